"""Run a plan on Ray: one task per node, dependencies as object refs, stored results reused.

One sweep, in order: read what the store holds; on a running cluster, join it and ask its nodes which stored
artifacts they see (:mod:`orchestrator.cluster_checks`); choose the nodes to run; start Ray where no cluster
was named and check each kind of task against single live nodes (:mod:`orchestrator.ray_cluster`); write the
sweep row ``running`` (:mod:`orchestrator.sweep_record`); submit every node and collect results as they
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
import logging
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from orchestrator import cluster_checks
from orchestrator.execute import execute_node
from orchestrator.plan import Node, SweepPlan
from orchestrator.progress import SweepProgress
from orchestrator.ray_cluster import (check_cluster_can_run, fresh_process, init_ray, live_nodes, task_options,
                                      task_request)
from orchestrator.schema import DATA_TABLES, KIND_TABLES
from orchestrator.store import ResultStore
from orchestrator.sweep_record import SweepOutcome, lost_task_row, record_sweep
from orchestrator.watchdog import GiveUp, Started, Watchdog

log = logging.getLogger("quantsweep")

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


def stored_nodes(store: ResultStore) -> dict[str, dict]:
    """The store's finished nodes (node_key -> runs row), the sweeps' own rows left out."""
    return {k: v for k, v in store.finished_nodes().items() if v["kind"] != "sweep"}


def nodes_from_store(plan: SweepPlan, cfg: dict[str, Any], store: ResultStore, stored: dict[str, dict],
                     seen_by_nodes: dict[str, bool] | None = None) -> tuple[list[Node], dict[str, dict]]:
    """:func:`select_nodes_to_run` against ``store``: which nodes run now, the summaries of those reused."""
    data_keys = {table: store.node_keys(table) for table in DATA_TABLES}
    return select_nodes_to_run(plan, stored, cfg["sweep"]["rerun"], seen_by_nodes, data_keys)


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


def run_sweep(plan: SweepPlan, cfg: dict[str, Any]) -> SweepOutcome:
    started = datetime.now(timezone.utc)
    recorded: list[bool] = []

    def record_start() -> None:
        record_sweep(cfg, plan, None, started, "running")
        recorded.append(True)

    try:
        outcome = _run_nodes(plan, cfg, on_submit=record_start)
    except BaseException:  # Ctrl-C, SIGTERM, a lost cluster: the row must not go on saying "running"
        if recorded:
            try:
                record_sweep(cfg, plan, None, started, "interrupted")
            except Exception as exc:  # the store may be what failed; the original error is the one to show
                log.warning("could not mark the sweep row interrupted: %s", exc)
        raise
    record_sweep(cfg, plan, outcome, started, "ok" if outcome.all_ok else "failed")
    return outcome


def _run_nodes(plan: SweepPlan, cfg: dict[str, Any], on_submit: Callable[[], None] = lambda: None) -> SweepOutcome:
    """Run what the store lacks; ``on_submit`` is called once the checks passed, before the first task."""
    start = time.perf_counter()
    store = ResultStore.from_config(cfg["store"])
    stored = stored_nodes(store)
    seen_by_nodes = None
    if cfg["cluster"].get("address"):  # a running cluster: its nodes, not the driver, say what they see
        init_ray(cfg["cluster"])
        seen_by_nodes = _seen_by_nodes(plan, stored, cfg)
    to_run, reused = nodes_from_store(plan, cfg, store, stored, seen_by_nodes)
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
        ref = remotes[fresh_process(node, options)].options(**options, name=f"quantsweep:{node.describe()}").remote(
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
                result = lost_task_row(node, cfg, err, "oom", started.get(node.key))
            except RayError as err:
                status = "skipped" if _upstream_lost(node, refs, outcome) else "failed"
                result = lost_task_row(node, cfg, err, status, started.get(node.key))
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
    result = lost_task_row(node, cfg, reason, status, started.get(node.key), verdict.lost_node)
    outcome.results[node.key] = result
    outcome.ran.add(node.key)
    progress.finished(node.key, status)
