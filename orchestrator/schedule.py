"""Run a plan on Ray: one task per node, dependencies as object refs, stored results reused.

One sweep, in order: read what the store holds; on a running cluster, join it and ask its nodes which stored
artifacts they see (:mod:`orchestrator.cluster_checks`); choose the nodes to run; start Ray where no cluster
was named and check each kind of task against single live nodes (:mod:`orchestrator.ray_cluster`); write the
sweep row ``running``; submit every node and collect results as they
come; write the sweep row again at the end.

An exception inside a task is not retried - it is a result, recorded as a row by the task.  When Ray loses
a task for good (retries spent, Ray's memory monitor killed it) the driver writes its row, and the nodes
below it are marked skipped.  A sweep never waits silently: while it runs, a watchdog gives up on cells no
live node can run any more or that made no progress for ``cluster.stall_timeout_s``
(:mod:`orchestrator.watchdog`), recording them as rows, so the sweep ends (exit 3) and a rerun of the same
command resumes it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from orchestrator import cluster_checks, secrets
from orchestrator.execute import execute_node, node_run_row, versions
from orchestrator.plan import Node, SweepPlan, node_key
from orchestrator.progress import SweepProgress
from orchestrator.ray_cluster import (check_cluster_can_run, fresh_process, init_ray, live_nodes, task_options,
                                      task_request)
from orchestrator.schema import DATA_TABLES, KIND_TABLES, SCHEMA_VERSION
from orchestrator.store import ResultStore
from orchestrator.watchdog import GiveUp, Started, Watchdog

log = logging.getLogger("quantsweep")


@dataclass
class SweepOutcome:
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # node_key -> summary
    reused: set[str] = field(default_factory=set)
    ran: set[str] = field(default_factory=set)
    wall_s: float = 0.0
    plan: SweepPlan | None = None

    @property
    def all_ok(self) -> bool:
        return all(r["status"] == "ok" for r in self.results.values())


#: seconds between the watchdog's looks at the cluster (ray.nodes() is one GCS call)
WATCH_PERIOD_S = 2.0


def _artifact_present(row: dict[str, Any], seen_by_nodes: dict[str, bool] | None = None) -> bool:
    """Is a stored node's artifact still there?  On a running cluster the nodes answer (the driver may not
    mount the shared folder); on a local instance the driver's own view is the nodes' view."""
    uri = row.get("artifact_uri")
    if uri is None or "://" in uri:
        return True
    if seen_by_nodes is not None and uri in seen_by_nodes:
        return seen_by_nodes[uri]
    return Path(uri).exists()


def select_nodes_to_run(plan: SweepPlan, stored: dict[str, dict], rerun: str,
                        seen_by_nodes: dict[str, bool] | None = None,
                        data_keys: dict[str, set[str]] | None = None) -> tuple[list[Node], dict[str, dict]]:
    """Which nodes run now, and the stored summaries of those reused.

    rerun=none reuses every stored node; failed also re-runs failed/oom/skipped ones; all re-runs
    everything.  A stored node whose artifact vanished is re-run, and so is anything below a node that
    runs again unless its own stored result is ok (its rows do not depend on where the artifact lives).
    An ``ok`` node whose data files are missing (``data_keys``: table -> nodes with a file there) is re-run
    too: a worker that outlived its lost node can commit ``ok`` after the driver cleared its rows.
    """
    def data_missing(node: Node) -> bool:
        return data_keys is not None and any(node.key not in data_keys.get(t, set())
                                             for t in KIND_TABLES.get(node.kind, ()))

    to_run, reused = [], {}
    for node in plan.nodes.values():
        row = stored.get(node.key)
        again = (row is None or rerun == "all" or (rerun == "failed" and row["status"] != "ok")
                 or (row["status"] == "ok" and (not _artifact_present(row, seen_by_nodes) or data_missing(node))))
        if again:
            to_run.append(node)
        else:
            reused[node.key] = {**row, "kind": node.kind}
    return to_run, reused


def _seen_by_nodes(plan: SweepPlan, stored: dict[str, dict], cfg: dict[str, Any]) -> dict[str, bool]:
    """On a running cluster: the nodes that can run some task of this sweep (any whose artifact may be
    gone) check the store, the shared folders and MMLU, and say which stored artifacts they see."""
    candidates, _ = select_nodes_to_run(plan, stored, cfg["sweep"]["rerun"], seen_by_nodes={
        row["artifact_uri"]: False for row in stored.values() if row.get("artifact_uri")})
    if not candidates:
        return {}
    artifacts = sorted({row["artifact_uri"] for key, row in stored.items()
                        if key in plan.nodes and row.get("artifact_uri") and "://" not in row["artifact_uri"]})
    return cluster_checks.check_nodes(candidates, artifacts, cfg)


def _remote_execute(node: Node, cfg: dict[str, Any], board: Any, *upstream: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task; upstream results arrive resolved (Ray waited for them)."""
    import ray
    import torch

    # As many compute threads as CPUs Ray gave this task: oversubscribed cores slow torch down 10x+.
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))

    def started() -> int | None:
        """Tell the driver where this attempt runs; the answer is the attempt number (Ray's retries + 1)."""
        try:
            return ray.get(board.started.remote(node.key, ray.get_runtime_context().get_node_id(),
                                                ray.util.get_node_ip_address(), socket.gethostname()), timeout=60)
        except Exception:  # noqa: BLE001 - progress display only; the cell itself goes on
            return None

    return execute_node(node, list(upstream), cfg, on_start=started)


def _progress_board() -> Any:
    import ray

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Tasks report when and where each attempt starts: the driver shows what runs, counts attempts,
        and knows which cells a lost node took with it."""

        def __init__(self) -> None:
            self.started_at: dict[str, tuple[int, str, str, str]] = {}

        def started(self, key: str, node_id: str, node_ip: str, hostname: str) -> int:
            attempt = self.started_at.get(key, (0,))[0] + 1
            self.started_at[key] = (attempt, node_id, node_ip, hostname)
            return attempt

        def snapshot(self) -> dict[str, tuple[int, str, str, str]]:
            return dict(self.started_at)

    # On the driver's node: the board must outlive any worker node the sweep may lose.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ProgressBoard.options(scheduling_strategy=here).remote()


def _upstream_lost(node: Node, refs: dict[str, Any], outcome: SweepOutcome) -> bool:
    """Did ``node`` fail only because Ray lost one of its upstream tasks (its error is the upstream's)?"""
    import ray

    for key in node.upstream:
        if key in outcome.results:
            if outcome.results[key]["status"] != "ok":
                return True
        elif key in refs:
            try:  # a downstream task fails on its inputs only after they failed: this returns at once
                ray.get(refs[key], timeout=0)
            except Exception:  # noqa: BLE001 - any error of the upstream task means the same here
                return True
    return False


def _lost_task_row(node: Node, cfg: dict[str, Any], err: BaseException | str, status: str,
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


def _record_sweep(cfg: dict[str, Any], plan: SweepPlan, outcome: SweepOutcome | None, started: Any,
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



def run_sweep(plan: SweepPlan, cfg: dict[str, Any]) -> SweepOutcome:
    started = datetime.now(timezone.utc)
    recorded: list[bool] = []

    def record_start() -> None:
        _record_sweep(cfg, plan, None, started, "running")
        recorded.append(True)

    try:
        outcome = _run_nodes(plan, cfg, on_submit=record_start)
    except BaseException:  # Ctrl-C, SIGTERM, a lost cluster: the row must not go on saying "running"
        if recorded:
            try:
                _record_sweep(cfg, plan, None, started, "interrupted")
            except Exception as exc:  # the store may be what failed; the original error is the one to show
                log.warning("could not mark the sweep row interrupted: %s", exc)
        raise
    _record_sweep(cfg, plan, outcome, started, "ok" if outcome.all_ok else "failed")
    return outcome


def _run_nodes(plan: SweepPlan, cfg: dict[str, Any], on_submit: Callable[[], None] = lambda: None) -> SweepOutcome:
    """Run what the store lacks; ``on_submit`` is called once the checks passed, before the first task."""
    start = time.perf_counter()
    store = ResultStore.from_config(cfg["store"])
    stored = {k: v for k, v in store.finished_nodes().items() if v["kind"] != "sweep"}
    seen_by_nodes = None
    if cfg["cluster"].get("address"):  # a running cluster: its nodes, not the driver, say what they see
        init_ray(cfg["cluster"])
        seen_by_nodes = _seen_by_nodes(plan, stored, cfg)
    data_keys = {table: store.node_keys(table) for table in DATA_TABLES}
    to_run, reused = select_nodes_to_run(plan, stored, cfg["sweep"]["rerun"], seen_by_nodes, data_keys)
    outcome = SweepOutcome(results=dict(reused), reused=set(reused), plan=plan)
    progress = SweepProgress(plan, reused)
    if not to_run:
        log.info("all %d nodes already in the store %s; nothing to run", len(plan.nodes), store.uri)
        outcome.wall_s = time.perf_counter() - start
        return outcome

    import ray

    init_ray(cfg["cluster"])
    ray_nodes = ray.nodes()
    cluster_gpus = sum((n.get("Resources") or {}).get("GPU", 0) for n in live_nodes(ray_nodes))
    check_cluster_can_run(to_run, cfg["cluster"], ray_nodes, cfg["backend"])
    on_submit()
    remotes = {True: ray.remote(max_calls=1)(_remote_execute), False: ray.remote(_remote_execute)}
    board = _progress_board()
    cfg_ref = ray.put(cfg)
    refs: dict[str, Any] = {}
    node_of_ref: dict[Any, Node] = {}
    requests: dict[str, dict[str, float]] = {}
    for node in to_run:  # plan order is topological: upstream refs exist before their consumers
        upstream = [refs[k] if k in refs else outcome.results[k] for k in node.upstream]
        options = task_options(node, cfg["cluster"], cluster_gpus)
        requests[node.key] = task_request(options)
        ref = remotes[fresh_process(node)].options(**options, name=f"quantsweep:{node.describe()}").remote(
            node, cfg_ref, board, *upstream)
        refs[node.key] = ref
        node_of_ref[ref] = node
    try:
        with progress.live():
            _watch(plan, cfg, refs, node_of_ref, requests, board, outcome, progress)
    except KeyboardInterrupt:
        for ref in refs.values():  # stop what runs and what waits; the finished cells are in the store
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    outcome.wall_s = time.perf_counter() - start
    return outcome


def _watch(plan: SweepPlan, cfg: dict[str, Any], refs: dict[str, Any], node_of_ref: dict[Any, Node],
           requests: dict[str, dict[str, float]], board: Any, outcome: SweepOutcome,
           progress: SweepProgress) -> None:
    """Collect results as they come; give up (as rows) on cells the watchdog says will never run."""
    import ray
    from ray.exceptions import OutOfMemoryError, RayError

    watchdog = Watchdog(stall_timeout_s=float(cfg["cluster"].get("stall_timeout_s") or 600.0))
    pending = list(node_of_ref)
    started: dict[str, Started] = {}
    finished_since_look, next_look = False, time.monotonic() + WATCH_PERIOD_S
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        for ref in done:
            node = node_of_ref[ref]
            try:
                result = ray.get(ref)
            except OutOfMemoryError as err:
                result = _lost_task_row(node, cfg, err, "oom", started.get(node.key))
            except RayError as err:
                status = "skipped" if _upstream_lost(node, refs, outcome) else "failed"
                result = _lost_task_row(node, cfg, err, status, started.get(node.key))
            outcome.results[node.key] = result
            outcome.ran.add(node.key)
            progress.finished(node.key, result["status"])
            finished_since_look = True
        try:
            started = {k: Started(*v) for k, v in ray.get(board.snapshot.remote(), timeout=5).items()}
            progress.set_running(set(started))
        except RayError:
            pass
        if time.monotonic() < next_look or not pending:
            continue
        unfinished = [node_of_ref[r].key for r in pending]
        ready = {k for k in unfinished if all(u in outcome.results for u in plan.nodes[k].upstream)}
        verdicts = watchdog.check(time.monotonic(), unfinished, ready, requests, started, ray.nodes(),
                                  finished_since_look, {k: plan.nodes[k].upstream for k in unfinished})
        finished_since_look, next_look = False, time.monotonic() + WATCH_PERIOD_S
        given_up = {v.key for v in verdicts}
        for verdict in verdicts:
            _give_up(plan.nodes[verdict.key], verdict, cfg, started, outcome, progress)
        for ref in [r for r in pending if node_of_ref[r].key in given_up]:
            pending.remove(ref)
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)


def _give_up(node: Node, verdict: GiveUp, cfg: dict[str, Any], started: dict[str, Started],
             outcome: SweepOutcome, progress: SweepProgress) -> None:
    """Record a cell the watchdog gave up on; below a cell that did not succeed it is ``skipped``."""
    status = verdict.status
    blocked = [u for u in node.upstream if u in outcome.results and outcome.results[u]["status"] != "ok"]
    reason = verdict.reason
    if blocked and status == "failed":
        status = "skipped"
        reason = f"upstream node(s) {', '.join(blocked)} did not succeed; {reason}"
    log.warning("giving up on %s: %s", node.describe(), reason)
    result = _lost_task_row(node, cfg, reason, status, started.get(node.key), verdict.lost_node)
    outcome.results[node.key] = result
    outcome.ran.add(node.key)
    progress.finished(node.key, status)
