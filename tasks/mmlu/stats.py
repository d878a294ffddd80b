"""MMLU aggregation from per-question rows: accuracies with 95% intervals, and paired method tests.

Everything is computed from the per-question rows (``mmlu_predictions``), never from lm-eval's group
scores, and groups come from the original MMLU mapping (:mod:`tasks.mmlu.categories`).

Averaging: every group's accuracy is **micro-averaged** (question-weighted): correct answers over
questions in the group, as the original MMLU evaluation computes its subcategory, category and overall
numbers (it concatenates the per-question results of the subjects before taking the mean).  A subject
with 1,534 questions therefore weighs more than one with 100.

Intervals: the 95% **Wilson score interval** of a binomial proportion, per group.  It stays inside
[0, 1] and keeps close to nominal coverage for small n and accuracies near 0 or 1, where the normal
(Wald) interval fails; questions are treated as independent draws, which ignores that questions within
a subject are correlated (so the intervals of large groups are, if anything, too narrow).

Paired tests: two methods on the same model answered the *same* questions, so their difference is
tested with McNemar's test on the questions both answered.  Only discordant pairs (one right, the other
wrong) carry information; the exact test is the two-sided binomial test of ``only_a`` successes in
``only_a + only_b`` trials with p = 1/2 (``scipy.stats.binomtest``).  The chi-square version with
continuity correction is reported alongside for comparison with papers that use it.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import pandas as pd

from tasks.mmlu.categories import CATEGORIES, SUBCATEGORIES, SUBJECTS, category, subcategory

LEVELS = ("subject", "subcategory", "category", "overall")
OVERALL = "all"  # the group name of the overall row
_ORDER = {"subject": SUBJECTS, "subcategory": SUBCATEGORIES, "category": CATEGORIES, "overall": (OVERALL,)}
Z_95 = 1.959963984540054  # scipy.stats.norm.ppf(0.975)


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes out of ``n``; (nan, nan) when n == 0."""
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 or 1 one bound is exactly 0 or 1; set it so rounding never leaves 0.9999999999999999.
    low = 0.0 if correct == 0 else max(0.0, center - half)
    high = 1.0 if correct == n else min(1.0, center + half)
    return low, high


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: binomial test on the discordant pairs (1.0 when there are none)."""
    from scipy.stats import binomtest

    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue)


def mcnemar_chi2_p(only_a: int, only_b: int) -> float:
    """McNemar chi-square p-value with continuity correction ((|b-c|-1)^2/(b+c), 1 dof); nan without pairs."""
    from scipy.stats import chi2

    if only_a + only_b == 0:
        return math.nan
    stat = (abs(only_a - only_b) - 1) ** 2 / (only_a + only_b)
    return float(chi2.sf(stat, df=1))


def _frame(rows: pd.DataFrame | Iterable[dict], need: Sequence[str]) -> pd.DataFrame:
    """Rows as a DataFrame with the original mapping attached (recomputed from ``subject``)."""
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"MMLU rows lack column(s) {missing}; have {list(df.columns)}")
    unknown = sorted(set(df["subject"]) - set(SUBJECTS))
    if unknown:
        raise ValueError(f"MMLU rows have unknown subject(s) {unknown}")
    df["subcategory"] = df["subject"].map(subcategory)
    df["category"] = df["subject"].map(category)
    df["correct"] = df["correct"].astype(bool)
    return df


def _check_unique(df: pd.DataFrame, keys: list[str], hint: str) -> None:
    """Each question may count once per group: duplicates mean the rows mix runs that ``by`` merges."""
    if "question_index" not in df.columns:
        return
    dup = df.duplicated(keys + ["subject", "question_index"], keep=False)
    if dup.any():
        first = df.loc[dup, keys + ["subject", "question_index"]].iloc[0].to_dict()
        raise ValueError(f"MMLU rows repeat a question within one group ({first}); {hint}")


def accuracy_table(rows: pd.DataFrame | Iterable[dict], by: Sequence[str] = ("method",)) -> pd.DataFrame:
    """Micro-averaged accuracy with a 95% Wilson interval per ``by`` group and per MMLU level.

    ``rows`` need ``subject`` and ``correct`` plus the ``by`` columns (``question_index`` too, to catch
    rows of several models or scorings merged into one group).  Returns one row per ``by`` value,
    level (subject/subcategory/category/overall, original mapping) and group present in the data:
    ``*by, level, group, n, correct, accuracy, ci_low, ci_high``.
    """
    by = list(by)
    df = _frame(rows, ["subject", "correct", *by])
    _check_unique(df, by, "add the column that differs (e.g. model, scoring) to `by`")
    out = []
    for level in LEVELS:
        keys = by + ([] if level == "overall" else [level])
        if keys:
            g = df.groupby(keys, sort=False, dropna=False)["correct"].agg(n="size", correct="sum").reset_index()
        else:
            g = pd.DataFrame({"n": [len(df)], "correct": [int(df["correct"].sum())]})
        g["group"] = OVERALL if level == "overall" else g[level]
        g["level"] = level
        out.append(g[by + ["level", "group", "n", "correct"]])
    table = pd.concat(out, ignore_index=True)
    table["n"] = table["n"].astype(int)
    table["correct"] = table["correct"].astype(int)
    table["accuracy"] = table["correct"] / table["n"]
    ci = [wilson_interval(c, n) for c, n in zip(table["correct"], table["n"])]
    table["ci_low"] = [lo for lo, _ in ci]
    table["ci_high"] = [hi for _, hi in ci]
    return _sorted(table, by)


def _sorted(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    flat = [(lvl, name) for lvl, names in _ORDER.items() for name in names]
    rank = {key: i for i, key in enumerate(flat)}  # level order, then the mapping's own order
    order = table.apply(lambda r: rank.get((r["level"], r["group"]), 1 << 30), axis=1)
    table = table.assign(_o=order).sort_values(by + ["_o"], kind="stable").drop(columns="_o")
    return table.reset_index(drop=True)


def mcnemar_pairs(rows: pd.DataFrame | Iterable[dict], by: Sequence[str] = ("model",),
                  method_col: str = "method", alpha: float = 0.05) -> pd.DataFrame:
    """McNemar tests for every pair of methods within each ``by`` group (default: the same model).

    Questions are paired on (subject, question_index) present for both methods; tests are overall
    and per category (original mapping).  Columns: ``*by, method_a, method_b, level, group, n_pairs,
    both_correct, both_wrong, only_a, only_b, accuracy_a, accuracy_b, diff (a - b), p_value (exact),
    p_value_chi2 (continuity-corrected), significant (p_value < alpha)``.  Methods are paired in sorted
    order, so ``method_a < method_b``.
    """
    by = list(by)
    df = _frame(rows, ["subject", "question_index", "correct", method_col, *by])
    _check_unique(df, by + [method_col], "add the column that differs (e.g. scoring) to `by`")
    q = ["subject", "question_index"]
    out = []
    groups = df.groupby(by, sort=True, dropna=False) if by else [((), df)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        methods = sorted(part[method_col].unique())
        for a, b in itertools.combinations(methods, 2):
            left = part.loc[part[method_col] == a, q + ["category", "correct"]]
            right = part.loc[part[method_col] == b, q + ["correct"]]
            paired = left.merge(right, on=q, suffixes=("_a", "_b"))
            for level, name, sel in [("overall", OVERALL, paired)] + [
                    ("category", c, paired[paired["category"] == c]) for c in CATEGORIES]:
                if level == "category" and sel.empty:
                    continue
                out.append({**dict(zip(by, key)), "method_a": a, "method_b": b, "level": level,
                            "group": name, **_pair_counts(sel["correct_a"], sel["correct_b"], alpha)})
    cols = by + ["method_a", "method_b", "level", "group", "n_pairs", "both_correct", "both_wrong",
                 "only_a", "only_b", "accuracy_a", "accuracy_b", "diff", "p_value", "p_value_chi2",
                 "significant"]
    return pd.DataFrame(out, columns=cols)


def _pair_counts(ca: pd.Series, cb: pd.Series, alpha: float) -> dict:
    ca, cb = ca.to_numpy(bool), cb.to_numpy(bool)
    n = len(ca)
    only_a, only_b = int((ca & ~cb).sum()), int((~ca & cb).sum())
    acc_a = float(ca.mean()) if n else math.nan
    acc_b = float(cb.mean()) if n else math.nan
    p = mcnemar_exact_p(only_a, only_b)
    return {"n_pairs": n, "both_correct": int((ca & cb).sum()), "both_wrong": int((~ca & ~cb).sum()),
            "only_a": only_a, "only_b": only_b, "accuracy_a": acc_a, "accuracy_b": acc_b,
            "diff": acc_a - acc_b, "p_value": p, "p_value_chi2": mcnemar_chi2_p(only_a, only_b),
            "significant": bool(p < alpha)}
