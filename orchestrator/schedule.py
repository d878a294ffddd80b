"""Run a plan on Ray: one task per node, dependencies as object refs, stored results reused.

GPU nodes ask for ``cluster.gpus_per_task`` GPUs plus the configured accelerator type and custom
resources, so they land only on matching nodes and each sees only its own GPU (Ray sets
CUDA_VISIBLE_DEVICES); they run in fresh worker processes (``max_calls=1``) so GPU memory and peak
memory readings never leak from one cell into the next.  Ray retries a task whose worker or node died
(``max_retries``); an exception inside a task is not retried - it is a result, recorded as a row.  When a
task is lost for good (retries spent, Ray's memory monitor killed it) the driver writes its row, and the
nodes below it are marked skipped.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.execute import execute_node, node_run_row, versions
from orchestrator.plan import Node, SweepPlan, node_key
from orchestrator.progress import SweepProgress
from orchestrator.schema import DATA_TABLES, SCHEMA_VERSION
from orchestrator.store import ResultStore
from orchestrator.validate import ConfigError

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


def _artifact_present(row: dict[str, Any]) -> bool:
    uri = row.get("artifact_uri")
    return uri is None or "://" in uri or Path(uri).exists()


def select_nodes_to_run(plan: SweepPlan, stored: dict[str, dict], rerun: str) -> tuple[list[Node], dict[str, dict]]:
    """Which nodes run now, and the stored summaries of those reused.

    rerun=none reuses every stored node; failed also re-runs failed/oom/skipped ones; all re-runs
    everything.  A stored node whose artifact vanished is re-run, and so is anything below a node that
    runs again unless its own stored result is ok (its rows do not depend on where the artifact lives).
    """
    to_run, reused = [], {}
    for node in plan.nodes.values():
        row = stored.get(node.key)
        again = (row is None or rerun == "all" or (rerun == "failed" and row["status"] != "ok")
                 or (row["status"] == "ok" and not _artifact_present(row)))
        if again:
            to_run.append(node)
        else:
            reused[node.key] = {**row, "kind": node.kind}
    return to_run, reused


def _init_ray(cluster: dict[str, Any]) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters here need no token auth
    runtime_env = dict(cluster.get("runtime_env") or {})
    # Quiet per-task progress bars; keep tokenizers from forking thread pools inside Ray workers.
    runtime_env["env_vars"] = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
                               "TRANSFORMERS_VERBOSITY": "error", **runtime_env.get("env_vars", {})}
    if cluster.get("address"):
        ray.init(address=cluster["address"], runtime_env=runtime_env or None,
                 log_to_driver=cluster.get("show_task_logs", False))
    else:
        ray.init(num_cpus=cluster.get("num_cpus"), num_gpus=cluster.get("num_gpus"),
                 include_dashboard=cluster.get("include_dashboard", False),
                 runtime_env=runtime_env or None, log_to_driver=cluster.get("show_task_logs", False))


def task_options(node: Node, cluster: dict[str, Any], cluster_gpus: float) -> dict[str, Any]:
    """Ray resource options of one node's task."""
    options: dict[str, Any] = {"num_cpus": cluster["cpus_per_task"], "max_retries": cluster["max_retries"],
                               "retry_exceptions": False}
    gpus = cluster.get("gpus_per_task")
    if gpus is None:
        gpus = 1 if cluster_gpus > 0 else 0
    if node.needs_gpu and gpus > 0:
        options["num_gpus"] = gpus
        if cluster.get("accelerator_type"):
            options["accelerator_type"] = cluster["accelerator_type"]
        if cluster.get("resources"):
            options["resources"] = dict(cluster["resources"])
    return options


def check_cluster_can_run(nodes: list[Node], cluster: dict[str, Any], resources: dict[str, float]) -> None:
    """Fail before submitting anything when GPU tasks would wait forever for resources no node has."""
    if not any(n.needs_gpu for n in nodes):
        return
    accelerators = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    gpus = cluster.get("gpus_per_task")
    if gpus and resources.get("GPU", 0) < gpus:
        raise ConfigError("cluster.gpus_per_task", f"{gpus} GPU(s) per task, but the Ray cluster has "
                          f"{resources.get('GPU', 0):g} GPUs", ("null (use GPUs when present)", 0))
    wanted = cluster.get("accelerator_type")
    if wanted and wanted not in accelerators:
        raise ConfigError("cluster.accelerator_type", f"no node of the Ray cluster has accelerator {wanted!r}",
                          accelerators + ["null (any GPU)"])
    for name, amount in (cluster.get("resources") or {}).items():
        if resources.get(name, 0) < amount:
            raise ConfigError(f"cluster.resources.{name}", f"the Ray cluster offers {resources.get(name, 0):g}",
                              sorted(k for k in resources if not k.startswith(("node:", "accelerator_type:"))))


def fresh_process(node: Node) -> bool:
    """Cells that load models run in a fresh worker (``max_calls=1``): clean GPU memory and memory peaks."""
    return node.kind in ("quantize", "evaluate", "profile")


def _remote_execute(node: Node, cfg: dict[str, Any], board: Any, *upstream: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task; upstream results arrive resolved (Ray waited for them)."""
    import ray
    import torch

    # As many compute threads as CPUs Ray gave this task: oversubscribed cores slow torch down 10x+.
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    return execute_node(node, list(upstream), cfg, on_start=lambda: board.started.remote(node.key))


def _progress_board() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Tasks report when they start, so the driver can show what is running, not just queued."""

        def __init__(self) -> None:
            self.running: set[str] = set()

        def started(self, key: str) -> None:
            self.running.add(key)

        def snapshot(self) -> set[str]:
            return set(self.running)

    return ProgressBoard.remote()


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


def _lost_task_row(node: Node, cfg: dict[str, Any], err: BaseException, status: str) -> dict[str, Any]:
    """Record a node Ray could not run (worker died after retries, killed by Ray's OOM monitor)."""
    now = datetime.now(timezone.utc)
    row = {**node_run_row(node, cfg, status, f"{type(err).__name__}: {str(err)[:3000]}"),
           "started_at": now, "finished_at": now}
    store = ResultStore(cfg["store"]["uri"])
    for table in DATA_TABLES:
        store.delete(table, node.key)  # rows a dying worker may have written before its runs row
    store.write("runs", node.key, [row])
    return {"node_key": node.key, "kind": node.kind, "status": status, "error": row["error"],
            "artifact_uri": None, "result_json": "{}"}


def _record_sweep(cfg: dict[str, Any], outcome: SweepOutcome, started: Any) -> None:
    """One ``runs`` row of kind ``sweep`` per (sweep name, config): what was asked for, as a whole.

    The report reads the experiment, the expected grid and the eval settings from it; its key depends
    only on the config, so a resumed sweep replaces its row instead of adding one.
    """
    described = {k: cfg[k] for k in ("experiment", "model", "methods", "backend", "cluster", "eval", "sweep")}
    described["methods"] = {m: cfg["methods"][m] for m in cfg["sweep"]["methods"]}
    statuses = [r["status"] for r in outcome.results.values()]
    summary = {"nodes": len(outcome.results), "ran": len(outcome.ran), "reused": len(outcome.reused),
               "wall_s": outcome.wall_s, **{s: statuses.count(s) for s in ("ok", "failed", "oom", "skipped")}}
    finished = datetime.now(timezone.utc)
    row = {"schema_version": SCHEMA_VERSION, "sweep_name": cfg["sweep"]["name"],
           "node_key": node_key("sweep", described, ()), "kind": "sweep", "status": "ok",
           "backend": cfg["backend"]["name"], "model": cfg["model"]["name"],
           "config_json": json.dumps(described, sort_keys=True, default=str),
           "result_json": json.dumps(summary, sort_keys=True), "hostname": socket.gethostname(),
           "started_at": started, "finished_at": finished, "duration_s": (finished - started).total_seconds(),
           "versions_json": json.dumps(versions(), sort_keys=True)}
    ResultStore(cfg["store"]["uri"]).write("runs", row["node_key"], [row])


def run_sweep(plan: SweepPlan, cfg: dict[str, Any]) -> SweepOutcome:
    started = datetime.now(timezone.utc)
    outcome = _run_nodes(plan, cfg)
    _record_sweep(cfg, outcome, started)
    return outcome


def _run_nodes(plan: SweepPlan, cfg: dict[str, Any]) -> SweepOutcome:
    start = time.perf_counter()
    store = ResultStore(cfg["store"]["uri"])
    stored = {k: v for k, v in store.finished_nodes().items() if v["kind"] != "sweep"}
    to_run, reused = select_nodes_to_run(plan, stored, cfg["sweep"]["rerun"])
    outcome = SweepOutcome(results=dict(reused), reused=set(reused), plan=plan)
    progress = SweepProgress(plan, reused)
    if not to_run:
        log.info("all %d nodes already in the store %s; nothing to run", len(plan.nodes), store.uri)
        outcome.wall_s = time.perf_counter() - start
        return outcome

    import ray
    from ray.exceptions import OutOfMemoryError, RayError

    _init_ray(cfg["cluster"])
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    check_cluster_can_run(to_run, cfg["cluster"], ray.cluster_resources())
    remotes = {True: ray.remote(max_calls=1)(_remote_execute), False: ray.remote(_remote_execute)}
    board = _progress_board()
    cfg_ref = ray.put(cfg)
    refs: dict[str, Any] = {}
    node_of_ref: dict[Any, Node] = {}
    for node in to_run:  # plan order is topological: upstream refs exist before their consumers
        upstream = [refs[k] if k in refs else outcome.results[k] for k in node.upstream]
        ref = remotes[fresh_process(node)].options(**task_options(node, cfg["cluster"], cluster_gpus),
                             name=f"quantsweep:{node.describe()}").remote(node, cfg_ref, board, *upstream)
        refs[node.key] = ref
        node_of_ref[ref] = node

    pending = list(node_of_ref)
    with progress.live():
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                node = node_of_ref[ref]
                try:
                    result = ray.get(ref)
                except OutOfMemoryError as err:
                    result = _lost_task_row(node, cfg, err, "oom")
                except RayError as err:
                    status = "skipped" if _upstream_lost(node, refs, outcome) else "failed"
                    result = _lost_task_row(node, cfg, err, status)
                outcome.results[node.key] = result
                outcome.ran.add(node.key)
                progress.finished(node.key, result["status"])
            try:
                progress.set_running(ray.get(board.snapshot.remote(), timeout=5))
            except RayError:
                pass
    outcome.wall_s = time.perf_counter() - start
    return outcome
