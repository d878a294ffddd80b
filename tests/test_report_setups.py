"""One store, several setups: the report keeps each method config its own series and each series' latest
fidelity text, so nothing measured twice or under another config is pooled (real sweeps through the CLI's
``run``)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from orchestrator.cli import run
from orchestrator.report_tables import compute
from tests.sweep_helpers import TINY, compose_config

pytestmark = pytest.mark.slow

WINDOWS = 3


@pytest.fixture(scope="module", autouse=True)
def _one_ray_instance():
    """The sweeps of this module run through the CLI's ``run()`` in this process, on one Ray instance."""
    yield
    import ray

    ray.shutdown()


def _sweep(store: Path, *overrides: str) -> None:
    assert run(compose_config([*TINY, f"store.uri={store}", "backend.device=cpu", "sweep.methods=[fp16,rtn]",
                               "sweep.stages=[fidelity,profile]", "sweep.batch_sizes=[1]",
                               f"fidelity.num_sequences={WINDOWS}", "fidelity.seq_len=32", *overrides])) == 0


def test_method_configs_and_fidelity_texts_are_never_pooled(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _sweep(store)  # rtn group 32 (TINY)
    _sweep(store, "methods.rtn.group_size=64")
    res = compute(str(store))
    fid = res.fidelity.set_index("series")
    assert {"rtn (group_size=32)", "rtn (group_size=64)", "fp16"} <= set(fid.index)
    assert (fid["sequences"] == WINDOWS).all(), fid[["sequences"]]  # fp16 vs itself measured twice: once
    tput = res.throughput.set_index("series")
    assert tput.loc["rtn (group_size=32)", "n_rows"] == tput.loc["rtn (group_size=64)", "n_rows"] == 1
    raw = pd.read_parquet(store / "throughput")
    assert sorted(tput.loc[["rtn (group_size=32)", "rtn (group_size=64)"], "output_tokens_per_s"]) == \
        sorted(raw.loc[raw["method"] == "rtn", "output_tokens_per_s"])

    text = tmp_path / "other.txt"
    text.write_text("A held-out paragraph about something else entirely, repeated. " * 120)
    _sweep(store, "methods.rtn.group_size=64", f"fidelity.text={text}")
    res = compute(str(store))
    fid = res.fidelity.set_index("series")
    assert fid.loc["rtn (group_size=64)", "sequences"] == WINDOWS  # the new text only, not 3 + 3 windows
    assert fid.loc["rtn (group_size=64)", "text"] == str(text)
    assert fid.loc["rtn (group_size=32)", "text"] == "pydoc_topics_heldout"  # its latest is still the old text
    assert any("fidelity rows measured earlier" in note for note in res.data.notes)
