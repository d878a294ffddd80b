"""``quantsweep-report``: the study's figures, tables and a self-contained HTML page, from the store.

Every number on the page is computed here from the store's rows (accuracy through
:mod:`tasks.mmlu.stats`), and every statement about the setup (hardware, engine, versions, dtype, shots,
scoring, how numbers were measured) is read from the rows too, so the report of a sweep can't drift
from the sweep.  The store may be partial (a sweep still running, resumed, or with failed cells): each
section then says what is missing instead of failing, and an empty store renders "no data yet".

Outputs in ``out_dir``: ``report.html`` (figures embedded as base64 PNG), one PNG and one SVG per figure
under ``figures/``, and one CSV per table under ``tables/``.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import pandas as pd
import pyarrow as pa

from orchestrator import report_figures as figs
from orchestrator.store import ResultStore
from orchestrator.schema import STATUSES, TABLES
from tasks.mmlu.categories import CATEGORIES, SUBCATEGORIES, SUBJECTS

log = logging.getLogger("quantsweep.report")

#: Method names taken as the unquantized baseline for speed-ups (first present wins), when no method's
#: config says ``algorithm: none``.
_BASELINE_NAMES = ("fp16", "bf16", "baseline", "none", "fp32")
_GIB = 1024 ** 3


# --------------------------------------------------------------------------------------------- reading
#: Columns the report never reads: per-choice scores and generated text are most of a predictions file.
_SKIP_COLUMNS = {"mmlu_predictions": {"choice_scores", "generation"}}


def read_table(store_uri: str, table: str) -> pa.Table:
    """All rows of one store table (the columns the report uses), read with the table's schema.

    The only place the report touches the store; an absent table reads as an empty one.
    """
    columns = [c for c in TABLES[table].names if c not in _SKIP_COLUMNS.get(table, set())]
    return ResultStore(store_uri).read(table, columns=columns)


@dataclass
class StoreData:
    """The store's four tables as DataFrames, restricted to one sweep when asked."""

    runs: pd.DataFrame
    predictions: pd.DataFrame
    throughput: pd.DataFrame
    memory: pd.DataFrame
    fidelity: pd.DataFrame
    sweep_names: list[str]
    notes: list[str] = field(default_factory=list)  # what the loader had to decide (dedup, filters)


def load_store(store_uri: str, sweep_name: str | None = None) -> StoreData:
    """Read every table, filter to ``sweep_name``, and add the ``series`` column figures are keyed by."""
    frames = {name: read_table(store_uri, name).to_pandas() for name in TABLES}
    all_sweeps = sorted({s for df in frames.values() for s in df["sweep_name"].dropna().unique()})
    notes: list[str] = []
    if sweep_name is not None:
        keys = _sweep_node_keys(frames["runs"], sweep_name)  # reused nodes keep their first sweep's name
        frames = {k: df[(df["sweep_name"] == sweep_name) | df["node_key"].isin(keys)].reset_index(drop=True)
                  for k, df in frames.items()}
        sweeps = [sweep_name]
    else:
        sweeps = all_sweeps
        if len(all_sweeps) > 1:
            notes.append(f"The store holds {len(all_sweeps)} sweeps ({', '.join(all_sweeps)}); all are "
                         "shown together (pass --sweep NAME for one).")
    _add_series(frames)
    preds = frames["mmlu_predictions"]
    unknown = sorted(set(preds["subject"].dropna()) - set(SUBJECTS))
    if unknown or preds["subject"].isna().any():
        bad = ~preds["subject"].isin(SUBJECTS)
        notes.append(f"{int(bad.sum())} MMLU predictions with subjects outside the 57 of MMLU "
                     f"({', '.join(map(str, unknown)) or 'null'}) were left out.")
        preds = preds[~bad].reset_index(drop=True)
    if len(preds):
        preds, dropped = _dedupe_predictions(preds, frames["runs"])
        if dropped:
            notes.append(f"{dropped} duplicate MMLU predictions (same series, subject and question from "
                         "more than one node) were dropped, keeping the latest node's.")
    fidelity, replaced = _latest_fidelity(frames["fidelity"], frames["runs"])
    if replaced:
        notes.append(f"{replaced} fidelity rows measured earlier (another text, window length or baseline "
                     "engine, or the same windows again) were left out, keeping each series' latest.")
    return StoreData(runs=frames["runs"], predictions=preds, throughput=frames["throughput"],
                     memory=frames["memory"], fidelity=fidelity, sweep_names=sweeps, notes=notes)


def _sweep_node_keys(runs: pd.DataFrame, sweep_name: str) -> set[str]:
    """Every node key the sweep rows named ``sweep_name`` planned (their ``result_json``'s ``node_keys``)."""
    keys: set[str] = set()
    rows = runs[(runs["kind"] == "sweep") & (runs["sweep_name"] == sweep_name)] if len(runs) else runs
    for text in rows["result_json"] if len(rows) else []:
        try:
            keys.update(json.loads(text or "{}").get("node_keys") or [])
        except (TypeError, ValueError):
            continue
    return keys


def _finish_order(rows: pd.DataFrame, runs: pd.DataFrame) -> pd.Series:
    """When each row's node finished (its latest runs row), to keep the latest of repeated measurements."""
    finished = runs.set_index("node_key")["finished_at"] if len(runs) else pd.Series(dtype="object")
    finished = finished[~finished.index.duplicated(keep="last")]
    return rows["node_key"].map(finished)


def _latest_fidelity(fid: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Per (series, baseline), the rows of its latest fidelity setup (text and window length), one per window.

    A store can hold the same method measured on two texts, or the same windows twice (a changed baseline
    engine); pooling them would count windows twice and narrow the intervals falsely.
    """
    if fid.empty:
        return fid, 0
    fid = fid.assign(_order=_finish_order(fid, runs)).sort_values("_order", na_position="first", kind="stable")
    latest = fid.groupby(["series", "baseline"], dropna=False)[["text_fingerprint", "seq_len"]].transform("last")
    same_setup = ((fid["text_fingerprint"].fillna("") == latest["text_fingerprint"].fillna(""))
                  & (fid["seq_len"].fillna(-1) == latest["seq_len"].fillna(-1)))
    kept = fid[same_setup].drop_duplicates(["series", "baseline", "sequence_index"], keep="last")
    return kept.drop(columns="_order").sort_index().reset_index(drop=True), len(fid) - len(kept)


def _quantize_of(runs: pd.DataFrame) -> dict[str, str]:
    """node key -> the key of the quantize node it descends from (first upstream at each step)."""
    if runs.empty:
        return {}
    latest = runs.drop_duplicates("node_key", keep="last")
    kinds = dict(zip(latest["node_key"], latest["kind"]))
    ups = {k: list(u) if u is not None else [] for k, u in zip(latest["node_key"], latest["upstream_keys"])}
    out: dict[str, str] = {}
    for key in kinds:
        k: str | None = key
        for _ in range(8):  # cell -> build -> quantize: a few steps at most
            if k is None or kinds.get(k) == "quantize":
                break
            k = (ups.get(k) or [None])[0]
        if k is not None and kinds.get(k) == "quantize":
            out[key] = k
    return out


def _method_config_tags(runs: pd.DataFrame) -> dict[str, str]:
    """quantize node key -> ``group_size=32`` when one method name was quantized with several configs in
    the store: the settings that differ, so each config is its own series instead of a median of both."""
    quants = runs[runs["kind"] == "quantize"].drop_duplicates("node_key", keep="last") if len(runs) else runs
    tags: dict[str, str] = {}
    for _, group in quants.groupby(["model", "method"], dropna=False):
        if group["node_key"].nunique() < 2:
            continue
        configs = {}
        for key, text in zip(group["node_key"], group["config_json"]):
            try:
                flat = pd.json_normalize(json.loads(text or "{}")).iloc[0].to_dict()
            except (TypeError, ValueError, IndexError):
                flat = {}
            configs[key] = {k.removeprefix("method."): v for k, v in flat.items()}
        fields = sorted(f for f in set().union(*configs.values())
                        if len({json.dumps(c.get(f), default=str) for c in configs.values()}) > 1)
        for key, config in configs.items():
            tags[key] = ", ".join(f"{f}={config.get(f)}" for f in fields) or key
    return tags


def _add_series(frames: dict[str, pd.DataFrame]) -> None:
    """Label what a line or bar stands for: the method, plus model/backend/scoring only when they vary.

    One model and one engine (the usual sweep) gives plain method names; otherwise e.g.
    ``llama-7b/awq@tensorrt_llm``, and a method quantized with several configs in one store is one series
    per config (``rtn (group_size=32)``), so rows of different setups are never averaged together.
    """
    runs = frames["runs"]
    lineage, tags = _quantize_of(runs), _method_config_tags(runs)
    def distinct(col: str, tables: tuple[str, ...]) -> set:
        return {v for t in tables for v in frames[t][col].dropna().unique()} if tables else set()

    all_tables = tuple(frames)
    multi_model = len(distinct("model", all_tables)) > 1
    multi_backend = len(distinct("backend", all_tables)) > 1
    preds = frames["mmlu_predictions"]
    multi_eval = len(preds[["scoring", "num_fewshot"]].drop_duplicates()) > 1 if len(preds) else False
    for name, df in frames.items():
        label = df["method"].fillna("?").astype(str)
        if tags:
            tag = df["node_key"].map(lineage).map(tags)
            label = label.where(tag.isna(), label + " (" + tag.fillna("") + ")")
        if multi_model:
            label = df["model"].fillna("?").astype(str) + "/" + label
        if multi_backend:
            label = label + "@" + df["backend"].fillna("?").astype(str)
        df["series_base"] = label  # without the evaluation setup: what profiling rows are keyed by
        if multi_eval and name == "mmlu_predictions":
            label = label + " [" + df["scoring"].astype(str) + ", " + df["num_fewshot"].astype(str) + "-shot]"
        df["series"] = label


def _dedupe_predictions(preds: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One prediction per (series, subject, question): a re-sharded rerun must not count a question twice."""
    preds = preds.assign(_order=_finish_order(preds, runs)).sort_values("_order", na_position="first", kind="stable")
    before = len(preds)
    preds = preds.drop_duplicates(["series", "subject", "question_index"], keep="last")
    return preds.drop(columns="_order").sort_index().reset_index(drop=True), before - len(preds)


# ------------------------------------------------------------------------------------- configuration
def node_configs(runs: pd.DataFrame) -> list[dict]:
    """The parsed ``config_json`` of every runs row (unparseable ones skipped)."""
    out = []
    for text in runs.get("config_json", pd.Series(dtype=str)).dropna():
        try:
            cfg = json.loads(text)
        except (TypeError, ValueError):
            continue
        if isinstance(cfg, dict):
            out.append(cfg)
    return out


def _sweep_section(configs: list[dict], key: str) -> dict:
    """The first ``key`` section (e.g. ``sweep``, ``eval``) found in the nodes' configs, else {}."""
    for cfg in configs:
        section = cfg.get(key)
        if isinstance(section, dict):
            return section
    return {}


def method_order(data: StoreData, configs: list[dict]) -> list[str]:
    """Methods in the sweep's own order (``sweep.methods``, measured yet or not: an interrupted sweep's
    missing cells are listed by them), then any others alphabetically."""
    declared = list(dict.fromkeys(str(m) for m in _sweep_section(configs, "sweep").get("methods", []) or []))
    seen = {m for df in (data.runs, data.predictions, data.throughput, data.memory)
            for m in df["method"].dropna().unique()}
    return declared + sorted(seen - set(declared))


def baseline_method(data: StoreData, configs: list[dict]) -> str | None:
    """The method others are compared with: the sweep's ``sweep.baseline``, else the ``algorithm: none``
    method, else by name."""
    seen = set(method_order(data, configs))
    declared = _sweep_section(configs, "sweep").get("baseline")
    if declared in seen:
        return str(declared)
    for cfg in configs:
        methods = cfg.get("methods") if isinstance(cfg.get("methods"), dict) else {}
        if isinstance(cfg.get("method"), dict):
            methods = {**methods, str(cfg["method"].get("name")): cfg["method"]}
        for name, mcfg in methods.items():
            if name in seen and isinstance(mcfg, dict) and str(mcfg.get("algorithm")) == "none":
                return name
    return next((n for n in _BASELINE_NAMES if n in seen), None)


def series_order(df: pd.DataFrame, methods: list[str], baseline: str | None) -> list[str]:
    """Series sorted by their method's position in the sweep (the baseline first), then by name."""
    methods = ([baseline] if baseline in methods else []) + [m for m in methods if m != baseline]
    rank = {m: i for i, m in enumerate(methods)}
    pairs = df[["series", "method"]].drop_duplicates()
    pairs = pairs.assign(_r=pairs["method"].map(rank).fillna(len(rank)))
    return pairs.sort_values(["_r", "series"])["series"].tolist()


# --------------------------------------------------------------------------------------------- tables
def accuracy_tables(preds: pd.DataFrame) -> pd.DataFrame:
    """Accuracy with 95% intervals per series at every level, via ``tasks.mmlu.stats``."""
    from tasks.mmlu import stats

    if preds.empty:
        return pd.DataFrame(columns=["series", "level", "group", "n", "correct", "accuracy", "ci_low",
                                     "ci_high"])
    rows = preds.drop(columns=["method"]).rename(columns={"series": "method"})
    acc = stats.accuracy_table(rows, by=("method",))
    return acc.rename(columns={"method": "series"})


def _ordered(df: pd.DataFrame, order: list[str], group_col: str | None = "group") -> pd.DataFrame:
    """Rows in series order, then MMLU's own group order (categories, subcategories, subjects)."""
    if df.empty:
        return df
    series_rank = {s: i for i, s in enumerate(order)}
    group_rank = {g: i for names in (CATEGORIES, SUBCATEGORIES, SUBJECTS) for i, g in enumerate(names)}
    keys = {"_s": df["series"].map(series_rank).fillna(len(order))}
    if group_col:
        keys["_g"] = df[group_col].map(group_rank).fillna(len(group_rank))
    sort_by = ["_s", "series"] + (["_g", group_col] if group_col else [])
    if "batch_size" in df:
        sort_by.append("batch_size")
    return df.assign(**keys).sort_values(sort_by, kind="stable").drop(columns=list(keys)).reset_index(drop=True)


def significance_table(preds: pd.DataFrame) -> pd.DataFrame:
    """Paired (McNemar) tests between series on the same questions, via ``tasks.mmlu.stats``."""
    from tasks.mmlu import stats

    if preds.empty or preds["series"].nunique() < 2:
        return pd.DataFrame(columns=["model", "series_a", "series_b", "level", "group", "n_pairs", "only_a",
                                     "only_b", "accuracy_a", "accuracy_b", "diff", "p_value", "significant"])
    rows = preds.drop(columns=["method"]).rename(columns={"series": "method"})
    pairs = stats.mcnemar_pairs(rows)
    return pairs.rename(columns={"method_a": "series_a", "method_b": "series_b"})


def throughput_table(tp: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """Median of the rows per series × batch size × shape, with the speed-up over the baseline method.

    The speed-up divides by the baseline's output tokens/s at the same model, engine, batch size and
    input/output lengths; it is empty where the baseline has no row there.
    """
    keys = ["series", "model", "method", "backend", "batch_size", "input_len", "output_len"]
    metrics = ["output_tokens_per_s", "decode_tokens_per_s", "e2e_s", "ttft_s", "itl_median_s",
               "itl_p90_s", "energy_j_per_token", "roofline_pct", "copy_bandwidth_bytes_per_s"]
    if tp.empty:
        return pd.DataFrame(columns=keys + metrics + ["n_rows", "device", "gpu_name", "dtype", "weight_format",
                                                      "speedup_vs_baseline"])
    g = tp.groupby(keys, dropna=False, sort=False)
    out = g[metrics].median().reset_index()
    out["n_rows"] = g.size().values
    for col in ("device", "gpu_name", "dtype", "weight_format"):
        out[col] = g[col].agg(lambda s: "; ".join(sorted(s.dropna().astype(str).unique()))).values
    base = out[out["method"] == baseline][["model", "backend", "batch_size", "input_len", "output_len",
                                           "output_tokens_per_s"]]
    base = base.rename(columns={"output_tokens_per_s": "_base"})
    out = out.merge(base, on=["model", "backend", "batch_size", "input_len", "output_len"], how="left")
    out["speedup_vs_baseline"] = out["output_tokens_per_s"] / out["_base"]
    return out.drop(columns="_base").sort_values(["series", "batch_size"]).reset_index(drop=True)


def memory_table(mem: pd.DataFrame) -> pd.DataFrame:
    """Peak memory per series × batch size (max over rows); ``peak_memory_bytes`` is what the figure plots.

    On CUDA that is the device-wide peak (NVML, as nvidia-smi shows it); on CPU there is no device
    memory, so it is the process's peak RSS, and ``memory_measure`` says which.
    """
    keys = ["series", "model", "method", "backend", "batch_size", "device", "memory_measure"]
    cols = ["peak_memory_bytes", "peak_device_memory_bytes", "peak_process_memory_bytes",
            "peak_allocator_memory_bytes", "weights_memory_bytes", "kv_cache_bytes"]
    if mem.empty:
        return pd.DataFrame(columns=keys + cols + ["n_rows", "peak_memory_gib"])
    mem = mem.copy()
    on_cuda = mem["device"].fillna("").str.startswith("cuda") & mem["peak_device_memory_bytes"].notna()
    mem["peak_memory_bytes"] = mem["peak_device_memory_bytes"].where(on_cuda, mem["peak_process_memory_bytes"])
    mem["memory_measure"] = on_cuda.map({True: "device memory (NVML)", False: "process peak RSS"})
    g = mem.groupby(keys, dropna=False, sort=False)
    out = g[cols].max().reset_index()
    out["n_rows"] = g.size().values
    out["peak_memory_gib"] = out["peak_memory_bytes"] / _GIB
    return out.sort_values(["series", "batch_size"]).reset_index(drop=True)


def tradeoff_table(acc: pd.DataFrame, tput: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    """Overall accuracy (batch-independent) next to output tokens/s at every measured batch size.

    Accuracy series may carry an evaluation suffix (scoring, shots) that profiling rows don't have; they
    are joined on the series without it, so each evaluation setup gets its own points.
    """
    if acc.empty or tput.empty:
        return pd.DataFrame(columns=["series", "accuracy", "ci_low", "ci_high", "n", "batch_size", "input_len",
                                     "output_len", "output_tokens_per_s", "energy_j_per_token"])
    base = preds[["series", "series_base"]].drop_duplicates()
    overall = acc[acc["level"] == "overall"][["series", "accuracy", "ci_low", "ci_high", "n"]].merge(base, on="series")
    speed = tput[["series", "batch_size", "input_len", "output_len", "output_tokens_per_s",
                  "energy_j_per_token"]].rename(columns={"series": "series_base"})
    out = overall.merge(speed, on="series_base", how="inner").drop(columns="series_base")
    return out.sort_values(["series", "batch_size"]).reset_index(drop=True)


def fidelity_table(fid: pd.DataFrame) -> pd.DataFrame:
    """Per series: perplexity, its ratio to the baseline's, mean KL [95% CI], p99 KL, top-1 agreement, and
    the text and engine they were measured on (:mod:`tasks.fidelity_stats`)."""
    from tasks.fidelity_stats import summarize

    summary = summarize(fid, by=("series", "method", "model", "backend"))
    if summary.empty:
        return summary.assign(text=pd.Series(dtype=str), weight_format=pd.Series(dtype=str))
    about = fid.groupby("series").agg(text=("text_source", "first"), device=("device", "first"),
                                      weight_format=("weight_format", "first"))
    return summary.join(about, on="series")


def fidelity_pairs_table(fid: pd.DataFrame) -> pd.DataFrame:
    """Which methods differ in KL when scored on the same windows (:func:`tasks.fidelity_stats.paired_kl`)."""
    from tasks.fidelity_stats import paired_kl

    return paired_kl(fid, series="series")


def flips_table(preds: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """MMLU answers that flipped against the baseline on the same questions (right->wrong, wrong->right)."""
    from tasks.fidelity_stats import answer_flips

    if preds.empty or baseline is None:
        return pd.DataFrame(columns=["series", "baseline", "questions", "right_to_wrong", "wrong_to_right",
                                     "answer_changed"])
    return answer_flips(preds, baseline, by=("series",))


def failures_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every node whose latest row is not ``ok`` (failed, OOM, skipped, or any other status)."""
    cols = ["kind", "status", "model", "method", "backend", "batch_size", "shard", "device", "gpu_name",
            "attempt", "error", "node_key"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    latest = runs.sort_values("finished_at", na_position="first").drop_duplicates("node_key", keep="last")
    bad = latest[(latest["status"] != "ok") & (latest["kind"] != "sweep")]  # cells, not the sweep's own row
    out = bad[cols].sort_values(["status", "kind", "method", "batch_size", "shard"]).reset_index(drop=True)
    return out.astype({"batch_size": "Int64", "shard": "Int64", "attempt": "Int64"})


def missing_table(data: StoreData, configs: list[dict], methods: list[str]) -> pd.DataFrame:
    """Expected cells with no result rows yet, with the reason we know of (failed node, or not run).

    The expected grid is the sweep's config (``sweep.methods`` × ``sweep.batch_sizes`` for profiling,
    × shards for evaluation, restricted to ``sweep.stages``) when the nodes' configs carry it, else the
    product of the methods and batch sizes seen anywhere in the store.
    """
    sweep = _sweep_section(configs, "sweep")
    stages = set(sweep.get("stages") or ["evaluate", "profile"] + (["fidelity"] if len(data.fidelity) else []))
    batch_sizes = sorted({int(b) for b in sweep.get("batch_sizes") or []}
                         | {int(b) for df in (data.runs, data.throughput, data.memory)
                            for b in df["batch_size"].dropna().unique()})
    status = {}
    if len(data.runs):
        latest = data.runs.sort_values("finished_at", na_position="first")
        for r in latest.itertuples():
            status[(r.kind, r.method, r.batch_size if pd.notna(r.batch_size) else None,
                    r.shard if pd.notna(r.shard) else None)] = r.status
    rows = []

    def reason(kind: str, method: str, bs: Any = None, shard: Any = None) -> str:
        st = status.get((kind, method, bs, shard))
        return f"node {st}" if st else "no runs row (not run yet, running, or lost)"

    tp_cells = set(zip(data.throughput["method"], data.throughput["batch_size"]))
    mem_cells = set(zip(data.memory["method"], data.memory["batch_size"]))
    if "profile" in stages:
        for m in methods:
            for bs in batch_sizes:
                for table, cells in (("throughput", tp_cells), ("memory", mem_cells)):
                    if (m, bs) not in cells:
                        rows.append({"table": table, "method": m, "batch_size": bs, "shard": None,
                                     "reason": reason("profile", m, bs)})
    if "fidelity" in stages:
        measured = set(data.fidelity["method"]) if len(data.fidelity) else set()
        rows += [{"table": "fidelity", "method": m, "batch_size": None, "shard": None,
                  "reason": reason("fidelity", m)} for m in methods if m not in measured]
    if "evaluate" in stages:
        num_shards = sweep.get("num_shards")
        shards = set(range(int(num_shards))) if num_shards else set()
        shards |= {int(s) for s in data.predictions["shard"].dropna().unique()}
        shards |= {int(s) for s in data.runs.loc[data.runs["kind"] == "evaluate", "shard"].dropna().unique()}
        present = set(zip(data.predictions["method"], data.predictions["shard"]))
        for m in methods:
            if shards:
                for sh in sorted(shards):
                    if (m, sh) not in present:
                        rows.append({"table": "mmlu_predictions", "method": m, "batch_size": None,
                                     "shard": sh, "reason": reason("evaluate", m, None, sh)})
            elif m not in set(data.predictions["method"]):
                rows.append({"table": "mmlu_predictions", "method": m, "batch_size": None, "shard": None,
                             "reason": "no predictions"})
    out = pd.DataFrame(rows, columns=["table", "method", "batch_size", "shard", "reason"])
    return out.astype({"batch_size": "Int64", "shard": "Int64"})


# ------------------------------------------------------------------------------------------ provenance
def provenance(data: StoreData, configs: list[dict]) -> list[tuple[str, str]]:
    """(what, value) pairs describing the setup, every value read from the rows or the nodes' configs."""
    def distinct(df: pd.DataFrame, col: str) -> str:
        if col not in df or df[col].dropna().empty:
            return "—"
        return "; ".join(sorted(df[col].dropna().astype(str).unique()))

    runs, tp, mem, preds = data.runs, data.throughput, data.memory, data.predictions
    eval_cfg = _sweep_section(configs, "eval")
    items = [
        ("Experiment", _experiments(configs)),
        ("Sweep", ", ".join(data.sweep_names) or "—"),
        ("Model", distinct(pd.concat([runs[["model"]], tp[["model"]], preds[["model"]]]), "model")),
        ("Model source (model node config)", _model_sources(configs)),
        ("Methods (quantize node configs)", _method_configs(configs)),
        ("Hardware (GPU / device)", _hardware(runs, tp, mem)),
        ("Driver", distinct(tp, "driver_version")),
        ("Hosts", distinct(runs, "hostname")),
        ("Engine / backend", distinct(pd.concat([runs[["backend"]], tp[["backend"]]]), "backend")),
        ("Weights dtype per method, stored / computed (profile rows)", _dtypes_per_method(tp)),
        ("Weight format per method", _per_method(tp, "weight_format")),
        ("KV cache policy", distinct(tp, "kv_cache_policy")),
        ("Weights", distinct(tp, "weights_note")),
        ("MMLU shots", distinct(preds, "num_fewshot")),
        ("MMLU scoring", distinct(preds, "scoring")),
        ("MMLU questions per subject limit", str(eval_cfg.get("limit_per_subject"))
         if eval_cfg else "—"),
        ("Throughput shape (input/output tokens, warmup, repeats)", _shapes(tp)),
        ("How throughput was measured", distinct(tp, "method_note")),
        ("Memory bandwidth of the roofline (copy test, per device)", _bandwidths(tp)),
        ("How memory was measured", distinct(mem, "method_note")),
        ("Software versions", _versions(runs)),
    ]
    return items


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


# ---------------------------------------------------------------------------------------------- html
def _table_html(df: pd.DataFrame, empty: str = "no data yet", max_rows: int | None = None) -> str:
    if df is None or df.empty:
        return f'<p class="empty">{html.escape(empty)}</p>'
    shown = df if max_rows is None else df.head(max_rows)
    text = shown.to_html(index=False, border=0, classes="tbl", na_rep="—",
                         float_format=lambda x: f"{x:.4g}")
    if max_rows is not None and len(df) > max_rows:
        text += f'<p class="note">First {max_rows} of {len(df)} rows; all in the CSV.</p>'
    return text


def _figure_html(fig: figs.Figure | None, caption: str) -> str:
    if fig is None:
        return ""
    data = base64.b64encode(fig.png.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{html.escape(caption)} (<a href="figures/{fig.png.name}">PNG</a>, '
            f'<a href="figures/{fig.svg.name}">SVG</a>)</figcaption></figure>')


def _notes_html(notes: list[str]) -> str:
    return "".join(f'<p class="missing">{html.escape(n)}</p>' for n in notes)


def _render(context: dict[str, str]) -> str:
    template = resources.files("orchestrator").joinpath("report_template.html").read_text("utf-8")
    return Template(template).substitute(context)


# --------------------------------------------------------------------------------------------- build
@dataclass
class Results:
    """Everything the page shows, computed once from the store; the CSVs are these tables."""

    data: StoreData
    configs: list[dict]
    baseline: str | None
    order: list[str]  # series, in plotting order
    accuracy: dict[str, pd.DataFrame]  # level -> accuracy rows of that level
    mcnemar: pd.DataFrame
    significant: pd.DataFrame
    throughput: pd.DataFrame
    memory: pd.DataFrame
    tradeoff: pd.DataFrame
    failed: pd.DataFrame
    missing: pd.DataFrame
    fidelity: pd.DataFrame  # one line per series: perplexity, KL with its interval, top-1 agreement
    flips: pd.DataFrame  # MMLU answer flips against the baseline
    fidelity_pairs: pd.DataFrame  # KL differences between two methods, paired over the same windows

    def tables(self) -> dict[str, pd.DataFrame]:
        return {**{f"accuracy_{lvl}": df for lvl, df in self.accuracy.items()},
                "mcnemar_all": self.mcnemar, "significant_differences": self.significant,
                "throughput": self.throughput, "memory": self.memory, "tradeoff": self.tradeoff,
                "failed_cells": self.failed, "missing": self.missing, "fidelity": self.fidelity,
                "answer_flips": self.flips, "fidelity_pairs": self.fidelity_pairs}

    @property
    def devices(self) -> set[str]:
        return set(self.data.throughput["device"].dropna().astype(str))


def compute(store_uri: str, sweep_name: str | None = None) -> Results:
    """Read the store and compute every table of the report."""
    data = load_store(store_uri, sweep_name)
    configs = node_configs(data.runs)
    methods = method_order(data, configs)
    baseline = baseline_method(data, configs)
    labelled = pd.concat([df[["series", "method"]] for df in
                          (data.predictions, data.throughput, data.memory, data.fidelity, data.runs)])
    order = series_order(labelled, methods, baseline)
    acc = accuracy_tables(data.predictions)
    by_level = {lvl: _ordered(acc[acc["level"] == lvl], order) if len(acc) else acc
                for lvl in ("overall", "category", "subcategory", "subject")}
    mcnemar = significance_table(data.predictions)
    tput = _ordered(throughput_table(data.throughput, baseline), order, None)
    return Results(
        data=data, configs=configs, baseline=baseline, order=order, accuracy=by_level, mcnemar=mcnemar,
        significant=mcnemar[mcnemar["significant"]].reset_index(drop=True) if len(mcnemar) else mcnemar,
        throughput=tput, memory=_ordered(memory_table(data.memory), order, None),
        tradeoff=_ordered(tradeoff_table(acc, tput, data.predictions), order, None),
        failed=failures_table(data.runs), missing=missing_table(data, configs, methods),
        fidelity=_ordered(fidelity_table(data.fidelity), order, None),
        flips=_ordered(flips_table(data.predictions, baseline), order, None),
        fidelity_pairs=fidelity_pairs_table(data.fidelity))


def build_report(store_uri: str, out_dir: Path, sweep_name: str | None = None) -> Path:
    """Write the report of the store at ``store_uri`` into ``out_dir``; returns the HTML file's path."""
    out_dir = Path(out_dir)
    fig_dir, tab_dir = out_dir / "figures", out_dir / "tables"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tab_dir.mkdir(parents=True, exist_ok=True)

    res = compute(store_uri, sweep_name)
    for name, df in res.tables().items():
        df.to_csv(tab_dir / f"{name}.csv", index=False)
    made = {
        "accuracy_category": figs.accuracy_bars(res.accuracy["category"], res.order,
                                                fig_dir / "accuracy_category",
                                                "MMLU accuracy by category (95% CI)"),
        "accuracy_subcategory": figs.accuracy_bars(res.accuracy["subcategory"], res.order,
                                                   fig_dir / "accuracy_subcategory",
                                                   "MMLU accuracy by subcategory (95% CI)", wide=True),
        "throughput": figs.throughput_lines(res.throughput, res.order, fig_dir / "throughput", res.baseline),
        "roofline": figs.roofline_lines(res.throughput, res.order, fig_dir / "roofline"),
        "memory": figs.memory_lines(res.memory, res.order, fig_dir / "memory"),
        "tradeoff": figs.tradeoff_scatter(res.tradeoff, res.order, fig_dir / "tradeoff"),
        "energy": figs.energy_lines(res.throughput, res.order, fig_dir / "energy", res.devices),
        "fidelity": figs.fidelity_bars(res.fidelity, res.order, fig_dir / "fidelity", res.baseline),
    }
    html_path = out_dir / "report.html"
    html_path.write_text(_render(_sections(res, store_uri, made)), encoding="utf-8")
    log.info("report of %s written to %s", store_uri, html_path)
    return html_path


def _missing_notes(res: Results) -> list[str]:
    """Series present in one kind of result but not another (e.g. evaluated but not yet profiled)."""
    def series(df: pd.DataFrame) -> set[str]:
        return set(df["series"]) if len(df) else set()

    preds = res.data.predictions
    acc = set(preds["series_base"]) if len(preds) else set()
    tp, mem = series(res.throughput), series(res.memory)
    notes = [f"{s}: accuracy rows but no throughput rows (missing)." for s in sorted(acc - tp)]
    notes += [f"{s}: throughput rows but no MMLU predictions (missing)." for s in sorted(tp - acc)]
    notes += [f"{s}: only one of throughput / memory rows present (missing the other)."
              for s in sorted(tp ^ mem)]
    if not len(res.data.runs):
        notes.append("The store has no runs rows yet: no node has finished.")
    return notes


def _summary(data: StoreData) -> str:
    cells = data.runs[data.runs["kind"] != "sweep"] if len(data.runs) else data.runs
    counts = cells["status"].value_counts().to_dict() if len(cells) else {}
    text = (f"{len(cells)} runs rows of cells ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items())) or 'none'}), "
            f"{len(data.predictions)} MMLU predictions, {len(data.throughput)} throughput rows, "
            f"{len(data.memory)} memory rows.")
    unknown = sorted(set(counts) - set(STATUSES))
    if unknown:
        text += f" Statuses outside {STATUSES}: {', '.join(unknown)}."
    return text


def _columns(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    return df[[c for c in cols if c in df]] if len(df) else df


def _sections(res: Results, store_uri: str, made: dict[str, figs.Figure | None]) -> dict[str, str]:
    """The template's fields: one HTML fragment per section, each saying what is missing."""
    tput, devices, baseline = res.throughput, res.devices, res.baseline
    energy_note = ""
    if len(tput) == 0 or tput["energy_j_per_token"].isna().all():
        energy_note = ("Energy per token: not measured on CPU (no NVML energy counter)."
                       if devices and all(d == "cpu" for d in devices)
                       else "Energy per token: not measured (no throughput rows or no NVML energy counter).")
    speed_note = (f"Speed-up is relative to <b>{html.escape(baseline)}</b> at the same batch size, engine and "
                  "input/output lengths; tokens/s is the median over the rows of a cell (each row itself a "
                  "median over repeats, as the rows' method note says)."
                  if baseline else "No unquantized baseline method found, so no speed-ups are shown.")
    speed_note += (" <i>roofline_pct</i> is decode tokens/s as a percentage of the memory-bandwidth limit: batch "
                   "× the copy bandwidth measured on the same device (setup table) ÷ the fewest bytes a decode "
                   "step moves (every weight once, the KV cache so far); on CPU rows of de-quantized methods it "
                   "is the limit of the dense weights that ran.")
    sweeps = ", ".join(res.data.sweep_names)
    wide = {lvl: _table_html(_accuracy_wide(df, res.order, lvl)) for lvl, df in res.accuracy.items()}
    return {
        "title": "quantsweep report" + (f": {html.escape(sweeps)}" if sweeps else ""),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "store_uri": html.escape(store_uri),
        "summary": html.escape(_summary(res.data)),
        "notes": _notes_html(res.data.notes),
        "provenance": "<table class=\"tbl kv\">" + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in provenance(res.data, res.configs)) + "</table>",
        "accuracy_overall": wide["overall"],
        "fig_category": _figure_html(made["accuracy_category"], "Accuracy by MMLU category, one bar per method"),
        "table_category": wide["category"],
        "fig_subcategory": _figure_html(made["accuracy_subcategory"], "Accuracy by the 17 MMLU subcategories"),
        "table_subcategory": wide["subcategory"],
        "table_subject": wide["subject"],
        "fig_throughput": _figure_html(made["throughput"], "Output tokens/s against batch size"),
        "fig_roofline": _figure_html(made["roofline"], "Decode % of the memory-bandwidth roofline against batch size"),
        "speed_note": speed_note,
        "table_throughput": _table_html(_columns(tput, [
            "series", "batch_size", "input_len", "output_len", "output_tokens_per_s", "decode_tokens_per_s",
            "ttft_s", "itl_median_s", "speedup_vs_baseline", "roofline_pct", "device", "n_rows"])),
        "fig_memory": _figure_html(made["memory"], "Peak memory against batch size"),
        "table_memory": _table_html(_columns(res.memory, [
            "series", "batch_size", "device", "memory_measure", "peak_memory_gib", "weights_memory_bytes",
            "kv_cache_bytes", "peak_allocator_memory_bytes", "n_rows"])),
        "fig_tradeoff": _figure_html(made["tradeoff"], "Overall accuracy against output tokens/s, every batch size"),
        "table_tradeoff": _table_html(res.tradeoff),
        "fig_energy": _figure_html(made["energy"], "Energy per output token against batch size"),
        "energy_note": html.escape(energy_note),
        "table_significant": _table_html(_columns(res.significant, [
            "model", "series_a", "series_b", "level", "group", "n_pairs", "only_a", "only_b", "accuracy_a",
            "accuracy_b", "diff", "p_value"]),
            empty=("no significant differences" if len(res.mcnemar)
                   else "no data yet (needs two methods with predictions)")),
        "n_tests": str(len(res.mcnemar)),
        "table_failed": _table_html(res.failed, empty="no failed, OOM or skipped cells"),
        "missing_notes": _notes_html(_missing_notes(res)),
        "fidelity_note": _fidelity_note(res),
        "fig_fidelity": _figure_html(made["fidelity"], "Mean KL divergence from the baseline's next-token "
                                     "distribution (95% CI over windows) and top-1 agreement"),
        "table_fidelity": _table_html(_columns(res.fidelity, [
            "series", "baseline", "sequences", "tokens", "perplexity", "ppl_ratio", "kl_mean", "kl_ci_low",
            "kl_ci_high", "kl_p99", "kl_max", "top1_agreement", "device", "weight_format"])),
        "table_fidelity_pairs": _table_html(res.fidelity_pairs, empty="no data yet (needs two methods other "
                                            "than the baseline on the same windows)"),
        "table_flips": _table_html(res.flips, empty="no data yet (needs MMLU predictions of the baseline and "
                                   "another method)"),
        "table_missing": _table_html(res.missing, empty="nothing missing: every expected cell has rows",
                                     max_rows=200),
    }


def _fidelity_note(res: Results) -> str:
    """What the fidelity numbers compare, on which text, read from the rows."""
    fid = res.data.fidelity
    if fid.empty:
        return "No fidelity rows yet (sweep.stages without <code>fidelity</code>, or its cells have not run)."
    baselines = ", ".join(sorted(map(str, fid["baseline"].dropna().unique())))
    texts = ", ".join(sorted(map(str, fid["text_source"].dropna().unique())))
    windows = ", ".join(sorted({f"{n} tokens" for n in fid["seq_len"].dropna().astype(int)}))
    return (f"Each method's next-token distributions against <b>{html.escape(baselines)}</b>'s on the same "
            f"windows of <code>{html.escape(texts)}</code> ({html.escape(windows)} per window, the first a "
            "BOS/EOS prefix). KL(baseline || method) is exact over the full vocabulary, in nats per scored "
            "token; its interval is a 95% t-interval over windows; p99 and max are over all scored tokens; "
            "perplexity is exp(total NLL / tokens). The baseline against itself reads KL 0 and agreement 1. "
            "Engines: " + html.escape("; ".join(sorted(set(fid["weight_format"].dropna().astype(str))))) + ".")


def _accuracy_wide(acc: pd.DataFrame, order: list[str], level: str) -> pd.DataFrame:
    """One row per group, one column per series: "accuracy [95% CI] n=…", for reading side by side.

    Groups keep the stats table's order (the original MMLU order); the CSVs keep the long format.
    """
    if acc.empty:
        return acc
    cell = acc.assign(cell=[f"{a:.3f} [{lo:.3f}, {hi:.3f}] n={int(n)}" for a, lo, hi, n in
                            zip(acc["accuracy"], acc["ci_low"], acc["ci_high"], acc["n"])])
    groups = list(dict.fromkeys(acc["group"]))
    series = [s for s in order if s in set(acc["series"])] + sorted(set(acc["series"]) - set(order))
    wide = cell.pivot(index="group", columns="series", values="cell").reindex(index=groups, columns=series)
    wide.columns.name = None
    return wide.reset_index().rename(columns={"group": level})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantsweep-report", description=__doc__.splitlines()[0])
    parser.add_argument("store_uri", help="the store: a local folder or a pyarrow filesystem URI (s3://...)")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.html, figures/ and tables/")
    parser.add_argument("--sweep", default=None, help="only this sweep_name (default: every sweep in the store)")
    args = parser.parse_args(argv)
    if "://" not in args.store_uri and not Path(args.store_uri).is_dir():
        print(f"quantsweep-report: no store at {args.store_uri}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = build_report(args.store_uri, args.out, args.sweep)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
