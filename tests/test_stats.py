"""Aggregation of per-question MMLU rows, checked against numbers worked out by hand."""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pandas as pd
import pytest

from tasks.mmlu import stats
from tasks.mmlu.categories import category

OTHER = "other (business, health, misc.)"

# Hand-made fixture: model "tiny", two methods, 4 subjects of 3 categories.  anatomy is "health" ->
# "other" in the original mapping (lm-eval files it under STEM); STEM mixes a 6-question subject at
# 3/6 with a 2-question one at 2/2, so micro (5/8) and macro (3/4) averages differ.
FIXTURE = {
    "fp16": {"anatomy": [1, 1, 0, 0], "abstract_algebra": [1, 1, 1, 0, 0, 0],
             "college_biology": [1, 1], "philosophy": [1, 0]},
    "awq": {"anatomy": [1, 0, 0, 0], "abstract_algebra": [1, 1, 1, 1, 0, 0],
            "college_biology": [0, 0], "philosophy": [0]},  # philosophy q1 missing for awq
}


def fixture_rows(model: str = "tiny") -> list[dict]:
    return [{"model": model, "method": m, "subject": s, "question_index": i, "correct": bool(c)}
            for m, subjects in FIXTURE.items() for s, cs in subjects.items() for i, c in enumerate(cs)]


def _get(table: pd.DataFrame, **where) -> pd.Series:
    sel = table
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, f"expected one row for {where}, got {len(sel)}"
    return sel.iloc[0]


def test_anatomy_follows_original_mapping_not_lm_eval():
    import lm_eval

    yaml_text = (Path(lm_eval.__file__).parent / "tasks/mmlu/default/mmlu_anatomy.yaml").read_text()
    assert "mmlu_stem_tasks" in yaml_text  # lm-eval's grouping: anatomy is STEM ...
    assert category("anatomy") == OTHER  # ... the original MMLU mapping: health -> other


def test_accuracy_table_hand_computed():
    table = stats.accuracy_table(fixture_rows(), by=("method",))
    expected_fp16 = {  # (level, group): (correct, n), counted by hand from FIXTURE
        ("subject", "anatomy"): (2, 4), ("subject", "abstract_algebra"): (3, 6),
        ("subject", "college_biology"): (2, 2), ("subject", "philosophy"): (1, 2),
        ("subcategory", "health"): (2, 4), ("subcategory", "math"): (3, 6),
        ("subcategory", "biology"): (2, 2), ("subcategory", "philosophy"): (1, 2),
        ("category", "STEM"): (5, 8), ("category", OTHER): (2, 4), ("category", "humanities"): (1, 2),
        ("overall", "all"): (8, 14),
    }
    expected_awq = {("subject", "anatomy"): (1, 4), ("subject", "abstract_algebra"): (4, 6),
                    ("subject", "college_biology"): (0, 2), ("subject", "philosophy"): (0, 1),
                    ("category", "STEM"): (4, 8), ("category", OTHER): (1, 4),
                    ("category", "humanities"): (0, 1), ("overall", "all"): (5, 13)}
    for method, expected in (("fp16", expected_fp16), ("awq", expected_awq)):
        for (level, group), (c, n) in expected.items():
            row = _get(table, method=method, level=level, group=group)
            assert (row["correct"], row["n"]) == (c, n), (method, level, group)
            assert row["accuracy"] == pytest.approx(c / n)
    # 4 subjects + 4 subcategories + 3 categories + overall, per method; nothing else
    assert len(table) == 2 * 12
    # micro average: STEM is 5/8, not the mean of its subjects' accuracies (0.5 + 1.0) / 2
    assert _get(table, method="fp16", level="category", group="STEM")["accuracy"] == 0.625
    # anatomy's questions count under "other", so STEM has 8 questions, not 12
    assert _get(table, method="fp16", level="category", group="STEM")["n"] == 8
    assert list(table["level"].unique()) == ["subject", "subcategory", "category", "overall"]
    # rows come in the mapping's order: subjects sorted, categories as in the original MMLU
    fp16 = table[table["method"] == "fp16"]
    assert fp16[fp16["level"] == "subject"]["group"].tolist() == sorted(FIXTURE["fp16"])
    assert fp16[fp16["level"] == "category"]["group"].tolist() == ["STEM", "humanities", OTHER]


def _score_statistic(p_hat: float, p: float, n: int) -> float:
    return abs(p_hat - p) / math.sqrt(p * (1 - p) / n)


def test_wilson_interval_is_the_score_test_inversion():
    """The Wilson bounds are the p where the score statistic |p_hat - p| / sqrt(p(1-p)/n) equals z."""
    z = 1.959963984540054
    for c, n in [(8, 14), (5, 13), (3, 6), (1, 4), (57, 100)]:
        lo, hi = stats.wilson_interval(c, n)
        p_hat = c / n
        assert lo < p_hat < hi
        assert _score_statistic(p_hat, lo, n) == pytest.approx(z, rel=1e-9)
        assert _score_statistic(p_hat, hi, n) == pytest.approx(z, rel=1e-9)
        # and they are the roots of (n + z^2) p^2 - (2 n p_hat + z^2) p + n p_hat^2 = 0
        a, b, cc = n + z * z, -(2 * n * p_hat + z * z), n * p_hat * p_hat
        roots = sorted([(-b - math.sqrt(b * b - 4 * a * cc)) / (2 * a), (-b + math.sqrt(b * b - 4 * a * cc)) / (2 * a)])
        assert (lo, hi) == pytest.approx(roots, rel=1e-12)
    # edges: 0/n starts at 0, n/n ends at 1; upper bound of 0/n is z^2 / (n + z^2)
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(z * z / (10 + z * z))
    lo, hi = stats.wilson_interval(10, 10)
    assert hi == 1 and lo == pytest.approx(10 / (10 + z * z))
    assert all(math.isnan(x) for x in stats.wilson_interval(0, 0))


def test_table_intervals_match_wilson():
    table = stats.accuracy_table(fixture_rows())
    for _, row in table.iterrows():
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(stats.wilson_interval(row["correct"], row["n"]))
        assert 0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1


def test_exact_mcnemar_small_tables():
    # two-sided binomial p for k discordant of one kind out of m, p = 1/2, counted by hand:
    # 1 of 7: 2 * (C(7,0) + C(7,1)) / 2^7 = 16/128; 0 of 6: 2 / 64; 1 of 5: 2 * 6 / 32; 3 of 6: 1
    assert stats.mcnemar_exact_p(1, 6) == pytest.approx(float(Fraction(16, 128)))
    assert stats.mcnemar_exact_p(6, 1) == pytest.approx(float(Fraction(16, 128)))
    assert stats.mcnemar_exact_p(0, 6) == pytest.approx(float(Fraction(2, 64)))
    assert stats.mcnemar_exact_p(1, 4) == pytest.approx(float(Fraction(12, 32)))
    assert stats.mcnemar_exact_p(3, 3) == 1.0
    assert stats.mcnemar_exact_p(0, 0) == 1.0
    # continuity-corrected chi-square, 1 dof: sf(x) = erfc(sqrt(x / 2)); (|1-6|-1)^2 / 7 = 16/7
    assert stats.mcnemar_chi2_p(1, 6) == pytest.approx(math.erfc(math.sqrt(16 / 7 / 2)))
    # Agresti (Categorical Data Analysis), presidential approval: b=150, c=86 -> z^2 = 64^2/236 = 17.36
    # without correction; with it (63^2/236 = 16.82) p is about 4.1e-5
    assert stats.mcnemar_chi2_p(150, 86) == pytest.approx(math.erfc(math.sqrt(63 ** 2 / 236 / 2)))
    assert stats.mcnemar_chi2_p(150, 86) < 1e-4


def test_mcnemar_pairs_hand_computed():
    pairs = stats.mcnemar_pairs(fixture_rows())
    assert set(pairs["method_a"]) == {"awq"} and set(pairs["method_b"]) == {"fp16"}
    overall = _get(pairs, level="overall")
    # paired on the 13 questions both methods answered (philosophy q1 only has fp16), a = awq, b = fp16:
    # both right: anatomy q0, abstract_algebra q0-2; awq only: abstract_algebra q3;
    # fp16 only: anatomy q1, college_biology q0-1, philosophy q0; both wrong: the other 4
    assert overall[["n_pairs", "both_correct", "only_a", "only_b", "both_wrong"]].tolist() == [13, 4, 1, 4, 4]
    assert overall["accuracy_a"] == pytest.approx(5 / 13)
    assert overall["accuracy_b"] == pytest.approx(8 / 13)
    assert overall["diff"] == pytest.approx(-3 / 13)
    assert overall["p_value"] == pytest.approx(12 / 32)  # 1 of 5 discordant, by hand above
    assert not overall["significant"]
    stem = _get(pairs, level="category", group="STEM")
    assert stem[["n_pairs", "only_a", "only_b"]].tolist() == [8, 1, 2]
    other = _get(pairs, level="category", group=OTHER)  # anatomy, by the original mapping
    assert other[["n_pairs", "only_a", "only_b"]].tolist() == [4, 0, 1]
    assert set(pairs["group"]) == {"all", "STEM", OTHER, "humanities"}


def test_mcnemar_pairs_significant_and_per_model():
    # model m2: gptq misses 6 questions that fp16 gets, never the reverse -> p = 2/64 < 0.05
    rows = fixture_rows("tiny") + [
        {"model": "m2", "method": meth, "subject": "marketing", "question_index": i,
         "correct": meth == "fp16" or i >= 6} for meth in ("fp16", "gptq") for i in range(10)]
    pairs = stats.mcnemar_pairs(rows)
    m2 = _get(pairs, model="m2", level="overall")
    assert (m2["method_a"], m2["method_b"], m2["only_a"], m2["only_b"]) == ("fp16", "gptq", 6, 0)
    assert m2["p_value"] == pytest.approx(2 / 64) and m2["significant"]
    # methods are only paired within one model: no fp16(tiny) x gptq(m2) pair
    assert set(zip(pairs["model"], pairs["method_a"], pairs["method_b"])) == {("tiny", "awq", "fp16"),
                                                                               ("m2", "fp16", "gptq")}


def test_mixed_models_need_model_in_by():
    rows = fixture_rows("tiny") + fixture_rows("other_model")
    with pytest.raises(ValueError, match="repeat a question"):
        stats.accuracy_table(rows, by=("method",))
    table = stats.accuracy_table(rows, by=("model", "method"))
    assert _get(table, model="other_model", method="fp16", level="overall")["n"] == 14


def test_accuracy_table_rejects_bad_rows():
    with pytest.raises(ValueError, match="lack column"):
        stats.accuracy_table([{"subject": "anatomy", "correct": True}], by=("method",))
    with pytest.raises(ValueError, match="unknown subject"):
        stats.accuracy_table([{"method": "x", "subject": "astrology", "correct": True}])
