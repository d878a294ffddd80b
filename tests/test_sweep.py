"""End to end on real Ray, real Parquet, real lm-eval: the sweep, failures as rows, kill and resume."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from orchestrator.plan import plan_sweep
from orchestrator.schedule import run_sweep
from orchestrator.store import ResultStore
from orchestrator.validate import validate
from tests.sweep_helpers import TINY, compose_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_ray_instance():
    """The in-process sweeps of this module share one Ray instance (``run_sweep`` reuses a running one)."""
    yield
    import ray

    ray.shutdown()


def _sweep(overrides: list[str], after_validation: Callable[[], None] = lambda: None):
    cfg = validate(compose_config(TINY + overrides))
    after_validation()
    plan = plan_sweep(cfg)
    return cfg, plan, run_sweep(plan, cfg)


METHODS = ("fp16", "awq", "gptq")


def test_cpu_sweep_fills_the_expected_grid(tmp_path: Path, mmlu_dir: Path) -> None:
    """fp16, AWQ and GPTQ on a tiny model, 2 MMLU subjects in 2 shards, 2 batch sizes."""
    subjects = ["abstract_algebra", "anatomy"]
    grid = [f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}", f"sweep.methods=[{','.join(METHODS)}]",
            f"sweep.subjects=[{','.join(subjects)}]", "sweep.batch_sizes=[1,3]", "sweep.num_shards=2"]
    cfg, plan, outcome = _sweep(grid)
    assert outcome.all_ok, {k: r["error"] for k, r in outcome.results.items() if r["status"] != "ok"}
    store = ResultStore(str(tmp_path))
    runs = store.read("runs").to_pandas()
    sweep_rows = runs[runs.kind == "sweep"]
    assert len(sweep_rows) == 1 and '"experiment"' in sweep_rows.iloc[0]["config_json"]
    runs = runs[runs.kind != "sweep"]
    assert sorted(runs["node_key"]) == sorted(plan.nodes) and (runs["status"] == "ok").all()
    predictions = store.read("mmlu_predictions").to_pandas()
    # 3 questions per subject (eval.limit_per_subject) x 2 subjects x 3 methods, one row per question
    assert len(predictions) == 3 * 2 * 3
    assert set(map(tuple, predictions[["method", "subject"]].drop_duplicates().values)) == {
        (m, s) for m in METHODS for s in subjects}
    assert (predictions["correct"] == (predictions["predicted"] == predictions["gold"])).all()
    assert set(predictions.loc[predictions.subject == "anatomy", "category"]) == {"other (business, health, misc.)"}
    throughput = store.read("throughput").to_pandas()
    assert sorted(zip(throughput["method"], throughput["batch_size"])) == sorted(
        (m, b) for m in METHODS for b in (1, 3))
    assert (throughput["output_tokens_per_s"] > 0).all() and (throughput["ttft_s"] > 0).all()
    memory = store.read("memory").to_pandas()
    assert len(memory) == 6 and (memory["peak_process_memory_bytes"] > 50 * 2**20).all()
    assert memory["method_note"].str.contains("RSS").all()
    # a second run finds everything in the store and runs nothing
    quantized = runs[runs.kind == "quantize"].set_index("method")
    for method in ("awq", "gptq"):
        assert "compressed-tensors" in quantized.loc[method, "result_json"]
    _, _, again = _sweep(grid)
    assert again.ran == set() and again.reused == set(plan.nodes)
    _check_report_matches_store(tmp_path, tmp_path / "report", predictions, throughput, memory)


def _check_report_matches_store(store_dir: Path, out: Path, predictions, throughput, memory) -> None:
    """The report of a real sweep: every figure exists, its tables equal numbers recomputed from the rows."""
    import pandas as pd

    from orchestrator.report import build_report

    html = build_report(str(store_dir), out)
    assert html.exists() and "no data yet" not in html.read_text().split("categories")[0]
    for name in ("accuracy_category", "accuracy_subcategory", "throughput", "memory", "tradeoff", "energy"):
        for ext in ("png", "svg"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000
    overall = pd.read_csv(out / "tables" / "accuracy_overall.csv")
    expected = predictions.groupby("method")["correct"].mean()
    for row in overall.itertuples():
        assert abs(row.accuracy - expected[row.series]) < 1e-9
    by_category = pd.read_csv(out / "tables" / "accuracy_category.csv")
    expected = predictions.groupby(["method", "category"])["correct"].agg(["mean", "size"])
    assert len(by_category) == len(expected)
    for row in by_category.itertuples():
        assert abs(row.accuracy - expected.loc[(row.series, row.group), "mean"]) < 1e-9
        assert row.n == expected.loc[(row.series, row.group), "size"]
    speed = pd.read_csv(out / "tables" / "throughput.csv")
    expected = throughput.set_index(["method", "batch_size"])["output_tokens_per_s"]
    assert len(speed) == len(expected)
    for row in speed.itertuples():
        assert abs(row.output_tokens_per_s - expected[(row.method, row.batch_size)]) < 1e-6 * expected.max()
    peaks = pd.read_csv(out / "tables" / "memory.csv")
    assert len(peaks) == len(memory)


def test_failing_and_oom_cells_become_rows(tmp_path: Path, mmlu_dir: Path) -> None:
    broken = tmp_path / "mmlu"
    shutil.copytree(mmlu_dir, broken)
    virology = broken / "test" / "virology_test.csv"
    good = virology.read_bytes()

    def break_virology() -> None:
        """The pre-flight reads every row of the chosen subjects' CSVs, so the file breaks after it (as one
        changed under a running sweep would): the evaluate cell that reads it fails, as a row."""
        virology.write_text('"only one column\n"\x00\x00,,\n')

    store_dir = tmp_path / "store"
    cfg, plan, outcome = _sweep([f"store.uri={store_dir}", f"eval.mmlu_dir={broken}", "sweep.methods=[fp16]",
                                 "sweep.subjects=[anatomy,virology]", "sweep.num_shards=2",
                                 # 2e9 sequences x 8 tokens x int64 = 128 GB cannot be allocated: an out-of-memory cell
                                 "sweep.batch_sizes=[1,2000000000]"], after_validation=break_virology)
    runs = ResultStore(str(store_dir)).read("runs").to_pandas().query("kind != 'sweep'").set_index("node_key")
    assert sorted(runs.index) == sorted(plan.nodes)  # every node has its row: the sweep finished
    evaluate = runs[runs.kind == "evaluate"].set_index("shard")
    by_subject = {tuple(s): row for s, row in zip(evaluate["subjects"], evaluate.itertuples())}
    assert by_subject[("anatomy",)].status == "ok"
    assert by_subject[("virology",)].status == "failed" and "virology" in by_subject[("virology",)].error
    profile = runs[runs.kind == "profile"].set_index("batch_size")
    assert profile.loc[1, "status"] == "ok"
    assert profile.loc[2000000000, "status"] == "oom"
    assert "allocate" in profile.loc[2000000000, "error"]
    assert not outcome.all_ok
    # the failed cells, and only they, run again on the next run (sweep.rerun=failed)
    virology.write_bytes(good)
    _, _, again = _sweep([f"store.uri={store_dir}", f"eval.mmlu_dir={broken}", "sweep.methods=[fp16]",
                          "sweep.subjects=[anatomy,virology]", "sweep.num_shards=2",
                          "sweep.batch_sizes=[1,2000000000]"], after_validation=break_virology)
    assert {plan.nodes[k].describe() for k in again.ran} == {"evaluate method=fp16 shard=1",
                                                             "profile method=fp16 batch_size=2000000000"}


def test_kill_driver_and_resume(tmp_path: Path, mmlu_dir: Path) -> None:
    store_dir = tmp_path / "store"
    args = [sys.executable, "-m", "orchestrator.cli", *TINY, f"store.uri={store_dir}", f"eval.mmlu_dir={mmlu_dir}",
            "sweep.methods=[fp16,rtn]", "sweep.stages=[profile]", "sweep.batch_sizes=[1,2,3]",
            "sweep.repeats=2", "sweep.output_len=32"]
    first = subprocess.Popen(args, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    runs_dir = store_dir / "runs"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = list(runs_dir.glob("profile-*.parquet")) if runs_dir.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started, mid-sweep
    first.wait()
    store = ResultStore(str(store_dir))
    before = store.read("runs").to_pandas().query("kind != 'sweep'").set_index("node_key")
    assert 2 <= (before.kind == "profile").sum() < 6, "kill landed before or after the sweep; nothing to resume"
    second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    after = store.read("runs").to_pandas()
    assert after["node_key"].is_unique and (after.kind == "sweep").sum() == 1
    after = after[after.kind != "sweep"]
    assert len(after) == 1 + 2 + 2 + 6  # model, 2 quantize, 2 build, 6 profile: one row each
    assert (after["status"] == "ok").all()
    after = after.set_index("node_key")
    for key, row in before.iterrows():  # finished nodes were not redone
        assert after.loc[key, "finished_at"] == row["finished_at"]
    throughput = store.read("throughput").to_pandas()
    assert throughput["node_key"].is_unique and len(throughput) == 6
    assert not [p for p in store_dir.rglob(".tmp-*")], "a temporary file survived the rerun"


def test_hydra_multirun_runs_one_sweep_per_value_into_one_store(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "-m", *TINY, f"store.uri={store_dir}",
                             "sweep.methods=[fp16]", "sweep.stages=[profile]", "sweep.batch_sizes=[1]",
                             "sweep.input_len=8,16"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Launching 2 jobs locally" in result.stdout + result.stderr
    store = ResultStore(str(store_dir))
    throughput = store.read("throughput").to_pandas()
    assert sorted(throughput["input_len"]) == [8, 16]
    runs = store.read("runs").to_pandas()
    # the model, its fp16 quantize node and the torch engine (sized per cell, not per input length) are
    # shared by both jobs; each job has its own profile cell and sweep row
    assert (runs.kind == "model").sum() == 1 and (runs.kind == "quantize").sum() == 1
    assert (runs.kind == "build").sum() == 1 and (runs.kind == "profile").sum() == 2
    assert (runs.kind == "sweep").sum() == 2
