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


def test_random_weights_are_seeded_and_skip_transformers_init() -> None:
    import torch

    from tasks.models import random_model, random_model_config

    shape = _model(["model=tiny_random"])["random"]
    config = random_model_config(shape)
    a, b = (random_model(config, torch.float32, "cpu", seed=0) for _ in range(2))
    c = random_model(config, torch.float32, "cpu", seed=1)
    wa, wc = a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight
    assert torch.equal(wa, b.model.layers[0].mlp.up_proj.weight) and not torch.equal(wa, wc)
    assert abs(wa.std().item() - config.initializer_range) < 0.003  # transformers' Llama init scale
    assert torch.equal(a.model.norm.weight, torch.ones_like(a.model.norm.weight))


def test_random_model_cell_writes_a_checkpoint_transformers_loads(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.models import prepare_model

    result = prepare_model(_model(["model=tiny_random"]), tmp_path, device="cpu")
    loaded = AutoModelForCausalLM.from_pretrained(result["checkpoint_dir"], dtype=torch.float32)
    logits = loaded(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] >= 512


def test_the_random_model_node_asks_for_a_gpu(tmp_path: Path) -> None:
    from orchestrator.plan import plan_sweep
    from orchestrator.validate import validate
    from tests.sweep_helpers import TINY

    cfg = validate(compose_config(TINY + [f"store.uri={tmp_path}", "sweep.stages=[profile]"]))
    assert plan_sweep(cfg).by_kind("model")[0].needs_gpu  # built on the GPU where the cluster has one


def test_a_gguf_header_is_parsed_once_per_process_until_the_file_changes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-flight asks for the header several times per command (7 s a parse for the demo model)."""
    import os

    import gguf

    from tasks import models

    parsed: list[str] = []

    class Field:
        data = [0]

        def contents(self) -> str:
            return "llama"

    class Reader:
        def __init__(self, path: str) -> None:
            parsed.append(path)
            self.fields = {"general.architecture": Field()}

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    models._gguf_metadata.cache_clear()
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert models.gguf_metadata(path) == models.gguf_metadata(path) == {"general.architecture": "llama"}
    assert len(parsed) == 1
    models.gguf_metadata(path)["general.architecture"] = "changed by a caller"  # callers get copies
    assert models.gguf_metadata(path)["general.architecture"] == "llama" and len(parsed) == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten: parsed again
    models.gguf_metadata(path)
    assert len(parsed) == 2
    models._gguf_metadata.cache_clear()
