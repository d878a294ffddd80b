"""The live progress table counts nodes per kind: reused, done, running, queued, failed/oom/skipped."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from orchestrator.plan import plan_sweep
from orchestrator.progress import SweepProgress
from orchestrator.validate import validate
from tests.sweep_helpers import TINY, compose_config


def test_counts_per_kind(tmp_path: Path) -> None:
    cfg = validate(compose_config(TINY + [f"store.uri={tmp_path}", "sweep.methods=[fp16,rtn]",
                                          "sweep.stages=[profile]", "sweep.batch_sizes=[1,2,4]"]))
    plan = plan_sweep(cfg)
    model = plan.by_kind("model")[0]
    profiles = plan.by_kind("profile")
    progress = SweepProgress(plan, {model.key: {"status": "ok"}})
    progress.finished(profiles[0].key, "ok")
    progress.finished(profiles[1].key, "oom")
    progress.set_running({profiles[2].key, profiles[0].key})  # a finished node is not running any more
    console = Console(width=120, record=True)
    console.print(progress.table())
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in console.export_text().splitlines() if line.startswith("│")}
    # columns: total, reused, done, running, queued, failed, oom, skipped
    assert rows["model"] == ["1", "1", "0", "0", "0", "0", "0", "0"]
    assert rows["profile"] == ["6", "0", "1", "1", "3", "0", "1", "0"]
    assert rows["quantize"] == ["2", "0", "0", "0", "2", "0", "0", "0"]
