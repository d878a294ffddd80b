"""The Ray cluster: reach it or start one, turn cells into Ray resource requests, check the requests against
its live nodes.

Reaching: ``ray.init`` retries an address nothing answers at for minutes, so :func:`init_ray` first asks the
head (``cluster.address``) for a TCP connection and a gRPC handshake, each within seconds.  The store's
connection settings from the driver's environment reach every task through the job's ``runtime_env``
(:mod:`orchestrator.secrets`; their values are never stored).

Requests: GPU cells ask for ``cluster.gpus_per_task`` GPUs plus the configured accelerator type and custom
resources, so they land only on matching nodes and each sees only its own GPU (Ray sets
CUDA_VISIBLE_DEVICES).  Cells that hold a GPU, and profile cells anywhere, run in fresh worker processes
(``max_calls=1``) so GPU memory and peak memory readings never leak from one cell into the next; the other
CPU cells reuse warm workers, as Ray does by default, and pay the 5-7 s of importing torch, transformers,
lm-eval and compressed-tensors once per worker instead of per cell.  Ray retries a task whose worker or node
died (``cluster.max_retries``); an exception inside a task is not retried - it is a result, recorded as a row.

Checks: Ray places a task on one node, so a request fits only when a *single* live node offers all of it:
CPUs, GPUs, the accelerator type (Ray's ``accelerator_type:<name>`` node resource), custom resources and
memory.  Summing over the cluster (``ray.cluster_resources()``) lets a GPU on one node and an ``nvme``
resource on another pass, and the task then waits forever; so every check here looks at nodes one by one,
before anything is submitted.  The same fit test tells the scheduler's watchdog which waiting cells no live
node can run any more (a lost node).  What a task will find on each node (store, shared folders, MMLU) is
checked from there by :mod:`orchestrator.cluster_checks`.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any, Iterable

from orchestrator import secrets
from orchestrator.plan import Node
from orchestrator.validate import ConfigError

#: seconds the driver waits for a cluster's head to accept a TCP connection, then again for its gRPC
#: handshake; Ray's own connect retries an unreachable address for minutes
CONNECT_TIMEOUT_S = 5.0

#: what a user reads whenever ``cluster.address`` leads nowhere
START_RAY = ("start Ray on the head node with `ray start --head --port=6379` (and `ray start "
             "--address=<head>:6379` on the others), then pass cluster.address=<head>:6379, or "
             "cluster.address=auto on the head node; without a cluster, cluster=local starts Ray on this machine")


def _reach_cluster(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`ConfigError` on ``cluster.address`` unless a Ray head answers there within seconds.

    Why: ``ray.init`` retries an address nothing answers at for minutes, or ends after half a minute with
    a traceback; a typo in the address must cost seconds and say what was tried.  ``auto`` is looked up the
    way ``ray.init`` does (``RAY_ADDRESS``, then the last ``ray start`` on this machine), and a loopback
    address becomes the address Ray itself will use.  The head must accept a TCP connection and then
    answer the gRPC handshake (a port that accepts and never speaks, or a firewall that drops, fails it).
    """
    import grpc
    from ray._private import services

    try:
        gcs = services.canonicalize_bootstrap_address(address.removeprefix("ray://"))
    except ConnectionError as err:  # auto, and neither RAY_ADDRESS nor a Ray started on this machine
        raise ConfigError("cluster.address", f"{address!r} found no running Ray instance: it looks for one "
                          f"started on this machine (`ray start`) or named by RAY_ADDRESS; {START_RAY}") from err
    except ValueError as err:
        raise ConfigError("cluster.address", f"{address!r} is not host:port ({err}); {START_RAY}") from err
    if gcs is None:  # "local": ray.init starts an instance of its own
        return
    host, port = services.parse_address(gcs)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:  # refused, timed out, no route, unknown host
        shown = f"{gcs} (from {address!r})" if gcs != address else gcs
        raise ConfigError("cluster.address", f"cannot reach the Ray cluster at {shown}: a TCP connection to "
                          f"its head (GCS) failed within {timeout_s:g} s: {err or type(err).__name__}; "
                          f"{START_RAY}") from err
    try:
        from ray._private.grpc_utils import init_grpc_channel  # Ray's channel: TLS and token auth as set
    except ImportError:  # another Ray release: a plain channel tells a gRPC server from a silent port too
        init_grpc_channel = grpc.insecure_channel
    channel = init_grpc_channel(gcs)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError as err:
        raise ConfigError("cluster.address", f"{gcs} accepts connections but did not answer as a Ray head "
                          f"node (GCS, gRPC) within {timeout_s:g} s: is it the port `ray start --head` "
                          f"printed (default 6379)? {START_RAY}") from err
    finally:
        channel.close()


def init_ray(cluster: dict[str, Any]) -> None:
    """Join the cluster at ``cluster.address`` (once a head answers there) or start a local instance; a
    no-op when Ray is up already."""
    import ray

    if ray.is_initialized():
        return
    if not cluster.get("address"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance on this machine needs no token
    else:
        _reach_cluster(cluster["address"])
    runtime_env = dict(cluster.get("runtime_env") or {})
    # Quiet per-task progress bars; keep tokenizers from forking thread pools inside Ray workers.  The
    # store's connection settings (credentials, endpoint, region) set on the driver reach every task, on
    # every node, the way the driver's checks saw them; cluster.runtime_env can still override each one.
    runtime_env["env_vars"] = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
                               "TRANSFORMERS_VERBOSITY": "error", **secrets.store_env(),
                               **runtime_env.get("env_vars", {})}
    if cluster.get("address"):
        try:
            ray.init(address=cluster["address"], runtime_env=runtime_env or None,
                     log_to_driver=cluster.get("show_task_logs", False))
        except ConnectionError as err:  # the head answered the probe, then Ray's own connect failed
            raise ConfigError("cluster.address", f"Ray could not connect to {cluster['address']!r}: {err}; "
                              f"{START_RAY}") from err
    else:
        ray.init(num_cpus=cluster.get("num_cpus"), num_gpus=cluster.get("num_gpus"),
                 include_dashboard=cluster.get("include_dashboard", False),
                 runtime_env=runtime_env or None, log_to_driver=cluster.get("show_task_logs", False))
    interrupt_on_sigterm()


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, Slurm, Kubernetes, ``kill``) take Ctrl-C's path: cells cancelled, the
    sweep row marked interrupted, exit 130 with the resume hint, instead of Ray's abort (exit 134).

    Called again after ``ray.init``, whose core worker installs a SIGTERM handler of its own.
    """
    import signal
    import threading

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


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
    if cluster.get("memory_per_task_gb"):
        options["memory"] = int(cluster["memory_per_task_gb"] * 2**30)
    return options


def fresh_process(node: Node, options: dict[str, Any]) -> bool:
    """A fresh worker (``max_calls=1``) for every cell that holds a GPU (a clean CUDA context and GPU memory)
    and for profile cells (their peak-memory reading must be the cell's alone, RSS on a CPU); CPU cells that
    measure no memory reuse warm workers, whose imports are most of a small cell's time."""
    return node.kind == "profile" or bool(options.get("num_gpus"))


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


def task_kinds(nodes: list[Node], cluster: dict[str, Any], cluster_gpus: float) -> dict[str, dict[str, Any]]:
    """The distinct Ray requests among ``nodes``, labelled by the node kinds that make them."""
    groups: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for node in nodes:
        options = task_options(node, cluster, cluster_gpus)
        key = json.dumps(task_request(options), sort_keys=True)
        kinds, _ = groups.setdefault(key, ([], options))
        if node.kind not in kinds:
            kinds.append(node.kind)
    return {f"{'GPU' if o.get('num_gpus') else 'CPU'} ({', '.join(k)})": o for k, o in groups.values()}


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


def check_cluster_can_run(nodes: list[Node], cluster: dict[str, Any], ray_nodes: list[dict[str, Any]],
                          backend: dict[str, Any] | None = None) -> None:
    """Fail before submitting anything when some kind of task fits no single live node (it would wait
    forever), or when ``backend`` needs a GPU that its GPU cells will not get (they would fail one by one)."""
    live = live_nodes(ray_nodes)
    gpus = sum((n.get("Resources") or {}).get("GPU", 0) for n in live)
    if backend is not None and any(n.needs_gpu for n in nodes):
        _check_gpu_backend(backend, cluster, live, gpus)
    wanted = cluster.get("accelerator_type")
    if wanted and gpus == 0 and not cluster.get("gpus_per_task") and any(n.needs_gpu for n in nodes):
        # asked for by name: never fall back to the CPU, as GPU cells on a cluster without GPUs otherwise
        # would (with GPUs, check_requests_fit below names what each node offers)
        offered = sorted({k.split(":", 1)[1] for n in live for k in (n.get("Resources") or {})
                          if k.startswith("accelerator_type:")})
        if wanted not in offered:
            raise ConfigError("cluster.accelerator_type", f"no node of the Ray cluster has accelerator {wanted!r}",
                              offered + ["null (any GPU)"])
    check_requests_fit(task_kinds(nodes, cluster, gpus), ray_nodes, cluster)


def _check_gpu_backend(backend: dict[str, Any], cluster: dict[str, Any], live: list[dict[str, Any]],
                       gpus: float) -> None:
    """``backend.device=cuda`` and TensorRT-LLM (GPU only) need a GPU in every GPU cell; without GPUs on the
    cluster, or with ``cluster.gpus_per_task=0``, those cells would run on CPUs and fail one by one after
    the model cell (or skip below it), so the sweep is refused here, naming the option that needs a GPU."""
    per_task = cluster.get("gpus_per_task")
    if per_task is None:
        per_task = 1 if gpus > 0 else 0
    if per_task > 0:
        return  # the GPU request itself is checked against the nodes by check_requests_fit
    if backend["name"] == "tensorrt_llm":
        field, problem, allowed = "backend.name", "tensorrt_llm runs on GPUs only", ["torch"]
    elif backend["device"] == "cuda":
        field, problem, allowed = "backend.device", "cuda", ["auto", "cpu"]
    else:
        return  # auto: GPU cells run on the CPU
    if gpus == 0:
        offers = "; ".join(describe_node(n) for n in live) or "no live nodes"
        raise ConfigError(field, f"{problem}, but no live node of the Ray cluster has a GPU, so its GPU cells "
                          f"would run on CPUs and fail; add GPU nodes or change {field}; nodes: {offers}", allowed)
    raise ConfigError(field, f"{problem}, but cluster.gpus_per_task=0 gives its GPU cells no GPU; set "
                      f"cluster.gpus_per_task >= 1 (or null) or change {field}", allowed)
