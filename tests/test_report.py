"""The report, built from a synthetic store written through the result schema.

Every CSV the report writes is checked against values recomputed here from the raw rows with plain
pandas (categories from the data folder's categories.json, not from the report's code), so a wrong
aggregation, a mixed-up method or a dropped row fails a test.  Also: partial and empty stores render,
and the HTML opens in headless Chromium without console errors.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import binomtest, norm

from orchestrator.report import build_report, main
from orchestrator.schema import SCHEMA_VERSION, table_from_rows

REPO = Path(__file__).resolve().parent.parent
MMLU_DIR = Path(os.environ.get("QUANTSWEEP_MMLU_DIR", REPO.parent / "shared" / "data" / "mmlu"))
CHROMIUM = Path("/usr/bin/chromium")

SWEEP = "synthetic"
METHODS = {"fp16": 0.62, "awq": 0.58, "rtn": 0.35}  # method -> probability of a correct answer
SUBJECTS = ["anatomy", "abstract_algebra", "high_school_us_history", "sociology", "marketing", "virology"]
BATCH_SIZES = [1, 8]
QUESTIONS = 30
FIGURES = ["accuracy_category", "accuracy_subcategory", "throughput", "roofline", "memory", "tradeoff", "energy",
           "fidelity"]
FIDELITY_WINDOWS = 4
SECTIONS = ["setup", "categories", "subcategories", "fidelity", "throughput", "memory", "tradeoff", "significance",
            "failures", "missing"]


def _mapping() -> tuple[dict[str, str], dict[str, str]]:
    path = MMLU_DIR / "categories.json"
    if not path.exists():
        pytest.skip(f"MMLU categories.json not found at {path} (set QUANTSWEEP_MMLU_DIR)")
    data = json.loads(path.read_text())
    return data["subject_to_subcategory"], data["subcategory_to_category"]


def _write(root: Path, table: str, key: str, rows: list[dict]) -> None:
    (root / table).mkdir(parents=True, exist_ok=True)
    pq.write_table(table_from_rows(table, rows), root / table / f"{key}.parquet")


def _common(key: str) -> dict:
    return {"schema_version": SCHEMA_VERSION, "sweep_name": SWEEP, "node_key": key}


def _run_row(key: str, kind: str, method: str, status: str = "ok", device: str = "cuda:0", **extra) -> dict:
    gpu = "NVIDIA H100 80GB HBM3" if device.startswith("cuda") else None
    return {**_common(key), "kind": kind, "status": status, "model": "smollm2-135m", "method": method,
            "backend": "torch", "device": device, "gpu_name": gpu, "hostname": "worker-1", "attempt": 1,
            "started_at": pd.Timestamp("2026-11-25 10:00", tz="UTC"),
            "finished_at": pd.Timestamp("2026-11-25 10:05", tz="UTC"), "duration_s": 300.0,
            "versions_json": json.dumps({"torch": "2.13.0", "transformers": "5.17.0", "lm_eval": "0.4.13"}),
            **extra}


def write_store(root: Path, *, profile: bool = True, device: str = "cuda:0") -> None:
    """Three methods × six subjects (two shards) × two batch sizes; rtn at batch 8 ran out of memory."""
    s2sub, sub2cat = _mapping()
    rng = np.random.default_rng(0)
    shards = [SUBJECTS[0::2], SUBJECTS[1::2]]
    on_cuda = device.startswith("cuda")
    for m_index, (method, p_correct) in enumerate(METHODS.items()):
        algorithm = "none" if method == "fp16" else method
        _write(root, "runs", f"quantize-{method}", [_run_row(
            f"quantize-{method}", "quantize", method, device=device,
            config_json=json.dumps({"method": {"name": method, "algorithm": algorithm}, "seed": 0}))])
        for shard, subjects in enumerate(shards):
            key = f"evaluate-{method}-{shard}"
            rows = []
            for subject in subjects:
                for q in range(QUESTIONS):
                    gold = "ABCD"[int(rng.integers(4))]
                    correct = bool(rng.random() < p_correct)
                    predicted = gold if correct else "ABCD"[("ABCD".index(gold) + 1) % 4]
                    rows.append({**_common(key), "model": "smollm2-135m", "method": method, "backend": "torch",
                                 "shard": shard, "subject": subject, "subcategory": s2sub[subject],
                                 "category": sub2cat[s2sub[subject]], "question_index": q, "gold": gold,
                                 "predicted": predicted, "correct": correct,
                                 "choice_scores": rng.normal(size=4).tolist(), "scoring": "loglikelihood",
                                 "num_fewshot": 5})
            _write(root, "mmlu_predictions", key, rows)
            _write(root, "runs", key, [_run_row(key, "evaluate", method, device=device, shard=shard,
                                                subjects=subjects,
                                                config_json=json.dumps({"eval": {"num_fewshot": 5,
                                                                                  "limit_per_subject": None}}))])
        key = f"fidelity-{method}"
        _write(root, "fidelity", key, [{
            **_common(key), "model": "smollm2-135m", "method": method, "backend": "torch", "baseline": "fp16",
            "sequence_index": i, "tokens": 7, "nll_sum": 7 * (2.0 + 0.1 * m_index + 0.01 * i),
            "kl_mean": 0.0 if method == "fp16" else 0.01 * m_index * (1 + 0.1 * i),
            "kl_p99": 0.0 if method == "fp16" else 0.05 * m_index, "kl_max": 0.0 if method == "fp16" else 0.1 * m_index,
            "top1_agreement": 1.0 if method == "fp16" else 0.9 - 0.01 * i,
            "kl_tokens": [0.0 if method == "fp16" else 0.01 * m_index * (1 + 0.1 * i)] * 7,
            "text_source": "pydoc_topics_heldout", "text_fingerprint": "abc", "seq_len": 8, "device": device,
            "dtype": "bfloat16", "weight_format": "dense bfloat16" if method == "fp16" else "int4-g128",
            "baseline_weight_format": "dense bfloat16", "engine": "test", "method_note": "exact KL"}
            for i in range(FIDELITY_WINDOWS)])
        _write(root, "runs", key, [_run_row(key, "fidelity", method, device=device)])
        for batch_size in BATCH_SIZES:
            key = f"profile-{method}-{batch_size}"
            if method == "rtn" and batch_size == 8:
                _write(root, "runs", key, [_run_row(key, "profile", method, status="oom", device=device,
                                                    batch_size=batch_size,
                                                    error="OutOfMemoryError: CUDA out of memory")])
                continue
            _write(root, "runs", key, [_run_row(key, "profile", method, device=device, batch_size=batch_size)])
            if not profile:
                continue
            tps = 40.0 * batch_size ** 0.8 * (1 + 0.5 * m_index) * (1 + 0.05 * rng.random())
            _write(root, "throughput", key, [{
                **_common(key), "model": "smollm2-135m", "method": method, "backend": "torch",
                "batch_size": batch_size, "input_len": 128, "output_len": 32, "repeats": 3, "warmup": 1,
                "output_tokens_per_s": tps, "decode_tokens_per_s": tps * 1.2, "e2e_s": batch_size * 32 / tps,
                "ttft_s": 0.05, "itl_median_s": 0.02, "itl_p90_s": 0.03,
                "energy_j_per_token": (0.5 / batch_size) if on_cuda else None, "device": device,
                "gpu_name": "NVIDIA H100 80GB HBM3" if on_cuda else None,
                "driver_version": "580.95.05" if on_cuda else None, "dtype": "float16",
                "weight_format": "float16" if method == "fp16" else "int4-g128", "kv_cache_policy": "dynamic",
                "weights_note": "real weights", "method_note": "median of 3 repeats after 1 warmup",
                "copy_bandwidth_bytes_per_s": 3.9e12 if on_cuda else 2.0e10,
                "roofline_pct": 30.0 + 10 * m_index + batch_size}])
            mem_bytes = int(2e9 / (1 + m_index) + batch_size * 1e7)
            _write(root, "memory", key, [{
                **_common(key), "model": "smollm2-135m", "method": method, "backend": "torch",
                "batch_size": batch_size, "device": device,
                "gpu_name": "NVIDIA H100 80GB HBM3" if on_cuda else None,
                "peak_device_memory_bytes": mem_bytes if on_cuda else None,
                "peak_process_memory_bytes": mem_bytes // 2,
                "weights_memory_bytes": mem_bytes // 3, "kv_cache_bytes": batch_size * 1000,
                "method_note": "NVML device-wide peak" if on_cuda else "peak RSS of the process"}])


def _raw(root: Path, table: str) -> pd.DataFrame:
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted((root / table).glob("*.parquet"))],
                     ignore_index=True)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One full store and its report, shared by the read-only checks below (building takes seconds)."""
    root = tmp_path_factory.mktemp("full")
    write_store(root / "store")
    html = build_report(str(root / "store"), root / "report")
    return root / "store", html


def test_every_figure_and_section_exists(full_report: tuple[Path, Path]) -> None:
    _, html_path = full_report
    for name in FIGURES:
        for ext in ("png", "svg"):
            path = html_path.parent / "figures" / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
    text = html_path.read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in text
    assert text.count("data:image/png;base64,") == len(FIGURES)
    assert "$" not in text.replace("$$", "")  # every template field filled
    assert "NVIDIA H100 80GB HBM3" in text and "580.95.05" in text and "torch 2.13.0" in text
    assert "OutOfMemoryError" in text


def test_fidelity_table_and_flips_match_the_rows(full_report: tuple[Path, Path]) -> None:
    """Perplexity, KL and agreement recomputed by hand from the raw rows; flips from the raw predictions."""
    store, html_path = full_report
    raw = _raw(store, "fidelity")
    got = pd.read_csv(html_path.parent / "tables" / "fidelity.csv").set_index("series")
    assert set(got.index) == set(raw["method"]) and got.index[0] == "fp16"  # the baseline first
    for method, rows in raw.groupby("method"):
        assert got.loc[method, "perplexity"] == pytest.approx(np.exp(rows["nll_sum"].sum() / rows["tokens"].sum()))
        assert got.loc[method, "kl_mean"] == pytest.approx(rows["kl_mean"].mean(), abs=1e-12)
        assert got.loc[method, "top1_agreement"] == pytest.approx(rows["top1_agreement"].mean())
        assert got.loc[method, "sequences"] == FIDELITY_WINDOWS
        base = raw[raw["method"] == "fp16"]
        assert got.loc[method, "ppl_ratio"] == pytest.approx(
            np.exp(rows["nll_sum"].sum() / rows["tokens"].sum() - base["nll_sum"].sum() / base["tokens"].sum()))
    assert got.loc["fp16", "kl_mean"] == 0 and got.loc["fp16", "ppl_ratio"] == 1.0
    preds = _raw(store, "mmlu_predictions").set_index(["method", "subject", "question_index"])["correct"]
    flips = pd.read_csv(html_path.parent / "tables" / "answer_flips.csv").set_index("series")
    base = preds.loc["fp16"]
    for method in set(flips.index):
        other = preds.loc[method].reindex(base.index)
        assert flips.loc[method, "right_to_wrong"] == int((base & ~other).sum())
        assert flips.loc[method, "wrong_to_right"] == int((~base & other).sum())
    text = html_path.read_text()
    assert "against <b>fp16</b>" in text and "pydoc_topics_heldout" in text


def _check_accuracy(csv: Path, raw: pd.DataFrame, key: str) -> None:
    expected = raw.groupby(["method", key])["correct"].agg(n="size", correct="sum").reset_index()
    expected["accuracy"] = expected["correct"] / expected["n"]
    got = pd.read_csv(csv)
    merged = expected.merge(got, left_on=["method", key], right_on=["series", "group"], suffixes=("", "_got"))
    assert len(merged) == len(expected) == len(got)
    assert (merged["n"] == merged["n_got"]).all()
    assert (merged["correct"] == merged["correct_got"]).all()
    assert np.allclose(merged["accuracy"], merged["accuracy_got"])
    low, high = _wilson(merged["correct"].to_numpy(float), merged["n"].to_numpy(float))
    assert np.allclose(merged["ci_low"], low) and np.allclose(merged["ci_high"], high)


def _wilson(k: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval (the interval tasks.mmlu.stats documents), from its textbook formula."""
    z = norm.ppf(0.975)
    p = k / n
    center = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
    half = z / (1 + z ** 2 / n) * np.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
    return center - half, center + half


def test_accuracy_tables_match_raw_rows(full_report: tuple[Path, Path]) -> None:
    store, html_path = full_report
    s2sub, sub2cat = _mapping()
    raw = _raw(store, "mmlu_predictions")
    raw["sub"] = raw["subject"].map(s2sub)
    raw["cat"] = raw["sub"].map(sub2cat)
    raw["all"] = "all"
    tables = html_path.parent / "tables"
    _check_accuracy(tables / "accuracy_category.csv", raw, "cat")
    _check_accuracy(tables / "accuracy_subcategory.csv", raw, "sub")
    _check_accuracy(tables / "accuracy_subject.csv", raw, "subject")
    _check_accuracy(tables / "accuracy_overall.csv", raw, "all")
    # anatomy is "health" -> "other (business, health, misc.)" in the original MMLU grouping.
    cat = pd.read_csv(tables / "accuracy_category.csv")
    assert "other (business, health, misc.)" in set(cat["group"])


def test_throughput_memory_and_failures_match_raw_rows(full_report: tuple[Path, Path]) -> None:
    store, html_path = full_report
    tables = html_path.parent / "tables"
    raw_tp = _raw(store, "throughput")
    expected = raw_tp.groupby(["method", "batch_size"])["output_tokens_per_s"].median()
    got = pd.read_csv(tables / "throughput.csv").set_index(["series", "batch_size"])
    assert len(got) == len(expected) == 5  # 3 methods × 2 batch sizes, less rtn's OOM cell
    for (method, bs), tps in expected.items():
        assert got.loc[(method, bs), "output_tokens_per_s"] == pytest.approx(tps)
        assert got.loc[(method, bs), "speedup_vs_baseline"] == pytest.approx(tps / expected[("fp16", bs)])
    roofline = raw_tp.groupby(["method", "batch_size"])["roofline_pct"].median()
    for (method, bs), pct in roofline.items():
        assert got.loc[(method, bs), "roofline_pct"] == pytest.approx(pct)
    html = html_path.read_text()
    assert "roofline_pct" in html and "3.900 TB/s (bytes read + written)" in html

    raw_mem = _raw(store, "memory")
    expected_mem = raw_mem.groupby(["method", "batch_size"])["peak_device_memory_bytes"].max()
    got_mem = pd.read_csv(tables / "memory.csv").set_index(["series", "batch_size"])
    assert len(got_mem) == len(expected_mem)
    for (method, bs), peak in expected_mem.items():
        assert got_mem.loc[(method, bs), "peak_memory_bytes"] == peak
        assert got_mem.loc[(method, bs), "memory_measure"] == "device memory (NVML)"

    trade = pd.read_csv(tables / "tradeoff.csv")
    assert len(trade) == 5 and set(trade["series"]) == set(METHODS)

    runs = _raw(store, "runs")
    bad = runs[runs["status"] != "ok"]
    failed = pd.read_csv(tables / "failed_cells.csv")
    assert set(failed["node_key"]) == set(bad["node_key"]) == {"profile-rtn-8"}
    assert failed.loc[0, "status"] == "oom" and "out of memory" in failed.loc[0, "error"]


def test_significance_table_matches_paired_counts(full_report: tuple[Path, Path]) -> None:
    store, html_path = full_report
    raw = _raw(store, "mmlu_predictions")
    wide = raw.pivot_table(index=["subject", "question_index"], columns="method", values="correct", aggfunc="first")
    all_pairs = pd.read_csv(html_path.parent / "tables" / "mcnemar_all.csv")
    overall = all_pairs[all_pairs["level"] == "overall"]
    assert len(overall) == 3  # fp16/awq, fp16/rtn, awq/rtn
    for r in overall.itertuples():
        a, b = wide[r.series_a].astype(bool), wide[r.series_b].astype(bool)
        assert r.only_a == int((a & ~b).sum()) and r.only_b == int((~a & b).sum())
        assert r.n_pairs == len(wide)
        assert r.p_value == pytest.approx(binomtest(r.only_a, r.only_a + r.only_b, 0.5).pvalue)
    significant = pd.read_csv(html_path.parent / "tables" / "significant_differences.csv")
    assert (significant["p_value"] < 0.05).all()
    assert len(significant) == int(all_pairs["significant"].sum())
    # fp16 (p=0.62) vs rtn (p=0.35) on 180 questions is far apart: the overall test must flag it.
    flagged = significant[significant["level"] == "overall"]
    assert any({r.series_a, r.series_b} == {"fp16", "rtn"} for r in flagged.itertuples())


def test_partial_store_says_what_is_missing(tmp_path: Path) -> None:
    """Evaluated but not profiled, and one evaluate node (awq, shard 1) not even started."""
    store = tmp_path / "store"
    write_store(store, profile=False, device="cpu")
    for table in ("runs", "mmlu_predictions"):
        (store / table / "evaluate-awq-1.parquet").unlink()
    (store / "runs" / ".tmp-evaluate-awq-1-crashed.parquet").write_bytes(b"half a file")  # ignored
    html_path = build_report(str(store), tmp_path / "report")
    text = html_path.read_text()
    assert "accuracy rows but no throughput rows (missing)" in text
    missing = pd.read_csv(html_path.parent / "tables" / "missing.csv")
    tp_missing = missing[missing["table"] == "throughput"]
    assert set(zip(tp_missing["method"], tp_missing["batch_size"])) == {
        (m, b) for m in METHODS for b in BATCH_SIZES}
    assert (tp_missing.set_index(["method", "batch_size"]).loc[("rtn", 8), "reason"]) == "node oom"
    ev_missing = missing[missing["table"] == "mmlu_predictions"]
    assert list(zip(ev_missing["method"], ev_missing["shard"])) == [("awq", 1)]
    assert ev_missing["reason"].iloc[0].startswith("no runs row")
    # awq's accuracy now covers shard 0's subjects only, and the table says so through n.
    overall = pd.read_csv(html_path.parent / "tables" / "accuracy_overall.csv").set_index("series")
    assert overall.loc["awq", "n"] == QUESTIONS * len(SUBJECTS[0::2])
    assert overall.loc["fp16", "n"] == QUESTIONS * len(SUBJECTS)
    for name in FIGURES:  # placeholders keep the file set stable
        assert (html_path.parent / "figures" / f"{name}.png").exists()
    assert "no data yet" in text


def test_duplicates_count_once_and_eval_setups_stay_apart(tmp_path: Path) -> None:
    """A re-sharded rerun repeats questions (counted once); a 0-shot rerun of fp16 is its own series."""
    store = tmp_path / "store"
    write_store(store)
    shard0 = pq.read_table(store / "mmlu_predictions" / "evaluate-fp16-0.parquet").to_pylist()
    _write(store, "mmlu_predictions", "evaluate-fp16-resharded",
           [{**r, "node_key": "evaluate-fp16-resharded"} for r in shard0])
    zero_shot = [{**r, "node_key": "evaluate-fp16-0shot", "num_fewshot": 0, "correct": True} for r in shard0]
    _write(store, "mmlu_predictions", "evaluate-fp16-0shot", zero_shot)
    html_path = build_report(str(store), tmp_path / "report")
    overall = pd.read_csv(html_path.parent / "tables" / "accuracy_overall.csv").set_index("series")
    five, zero = "fp16 [loglikelihood, 5-shot]", "fp16 [loglikelihood, 0-shot]"
    assert overall.loc[five, "n"] == QUESTIONS * len(SUBJECTS)  # not + the resharded copy
    assert overall.loc[zero, "n"] == len(zero_shot) and overall.loc[zero, "accuracy"] == 1.0
    assert "duplicate MMLU predictions" in html_path.read_text()
    trade = pd.read_csv(html_path.parent / "tables" / "tradeoff.csv")
    assert {five, zero} <= set(trade["series"])
    assert "accuracy rows but no throughput rows" not in html_path.read_text()


def test_cpu_rows_are_labelled_as_rss_and_no_energy(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_store(store, device="cpu")
    html_path = build_report(str(store), tmp_path / "report")
    mem = pd.read_csv(html_path.parent / "tables" / "memory.csv")
    raw = _raw(store, "memory").set_index(["method", "batch_size"])["peak_process_memory_bytes"]
    assert (mem["memory_measure"] == "process peak RSS").all()
    for r in mem.itertuples():
        assert r.peak_memory_bytes == raw[(r.series, r.batch_size)]
    assert "not measured on CPU" in html_path.read_text()


def test_empty_store_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "store").mkdir()
    assert main([str(tmp_path / "store"), "--out", str(tmp_path / "report"), "--sweep", "nothing"]) == 0
    html_path = Path(capsys.readouterr().out.strip())
    assert html_path.exists() and "no data yet" in html_path.read_text()
    assert main([str(tmp_path / "no-such-store"), "--out", str(tmp_path / "r2")]) == 2  # a typo is an error


def test_sweep_filter(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_store(store)
    html_path = build_report(str(store), tmp_path / "report", sweep_name="another-sweep")
    assert "no data yet" in html_path.read_text()
    assert pd.read_csv(html_path.parent / "tables" / "accuracy_overall.csv").empty


def render_in_chromium(html_path: Path, screenshot: Path, profile_dir: Path) -> tuple[str, str]:
    """Screenshot the page and dump its DOM with headless Chromium; returns (dom, chromium's stderr)."""
    common = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run",
              f"--user-data-dir={profile_dir}", "--enable-logging=stderr", "--v=0"]
    url = html_path.resolve().as_uri()
    shot = subprocess.run(common + [f"--screenshot={screenshot}", "--window-size=1280,4000", url],
                          capture_output=True, text=True, timeout=120)
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and dom.returncode == 0, shot.stderr[-2000:] + dom.stderr[-2000:]
    return dom.stdout, shot.stderr + dom.stderr


def _console_lines(log: str) -> list[str]:
    """Page console output (errors included) as Chromium logs it with --enable-logging=stderr."""
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_html_opens_in_headless_chromium(full_report: tuple[Path, Path], tmp_path: Path) -> None:
    _, html_path = full_report
    screenshot = tmp_path / "shot.png"
    dom, log = render_in_chromium(html_path, screenshot, tmp_path / "chromium-profile")
    assert screenshot.exists() and screenshot.stat().st_size > 10_000
    for section in SECTIONS:
        assert f'id="{section}"' in dom
    assert not _console_lines(log), _console_lines(log)
    # The check itself can fail: a page with a script error is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    _, bad_log = render_in_chromium(bad, tmp_path / "bad.png", tmp_path / "chromium-profile")
    assert any("undefinedFunction" in line for line in _console_lines(bad_log))
    if os.environ.get("QUANTSWEEP_REPORT_SCREENSHOT"):  # refresh docs/report-screenshot.png by hand
        shutil.copy(screenshot, os.environ["QUANTSWEEP_REPORT_SCREENSHOT"])
