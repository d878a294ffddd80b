"""Pre-flight checks (issue 20): every bad value ends with exit 2 and one line naming the field, before
anything runs, including values Hydra/OmegaConf reject while composing and values only the model's
config (read without weights) can rule out."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.validate import ConfigError, validate
from tests.sweep_helpers import TINY, cli_in_process, compose_config

PREFIX = "quantsweep: invalid configuration: "


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The command line through the CLI's ``main()`` in-process: every case here ends before Ray starts
    (tests/test_config.py runs the same refusals as a real process)."""
    return cli_in_process(args, cwd)


def _last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("override, field, says", [
    ("sweep.batch_sizes=[a]", "sweep.batch_sizes", "Value 'a' of type 'str' could not be converted to Integer"),
    ("sweep.input_len=abc", "sweep.input_len", "could not be converted to Integer"),
    ("sweep.bogus=1", "sweep.bogus", "Key 'bogus' not in 'SweepConfig'"),
    ("model=nope", "model", "allowed: llama2_7b_chat, random_llama2_7b, random_llama31_8b, random_qwen25_7b, smollm2_135m_instruct, tiny_random"),
    ("sweep.batch_sizes=[1", "sweep.batch_sizes", "cannot parse"),
])
def test_hydra_composition_errors_take_the_one_error_path(tmp_path: Path, override: str, field: str,
                                                          says: str) -> None:
    result = _cli([*TINY, f"store.uri={tmp_path / 'store'}", override], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    line = _last_line(result)
    assert line.startswith(f"{PREFIX}{field}: ") and says in line, line
    assert "Traceback" not in result.stderr and not (tmp_path / "store" / "runs").exists()


def test_a_bad_value_in_one_multirun_value_is_caught_too(tmp_path: Path) -> None:
    result = _cli(["-m", *TINY, f"store.uri={tmp_path / 'store'}", "sweep.input_len=8,abc"], tmp_path)
    assert result.returncode == 2 and _last_line(result).startswith(f"{PREFIX}sweep.input_len: "), result.stderr


def test_prompt_plus_output_beyond_the_models_positions_is_rejected(tmp_path: Path, mmlu_dir: Path) -> None:
    result = _cli([*TINY, f"store.uri={tmp_path / 'store'}", f"eval.mmlu_dir={mmlu_dir}",
                   "sweep.input_len=100000"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert _last_line(result) == (
        f"{PREFIX}sweep.input_len: sweep.input_len 100000 + sweep.output_len 4 = 100004 tokens exceed the 4096 "
        "positions of model 'tiny-random-llama' (allowed: input_len + output_len <= 4096)")
    assert not (tmp_path / "store" / "runs").exists()


def test_the_last_position_still_fits(tmp_path: Path, mmlu_dir: Path) -> None:
    validate(compose_config(TINY + [f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}",
                                    "sweep.input_len=4092", "sweep.output_len=4"]))


def test_group_size_that_does_not_divide_a_linear_is_rejected_up_front(tmp_path: Path, mmlu_dir: Path) -> None:
    result = _cli([*TINY, f"store.uri={tmp_path / 'store'}", f"eval.mmlu_dir={mmlu_dir}",
                   "methods.gptq.group_size=48"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    line = _last_line(result)
    assert line.startswith(f"{PREFIX}methods.gptq.group_size: method.group_size=48 does not divide in_features=64")
    assert "[1, 2, 4, 8, 16, 32, 64]" in line  # the allowed values
    assert not (tmp_path / "store" / "runs").exists()


def test_gguf_models_group_sizes_come_from_the_gguf_header(tmp_path: Path, mmlu_dir: Path) -> None:
    # SmolLM2-135M: hidden 576, intermediate 1536 -> 128 does not divide 576; the demo's 64 does
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["sweep.name=t", f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}",
                                 "methods.awq.group_size=128"]))
    assert err.value.field == "methods.awq.group_size" and "divisors of 192" in str(err.value)
    validate(compose_config(["sweep.name=t", f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}"]))


def test_hub_models_skip_the_model_checks_offline(tmp_path: Path, mmlu_dir: Path) -> None:
    cfg = compose_config(TINY + ["model=llama2_7b_chat", f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}",
                                 "sweep.input_len=100000", "methods.gptq.group_size=48"])
    from orchestrator.validate import _check_group_sizes, _check_sequence_fits
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True)
    _check_sequence_fits(resolved)  # unknown positions: no claim either way
    _check_group_sizes(resolved)


def test_no_stages_is_a_config_error(tmp_path: Path, mmlu_dir: Path) -> None:
    result = _cli([*TINY, f"store.uri={tmp_path / 'store'}", f"eval.mmlu_dir={mmlu_dir}", "sweep.stages=[]"],
                  tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert _last_line(result).startswith(f"{PREFIX}sweep.stages: is empty"), result.stderr


@pytest.mark.parametrize("subjects, says", [
    ("[]", "is empty but the evaluate stage is on"),
    ("[all,econometrics]", "'all' must be the only entry"),
])
def test_subjects_that_cannot_mean_a_grid_are_config_errors(tmp_path: Path, mmlu_dir: Path, subjects: str,
                                                             says: str) -> None:
    result = _cli([*TINY, f"store.uri={tmp_path / 'store'}", f"eval.mmlu_dir={mmlu_dir}",
                   f"sweep.subjects={subjects}"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert _last_line(result).startswith(f"{PREFIX}sweep.subjects: ") and says in _last_line(result)
    assert not (tmp_path / "store" / "runs").exists()


def test_no_subjects_is_fine_without_the_evaluate_stage(tmp_path: Path, mmlu_dir: Path) -> None:
    """And the summary's read of this sweep's MMLU rows (none planned) is empty, not a type error."""
    from orchestrator.plan import plan_sweep
    from orchestrator.progress import _stored_rows
    from orchestrator.store import ResultStore

    cfg = validate(compose_config(TINY + [f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}",
                                          "sweep.subjects=[]", "sweep.stages=[profile]"]))
    ResultStore.from_config(cfg["store"]).write("mmlu_predictions", "evaluate-earlier", [
        {"schema_version": 1, "node_key": "evaluate-earlier", "method": "fp16", "subject": "econometrics"}])
    plan = plan_sweep(cfg)
    assert not plan.by_kind("evaluate")
    assert _stored_rows(plan, cfg, "evaluate", "mmlu_predictions").empty


@pytest.mark.parametrize("sweep_value, field", [
    ("sweep.methods=[fp16],[fp16,bogus]", "sweep.methods"),
    ("sweep.input_len=8,5000", "sweep.input_len"),
])
def test_a_multirun_with_one_invalid_job_runs_no_job(tmp_path: Path, mmlu_dir: Path, sweep_value: str,
                                                      field: str) -> None:
    result = _cli(["-m", *TINY, f"store.uri={tmp_path / 'store'}", f"eval.mmlu_dir={mmlu_dir}",
                   "backend.device=cpu", "sweep.stages=[profile]", sweep_value], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert _last_line(result).startswith(f"{PREFIX}{field}: "), result.stderr[-2000:]
    assert not (tmp_path / "store").exists()  # not even the first job's store


@pytest.mark.parametrize("name, content, says", [
    ("empty.txt", "\n\n  \n", "holds no text"),
    ("no_key.jsonl", '{"body": "text under another key"}\n', "KeyError"),
    ("not_json.jsonl", '{"text": "fine"}\nthis line is not JSON\n', "JSONDecodeError"),
])
def test_a_fidelity_text_file_that_cannot_give_windows_is_a_config_error(
        tmp_path: Path, mmlu_dir: Path, name: str, content: str, says: str) -> None:
    text = tmp_path / name
    text.write_text(content)
    result = _cli([*TINY, f"store.uri={tmp_path / 'store'}", f"eval.mmlu_dir={mmlu_dir}",
                   f"fidelity.text={text}"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert _last_line(result).startswith(f"{PREFIX}fidelity.text: ") and says in _last_line(result)
    assert not (tmp_path / "store" / "runs").exists()


# ---------------------------------------------------------------- models the fast engine does not implement


def test_an_unsupported_architecture_exits_2_naming_it_before_anything_runs(tmp_path: Path) -> None:
    """A GPT-NeoX checkpoint with the fast engine asked for: exit 2 naming model.path, the architecture, the
    field, and the engine that does run it; no store row is written."""
    from tests.family_checkpoints import save

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_neox", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128)
    folder = save(AutoModelForCausalLM.from_config(config), tmp_path / "neox")
    result = _cli([*TINY, f"store.uri={tmp_path / 'store'}", "model.source=hf", f"model.path={folder}",
                   "backend.device=cpu", "+backend.options.engine=fast", "sweep.stages=[fidelity,profile]"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    line = _last_line(result)
    assert line.startswith(f"{PREFIX}model.path: the fast engine does not implement this model: GPTNeoXForCausalLM: "
                           "config.json architectures: ['GPTNeoXForCausalLM'] is not implemented"), line
    assert "backend.options.engine=hf runs it on the transformers reference engine" in line
    assert not (tmp_path / "store" / "runs").exists()


@pytest.mark.parametrize("overrides, field, says", [
    (["model.random.model_type=gpt_neox"], "model.random.model_type", "GPTNeoXForCausalLM"),
    (["+model.random.config.rope_parameters={rope_type:yarn,rope_theta:10000.0,factor:4.0}"],
     "model.random.config", "config.json rope_parameters.rope_type: 'yarn' is not implemented"),
    (["model.random.model_type=mistral", "+model.random.config.sliding_window=8"], "fidelity.seq_len",
     "16 tokens exceed Mistral's sliding_window of 8"),
])
def test_unsupported_features_of_a_random_model_are_refused(tmp_path: Path, mmlu_dir: Path, overrides: list[str],
                                                            field: str, says: str) -> None:
    cfg = compose_config(TINY + [f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}", "backend.device=cpu",
                                 "+backend.options.engine=fast", "sweep.stages=[fidelity]", "fidelity.seq_len=16",
                                 *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg, touch_store=False)
    assert err.value.field == field and says in str(err.value), str(err.value)


def test_the_transformers_engine_or_cpu_runs_what_the_fast_engine_refuses(tmp_path: Path, mmlu_dir: Path) -> None:
    """The refusal is the fast engine's: with engine=hf, or auto on a CPU, the same model passes."""
    base = TINY + [f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}", "model.random.model_type=gpt_neox"]
    validate(compose_config(base + ["+backend.options.engine=hf", "backend.device=cuda"]), touch_store=False)
    validate(compose_config(base + ["backend.device=cpu"]), touch_store=False)
    with pytest.raises(ConfigError):
        validate(compose_config(base + ["backend.device=cuda"]), touch_store=False)


@pytest.mark.parametrize("how", ["unterminated quote", "3 choices", "answer E"])
def test_a_broken_mmlu_file_of_a_chosen_subject_is_a_config_error(tmp_path: Path, mmlu_dir: Path, how: str) -> None:
    """Before, the sweep quantized and built before its evaluate cells met the file."""
    from tests.test_mmlu_data import break_row, mmlu_copy

    folder = mmlu_copy(mmlu_dir, tmp_path / "mmlu")
    path = folder / "test" / "econometrics_test.csv"
    line = break_row(path, 20, how)
    chosen = [f"store.uri={tmp_path / 'store'}", f"eval.mmlu_dir={folder}", "sweep.subjects=[anatomy,econometrics]"]
    with pytest.raises(ConfigError) as err:
        validate(compose_config(TINY + chosen), touch_store=False)
    assert err.value.field == "eval.mmlu_dir"
    assert str(err.value).startswith(f"eval.mmlu_dir: {path}, line {line} (row 20): "), str(err.value)
    validate(compose_config(TINY + chosen[:2] + ["sweep.subjects=[anatomy,virology]"]), touch_store=False)
    validate(compose_config(TINY + chosen + ["sweep.stages=[profile]"]), touch_store=False)  # nothing reads it


@pytest.mark.slow
def test_the_cli_refuses_a_broken_mmlu_file_before_anything_runs(tmp_path: Path, mmlu_dir: Path) -> None:
    from tests.test_mmlu_data import break_row, mmlu_copy

    folder = mmlu_copy(mmlu_dir, tmp_path / "mmlu")
    path = folder / "dev" / "anatomy_dev.csv"
    line = break_row(path, 3, "answer E")
    result = _cli([*TINY, f"store.uri={tmp_path / 'store'}", f"eval.mmlu_dir={folder}",
                   "sweep.subjects=[anatomy,virology]"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert _last_line(result).startswith(f"{PREFIX}eval.mmlu_dir: {path}, line {line} (row 3): answer 'E' is not "
                                         "one of A, B, C, D"), _last_line(result)
    assert not (tmp_path / "store" / "runs").exists()
