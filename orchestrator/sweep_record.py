"""The rows the driver writes itself: the sweep's own ``runs`` row, and the rows of cells Ray lost.

Every other row is written by the task that ran the cell.  The sweep row (``kind = sweep``) says what the
sweep asked for, as a whole: written ``running`` once the pre-flight checks passed, replaced at the end
(``ok``, ``failed``, ``interrupted``).  A cell lost for good (retries spent, killed by Ray's memory monitor,
its node gone, no progress) gets a row from the driver that names where it last ran.  Values of
``cluster.runtime_env`` and of the forwarded store settings are never stored (:mod:`orchestrator.secrets`).
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from orchestrator import secrets
from orchestrator.execute import node_run_row, versions
from orchestrator.plan import Node, SweepPlan, node_key
from orchestrator.schema import DATA_TABLES, SCHEMA_VERSION
from orchestrator.store import ResultStore
from orchestrator.watchdog import Started


@dataclass
class SweepOutcome:
    """What a sweep did (what :func:`orchestrator.schedule.run_sweep` returns): every node's summary, run now
    or reused from the store; the final sweep row counts them."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # node_key -> summary
    reused: set[str] = field(default_factory=set)
    ran: set[str] = field(default_factory=set)
    wall_s: float = 0.0
    plan: SweepPlan | None = None

    @property
    def all_ok(self) -> bool:
        return all(r["status"] == "ok" for r in self.results.values())


def record_sweep(cfg: dict[str, Any], plan: SweepPlan, outcome: SweepOutcome | None, started: Any,
                 status: str) -> None:
    """One ``runs`` row of kind ``sweep`` per (sweep name, config): what was asked for, as a whole.

    The report reads the experiment, the expected grid, the eval settings and the sweep's node keys (a
    reused node keeps the sweep name it was first run under) from it.  It is written before any cell
    (``running``, once the pre-flight cluster checks have passed: a sweep refused by them writes nothing),
    so an interrupted sweep still says what it expected, and again at the end (``ok``, or
    ``failed`` when some cell did not succeed, ``interrupted``).  Its key depends only on the config (not
    on ``sweep.rerun``), so a resumed sweep replaces its row instead of adding one.
    """
    described = {k: cfg[k] for k in ("experiment", "model", "methods", "backend", "cluster", "eval", "sweep")}
    described["methods"] = {m: cfg["methods"][m] for m in cfg["sweep"]["methods"]}
    described = secrets.redact_config(described)  # runtime_env values (tokens, keys) are never stored
    # how the sweep reached the cluster is not what it asked for: not part of the row's key
    keyed = {**described, "cluster": {k: v for k, v in described["cluster"].items()
                                      if k not in ("runtime_env", "stall_timeout_s")},
             "sweep": {k: v for k, v in described["sweep"].items() if k != "rerun"}}
    summary: dict[str, Any] = {"nodes": len(plan.nodes), "node_keys": sorted(plan.nodes)}
    if outcome is not None:
        statuses = [r["status"] for r in outcome.results.values()]
        summary.update(ran=len(outcome.ran), reused=len(outcome.reused), wall_s=outcome.wall_s,
                       **{s: statuses.count(s) for s in ("ok", "failed", "oom", "skipped")})
    finished = datetime.now(timezone.utc)
    row = {"schema_version": SCHEMA_VERSION, "sweep_name": cfg["sweep"]["name"],
           "node_key": node_key("sweep", keyed, ()), "kind": "sweep", "status": status,
           "backend": cfg["backend"]["name"], "model": cfg["model"]["name"],
           "config_json": json.dumps(described, sort_keys=True, default=str),
           "result_json": json.dumps(summary, sort_keys=True), "hostname": socket.gethostname(),
           "started_at": started, "finished_at": finished, "duration_s": (finished - started).total_seconds(),
           "versions_json": json.dumps(versions(), sort_keys=True)}
    ResultStore.from_config(cfg["store"]).write("runs", row["node_key"], [row])


def lost_task_row(node: Node, cfg: dict[str, Any], err: BaseException | str, status: str,
                  started: Started | None = None, lost_node: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record a node Ray could not run (worker died after retries, killed by Ray's OOM monitor, its node
    lost, no progress); the row names where it last ran - or the lost node - and how often it started."""
    now = datetime.now(timezone.utc)
    error = err if isinstance(err, str) else f"{type(err).__name__}: {str(err)[:3000]}"
    where: dict[str, Any] = {"attempt": started.attempt if started else 0}
    if started is not None:
        where.update(ray_node_id=started.node_id, node_ip=started.node_ip, hostname=started.hostname)
    if lost_node is not None and started is not None and started.node_id == lost_node.get("NodeID"):
        where.update(ray_node_id=lost_node.get("NodeID"), node_ip=lost_node.get("NodeManagerAddress"),
                     hostname=lost_node.get("NodeManagerHostname"))
    row = {**node_run_row(node, cfg, status, error), **where, "started_at": now, "finished_at": now}
    store = ResultStore.from_config(cfg["store"])
    for table in DATA_TABLES:
        store.delete(table, node.key)  # rows a dying worker may have written before its runs row
    store.write("runs", node.key, [row])
    return {"node_key": node.key, "kind": node.kind, "status": status, "error": row["error"],
            "artifact_uri": None, "result_json": "{}"}
