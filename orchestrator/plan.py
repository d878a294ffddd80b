"""Expand a validated sweep config into the task graph.

    model ─► quantize(method) ─► build(method, engine shape) ─┬─► evaluate(shard of MMLU subjects)
                                                              ├─► fidelity(vs the baseline's build)
                                                              └─► profile(batch size)

Quantize runs once per (model, method), build once per (model, method[, engine shape]), and every
evaluate/profile cell hangs off its engine.  A node's key is a hash of its kind, everything in its own
config that changes its result, its upstream keys and the result schema version; reruns with the same
inputs therefore find the stored result, and changing one method's group size re-runs exactly that
method's branch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.schema import SCHEMA_VERSION

KINDS = ("model", "quantize", "build", "evaluate", "fidelity", "profile")


def file_sha256(source: str | None) -> str | None:
    """SHA-256 of ``source`` when it names a local file (a text or calibration source), else None.

    Node keys hash configs, and a config only holds the file's path: without its content in the key an
    edited file would silently reuse the results measured on the old text.
    """
    if not source or not Path(source).is_file():
        return None
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Node:
    key: str
    kind: str
    config: dict[str, Any]  # everything the task needs, JSON-able
    upstream: tuple[str, ...]
    needs_gpu: bool
    labels: dict[str, Any] = field(default_factory=dict)  # model/method/backend/batch_size/shard/subjects

    def describe(self) -> str:
        parts = [self.kind] + [f"{k}={v}" for k, v in self.labels.items()
                               if k in ("method", "batch_size", "shard") and v is not None]
        return " ".join(parts)


@dataclass
class SweepPlan:
    nodes: dict[str, Node]  # insertion order is a topological order

    def by_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == kind]

    def downstream(self, key: str) -> list[Node]:
        """Every node that (transitively) depends on ``key``."""
        hit, out = {key}, []
        for node in self.nodes.values():
            if hit.intersection(node.upstream):
                hit.add(node.key)
                out.append(node)
        return out


def node_key(kind: str, config: dict[str, Any], upstream: tuple[str, ...]) -> str:
    payload = json.dumps({"kind": kind, "config": config, "upstream": list(upstream),
                          "schema_version": SCHEMA_VERSION}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def shard_subjects(subjects: list[str], num_shards: int) -> list[list[str]]:
    """Round-robin over the sorted subjects: deterministic, and big/small subjects spread evenly."""
    ordered = sorted(subjects)
    return [ordered[i::num_shards] for i in range(num_shards) if ordered[i::num_shards]]


def _needs_gpu_quantize(method: dict[str, Any]) -> bool:
    # Calibration-based methods run forward passes: give them the GPU when the cluster has one.
    return method["algorithm"] in ("awq", "gptq", "fp8")


#: model.random keys added after stores were written, with the value every earlier sweep had: left out of
#: the model node's key at that value, so those sweeps keep their keys (and resume)
RANDOM_KEYS_SINCE = {"model_type": "llama", "config": {}}


def _model_key_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """What of ``model`` the model node's key hashes: all but the free-text note."""
    config = {k: v for k, v in model_cfg.items() if k != "note"}
    if isinstance(config.get("random"), dict):
        config["random"] = {k: v for k, v in config["random"].items()
                            if not (k in RANDOM_KEYS_SINCE and v == RANDOM_KEYS_SINCE[k])}
    return config


def plan_sweep(cfg: dict[str, Any]) -> SweepPlan:
    """``cfg`` is the resolved, validated config as a plain dict (see :func:`orchestrator.validate.validate`)."""
    sweep, model_cfg, backend, ev = cfg["sweep"], cfg["model"], cfg["backend"], cfg["eval"]
    hardware = {"accelerator_type": cfg["cluster"].get("accelerator_type"), "device": backend["device"]}
    nodes: dict[str, Node] = {}

    def add(kind: str, config: dict[str, Any], upstream: tuple[str, ...], needs_gpu: bool,
            labels: dict[str, Any]) -> Node:
        node = Node(node_key(kind, config, upstream), kind, config, upstream, needs_gpu,
                    {"model": model_cfg["name"], **labels})
        nodes.setdefault(node.key, node)
        return node

    # a random-weight model is made on the node's GPU when the cluster has one (seconds, not minutes on CPUs)
    model_node = add("model", {"model": _model_key_config(model_cfg)}, (),
                     model_cfg["source"] == "random", {})
    # TensorRT-LLM compiles its engine for the largest batch and lengths; the torch backend's engine does not
    # depend on them (each profile cell sizes its own KV cache), so adding a batch size or changing the
    # lengths must not rebuild it, nor re-run the evaluate and fidelity cells below it
    shape = None if backend["name"] == "torch" else {
        "max_batch_size": max(sweep["batch_sizes"]), "max_input_len": sweep["input_len"],
        "max_seq_len": sweep["input_len"] + sweep["output_len"]}
    shards = shard_subjects(cfg["subjects_resolved"], sweep["num_shards"])

    builds: dict[str, Node] = {}
    for method_name in sweep["methods"]:  # every engine first: fidelity cells also hang off the baseline's
        method = cfg["methods"][method_name]
        labels = {"method": method_name, "backend": backend["name"]}
        quant_cfg = {"method": method, "seed": sweep["seed"]}
        calibration_file = file_sha256((method.get("calibration") or {}).get("dataset"))
        if calibration_file:  # a local file: its content, not only its path, decides the result
            quant_cfg["calibration_sha256"] = calibration_file
        quant = add("quantize", quant_cfg, (model_node.key,), _needs_gpu_quantize(method), labels)
        builds[method_name] = add("build", {"backend": backend["name"], "options": backend["options"],
                                            "shape": shape, "method": method, "hardware": hardware},
                                  (quant.key,), backend["name"] != "torch", labels)

    for method_name in sweep["methods"]:
        labels = {"method": method_name, "backend": backend["name"]}
        build = builds[method_name]
        if "evaluate" in sweep["stages"]:
            for index, subjects in enumerate(shards):
                add("evaluate", {"shard": index, "subjects": subjects, "eval": ev, "hardware": hardware,
                                 "seed": sweep["seed"]},
                    (build.key,), True, {**labels, "shard": index, "subjects": subjects})
        if "fidelity" in sweep["stages"]:
            baseline = sweep["baseline"]
            # upstream: (the method's engine, the baseline's engine), in that order
            fidelity_cfg = {"fidelity": cfg["fidelity"], "baseline": baseline, "hardware": hardware,
                            "seed": sweep["seed"]}
            text_file = file_sha256(cfg["fidelity"]["text"])
            if text_file:  # editing the file must re-measure, not reuse the old text's rows
                fidelity_cfg["text_sha256"] = text_file
            add("fidelity", fidelity_cfg,
                (build.key, builds[baseline].key), True, {**labels, "baseline": baseline})
        if "profile" in sweep["stages"]:
            for batch_size in sweep["batch_sizes"]:
                add("profile", {"batch_size": batch_size, "input_len": sweep["input_len"],
                                "output_len": sweep["output_len"], "warmup": sweep["warmup"],
                                "repeats": sweep["repeats"], "hardware": hardware, "seed": sweep["seed"]},
                    (build.key,), True, {**labels, "batch_size": batch_size})
    return SweepPlan(nodes)
