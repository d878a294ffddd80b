"""Notice cells that will never run, so a sweep ends instead of waiting forever for a lost node.

Ray retries a task whose node died, then queues it again; if no live node can run it (the only GPU node
is gone) it waits, silently, for ever.  Each tick the scheduler gives the watchdog what it knows - which
cells are unfinished, which are ready (their upstream cells finished), where each one last started and
the nodes Ray reports (``ray.nodes()``, dead ones included) - and the watchdog answers which cells to give
up on and why:

* **no live node can run it**: the cell is ready and waiting, and no single live node offers what it asks
  for (the check of :mod:`orchestrator.ray_cluster`); held for ``grace_s`` so that a node re-joining
  is not raced;
* **no progress**: nothing started or finished for ``stall_timeout_s`` and nothing is running on a live
  node; then every unfinished cell is given up (cells whose upstream never finished as ``skipped``).

The reasons name the lost node (address and id) where one was involved.  The watchdog is plain Python
(no Ray calls), so its rules are tested without a cluster.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.ray_cluster import describe_node, describe_request, fits, live_nodes


@dataclass
class Started:
    """Where a cell last started (reported by the task itself) and how many times it started."""

    attempt: int
    node_id: str
    node_ip: str | None = None
    hostname: str | None = None


@dataclass
class GiveUp:
    key: str
    status: str  # failed | skipped
    reason: str
    lost_node: dict[str, Any] | None = None  # the ray.nodes() entry of the node the cell was lost with


@dataclass
class Watchdog:
    stall_timeout_s: float
    grace_s: float = 5.0
    _last_progress: float | None = None
    _started_seen: dict[str, int] = field(default_factory=dict)
    _infeasible_since: dict[str, float] = field(default_factory=dict)

    def check(self, now: float, unfinished: list[str], ready: set[str], requests: dict[str, dict[str, float]],
              started: dict[str, Started], nodes: list[dict[str, Any]], finished_any: bool,
              upstream: dict[str, tuple[str, ...]]) -> list[GiveUp]:
        """Cells to give up on now (empty when the sweep is making progress or may still)."""
        by_id = {n.get("NodeID"): n for n in nodes}
        alive = live_nodes(nodes)
        dead = [n for n in nodes if not n.get("Alive")]
        running = {k for k in unfinished if k in started and by_id.get(started[k].node_id, {}).get("Alive")}
        new_start = any(self._started_seen.get(k) != s.attempt for k, s in started.items())
        self._started_seen = {k: s.attempt for k, s in started.items()}
        if self._last_progress is None or finished_any or new_start or running:
            self._last_progress = now

        out: list[GiveUp] = []
        for key in unfinished:
            if key not in ready or key in running:
                self._infeasible_since.pop(key, None)
                continue
            request = requests[key]
            if any(fits(n.get("Resources") or {}, request) for n in alive):
                self._infeasible_since.pop(key, None)
                continue
            since = self._infeasible_since.setdefault(key, now)
            if now - since >= self.grace_s:
                lost = self._lost_node(key, started, by_id, dead, request)
                where = f"; it was running on node {_name(lost)}, which was lost" if lost and key in started else (
                    f"; node {_name(lost)}, which could run it, was lost" if lost else "")
                out.append(GiveUp(key, "failed", f"no live Ray node can run this cell (it needs "
                                  f"{describe_request(request)}; live nodes: "
                                  f"{'; '.join(describe_node(n) for n in alive) or 'none'}){where}", lost))
        if out:
            return out
        if now - self._last_progress < self.stall_timeout_s:
            return []
        given: set[str] = set()
        for key in unfinished:
            lost = self._lost_node(key, started, by_id, dead, requests[key])
            if key in ready:
                reason = (f"no progress for {self.stall_timeout_s:g} s (cluster.stall_timeout_s): nothing "
                          f"started or finished and nothing ran on a live node; this cell was waiting for "
                          f"{describe_request(requests[key])}")
                if lost:
                    reason += f"; lost node: {_name(lost)}"
                out.append(GiveUp(key, "failed", reason, lost))
            else:
                waiting = [u for u in upstream.get(key, ()) if u in set(unfinished) or u in given]
                out.append(GiveUp(key, "skipped", f"upstream node(s) {', '.join(waiting)} did not finish: no "
                                  f"progress for {self.stall_timeout_s:g} s (cluster.stall_timeout_s)", lost))
            given.add(key)
        return out

    @staticmethod
    def _lost_node(key: str, started: dict[str, Started], by_id: dict[str, dict], dead: list[dict],
                   request: dict[str, float]) -> dict[str, Any] | None:
        """The dead node this cell last started on, else a dead node that could have run it."""
        if key in started:
            node = by_id.get(started[key].node_id)
            if node is not None and not node.get("Alive"):
                return node
        # Ray may report a dead node without its resources: then any dead node is the best answer we have
        return (next((n for n in dead if fits(n.get("Resources") or {}, request)), None)
                or next((n for n in dead if not n.get("Resources")), None))


def _name(node: dict[str, Any] | None) -> str:
    if node is None:
        return "?"
    return f"{node.get('NodeManagerAddress')} ({node.get('NodeManagerHostname')}, id {node.get('NodeID')})"
