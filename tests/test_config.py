"""Bad input fails fast, naming the field and the allowed values, before any task starts."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.validate import ConfigError, validate
from tests.sweep_helpers import TINY, compose_config


def _validate(overrides: list[str]):
    return validate(compose_config(TINY + overrides))


def test_default_config_composes_and_validates(tmp_path: Path, mmlu_dir: Path) -> None:
    cfg = validate(compose_config(["sweep.name=demo", f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}"]))
    assert cfg["model"]["name"] == "smollm2-135m-instruct"
    assert cfg["sweep"]["methods"] == ["fp16", "awq", "gptq"]
    assert cfg["methods"]["awq"]["group_size"] == 64  # SmolLM2's hidden size 576 is not a multiple of 128
    assert cfg["store"]["artifacts_dir"] == str(tmp_path / "artifacts")


def test_study_experiment_is_one_override_away(tmp_path: Path, mmlu_dir: Path) -> None:
    cfg = compose_config(["experiment=llama2_7b_l40", "sweep.name=study"])
    assert cfg.model.path == "meta-llama/Llama-2-7b-chat-hf"
    assert cfg.sweep.batch_sizes == [1, 2, 4, 8, 16, 32, 64]
    assert (cfg.sweep.input_len, cfg.sweep.output_len, cfg.eval.num_fewshot) == (512, 200, 5)
    assert cfg.sweep.subjects == ["all"] and cfg.cluster.accelerator_type == "L40"
    assert cfg.methods.awq.group_size == 128 and cfg.methods.gptq.group_size == 128


@pytest.mark.parametrize("overrides, field, allowed", [
    (["sweep.methods=[fp16,bogus]"], "sweep.methods", "allowed: awq, fp16, fp8, gptq, rtn"),
    (["sweep.batch_sizes=[0,1]"], "sweep.batch_sizes", "integers >= 1"),
    (["sweep.subjects=[astrology]"], "sweep.subjects", "abstract_algebra"),
    (["eval.scoring=vibes"], "eval.scoring", "allowed: loglikelihood, generate"),
    (["sweep.rerun=sometimes"], "sweep.rerun", "allowed: failed, all, none"),
    (["methods.awq.algorithm=magic", "sweep.methods=[awq]"], "methods.awq.algorithm", "gptq"),
    (["model=llama2_7b_chat", "model.path=/definitely/not/here"], "model.path", "config.json"),
    (["+backend.options.int4_kernels=marlin"], "backend.options.int4_kernels", "allowed: auto, mma, triton"),
    (["+backend.options.gemv_fusion=silu"], "backend.options.gemv_fusion", "allowed: off, norm, all"),
    (["+backend.options.engine=vllm"], "backend.options.engine", "allowed: auto, fast, hf"),
])
def test_bad_input_names_field_and_allowed_values(tmp_path: Path, mmlu_dir: Path, overrides, field, allowed) -> None:
    with pytest.raises(ConfigError) as info:
        _validate([f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}"] + overrides)
    assert info.value.field == field
    assert allowed in str(info.value)


def test_unreadable_store_is_rejected(tmp_path: Path, mmlu_dir: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        _validate([f"store.uri={blocker}/store", f"eval.mmlu_dir={mmlu_dir}"])
    assert info.value.field == "store.uri" and "cannot write" in str(info.value)


def test_missing_mmlu_dir_says_how_to_point_at_a_local_copy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _validate([f"store.uri={tmp_path}", f"eval.mmlu_dir={tmp_path}/nope"])
    assert info.value.field == "eval.mmlu_dir" and "eval.mmlu_dir" in str(info.value)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_rejects_bad_input_before_any_task(tmp_path: Path, mmlu_dir: Path) -> None:
    store = tmp_path / "store"
    result = _cli([*TINY, f"store.uri={store}", f"eval.mmlu_dir={mmlu_dir}", "sweep.batch_sizes=[4,0]"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "sweep.batch_sizes" in result.stderr
    assert "Started a local Ray instance" not in result.stderr
    assert not (store / "runs").exists()


def test_cli_help_and_cfg_job_work_like_any_hydra_app(tmp_path: Path) -> None:
    helped = _cli(["--help"], tmp_path)
    assert helped.returncode == 0 and "experiment: cpu_demo, llama2_7b_l40" in helped.stdout
    job = _cli(["--cfg", "job", "sweep.batch_sizes=[1,8]"], tmp_path)
    assert job.returncode == 0 and "batch_sizes:\n  - 1\n  - 8" in job.stdout


def test_help_names_the_program_its_commands_and_only_real_options(tmp_path: Path) -> None:
    """``quantsweep --help`` is the program's own: its name, what it does with the README's three main
    commands, and the config groups with the options in conf/ (not Hydra's banner or the schemas)."""
    helped = _cli(["--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    text = helped.stdout
    assert text.startswith("quantsweep: ")
    for command in ("quantsweep eval.mmlu_dir=", "quantsweep experiment=llama2_7b_l40 ",
                    "quantsweep-report outputs/store --out outputs/report"):
        assert command in text, command
    conf = Path(__file__).resolve().parent.parent / "conf"
    groups = text.split("== Config groups")[1].split("\n== ")[0]
    listed = dict(re.findall(r"^(\w+): (.+)$", groups, re.M))
    assert {group: set(options.split(", ")) for group, options in listed.items()} == {
        group: {p.stem for p in (conf / group).glob("*.yaml")}
        for group in ("backend", "cluster", "experiment", "method", "model", "store")}
    assert "_schema" not in text and "powered by hydra" not in text.lower()


@pytest.mark.slow
def test_cluster_without_the_accelerator_fails_before_any_task(tmp_path: Path, mmlu_dir: Path) -> None:
    store = tmp_path / "store"
    result = _cli([*TINY, f"store.uri={store}", f"eval.mmlu_dir={mmlu_dir}", "cluster.accelerator_type=L40",
                   "sweep.stages=[profile]", "sweep.methods=[fp16]"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cluster.accelerator_type: no node of the Ray cluster has accelerator 'L40'" in result.stderr
    assert not (store / "runs").exists()  # no node ran, not even the CPU ones
