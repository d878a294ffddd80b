"""What a sweep prints and reports says what it ran (issue 20 items 4-6): the setup line is built from the
resolved config, only the tables of stages that ran are printed, and dtypes say stored vs computed."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from omegaconf import OmegaConf

from orchestrator.describe import describe_setup
from orchestrator.plan import plan_sweep
from orchestrator.progress import print_summary
from orchestrator.report_load import node_configs
from orchestrator.report_provenance import _experiments
from orchestrator.validate import validate
from tests.sweep_helpers import TINY, compose_config

OVERRIDES = ["sweep.subjects=[anatomy,virology,marketing]", "eval.limit_per_subject=5", "sweep.batch_sizes=[2,16]",
             "sweep.input_len=32", "sweep.output_len=8", "backend.device=cpu", "sweep.methods=[fp16,rtn]"]
EXPECTED = ("demo: model tiny-random-llama; methods fp16, rtn; MMLU 3 subjects x 5 questions each, 1-shot; "
            "batch 2, 16, 32 in / 8 out tokens; torch backend on cpu")


def _cfg(tmp_path: Path, mmlu_dir: Path, extra: list[str]) -> dict:
    return validate(compose_config(["experiment=cpu_demo", *TINY, "sweep.name=demo", f"store.uri={tmp_path}",
                                    f"eval.mmlu_dir={mmlu_dir}", "sweep.stages=[evaluate,profile]",
                                    *OVERRIDES, *extra]))


def test_setup_line_is_built_from_the_overrides_not_the_presets_text(tmp_path: Path, mmlu_dir: Path) -> None:
    cfg = _cfg(tmp_path, mmlu_dir, [])
    assert describe_setup(cfg) == EXPECTED
    assert "8 questions x 8 subjects" not in describe_setup(cfg)  # cpu_demo's fixed text


def _outcome(cfg: dict) -> SimpleNamespace:
    plan = plan_sweep(cfg)
    results = {}
    for node in plan.by_kind("profile"):
        results[node.key] = {"status": "ok", "result_json": json.dumps(
            {"output_tokens_per_s": 12.5, "decode_tokens_per_s": 13.0, "ttft_s": 0.01, "peak_memory_bytes": 2**20,
             "roofline_pct": 41.3})}
    return SimpleNamespace(plan=plan, results=results, ran=list(results), reused=[], wall_s=1.0, all_ok=True)


def test_summary_header_and_only_the_tables_of_stages_that_ran(tmp_path: Path, mmlu_dir: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    cfg = _cfg(tmp_path, mmlu_dir, ["sweep.stages=[profile]"])
    print_summary(_outcome(cfg), cfg)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == EXPECTED.replace(
        "MMLU 3 subjects x 5 questions each, 1-shot; ", "")  # no evaluate stage: no MMLU part
    assert "Throughput" in out and "12.5" in out
    assert "roofline" in out and "41.3" in out
    assert "MMLU accuracy" not in out


def test_report_experiment_row_comes_from_the_sweep_rows_config(tmp_path: Path, mmlu_dir: Path) -> None:
    cfg = _cfg(tmp_path, mmlu_dir, [])
    # what orchestrator.sweep_record records in the runs row of kind "sweep"
    described = {k: cfg[k] for k in ("experiment", "model", "methods", "backend", "cluster", "eval", "sweep")}
    runs = pd.DataFrame([{"kind": "sweep", "config_json": json.dumps(described)},
                         {"kind": "profile", "config_json": json.dumps({"batch_size": 2})}])
    assert _experiments(node_configs(runs)) == EXPECTED


def test_rows_and_report_name_the_stored_and_the_computed_dtype(tmp_path: Path) -> None:
    """The demo's case: a checkpoint stored in bfloat16, run by the CPU reference in float32, under a
    method called "fp16"; rows and report must say both dtypes, not the method's name."""
    from orchestrator.report_provenance import _dtypes_per_method
    from orchestrator.schema import table_from_rows
    from tasks.backends.torch.hf_engine import HFEngine
    from tasks.models import prepare_model
    from tasks.profile import profile_engine

    model = OmegaConf.to_container(compose_config(["model=tiny_random", "model.dtype=bfloat16"]).model)
    checkpoint = prepare_model(model, tmp_path / "model")["checkpoint_dir"]
    engine = HFEngine(Path(checkpoint), "cpu", "float32")
    assert engine.dtype_label() == "stored bfloat16, computed float32 on cpu"
    assert engine.weight_format == "dense float32 (stored bfloat16, cast at load)"
    throughput, memory = profile_engine(engine, batch_size=1, input_len=4, output_len=2, warmup=0, repeats=1)
    assert (throughput["stored_dtype"], throughput["dtype"]) == ("bfloat16", "float32")
    assert (memory["stored_dtype"], memory["dtype"]) == ("bfloat16", "float32")
    table_from_rows("throughput", [throughput]), table_from_rows("memory", [memory])  # columns in the schema
    rows = pd.DataFrame([{**throughput, "method": "fp16"}])
    assert _dtypes_per_method(rows) == "fp16: stored bfloat16, computed float32 on cpu"
