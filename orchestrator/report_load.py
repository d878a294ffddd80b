"""The report's first step: read the store into DataFrames, keep one sweep if asked, label series, dedupe.

The only module of the report that touches the store.  What it hands on (:class:`StoreData`) is the rows
as measured, less what would be counted twice (a re-sharded rerun's questions, a fidelity setup measured
again), each row labelled with the ``series`` that figures and tables are keyed by, and the notes that say
what was dropped.  Also here: the nodes' recorded configs, parsed once for the later steps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa

from orchestrator.schema import TABLES
from orchestrator.store import ResultStore
from tasks.mmlu.categories import SUBJECTS

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


def config_section(configs: list[dict], key: str) -> dict:
    """The first ``key`` section (e.g. ``sweep``, ``eval``) found in the nodes' configs, else {}."""
    for cfg in configs:
        section = cfg.get(key)
        if isinstance(section, dict):
            return section
    return {}
