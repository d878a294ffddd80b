"""The report's second step: every table it shows, computed from the loaded rows (:mod:`orchestrator.report_load`).

:func:`compute` is the entry point: it loads the store and returns :class:`Results`, whose tables are both
the CSVs and what the page renders (:mod:`orchestrator.report_render`).  Accuracy and paired tests come from
:mod:`tasks.mmlu.stats`, fidelity summaries from :mod:`tasks.fidelity_stats`; this module groups, orders
and joins, and decides which method is the baseline and what the sweep expected but did not get.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from orchestrator.report_load import StoreData, config_section, load_store, node_configs
from orchestrator.validate import STAGES
from tasks.mmlu.categories import CATEGORIES, SUBCATEGORIES, SUBJECTS

#: Method names taken as the unquantized baseline for speed-ups (first present wins), when no method's
#: config says ``algorithm: none``.
_BASELINE_NAMES = ("fp16", "bf16", "baseline", "none", "fp32")
_GIB = 1024 ** 3


# ------------------------------------------------------------------------------------- configuration
def asked_stages(runs: pd.DataFrame) -> tuple[str, ...]:
    """The stages the sweeps asked for (``sweep.stages`` of their ``kind = sweep`` rows, all of them
    together), in :data:`~orchestrator.validate.STAGES` order.

    A speed-only sweep's report must not promise accuracy that will never come, so sections of stages
    not asked for are left out.  A store without sweep rows (written before they existed, or by hand)
    can't say what was asked: every stage is then.
    """
    sweeps = runs[runs["kind"] == "sweep"] if len(runs) else runs
    asked: set[str] = set()
    for cfg in node_configs(sweeps):
        stages = config_section([cfg], "sweep").get("stages")
        if not stages:  # a sweep row that does not say
            return STAGES
        asked.update(map(str, stages))
    return tuple(s for s in STAGES if s in asked) or STAGES


def method_order(data: StoreData, configs: list[dict]) -> list[str]:
    """Methods in the sweep's own order (``sweep.methods``, measured yet or not: an interrupted sweep's
    missing cells are listed by them), then any others alphabetically."""
    declared = list(dict.fromkeys(str(m) for m in config_section(configs, "sweep").get("methods", []) or []))
    seen = {m for df in (data.runs, data.predictions, data.throughput, data.memory)
            for m in df["method"].dropna().unique()}
    return declared + sorted(seen - set(declared))


def baseline_method(data: StoreData, configs: list[dict]) -> str | None:
    """The method others are compared with: the sweep's ``sweep.baseline``, else the ``algorithm: none``
    method, else by name."""
    seen = set(method_order(data, configs))
    declared = config_section(configs, "sweep").get("baseline")
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
    sweep = config_section(configs, "sweep")
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


# ------------------------------------------------------------------------------------------- results
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
    stages: tuple[str, ...] = STAGES  # what the sweep asked for: the page leaves out the others' sections

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
        fidelity_pairs=fidelity_pairs_table(data.fidelity), stages=asked_stages(data.runs))

