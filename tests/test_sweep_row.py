"""The sweep's own runs row: written before any cell so an interrupted sweep still says what it expected,
replaced (not duplicated) on resume, and the way ``--sweep NAME`` finds nodes reused from another sweep."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import schedule
from orchestrator.cli import CONF_DIR, run
from orchestrator.plan import plan_sweep
from orchestrator.report_tables import compute
from orchestrator.validate import validate
from tests.sweep_helpers import TINY, compose_config

COMMON = ["backend.device=cpu", "sweep.methods=[fp16,rtn]", "sweep.subjects=[econometrics,world_religions]",
          "fidelity.num_sequences=2", "fidelity.seq_len=32", "eval.limit_per_subject=2"]
SMALL = COMMON + ["sweep.num_shards=2", "sweep.batch_sizes=[1,2]"]
#: the sweeps that really run: every stage, one cell per method and stage (11 nodes)
RUN = COMMON + ["sweep.num_shards=1", "sweep.batch_sizes=[1]"]


def _sweep_rows(store: Path) -> pd.DataFrame:
    runs = pd.read_parquet(store / "runs")
    return runs[runs["kind"] == "sweep"]


def test_an_interrupted_sweep_leaves_a_row_that_lists_what_is_missing(tmp_path: Path, mmlu_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    cfg = validate(compose_config(TINY + SMALL + [f"store.uri={store}", f"eval.mmlu_dir={mmlu_dir}"]))
    plan = plan_sweep(cfg)
    seen: list[str] = []

    def interrupted(plan_, cfg_, on_submit):  # the checks pass, then Ctrl-C before the first cell finished
        on_submit()
        seen.extend(_sweep_rows(store)["status"])
        raise KeyboardInterrupt

    monkeypatch.setattr(schedule, "_run_nodes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        schedule.run_sweep(plan, cfg)
    assert seen == ["running"]  # the row existed while the cells ran
    rows = _sweep_rows(store)
    assert list(rows["status"]) == ["interrupted"]
    assert set(json.loads(rows["result_json"].iloc[0])["node_keys"]) == set(plan.nodes)

    res = compute(str(store))
    missing = res.missing
    assert set(missing["table"]) == {"mmlu_predictions", "fidelity", "throughput", "memory"}
    assert len(missing[missing["table"] == "throughput"]) == 4  # 2 methods x 2 batch sizes
    assert len(missing[missing["table"] == "mmlu_predictions"]) == 4  # 2 methods x 2 shards
    assert set(missing.loc[missing["table"] == "fidelity", "method"]) == {"fp16", "rtn"}
    assert res.failed.empty  # the sweep's own row is not a failed cell


@pytest.mark.slow
def test_a_renamed_rerun_and_rerun_all_keep_one_row_and_the_sweep_filter_finds_reused_nodes(
        tmp_path: Path, mmlu_dir: Path) -> None:
    import ray

    store = tmp_path / "store"

    def sweep(*extra: str) -> None:  # the CLI's run(), in this process: the three sweeps share one Ray instance
        assert run(compose_config([*TINY, *RUN, f"store.uri={store}", f"eval.mmlu_dir={mmlu_dir}", *extra])) == 0

    try:
        sweep("sweep.name=first")
        sweep("sweep.name=second")  # every node reused: its rows keep the name "first"
        sweep("sweep.name=first", "sweep.rerun=all")  # runs everything again, same sweep
    finally:
        ray.shutdown()
    rows = _sweep_rows(store)
    assert sorted(rows["sweep_name"]) == ["first", "second"] and set(rows["status"]) == {"ok"}
    second = compute(str(store), "second")
    first = compute(str(store), "first")
    for res in (first, second):
        assert len(res.data.predictions) == 2 * 2 * 2  # methods x subjects x questions
        assert len(res.data.throughput) == 2 and len(res.fidelity) == 2
        assert res.missing.empty


@pytest.mark.slow
def test_sigterm_takes_the_interrupt_path_and_the_same_command_resumes(tmp_path: Path, mmlu_dir: Path) -> None:
    """What ``timeout``, Slurm and Kubernetes send: exit 130 with the resume hint, not Ray's abort (134)."""
    import signal
    import time

    store = tmp_path / "store"
    # a profile-only grid: what is tested is the signal's path, which any cell in flight shows
    args = [sys.executable, "-m", "orchestrator.cli", *TINY, "backend.device=cpu", "sweep.methods=[fp16,rtn]",
            "sweep.stages=[profile]", "sweep.batch_sizes=[1]", f"store.uri={store}", f"eval.mmlu_dir={mmlu_dir}",
            f"hydra.run.dir={store}/hydra"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(args, cwd=CONF_DIR.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((store / "runs").glob("*.parquet"))) < 2:
        time.sleep(0.5)  # the sweep row, then the first finished cell: Ray is up and cells are running
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "interrupted; rerun the same command to resume" in err
    assert list(_sweep_rows(store)["status"]) == ["interrupted"]
    again = subprocess.run(args, cwd=CONF_DIR.parent, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert list(_sweep_rows(store)["status"]) == ["ok"]
