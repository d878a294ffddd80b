"""Aggregates of the ``fidelity`` rows and MMLU answer flips, computed from stored rows only.

The CLI summary and the report both call these, so the two can never disagree.  Definitions:

- perplexity: ``exp(sum(nll_sum) / sum(tokens))`` over every scored token of the rows (token-weighted);
  ``ppl_ratio`` divides it by the baseline's own perplexity on the same rows' text (its row against itself);
- mean KL: the token mean (windows have equal lengths, so also the mean of the per-window means), with a
  95% Student-t interval over windows (tokens of one window are correlated, windows much less so), its
  lower end clipped at 0 since a KL divergence cannot be negative;
- p99 / max KL: over every scored token (from ``kl_tokens``), not an average of per-window percentiles;
- top-1 agreement: the fraction of all scored tokens whose argmax agrees with the baseline's;
- paired KL differences between two methods: per-window differences of their mean KL, with a t-interval
  and the paired t-test (the same windows score every method);
- answer flips: questions the baseline answered right and the method wrong (right -> wrong) and the
  reverse, paired on (subject, question) like McNemar's test in :mod:`tasks.mmlu.stats`.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

SUMMARY_COLUMNS = ["baseline", "sequences", "tokens", "perplexity", "ppl_ratio", "kl_mean", "kl_ci_low",
                   "kl_ci_high", "kl_p99", "kl_max", "top1_agreement"]


def _t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    n = len(values)
    mean = float(values.mean())
    if n < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return max(0.0, mean - half), mean + half


def _one_group(g: pd.DataFrame) -> dict:
    tokens = int(g["tokens"].sum())
    per_window = g["kl_mean"].to_numpy(dtype=float)
    low, high = _t_interval(per_window)
    if "kl_tokens" in g and g["kl_tokens"].map(lambda v: v is not None and len(v) > 0).all():
        all_kl = np.concatenate([np.asarray(v, dtype=float) for v in g["kl_tokens"]])
        p99, kl_max = float(np.quantile(all_kl, 0.99)), float(all_kl.max())
    else:  # rows without per-token values: the worst window's percentile, stated as an upper bound
        p99, kl_max = float(g["kl_p99"].max()), float(g["kl_max"].max())
    return {"sequences": len(g), "tokens": tokens,
            "perplexity": math.exp(g["nll_sum"].sum() / tokens) if tokens else math.nan,
            "kl_mean": float((g["kl_mean"] * g["tokens"]).sum() / tokens) if tokens else math.nan,
            "kl_ci_low": low, "kl_ci_high": high, "kl_p99": p99, "kl_max": kl_max,
            "top1_agreement": float((g["top1_agreement"] * g["tokens"]).sum() / tokens) if tokens else math.nan}


def summarize(rows: pd.DataFrame | Iterable[dict], by: Sequence[str] = ("method",)) -> pd.DataFrame:
    """One line per ``by`` group (and baseline): the aggregates above; ``ppl_ratio`` where the baseline's
    own rows (method == baseline) are present with the same values of ``by`` other than method/series."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    keys = list(by) + ["baseline"]
    if df.empty:
        return pd.DataFrame(columns=keys + [c for c in SUMMARY_COLUMNS if c != "baseline"])
    out = pd.DataFrame([{**dict(zip(keys, key if isinstance(key, tuple) else (key,))), **_one_group(g)}
                        for key, g in df.groupby(keys, sort=False, dropna=False)])
    # the baseline's own line shares everything but the method (and the series label naming it)
    context = [k for k in by if k not in ("method", "series")]
    out["ppl_ratio"] = [_ppl_ratio(out, row, context) for row in out.itertuples()]
    return out[keys + [c for c in SUMMARY_COLUMNS if c not in keys]]


def _ppl_ratio(out: pd.DataFrame, row, context: list[str]) -> float:
    same = out[(out["method"] == row.baseline) & (out["baseline"] == row.baseline)]
    for k in context:
        same = same[same[k] == getattr(row, k)]
    return float(row.perplexity / same["perplexity"].iloc[0]) if len(same) else math.nan


def paired_kl(rows: pd.DataFrame, series: str = "method") -> pd.DataFrame:
    """Every pair of non-baseline ``series`` scored on the same windows: the mean of their per-window KL
    differences (a - b) with a 95% t-interval and the paired t-test's p-value.

    Pairing on windows removes what the windows share (hard text is hard for every method), so two methods
    whose own KL intervals overlap can still be told apart.
    """
    columns = ["series_a", "series_b", "windows", "kl_a", "kl_b", "diff", "ci_low", "ci_high", "p_value"]
    df = rows[rows["method"] != rows["baseline"]] if len(rows) else rows
    if df.empty:
        return pd.DataFrame(columns=columns)
    wide = df.pivot_table(index=["text_fingerprint", "sequence_index"], columns=series, values="kl_mean")
    names = list(dict.fromkeys(df[series]))
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pair = wide[[a, b]].dropna()
            if len(pair) < 2:
                continue
            diff = (pair[a] - pair[b]).to_numpy(dtype=float)
            half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
            p_value = float(stats.ttest_rel(pair[a], pair[b]).pvalue) if diff.std(ddof=1) > 0 else math.nan
            out.append({"series_a": a, "series_b": b, "windows": len(pair), "kl_a": float(pair[a].mean()),
                        "kl_b": float(pair[b].mean()), "diff": float(diff.mean()), "ci_low": diff.mean() - half,
                        "ci_high": diff.mean() + half, "p_value": p_value})
    return pd.DataFrame(out, columns=columns)


def answer_flips(predictions: pd.DataFrame, baseline: str, by: Sequence[str] = ("method",)) -> pd.DataFrame:
    """Per method (other than the baseline): questions answered by both, right -> wrong, wrong -> right,
    answers changed (any letter), from the stored ``mmlu_predictions`` rows."""
    columns = list(by) + ["baseline", "questions", "right_to_wrong", "wrong_to_right", "answer_changed"]
    if predictions.empty or baseline not in set(predictions["method"]):
        return pd.DataFrame(columns=columns)
    key = ["subject", "question_index"]
    base = predictions[predictions["method"] == baseline].drop_duplicates(key).set_index(key)
    rows = []
    for group, g in predictions[predictions["method"] != baseline].groupby(list(by), sort=False):
        paired = g.drop_duplicates(key).merge(base[["correct", "predicted"]].reset_index(), on=key, how="inner",
                                              suffixes=("", "_base"))
        rows.append({**dict(zip(by, group if isinstance(group, tuple) else (group,))), "baseline": baseline,
                     "questions": len(paired),
                     "right_to_wrong": int((paired["correct_base"] & ~paired["correct"]).sum()),
                     "wrong_to_right": int((~paired["correct_base"] & paired["correct"]).sum()),
                     "answer_changed": int((paired["predicted_base"] != paired["predicted"]).sum())})
    return pd.DataFrame(rows, columns=columns)
