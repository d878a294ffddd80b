"""The report's setup table: what ran, where and how, as (what, value) pairs read from the rows.

Every value comes from the store (runs, throughput, memory and prediction rows, and the configs the nodes
and the sweep recorded), never from the experiment preset's fixed text, so the setup a report states can't
drift from the setup that ran.  Rendering it is :mod:`orchestrator.report_render`'s job.
"""
from __future__ import annotations

import json

import pandas as pd

from orchestrator.report_load import StoreData, config_section
from orchestrator.validate import STAGES


def provenance(data: StoreData, configs: list[dict], stages: tuple[str, ...] = STAGES) -> list[tuple[str, str]]:
    """(what, value) pairs describing the setup, every value read from the rows or the nodes' configs;
    the pairs about a stage the sweep did not ask for (MMLU shots of a speed-only sweep) are left out."""
    def distinct(df: pd.DataFrame, col: str) -> str:
        if col not in df or df[col].dropna().empty:
            return "—"
        return "; ".join(sorted(df[col].dropna().astype(str).unique()))

    runs, tp, mem, preds = data.runs, data.throughput, data.memory, data.predictions
    eval_cfg = config_section(configs, "eval")
    # (what, value, the stage whose rows it describes: None for every sweep)
    items = [
        ("Experiment", _experiments(configs), None),
        ("Sweep", ", ".join(data.sweep_names) or "—", None),
        ("Model", distinct(pd.concat([runs[["model"]], tp[["model"]], preds[["model"]]]), "model"), None),
        ("Model source (model node config)", _model_sources(configs), None),
        ("Methods (quantize node configs)", _method_configs(configs), None),
        ("Hardware (GPU / device)", _hardware(runs, tp, mem), None),
        ("Driver", distinct(tp, "driver_version"), None),
        ("Hosts", distinct(runs, "hostname"), None),
        ("Engine / backend", distinct(pd.concat([runs[["backend"]], tp[["backend"]]]), "backend"), None),
        ("Weights dtype per method, stored / computed (profile rows)", _dtypes_per_method(tp), "profile"),
        ("Weight format per method", _per_method(tp, "weight_format"), "profile"),
        ("KV cache policy", distinct(tp, "kv_cache_policy"), "profile"),
        ("Weights", distinct(tp, "weights_note"), "profile"),
        ("MMLU shots", distinct(preds, "num_fewshot"), "evaluate"),
        ("MMLU scoring", distinct(preds, "scoring"), "evaluate"),
        ("MMLU questions per subject limit", str(eval_cfg.get("limit_per_subject")) if eval_cfg else "—",
         "evaluate"),
        ("Throughput shape (input/output tokens, warmup, repeats)", _shapes(tp), "profile"),
        ("How throughput was measured", distinct(tp, "method_note"), "profile"),
        ("Memory bandwidth of the roofline (copy test, per device)", _bandwidths(tp), "profile"),
        ("How memory was measured", distinct(mem, "method_note"), "profile"),
        ("Software versions", _versions(runs), None),
    ]
    return [(what, value) for what, value, stage in items if stage is None or stage in stages]


def _bandwidths(tp: pd.DataFrame) -> str:
    """``NVIDIA H200 (cuda:0): 4.21 TB/s`` per device: the median copy bandwidth its roofline_pct is against."""
    if "copy_bandwidth_bytes_per_s" not in tp or tp["copy_bandwidth_bytes_per_s"].dropna().empty:
        return "—"
    rows = tp.dropna(subset=["copy_bandwidth_bytes_per_s"]).fillna({"gpu_name": "?", "device": "?"})
    per = rows.groupby(["gpu_name", "device"])["copy_bandwidth_bytes_per_s"].median()
    return "; ".join(f"{gpu} ({device}): {bw / 1e12:.3f} TB/s (bytes read + written)" for (gpu, device), bw in per.items())


def _experiments(configs: list[dict]) -> str:
    """What each sweep asked for, built from its ``kind = sweep`` row's config (model, methods, subjects,
    questions, batch sizes, lengths, backend, device), never from the experiment preset's fixed text."""
    from orchestrator.describe import describe_setup

    seen: list[str] = []
    for cfg in configs:
        if all(isinstance(cfg.get(k), dict) for k in ("sweep", "model", "backend", "eval")):
            try:
                line = describe_setup(cfg)
            except (KeyError, TypeError):  # a row of another quantsweep version: leave it out
                continue
            if line not in seen:
                seen.append(line)
    return "; ".join(seen) or "—"


def _dtypes_per_method(tp: pd.DataFrame) -> str:
    """``fp16: stored bfloat16, computed float32 on cpu``: a method's name ("fp16") and config do not say
    which dtypes ran, the rows do (``stored_dtype`` from the checkpoint, ``dtype`` from the engine)."""
    if tp.empty:
        return "—"
    cols = tp.reindex(columns=["method", "stored_dtype", "dtype", "device"]).fillna("unknown").astype(str)
    labels = [f"{m}: stored {s}, computed {c} on {d}" for m, s, c, d in
              cols.drop_duplicates().sort_values(["method", "device"]).itertuples(index=False)]
    return "; ".join(labels)


def _model_sources(configs: list[dict]) -> str:
    seen = []
    for cfg in configs:
        model = cfg.get("model")
        if isinstance(model, dict) and "source" in model:
            where = [str(model[k]) for k in ("path", "package", "gguf_file") if model.get(k)]
            text = f"{model.get('name', '?')}: {' '.join([str(model['source']), *where])}, " \
                   f"dtype {model.get('dtype', '?')}"
            if text not in seen:
                seen.append(text)
    return "; ".join(seen) or "—"


def _method_configs(configs: list[dict]) -> str:
    """Each method's algorithm, bits, group size and symmetry, as its quantize nodes recorded them (every
    distinct config of a method, as the series do)."""
    seen: dict[str, list[str]] = {}
    for cfg in configs:
        method = cfg.get("method")
        if isinstance(method, dict) and method.get("name") is not None:
            parts = ", ".join(f"{k}={method[k]}" for k in ("algorithm", "bits", "group_size", "symmetric", "dtype")
                              if method.get(k) is not None)
            descs = seen.setdefault(str(method["name"]), [])
            if parts not in descs:
                descs.append(parts)
    return "; ".join(f"{name}: {' | '.join(descs)}" for name, descs in seen.items()) or "—"


def _hardware(runs: pd.DataFrame, tp: pd.DataFrame, mem: pd.DataFrame) -> str:
    """Distinct devices with their GPU (or CPU) name; a bare device is listed only if never named."""
    both = pd.concat([df[["gpu_name", "device"]] for df in (runs, tp, mem)]).dropna(subset=["device"])
    named = both.dropna(subset=["gpu_name"]).drop_duplicates()
    parts = {f"{r.gpu_name} ({r.device})" for r in named.itertuples()}
    parts |= {str(d) for d in set(both["device"]) - set(named["device"])}
    return "; ".join(sorted(parts)) or "—"


def _per_method(df: pd.DataFrame, col: str) -> str:
    if df.empty:
        return "—"
    pairs = df[["method", col]].dropna().drop_duplicates().sort_values(["method", col])
    return "; ".join(f"{m}: {v}" for m, v in pairs.itertuples(index=False)) or "—"


def _shapes(tp: pd.DataFrame) -> str:
    if tp.empty:
        return "—"
    shapes = tp[["input_len", "output_len", "warmup", "repeats"]].drop_duplicates()
    return "; ".join(f"{a}/{b}, warmup {w}, repeats {r}" for a, b, w, r in shapes.itertuples(index=False))


def _versions(runs: pd.DataFrame) -> str:
    """Every package version seen in ``versions_json``; several values mean nodes ran different stacks."""
    seen: dict[str, set[str]] = {}
    for text in runs.get("versions_json", pd.Series(dtype=str)).dropna():
        try:
            versions = json.loads(text)
        except (TypeError, ValueError):
            continue
        for pkg, ver in (versions.items() if isinstance(versions, dict) else []):
            seen.setdefault(str(pkg), set()).add(str(ver))
    return "; ".join(f"{p} {' / '.join(sorted(v))}" for p, v in sorted(seen.items())) or "—"
