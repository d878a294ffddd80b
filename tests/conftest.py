"""Shared fixtures: the local MMLU copy, a clean environment for Ray and Hydra."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def mmlu_path() -> Path:
    return Path(os.environ.get("QUANTSWEEP_MMLU_DIR", REPO.parent / "shared" / "data" / "mmlu")).resolve()


@pytest.fixture(scope="session")
def mmlu_dir() -> Path:
    path = mmlu_path()
    if not (path / "test").is_dir():
        pytest.fail(f"MMLU data not found at {path}; set QUANTSWEEP_MMLU_DIR to a Hendrycks MMLU folder")
    return path
