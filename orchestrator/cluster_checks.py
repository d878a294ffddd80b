"""What a task will find on each node of a running cluster, checked from there before anything is submitted.

The driver may not mount what the tasks use, so it asks the nodes: :func:`check_nodes` picks every live node
that can run some cell of the sweep (the per-node fit of :mod:`orchestrator.ray_cluster`), and
:func:`probe_nodes` runs a small task on each that checks, from that node, what a task there will use: the
store (with the connection settings the tasks get), the artifacts folder and a local store folder (that every
node sees the *same* folder: a marker file written by one must be visible to all), the MMLU folder on nodes
that evaluate (every CSV of the chosen subjects read as the evaluate cells will), and which stored artifacts
exist.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from orchestrator.plan import Node
from orchestrator.ray_cluster import describe_node, fits, live_nodes, task_kinds, task_options, task_request
from orchestrator.validate import ConfigError


def check_nodes(candidates: list[Node], artifacts: list[str], cfg: dict[str, Any]) -> dict[str, bool]:
    """Probe every live node that can run some of ``candidates`` (store, shared folders, MMLU on those that
    can evaluate) and return which of the stored ``artifacts`` the nodes see."""
    import ray

    cluster = cfg["cluster"]
    ray_nodes = live_nodes(ray.nodes())
    gpus = sum((n.get("Resources") or {}).get("GPU", 0) for n in ray_nodes)
    requests = [task_request(o) for o in task_kinds(candidates, cluster, gpus).values()]
    able = [n for n in ray_nodes if any(fits(n.get("Resources") or {}, r) for r in requests)]
    evaluate = [n for n in candidates if n.kind == "evaluate"]
    evaluate_request = (task_request(task_options(evaluate[0], cluster, gpus))
                        if evaluate and cfg["eval"].get("mmlu_dir") else None)
    evaluate_nodes = {n["NodeID"] for n in able
                      if evaluate_request and fits(n.get("Resources") or {}, evaluate_request)}
    return probe_nodes(able, cfg, evaluate_nodes, artifacts, driver_sees_store=True)


def _mmlu_problems(mmlu_dir: str, subjects: list[str]) -> list[tuple[str, str]]:
    """What an evaluate cell on this node would fail on: no test/ folder, a missing CSV of a chosen subject,
    or a row of one that is not a question, four choices and an answer letter (file and line named)."""
    from tasks.mmlu.data import MMLUDataError, check_subject_files, resolve_mmlu_dir

    if not (Path(mmlu_dir) / "test").is_dir():
        return [("eval.mmlu_dir", f"{mmlu_dir!r} has no test/ folder on this node")]
    try:
        check_subject_files(resolve_mmlu_dir(mmlu_dir, subjects or None), subjects)
    except (MMLUDataError, OSError) as err:  # OSError: a file there that this node cannot read
        return [("eval.mmlu_dir", str(err))]
    return []


def _probe(markers: list[str], store_uri: str | None, store_options: dict[str, Any], artifacts_dir: str,
           mmlu_dir: str | None, subjects: list[str], artifacts: list[str], phase: str,
           token: str) -> dict[str, Any]:
    """Runs on one node.  ``write``: check the store and folders and leave a marker in each shared folder,
    and read the chosen ``subjects`` of ``mmlu_dir`` (None: this node does not evaluate); ``read``: report
    which markers (of all nodes) this node sees, then which artifacts exist; ``clean``: remove this node's
    markers."""
    import ray

    from orchestrator.store import ResultStore

    node_id = ray.get_runtime_context().get_node_id()
    out: dict[str, Any] = {"node_id": node_id, "problems": [], "seen": [], "artifacts": {}}
    folders = [f for f in markers if f]
    if phase == "write":
        try:
            ResultStore(store_uri, store_options).check_writable()
        except Exception as err:  # noqa: BLE001 - reported with the field name by the driver
            out["problems"].append(("store.uri", f"cannot write to the store from this node: {err}"))
        for folder in folders:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                (Path(folder) / f".quantsweep-probe-{token}-{node_id}").write_text(node_id)
            except OSError as err:
                out["problems"].append((folder, f"cannot write to {folder!r} on this node: {err}"))
        if mmlu_dir is not None:
            out["problems"] += _mmlu_problems(mmlu_dir, subjects)
    elif phase == "clean":
        for folder in folders:
            (Path(folder) / f".quantsweep-probe-{token}-{node_id}").unlink(missing_ok=True)
    else:
        for folder in folders:
            prefix = f".quantsweep-probe-{token}-"
            try:
                out["seen"] += [(folder, p.name[len(prefix):]) for p in Path(folder).glob(prefix + "*")]
            except OSError:
                pass
        out["artifacts"] = {uri: os.path.exists(uri) for uri in artifacts}
    return out


def probe_nodes(nodes: list[dict[str, Any]], cfg: dict[str, Any], evaluate_nodes: set[str],
                artifacts: list[str], driver_sees_store: bool, timeout_s: float = 300.0) -> dict[str, bool]:
    """Check store, folders and MMLU from a task on each of ``nodes``; return which ``artifacts`` exist.

    ``evaluate_nodes`` are the node ids that can run evaluate cells (they need the MMLU folder).  A local
    store folder must be the same folder on every node *and* on the driver (which writes the sweep row and
    the rows of lost cells).  Raises :class:`ConfigError` naming the field and the node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    store = cfg["store"]
    local_store = "://" not in store["uri"]
    shared = {store["artifacts_dir"]: "store.artifacts_dir"}
    if local_store:
        shared[store["uri"]] = "store.uri"
    token = uuid.uuid4().hex[:12]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    by_id = {n["NodeID"]: n for n in nodes}

    def run(phase: str) -> list[dict[str, Any]]:
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                              name="quantsweep:check-node").remote(
                    list(shared), store["uri"], store.get("options") or {}, store["artifacts_dir"],
                    cfg["eval"].get("mmlu_dir") if node_id in evaluate_nodes else None,
                    list(cfg.get("subjects_resolved") or []), artifacts, phase, token)
                for node_id in by_id]
        return ray.get(refs, timeout=timeout_s)

    try:
        written = run("write")
        if local_store and driver_sees_store:  # the driver's own marker: it writes rows to this folder too
            (Path(store["uri"]) / f".quantsweep-probe-{token}-driver").write_text("driver")
        for result in written:
            for field, problem in result["problems"]:
                where = describe_node(by_id[result["node_id"]])
                raise ConfigError(shared.get(field, field), f"{problem} (node {where})")
        seen = run("read")
        for result in seen:
            visible = set(result["seen"])
            for folder, field in shared.items():
                writers = list(by_id) + (["driver"] if folder == store["uri"] and driver_sees_store else [])
                missing = [w for w in writers if (folder, w) not in visible]
                if missing:
                    who = ", ".join("the driver" if w == "driver" else by_id[w]["NodeManagerAddress"] + f" ({w[:8]})"
                                    for w in missing)
                    raise ConfigError(field, f"{folder!r} is not the same folder on every node: node "
                                      f"{describe_node(by_id[result['node_id']])} does not see files that {who} "
                                      "wrote there; use a filesystem every node mounts at this path "
                                      "(NFS, a shared volume) or an object store URI (s3://...)")
        present = {uri: all(r["artifacts"].get(uri, False) for r in seen) for uri in artifacts}
    finally:
        try:
            run("clean")
        except Exception:  # noqa: BLE001 - leftover dot-files are harmless (pyarrow and the store skip them)
            pass
        if local_store and driver_sees_store:
            (Path(store["uri"]) / f".quantsweep-probe-{token}-driver").unlink(missing_ok=True)
    return present
