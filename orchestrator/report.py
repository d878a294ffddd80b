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
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from orchestrator import report_figures as figs
from orchestrator.schema import STATUSES, TABLES

log = logging.getLogger("quantsweep.report")

#: Method names taken as the unquantized baseline for speed-ups (first present wins), when no method's
#: config says ``algorithm: none``.
_BASELINE_NAMES = ("fp16", "bf16", "baseline", "none", "fp32")
_GIB = 1024 ** 3


# --------------------------------------------------------------------------------------------- reading
def read_table(store_uri: str, table: str) -> pa.Table:
    """All rows of one store table, read with its schema; an absent table is an empty one.

    The only place the report touches the store, so switching to ``orchestrator.store`` is one edit.
    """
    try:
        from orchestrator.store import ResultStore  # the lead's store, when it exists
    except ImportError:
        ResultStore = None  # noqa: N806
    if ResultStore is not None:
        return ResultStore(store_uri).read(table)
    schema = TABLES[table]
    fs, root = pafs.FileSystem.from_uri(_as_uri(store_uri))
    path = f"{root.rstrip('/')}/{table}"
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return schema.empty_table()
    # ignore_prefixes (default "." and "_") skips temp files of writers still running.
    return pads.dataset(path, filesystem=fs, format="parquet", schema=schema).to_table()


def _as_uri(store_uri: str) -> str:
    """Local paths (relative ones too) as absolute paths; URIs with a scheme unchanged."""
    return store_uri if "://" in store_uri else str(Path(store_uri).resolve())


@dataclass
class StoreData:
    """The store's four tables as DataFrames, restricted to one sweep when asked."""

    runs: pd.DataFrame
    predictions: pd.DataFrame
    throughput: pd.DataFrame
    memory: pd.DataFrame
    sweep_names: list[str]
    notes: list[str] = field(default_factory=list)  # what the loader had to decide (dedup, filters)


def load_store(store_uri: str, sweep_name: str | None = None) -> StoreData:
    """Read every table, filter to ``sweep_name``, and add the ``series`` column figures are keyed by."""
    frames = {name: read_table(store_uri, name).to_pandas() for name in TABLES}
    all_sweeps = sorted({s for df in frames.values() for s in df["sweep_name"].dropna().unique()})
    notes: list[str] = []
    if sweep_name is not None:
        frames = {k: df[df["sweep_name"] == sweep_name].reset_index(drop=True) for k, df in frames.items()}
        sweeps = [sweep_name]
    else:
        sweeps = all_sweeps
        if len(all_sweeps) > 1:
            notes.append(f"The store holds {len(all_sweeps)} sweeps ({', '.join(all_sweeps)}); all are "
                         "shown together (pass --sweep NAME for one).")
    _add_series(frames)
    preds = frames["mmlu_predictions"]
    if len(preds):
        preds, dropped = _dedupe_predictions(preds, frames["runs"])
        if dropped:
            notes.append(f"{dropped} duplicate MMLU predictions (same series, subject and question from "
                         "more than one node) were dropped, keeping the latest node's.")
    return StoreData(runs=frames["runs"], predictions=preds, throughput=frames["throughput"],
                     memory=frames["memory"], sweep_names=sweeps, notes=notes)


def _add_series(frames: dict[str, pd.DataFrame]) -> None:
    """Label what a line or bar stands for: the method, plus model/backend/scoring only when they vary.

    One model and one engine (the usual sweep) gives plain method names; otherwise e.g.
    ``llama-7b/awq@tensorrt_llm``, so rows of different setups are never averaged together.
    """
    def distinct(col: str, tables: tuple[str, ...]) -> set:
        return {v for t in tables for v in frames[t][col].dropna().unique()} if tables else set()

    all_tables = tuple(frames)
    multi_model = len(distinct("model", all_tables)) > 1
    multi_backend = len(distinct("backend", all_tables)) > 1
    preds = frames["mmlu_predictions"]
    multi_eval = len(preds[["scoring", "num_fewshot"]].drop_duplicates()) > 1 if len(preds) else False
    for name, df in frames.items():
        label = df["method"].fillna("?").astype(str)
        if multi_model:
            label = df["model"].fillna("?").astype(str) + "/" + label
        if multi_backend:
            label = label + "@" + df["backend"].fillna("?").astype(str)
        if multi_eval and name == "mmlu_predictions":
            label = label + " [" + df["scoring"].astype(str) + ", " + df["num_fewshot"].astype(str) + "-shot]"
        df["series"] = label


def _dedupe_predictions(preds: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One prediction per (series, subject, question): a re-sharded rerun must not count a question twice."""
    finished = runs.set_index("node_key")["finished_at"] if len(runs) else pd.Series(dtype="object")
    finished = finished[~finished.index.duplicated(keep="last")]
    order = preds["node_key"].map(finished)
    preds = preds.assign(_order=order).sort_values("_order", na_position="first", kind="stable")
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
    """Methods in the sweep's own order (``sweep.methods``), then any others alphabetically."""
    declared = [str(m) for m in _sweep_section(configs, "sweep").get("methods", []) or []]
    seen = {m for df in (data.runs, data.predictions, data.throughput, data.memory)
            for m in df["method"].dropna().unique()}
    return [m for m in declared if m in seen] + sorted(seen - set(declared))


def baseline_method(data: StoreData, configs: list[dict]) -> str | None:
    """The unquantized method speed-ups are relative to: ``algorithm: none`` in its config, else by name."""
    seen = set(method_order(data, configs))
    for cfg in configs:
        methods = cfg.get("methods") if isinstance(cfg.get("methods"), dict) else {}
        if isinstance(cfg.get("method"), dict):
            methods = {**methods, str(cfg["method"].get("name")): cfg["method"]}
        for name, mcfg in methods.items():
            if name in seen and isinstance(mcfg, dict) and str(mcfg.get("algorithm")) == "none":
                return name
    return next((n for n in _BASELINE_NAMES if n in seen), None)


def series_order(df: pd.DataFrame, methods: list[str]) -> list[str]:
    """Series sorted by their method's position in the sweep, then by name."""
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


def significance_table(preds: pd.DataFrame) -> pd.DataFrame:
    """Paired (McNemar) tests between series on the same questions, via ``tasks.mmlu.stats``."""
    from tasks.mmlu import stats

    if preds.empty or preds["series"].nunique() < 2:
        return pd.DataFrame()
    rows = preds.drop(columns=["method"]).rename(columns={"series": "method"})
    pairs = stats.mcnemar_pairs(rows)
    return pairs.rename(columns={"method_a": "series_a", "method_b": "series_b"})


def throughput_table(tp: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """Median of the rows per series × batch size × shape, with the speed-up over the baseline method.

    The speed-up divides by the baseline's output tokens/s at the same model, engine, batch size and
    input/output lengths; it is empty where the baseline has no row there.
    """
    if tp.empty:
        return pd.DataFrame()
    keys = ["series", "model", "method", "backend", "batch_size", "input_len", "output_len"]
    metrics = ["output_tokens_per_s", "decode_tokens_per_s", "e2e_s", "ttft_s", "itl_median_s",
               "itl_p90_s", "energy_j_per_token"]
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
    if mem.empty:
        return pd.DataFrame()
    mem = mem.copy()
    on_cuda = mem["device"].fillna("").str.startswith("cuda") & mem["peak_device_memory_bytes"].notna()
    mem["peak_memory_bytes"] = mem["peak_device_memory_bytes"].where(on_cuda, mem["peak_process_memory_bytes"])
    mem["memory_measure"] = on_cuda.map({True: "device memory (NVML)", False: "process peak RSS"})
    keys = ["series", "model", "method", "backend", "batch_size", "device", "memory_measure"]
    cols = ["peak_memory_bytes", "peak_device_memory_bytes", "peak_process_memory_bytes",
            "peak_allocator_memory_bytes", "weights_memory_bytes", "kv_cache_bytes"]
    g = mem.groupby(keys, dropna=False, sort=False)
    out = g[cols].max().reset_index()
    out["n_rows"] = g.size().values
    out["peak_memory_gib"] = out["peak_memory_bytes"] / _GIB
    return out.sort_values(["series", "batch_size"]).reset_index(drop=True)


def tradeoff_table(acc: pd.DataFrame, tput: pd.DataFrame) -> pd.DataFrame:
    """Overall accuracy (batch-independent) next to output tokens/s at every measured batch size."""
    if acc.empty or tput.empty:
        return pd.DataFrame()
    overall = acc[acc["level"] == "overall"][["series", "accuracy", "ci_low", "ci_high", "n"]]
    speed = tput[["series", "batch_size", "input_len", "output_len", "output_tokens_per_s",
                  "energy_j_per_token"]]
    return overall.merge(speed, on="series", how="inner").sort_values(["series", "batch_size"]).reset_index(drop=True)


def failures_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every node whose latest row is not ``ok`` (failed, OOM, skipped, or any other status)."""
    if runs.empty:
        return pd.DataFrame()
    latest = runs.sort_values("finished_at", na_position="first").drop_duplicates("node_key", keep="last")
    bad = latest[latest["status"] != "ok"]
    cols = ["kind", "status", "model", "method", "backend", "batch_size", "shard", "device", "gpu_name",
            "attempt", "error", "node_key"]
    return bad[cols].sort_values(["status", "kind", "method", "batch_size", "shard"]).reset_index(drop=True)


def missing_table(data: StoreData, configs: list[dict], methods: list[str]) -> pd.DataFrame:
    """Expected cells with no result rows yet, with the reason we know of (failed node, or not run).

    The expected grid is the sweep's config (``sweep.methods`` × ``sweep.batch_sizes`` for profiling,
    × shards for evaluation, restricted to ``sweep.stages``) when the nodes' configs carry it, else the
    product of the methods and batch sizes seen anywhere in the store.
    """
    sweep = _sweep_section(configs, "sweep")
    stages = set(sweep.get("stages") or ["evaluate", "profile"])
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
    return pd.DataFrame(rows, columns=["table", "method", "batch_size", "shard", "reason"])


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
        ("Experiment", next((str(c["experiment"]) for c in configs if c.get("experiment")), "—")),
        ("Sweep", ", ".join(data.sweep_names) or "—"),
        ("Model", distinct(pd.concat([runs[["model"]], tp[["model"]], preds[["model"]]]), "model")),
        ("Hardware (GPU / device)", _hardware(runs, tp, mem)),
        ("Driver", distinct(tp, "driver_version")),
        ("Hosts", distinct(runs, "hostname")),
        ("Engine / backend", distinct(pd.concat([runs[["backend"]], tp[["backend"]]]), "backend")),
        ("Compute dtype (profile rows)", distinct(tp, "dtype")),
        ("Weight format per method", _per_method(tp, "weight_format")),
        ("KV cache policy", distinct(tp, "kv_cache_policy")),
        ("Weights", distinct(tp, "weights_note")),
        ("MMLU shots", distinct(preds, "num_fewshot")),
        ("MMLU scoring", distinct(preds, "scoring")),
        ("MMLU questions per subject limit", str(eval_cfg.get("limit_per_subject"))
         if eval_cfg else "—"),
        ("Throughput shape (input/output tokens, warmup, repeats)", _shapes(tp)),
        ("How throughput was measured", distinct(tp, "method_note")),
        ("How memory was measured", distinct(mem, "method_note")),
        ("Software versions", _versions(runs)),
    ]
    return items


def _hardware(runs: pd.DataFrame, tp: pd.DataFrame, mem: pd.DataFrame) -> str:
    """Distinct (gpu_name, device) pairs; CPU nodes have no GPU name."""
    both = pd.concat([df[["gpu_name", "device"]] for df in (runs, tp, mem)]).drop_duplicates()
    parts = []
    for r in both.itertuples():
        if pd.isna(r.device) and pd.isna(r.gpu_name):
            continue
        parts.append(f"{r.gpu_name} ({r.device})" if pd.notna(r.gpu_name) and r.gpu_name else f"{r.device}")
    return "; ".join(sorted(set(parts))) or "—"


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
def build_report(store_uri: str, out_dir: Path, sweep_name: str | None = None) -> Path:
    """Write the report of the store at ``store_uri`` into ``out_dir``; returns the HTML file's path."""
    out_dir = Path(out_dir)
    fig_dir, tab_dir = out_dir / "figures", out_dir / "tables"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tab_dir.mkdir(parents=True, exist_ok=True)

    data = load_store(store_uri, sweep_name)
    configs = node_configs(data.runs)
    methods = method_order(data, configs)
    baseline = baseline_method(data, configs)
    order = series_order(pd.concat([df[["series", "method"]] for df in
                                    (data.predictions, data.throughput, data.memory, data.runs)]), methods)

    acc = accuracy_tables(data.predictions)
    sig_all = significance_table(data.predictions)
    significant = sig_all[sig_all["significant"]] if len(sig_all) else sig_all
    tput = throughput_table(data.throughput, baseline)
    mem = memory_table(data.memory)
    trade = tradeoff_table(acc, tput)
    failed = failures_table(data.runs)
    missing = missing_table(data, configs, methods)

    by_level = {lvl: acc[acc["level"] == lvl].reset_index(drop=True) if len(acc) else acc
                for lvl in ("overall", "category", "subcategory", "subject")}
    tables = {"accuracy_overall": by_level["overall"], "accuracy_category": by_level["category"],
              "accuracy_subcategory": by_level["subcategory"], "accuracy_subject": by_level["subject"],
              "mcnemar_all": sig_all, "significant_differences": significant, "throughput": tput,
              "memory": mem, "tradeoff": trade, "failed_cells": failed, "missing": missing}
    for name, df in tables.items():
        df.to_csv(tab_dir / f"{name}.csv", index=False)

    devices = set(data.throughput["device"].dropna().astype(str))
    made = {
        "accuracy_category": figs.accuracy_bars(by_level["category"], order, fig_dir / "accuracy_category",
                                                "MMLU accuracy by category (95% CI)"),
        "accuracy_subcategory": figs.accuracy_bars(by_level["subcategory"], order,
                                                   fig_dir / "accuracy_subcategory",
                                                   "MMLU accuracy by subcategory (95% CI)", wide=True),
        "throughput": figs.throughput_lines(tput, order, fig_dir / "throughput", baseline),
        "memory": figs.memory_lines(mem, order, fig_dir / "memory"),
        "tradeoff": figs.tradeoff_scatter(trade, order, fig_dir / "tradeoff"),
        "energy": figs.energy_lines(tput, order, fig_dir / "energy", devices),
    }

    context = _sections(data, store_uri, acc, by_level, tput, mem, trade, significant, sig_all, failed,
                        missing, made, configs, baseline, devices)
    html_path = out_dir / "report.html"
    html_path.write_text(_render(context), encoding="utf-8")
    return html_path


def _sections(data: StoreData, store_uri: str, acc: pd.DataFrame, by_level: dict[str, pd.DataFrame],
              tput: pd.DataFrame, mem: pd.DataFrame, trade: pd.DataFrame, significant: pd.DataFrame,
              sig_all: pd.DataFrame, failed: pd.DataFrame, missing: pd.DataFrame,
              made: dict[str, figs.Figure | None], configs: list[dict], baseline: str | None,
              devices: set[str]) -> dict[str, str]:
    """The template's fields: one HTML fragment per section, each saying what is missing."""
    acc_series = set(acc["series"]) if len(acc) else set()
    tp_series = set(tput["series"]) if len(tput) else set()
    mem_series = set(mem["series"]) if len(mem) else set()
    missing_notes = []
    for s in sorted(acc_series - tp_series):
        missing_notes.append(f"{s}: accuracy rows but no throughput rows (missing).")
    for s in sorted(tp_series - acc_series):
        missing_notes.append(f"{s}: throughput rows but no MMLU predictions (missing).")
    for s in sorted(tp_series ^ mem_series):
        missing_notes.append(f"{s}: only one of throughput / memory rows present (missing the other).")

    fmt = lambda df, cols: df[[c for c in cols if c in df]] if len(df) else df  # noqa: E731
    acc_cols = ["series", "group", "n", "correct", "accuracy", "ci_low", "ci_high"]
    n_pred = len(data.predictions)
    status_counts = data.runs["status"].value_counts().to_dict() if len(data.runs) else {}
    summary = (f"{len(data.runs)} runs rows ({', '.join(f'{k}: {v}' for k, v in sorted(status_counts.items())) or 'none'}), "
               f"{n_pred} MMLU predictions, {len(data.throughput)} throughput rows, {len(data.memory)} memory rows.")
    unknown = sorted(set(status_counts) - set(STATUSES))
    if unknown:
        summary += f" Statuses outside {STATUSES}: {', '.join(unknown)}."

    energy_note = ""
    if len(tput) == 0 or tput["energy_j_per_token"].isna().all():
        energy_note = ("Energy per token: not measured on CPU (no NVML energy counter)."
                       if devices and all(d == "cpu" for d in devices)
                       else "Energy per token: not measured (no throughput rows or no NVML energy counter).")
    speed_note = (f"Speed-up is relative to <b>{html.escape(baseline)}</b> at the same batch size, engine and "
                  "input/output lengths; tokens/s is the median over repeats as the rows' method note says."
                  if baseline else "No unquantized baseline method found, so no speed-ups are shown.")

    ctx = {
        "title": "quantsweep report" + (f": {html.escape(', '.join(data.sweep_names))}" if data.sweep_names else ""),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "store_uri": html.escape(store_uri),
        "summary": html.escape(summary),
        "notes": _notes_html(data.notes),
        "provenance": "<table class=\"tbl kv\">" + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in provenance(data, configs))
        + "</table>",
        "accuracy_overall": _table_html(fmt(by_level["overall"], acc_cols)),
        "fig_category": _figure_html(made["accuracy_category"], "Accuracy by MMLU category, one bar per method"),
        "table_category": _table_html(fmt(by_level["category"], acc_cols)),
        "fig_subcategory": _figure_html(made["accuracy_subcategory"], "Accuracy by the 17 MMLU subcategories"),
        "table_subcategory": _table_html(fmt(by_level["subcategory"], acc_cols)),
        "table_subject": _table_html(_subject_wide(by_level["subject"])),
        "fig_throughput": _figure_html(made["throughput"], "Output tokens/s against batch size"),
        "speed_note": speed_note,
        "table_throughput": _table_html(fmt(tput, ["series", "batch_size", "input_len", "output_len",
                                                   "output_tokens_per_s", "decode_tokens_per_s", "ttft_s",
                                                   "itl_median_s", "speedup_vs_baseline", "device", "n_rows"])),
        "fig_memory": _figure_html(made["memory"], "Peak memory against batch size"),
        "table_memory": _table_html(fmt(mem, ["series", "batch_size", "device", "memory_measure",
                                              "peak_memory_gib", "weights_memory_bytes", "kv_cache_bytes",
                                              "peak_allocator_memory_bytes", "n_rows"])),
        "fig_tradeoff": _figure_html(made["tradeoff"], "Overall accuracy against output tokens/s, every batch size"),
        "fig_energy": _figure_html(made["energy"], "Energy per output token against batch size"),
        "energy_note": html.escape(energy_note),
        "table_tradeoff": _table_html(trade),
        "table_significant": _table_html(fmt(significant, ["model", "series_a", "series_b", "level", "group",
                                                           "n_pairs", "only_a", "only_b", "accuracy_a",
                                                           "accuracy_b", "diff", "p_value"]),
                                         empty=("no significant differences" if len(sig_all)
                                                else "no data yet (needs two methods with predictions)")),
        "n_tests": str(len(sig_all)),
        "table_failed": _table_html(failed, empty="no failed, OOM or skipped cells"),
        "missing_notes": _notes_html(missing_notes),
        "table_missing": _table_html(missing, empty="nothing missing: every expected cell has rows",
                                     max_rows=200),
    }
    return ctx


def _subject_wide(subjects: pd.DataFrame) -> pd.DataFrame:
    """57-subject table: one row per subject, one accuracy column per series (n in brackets)."""
    if subjects.empty:
        return subjects
    cell = subjects.assign(cell=subjects.apply(
        lambda r: f"{r['accuracy']:.3f} (n={int(r['n'])})", axis=1))
    wide = cell.pivot_table(index="group", columns="series", values="cell", aggfunc="first")
    return wide.reset_index().rename(columns={"group": "subject"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantsweep-report", description=__doc__.splitlines()[0])
    parser.add_argument("store_uri", help="the store: a local folder or a pyarrow filesystem URI (s3://...)")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.html, figures/ and tables/")
    parser.add_argument("--sweep", default=None, help="only this sweep_name (default: every sweep in the store)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = build_report(args.store_uri, args.out, args.sweep)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
