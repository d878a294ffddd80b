"""Run one node of the plan in the current process and commit its rows to the store.

This is the only place that knows how a node kind maps onto a task function; it is plain Python (the
scheduler wraps it in a Ray task, tests may call it directly).  Whatever happens inside the task - an
exception, an out-of-memory error - ends as a ``runs`` row with a status, so a sweep never loses a cell.
Artifacts are written to a temporary folder and renamed into place, like store files.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import traceback
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from orchestrator.plan import Node
from orchestrator.schema import DATA_TABLES, SCHEMA_VERSION
from orchestrator.store import ResultStore

_VERSIONED = ("quantsweep", "torch", "transformers", "lm_eval", "ray", "pyarrow", "hydra-core",
              "llmcompressor", "compressed-tensors", "nvidia-ml-py", "tensorrt_llm")


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA OOM, Python MemoryError, or the CPU allocator refusing a huge tensor."""
    import torch

    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "not enough memory"))


def _unsupported(err: BaseException) -> bool:
    """The engine cannot do what the cell asks (a ``skipped`` row saying why, not a failure)."""
    from tasks.backends.base import Unsupported

    return isinstance(err, Unsupported)


def task_device(cfg: dict[str, Any], node: Node) -> str:
    """The device a node computes on: its Ray-assigned GPU (always cuda:0 inside the task) or the CPU."""
    import torch

    wanted = cfg["backend"]["device"]
    if not node.needs_gpu or wanted == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda:0"
    if wanted == "cuda":
        raise RuntimeError("backend.device=cuda but this task sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return "cpu"


class _Artifact:
    """A folder written under a temporary name and renamed into ``final`` on success."""

    def __init__(self, artifacts_dir: str, kind: str, key: str):
        self.final = Path(artifacts_dir) / kind / key
        # what an earlier attempt of this node left when its process was killed (a 7B checkpoint is GBs);
        # the node runs again only because that attempt never committed
        for stale in (Path(artifacts_dir) / kind).glob(f".tmp-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(artifacts_dir) / kind / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)

    def keep(self, path: str | Path) -> str:
        """Commit the folder if the task wrote its result there; else the task pointed elsewhere."""
        if Path(path).resolve() != self.tmp.resolve():
            return str(path)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return str(self.final)


@contextlib.contextmanager
def _artifact(cfg: dict, kind: str, key: str) -> Iterator[_Artifact]:
    """Whatever the task left uncommitted (a failure, a pass-through) is removed."""
    artifact = _Artifact(cfg["store"]["artifacts_dir"], kind, key)
    try:
        yield artifact
    finally:
        shutil.rmtree(artifact.tmp, ignore_errors=True)


def _labels(node: Node) -> dict[str, Any]:
    return {k: node.labels.get(k) for k in ("model", "method", "backend")}


def _run_model(node: Node, upstream: list[dict], cfg: dict, device: str) -> tuple[dict, str, dict]:
    from tasks.models import prepare_model

    with _artifact(cfg, "model", node.key) as artifact:
        result = prepare_model(node.config["model"], artifact.tmp, device)
        result["checkpoint_dir"] = artifact.keep(result["checkpoint_dir"])
    return result, result["checkpoint_dir"], {}


def _run_quantize(node: Node, upstream: list[dict], cfg: dict, device: str) -> tuple[dict, str, dict]:
    from tasks.quantize import quantize

    method = node.config["method"]
    if method["algorithm"] == "fp8" and cfg["backend"]["name"] == "tensorrt_llm":
        # There FP8 is quantized by ModelOpt at build time, from the fp checkpoint; the torch backend runs
        # llm-compressor's FP8_DYNAMIC checkpoint (tasks.quantize).
        method = {**method, "algorithm": "none", "bits": 16}
    with _artifact(cfg, "quantize", node.key) as artifact:
        result = quantize(Path(upstream[0]["artifact_uri"]), artifact.tmp, method, seed=node.config["seed"])
        result["checkpoint_dir"] = artifact.keep(result["checkpoint_dir"])
    return result, result["checkpoint_dir"], {}


def _run_build(node: Node, upstream: list[dict], cfg: dict, device: str) -> tuple[dict, str, dict]:
    from tasks.backends import get_backend
    from tasks.backends.base import EngineShape

    backend = get_backend(node.config["backend"])
    with _artifact(cfg, "build", node.key) as artifact:
        result = backend.build(Path(upstream[0]["artifact_uri"]), artifact.tmp,
                               EngineShape(**node.config["shape"]) if node.config["shape"] else None,
                               node.config["method"],
                               node.config["options"])
        engine_dir = artifact.keep(artifact.tmp)
    return result, engine_dir, {}


def _load_engine(node: Node, upstream: list[dict], cfg: dict, device: str,
                 extra: dict[str, Any] | None = None) -> Any:
    from tasks.backends import get_backend

    return get_backend(cfg["backend"]["name"]).load(Path(upstream[0]["artifact_uri"]), device,
                                                    {**cfg["backend"]["options"], **(extra or {})})


def _run_evaluate(node: Node, upstream: list[dict], cfg: dict, device: str) -> tuple[dict, str, dict]:
    from tasks.evaluate import evaluate_mmlu

    ev = node.config["eval"]
    engine = _load_engine(node, upstream, cfg, device, {"purpose": "evaluate"})
    try:
        rows = evaluate_mmlu(engine.lm_eval_model(ev["batch_size"]), node.config["subjects"],
                             mmlu_dir=Path(ev["mmlu_dir"]) if ev["mmlu_dir"] else None,
                             cache_dir=Path(cfg["store"]["artifacts_dir"]) / "mmlu_cache",
                             num_fewshot=ev["num_fewshot"], scoring=ev["scoring"],
                             limit_per_subject=ev["limit_per_subject"], seed=node.config["seed"])
    finally:
        engine.close()
    shard = node.config["shard"]
    rows = [{**_labels(node), "shard": shard, **row} for row in rows]
    correct = sum(bool(r["correct"]) for r in rows)
    summary = {"questions": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else None,
               "weight_format": engine.weight_format, "dtype": engine.dtype, "stored_dtype": engine.stored_dtype,
               "dtypes": engine.dtype_label()}
    return summary, None, {"mmlu_predictions": rows}


def _run_fidelity(node: Node, upstream: list[dict], cfg: dict, device: str) -> tuple[dict, str, dict]:
    """The method's engine (upstream[0]) against the baseline's (upstream[1]) on the same windows and device.

    Both engines load in this one process, so logits stream window by window and none is stored; on CUDA
    they are the engines the profile cells time, scoring through their CUDA-graph decode step (the int4
    GEMV / mma kernels, not a de-quantized copy; see the torch backend's ``load``).
    """
    from tasks.fidelity import KL_HOW, measure, prepare_text
    from tasks.fidelity_stats import summarize

    fid, baseline = node.config["fidelity"], node.config["baseline"]
    options = {"purpose": "fidelity", "kv_cache_batch_size": 1,
               "kv_cache_input_len": fid["seq_len"], "kv_cache_output_len": 0}
    method_engine = _load_engine(node, upstream[:1], cfg, device, options)
    try:  # the baseline's own cell: one engine, loaded once
        same = upstream[0]["artifact_uri"] == upstream[1]["artifact_uri"]
        baseline_engine = method_engine if same else _load_engine(node, upstream[1:], cfg, device, options)
        try:
            text = prepare_text(baseline_engine.tokenizer, fid["text"], fid["seq_len"], fid["num_sequences"],
                                seed=node.config["seed"])
            provenance = {
                **_labels(node), "baseline": baseline, "text_source": text.source,
                "text_fingerprint": text.fingerprint, "seq_len": text.seq_len, "device": device,
                "dtype": method_engine.dtype, "weight_format": method_engine.weight_format,
                "baseline_weight_format": baseline_engine.weight_format,
                "engine": f"{method_engine.details.get('engine')}; logits: {method_engine.logits_how}",
                "method_note": KL_HOW}
            rows = [{**provenance, **row} for row in measure(method_engine, baseline_engine, text)]
        finally:
            if baseline_engine is not method_engine:
                baseline_engine.close()
    finally:
        method_engine.close()
    summary = summarize(rows).iloc[0].to_dict()
    return ({k: summary[k] for k in ("baseline", "sequences", "tokens", "perplexity", "kl_mean", "kl_p99",
                                     "top1_agreement")}, None, {"fidelity": rows})


def _run_profile(node: Node, upstream: list[dict], cfg: dict, device: str) -> tuple[dict, str, dict]:
    from tasks.profile import profile_engine

    c = node.config
    # Size the KV cache for this cell's batch x (input + output), so peak memory is comparable across
    # batch sizes (engines would otherwise pre-allocate for the largest batch or most free memory).
    engine = _load_engine(node, upstream, cfg, device, {"purpose": "profile", "kv_cache_batch_size": c["batch_size"],
                                                         "kv_cache_input_len": c["input_len"],
                                                         "kv_cache_output_len": c["output_len"]})
    try:
        throughput, memory = profile_engine(engine, c["batch_size"], c["input_len"], c["output_len"],
                                            c["warmup"], c["repeats"], seed=c["seed"])
    finally:
        engine.close()
    note = cfg["model"].get("note") or "real weights"
    throughput = {**_labels(node), **throughput, "weights_note": note}
    memory = {**_labels(node), **memory}
    summary = {k: throughput[k] for k in ("output_tokens_per_s", "decode_tokens_per_s", "ttft_s", "roofline_pct")}
    summary["peak_memory_bytes"] = memory["peak_device_memory_bytes"] or memory["peak_process_memory_bytes"]
    summary.update(dtype=engine.dtype, stored_dtype=engine.stored_dtype, dtypes=engine.dtype_label())
    return summary, None, {"throughput": [throughput], "memory": [memory]}


RUNNERS: dict[str, Callable[[Node, list[dict], dict, str], tuple[dict, str | None, dict]]] = {
    "model": _run_model, "quantize": _run_quantize, "build": _run_build,
    "evaluate": _run_evaluate, "fidelity": _run_fidelity, "profile": _run_profile,
}


def _where() -> dict[str, Any]:
    """Which host / Ray node / GPU this task runs on (GPU ids as Ray assigned them)."""
    where: dict[str, Any] = {"hostname": socket.gethostname(), "ray_node_id": None, "gpu_ids": [], "node_ip": None}
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            where["ray_node_id"] = context.get_node_id()
            where["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
            where["node_ip"] = ray.util.get_node_ip_address()
    except ImportError:
        pass
    return where


def node_run_row(node: Node, cfg: dict, status: str, error: str | None) -> dict[str, Any]:
    """The ``runs`` columns every node's row has, whether it ran here or Ray lost it."""
    return {"schema_version": SCHEMA_VERSION, "sweep_name": cfg["sweep"]["name"], "node_key": node.key,
            "kind": node.kind, "status": status, "error": error,
            **{k: node.labels.get(k) for k in ("model", "method", "backend", "batch_size", "shard", "subjects")},
            "config_json": json.dumps(node.config, sort_keys=True, default=str),
            "upstream_keys": list(node.upstream), "versions_json": json.dumps(versions(), sort_keys=True)}


def execute_node(node: Node, upstream: list[dict], cfg: dict, attempt: int = 1,
                 on_start: Callable[[], int | None] | None = None) -> dict[str, Any]:
    """Run ``node`` (unless an upstream node did not succeed), commit its rows, return its summary."""
    store = ResultStore.from_config(cfg["store"])
    started = datetime.now(timezone.utc)
    if on_start:  # the scheduler's count of starts: Ray's retries of this cell show as attempt 2, 3, ...
        attempt = on_start() or attempt
    where, device = _where(), "cpu"
    status, error, result, artifact, tables = "ok", None, {}, None, {}
    blocked = [u for u in upstream if u["status"] != "ok"]
    if blocked:
        status = "skipped"
        error = "; ".join(f"upstream {u['kind']} node {u['node_key']} {u['status']}: {(u.get('error') or '')[:300]}"
                          for u in blocked)
    else:
        try:
            device = task_device(cfg, node)
            result, artifact, tables = RUNNERS[node.kind](node, upstream, cfg, device)
        except BaseException as err:  # noqa: BLE001 - every failure becomes a row
            if isinstance(err, KeyboardInterrupt):
                raise
            status = "skipped" if _unsupported(err) else "oom" if is_out_of_memory(err) else "failed"
            error = f"{type(err).__name__}: {err}\n" + "".join(traceback.format_exc(limit=-6))[-3000:]
            tables = {}
    from tasks.gpu_metrics import device_info

    info = device_info(device)
    row = node_run_row(node, cfg, status, error)
    for table in DATA_TABLES:
        if table in tables:
            keys = {k: row[k] for k in ("schema_version", "sweep_name", "node_key")}
            store.write(table, node.key, [{**keys, **r} for r in tables[table]])
        else:  # a rerun that failed must not leave an earlier attempt's rows behind
            store.delete(table, node.key)
    finished = datetime.now(timezone.utc)
    run_row = {
        **row, "artifact_uri": artifact, "result_json": json.dumps(result, sort_keys=True, default=str),
        **where, "gpu_name": info.get("gpu_name"), "gpu_pci_bus_id": info.get("gpu_pci_bus_id"),
        "device": device, "started_at": started, "finished_at": finished,
        "duration_s": (finished - started).total_seconds(), "attempt": attempt,
    }
    store.write("runs", node.key, [run_row])  # the commit marker: written last
    return {"node_key": node.key, "kind": node.kind, "status": status, "error": error,
            "artifact_uri": artifact, "result_json": run_row["result_json"]}
