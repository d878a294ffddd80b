"""Can this Ray cluster run the plan?  Checked per node, before anything is submitted.

Ray places a task on one node, so a request fits only when a *single* live node offers all of it: CPUs,
GPUs, the accelerator type (Ray's ``accelerator_type:<name>`` node resource), custom resources and memory.
Summing over the cluster (``ray.cluster_resources()``) lets a GPU on one node and an ``nvme`` resource on
another pass, and the task then waits forever; so every check here looks at nodes one by one.  The same
fit test tells the scheduler's watchdog which waiting cells no live node can run any more (a lost node).

:func:`probe_nodes` then runs a small task on every node that can run some kind of task and checks, from
that node, what a task there will use: the store (with the connection settings the tasks get), the
artifacts folder and a local store folder (that every node sees the *same* folder: a marker file written
by one must be visible to all), the MMLU folder on nodes that evaluate (every CSV of the chosen subjects read
as the evaluate cells will), and which stored artifacts exist.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterable

from orchestrator.validate import ConfigError

#: Ray's request for an accelerator type: this much of the ``accelerator_type:<name>`` node resource.
ACCELERATOR_FRACTION = 0.001


def task_request(options: dict[str, Any]) -> dict[str, float]:
    """The node resources a task with these Ray ``.options(...)`` needs, in Ray's resource names."""
    request: dict[str, float] = {"CPU": float(options.get("num_cpus") or 0)}
    if options.get("num_gpus"):
        request["GPU"] = float(options["num_gpus"])
    if options.get("accelerator_type"):
        request[f"accelerator_type:{options['accelerator_type']}"] = ACCELERATOR_FRACTION
    for name, amount in (options.get("resources") or {}).items():
        request[name] = float(amount)
    if options.get("memory"):
        request["memory"] = float(options["memory"])
    return request


def fits(offered: dict[str, float], request: dict[str, float]) -> bool:
    """Does one node's *total* resources cover the whole request (Ray's own tolerance for fractions)?"""
    return all(offered.get(name, 0.0) + 1e-9 >= amount for name, amount in request.items() if amount > 0)


def live_nodes(nodes: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in nodes if n.get("Alive")]


def _amount(name: str, value: float) -> str:
    if name in ("memory", "object_store_memory"):
        return f"{name} {value / 2**30:.1f} GiB"
    if name.startswith("accelerator_type:"):
        return name
    return f"{name} {value:g}"


def describe_request(request: dict[str, float]) -> str:
    return ", ".join(_amount(k, v) for k, v in request.items() if v > 0) or "nothing"


def describe_node(node: dict[str, Any]) -> str:
    """``127.0.0.1 (node 1a2b3c4d): CPU 2, GPU 1, accelerator_type:L40, memory 3.0 GiB``."""
    resources = node.get("Resources") or {}
    shown = [_amount(k, v) for k, v in sorted(resources.items())
             if not k.startswith("node:") and k != "object_store_memory"]
    return f"{node.get('NodeManagerAddress')} (node {str(node.get('NodeID'))[:8]}): {', '.join(shown) or 'no resources'}"


#: which config field asks for which part of a request
def _field_of(resource: str, cluster: dict[str, Any]) -> str:
    if resource == "CPU":
        return "cluster.cpus_per_task"
    if resource == "GPU":
        return "cluster.gpus_per_task"
    if resource == "memory":
        return "cluster.memory_per_task_gb"
    if resource.startswith("accelerator_type:"):
        return "cluster.accelerator_type"
    return f"cluster.resources.{resource}"


def check_requests_fit(kinds: dict[str, dict[str, Any]], nodes: list[dict[str, Any]],
                       cluster: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` unless every kind of task (``label -> Ray options``) fits one live node.

    The error names the field that asks for what no node has; when each part exists somewhere but no
    node has all of it, it says so and lists what every node offers.
    """
    alive = live_nodes(nodes)
    offers = "; ".join(describe_node(n) for n in alive) or "no live nodes"
    for label, options in kinds.items():
        request = task_request(options)
        if any(fits(n.get("Resources") or {}, request) for n in alive):
            continue
        for name, amount in request.items():
            if amount > 0 and not any(fits(n.get("Resources") or {}, {name: amount}) for n in alive):
                best = max(((n.get("Resources") or {}).get(name, 0.0) for n in alive), default=0.0)
                raise ConfigError(_field_of(name, cluster),
                                  f"{label} tasks ask for {_amount(name, amount)} but no live node of the Ray "
                                  f"cluster has that much (largest: {_amount(name, best)}); nodes: {offers}")
        raise ConfigError("cluster", f"{label} tasks ask for {describe_request(request)} on one node, but no "
                          f"single live node has all of it (Ray places a task on one node); nodes: {offers}")


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
