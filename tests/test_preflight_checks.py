"""Pre-flight checks that must hold for every job before anything runs, and the SIGTERM handler's scope.

Complements tests/test_preflight.py (empty or mixed ``sweep.subjects``, unreadable fidelity texts, one bad
value of a multirun sweep) and tests/test_sweep_row.py (SIGTERM mid-sweep: exit 130, then the same command
resumes)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from orchestrator.cli import _override_sets, run
from orchestrator.validate import ConfigError, validate
from tests.sweep_helpers import TINY, compose_config
from tests.test_preflight import PREFIX, _cli, _last_line


def test_a_multirun_checks_every_combination_of_its_sweeps() -> None:
    """Hydra's basic sweeper runs the cartesian product; each job of it is composed and validated."""
    assert _override_sets(["model=tiny_random", "sweep.input_len=8,4000", "sweep.output_len=4,200"]) == [
        ["model=tiny_random", "sweep.input_len=8", "sweep.output_len=4"],
        ["model=tiny_random", "sweep.input_len=8", "sweep.output_len=200"],
        ["model=tiny_random", "sweep.input_len=4000", "sweep.output_len=4"],
        ["model=tiny_random", "sweep.input_len=4000", "sweep.output_len=200"],
    ]


def test_a_multirun_whose_only_bad_job_is_a_combination_runs_no_job(tmp_path: Path, mmlu_dir: Path) -> None:
    """8+4, 8+200 and 4000+4 tokens fit the tiny model's 4096 positions; only the last job, 4000+200, does
    not, and no value is bad on its own: the whole multirun must stop before its first job."""
    store = tmp_path / "store"
    result = _cli(["-m", *TINY, f"store.uri={store}", f"eval.mmlu_dir={mmlu_dir}", "backend.device=cpu",
                   "sweep.stages=[profile]", "sweep.methods=[fp16]", "sweep.batch_sizes=[1]",
                   f"hydra.sweep.dir={tmp_path / 'multirun'}", "sweep.input_len=8,4000",
                   "sweep.output_len=4,200"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert _last_line(result) == (
        f"{PREFIX}sweep.input_len: sweep.input_len 4000 + sweep.output_len 200 = 4200 tokens exceed the 4096 "
        "positions of model 'tiny-random-llama' (allowed: input_len + output_len <= 4096)")
    assert not store.exists()  # no job ran, and the up-front checks created nothing
    assert "Started a local Ray instance" not in result.stderr


def _fidelity_cfg(tmp_path: Path, mmlu_dir: Path, text: Path) -> object:
    return compose_config(TINY + [f"store.uri={tmp_path / 'store'}", f"eval.mmlu_dir={mmlu_dir}",
                                  "backend.device=cpu", "sweep.methods=[fp16,rtn]", f"fidelity.text={text}"])


@pytest.mark.parametrize("lines, says", [
    ([{"text": None}], '"text" that is not a string: [None]'),
    ([{"text": "fine"}, {"text": 5}], '"text" that is not a string: [5]'),
    ([{"text": ["a", "list"]}], '"text" that is not a string'),
    ([{"body": "text under another key"}], 'a .jsonl line is an object without a "text" key'),
])
def test_a_jsonl_whose_texts_the_fidelity_task_cannot_join_is_a_config_error(
        tmp_path: Path, mmlu_dir: Path, lines: list, says: str) -> None:
    """The fidelity task joins the texts into one string; a null, a number or a list there fails it at run
    time (``TypeError: sequence item 0: expected str instance``), so validation refuses it first."""
    text = tmp_path / "texts.jsonl"
    text.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ConfigError) as err:
        validate(_fidelity_cfg(tmp_path, mmlu_dir, text), touch_store=False)
    assert err.value.field == "fidelity.text" and says in str(err.value), str(err.value)


def test_a_jsonl_of_strings_and_text_objects_is_accepted(tmp_path: Path, mmlu_dir: Path) -> None:
    text = tmp_path / "texts.jsonl"
    text.write_text(json.dumps("a plain string") + "\n\n" + json.dumps({"text": "an object", "id": 1}) + "\n")
    cfg = validate(_fidelity_cfg(tmp_path, mmlu_dir, text), touch_store=False)
    assert cfg["fidelity"]["text"] == str(text.resolve())


def test_run_puts_back_the_sigterm_handler_it_found(tmp_path: Path, mmlu_dir: Path) -> None:
    """SIGTERM raises KeyboardInterrupt only while a sweep runs (Ctrl-C's path); a caller of run() keeps
    its own handler afterwards, here after a config error (exit code 2, nothing started)."""
    def mine(signum: int, frame: object) -> None:  # pragma: no cover - never delivered
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        code = run(compose_config(TINY + [f"store.uri={tmp_path / 'store'}", f"eval.mmlu_dir={mmlu_dir}",
                                          "sweep.methods=[fp16,bogus]"]))
        assert code == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
