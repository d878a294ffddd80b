"""Model facts known without loading weights (pre-flight checks rely on them)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.sweep_helpers import compose_config
from tasks.models import model_max_positions


def _model(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_config(overrides).model, resolve=True)


def test_random_model_positions_come_from_its_shape() -> None:
    assert model_max_positions(_model(["model=tiny_random"])) == 4096
    assert model_max_positions(_model(["model=tiny_random", "model.random.max_position_embeddings=128"])) == 128


def test_gguf_package_positions_come_from_the_gguf_header() -> None:
    pytest.importorskip("gguf")
    # SmolLM2-135M-Instruct's GGUF says llama.context_length = 8192
    assert model_max_positions(_model(["model=smollm2_135m_instruct"])) == 8192


def test_gguf_file_reads_the_same_header() -> None:
    from tasks.models import gguf_path

    path = gguf_path(_model(["model=smollm2_135m_instruct"]))
    model = {"source": "gguf_file", "gguf_file": str(path)}
    assert model_max_positions(model) == 8192


def test_hf_folder_reads_config_json_and_hub_ids_are_unknown(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    assert model_max_positions({"source": "hf", "path": str(tmp_path)}) == 2048
    assert model_max_positions({"source": "hf", "path": "meta-llama/Llama-2-7b-chat-hf"}) is None
