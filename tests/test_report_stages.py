"""The report shows what the sweep asked for: sections and figures of stages left out of ``sweep.stages``
say "not part of this sweep" instead of "no data yet", which stays for asked-for cells not finished yet.

Stores are the synthetic ones of :mod:`tests.test_report`, less the rows of the stages a sweep left out,
plus the ``kind = sweep`` runs row that records the sweep's config (as :mod:`orchestrator.sweep_record` does).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd

from orchestrator.report import build_report
from tests.test_report import BATCH_SIZES, METHODS, SWEEP, _run_row, _write, write_store

ALL_FIGURES = {"accuracy_category", "accuracy_subcategory", "throughput", "roofline", "memory", "tradeoff",
               "energy", "fidelity"}
SPEED_FIGURES = {"throughput", "roofline", "memory", "energy"}


def _store(root: Path, stages: list[str], finished: set[str]) -> Path:
    """The synthetic store of a sweep that asked for ``stages``, holding the rows of ``finished`` stages only."""
    store = root / "store"
    write_store(store)
    for stage, table in (("evaluate", "mmlu_predictions"), ("fidelity", "fidelity")):
        if stage not in finished:
            shutil.rmtree(store / table)
            for path in (store / "runs").glob(f"{stage}-*.parquet"):
                path.unlink()
    sweep = {"name": SWEEP, "stages": stages, "methods": list(METHODS), "batch_sizes": BATCH_SIZES,
             "baseline": "fp16", "num_shards": 2}
    _write(store, "runs", "sweep-row", [_run_row("sweep-row", "sweep", None,
                                                 config_json=json.dumps({"sweep": sweep}))])
    return store


def _section(text: str, name: str) -> str:
    match = re.search(f'<section id="{name}">(.*?)</section>', text, re.S)
    assert match, name
    return match.group(1)


def _figures(html_path: Path) -> set[str]:
    return {p.stem for p in (html_path.parent / "figures").glob("*.png")}


def test_a_speed_only_sweep_shows_no_accuracy_or_fidelity_placeholders(tmp_path: Path) -> None:
    """``experiment=speed_random_7b`` (``sweep.stages=[profile]``), every cell done."""
    html_path = build_report(str(_store(tmp_path, ["profile"], {"profile"})), tmp_path / "report")
    text = html_path.read_text()
    assert "no data yet" not in text  # nothing is coming: no placeholder table or figure
    assert _figures(html_path) == SPEED_FIGURES
    assert text.count("data:image/png;base64,") == len(SPEED_FIGURES)
    for name in ("categories", "subcategories", "fidelity", "significance"):
        assert "not part of this sweep" in _section(text, name), name
    assert "no MMLU predictions" not in text and "MMLU shots" not in text  # nor do notes or the setup table
    for name in ("throughput", "memory"):
        assert "not part of this sweep" not in _section(text, name)
    missing = pd.read_csv(html_path.parent / "tables" / "missing.csv")
    assert set(missing["table"]) == {"throughput", "memory"}  # rtn at batch 8 (OOM), nothing of MMLU


def test_asked_for_stages_not_yet_finished_still_say_no_data_yet(tmp_path: Path) -> None:
    """A sweep that asked for evaluate and profile, its evaluate cells still running; fidelity not asked."""
    html_path = build_report(str(_store(tmp_path, ["evaluate", "profile"], {"profile"})), tmp_path / "report")
    text = html_path.read_text()
    assert "no data yet" in _section(text, "categories")
    assert "not part of this sweep" not in _section(text, "categories")
    assert "not part of this sweep" in _section(text, "fidelity")
    assert _figures(html_path) == ALL_FIGURES - {"fidelity"}  # accuracy placeholders: data is coming
    missing = pd.read_csv(html_path.parent / "tables" / "missing.csv")
    assert set(missing["table"]) == {"throughput", "memory", "mmlu_predictions"}
    assert len(missing[missing["table"] == "mmlu_predictions"]) == len(METHODS) * 2  # every shard
