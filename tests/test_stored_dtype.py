"""What a quantized checkpoint stores, and what its rows say it stores (issue item 6).

The tensors a method leaves unquantized (embeddings, norms, ``lm_head``) keep the source model's dtype:
calibrating in float32 must not double their size on disk, and ``stored_dtype`` names the quantized format
plus that dtype instead of a bare dtype that reads as "the weights are float32".  On a GPU host
llm-compressor leaves the model dispatched (each module's tensors offloaded to the CPU, onloaded to the GPU
for each use), where a cast reaches only the onloaded copies; on CPU the test reproduces that state by
re-dispatching the model onto the meta device right after ``oneshot``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.sweep_helpers import compose_config

LABELS = {"rtn": "int4 packed g32; other tensors bfloat16", "fp8": "fp8-e4m3 per-channel; other tensors bfloat16"}
#: the tensors of a quantized Linear; every other tensor is one the method leaves unquantized
QUANTIZED_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny random Llama stored in bfloat16, and the default method configs (``method.dtype`` float16)."""
    from tasks.models import prepare_model

    cfg = compose_config(["model=tiny_random", "model.dtype=bfloat16", "methods.rtn.group_size=32"])
    checkpoint = prepare_model(OmegaConf.to_container(cfg.model), tmp_path_factory.mktemp("bf16") / "model")
    return Path(checkpoint["checkpoint_dir"]), OmegaConf.to_container(cfg.methods)


def _dtypes(checkpoint: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as st:
        return {name: st.get_slice(name).get_dtype() for name in st.keys()}


def _dispatched_like_on_a_gpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    import llmcompressor
    from compressed_tensors.offload import set_onload_device

    real = llmcompressor.oneshot

    def oneshot(*args, **kwargs):
        result = real(*args, **kwargs)
        set_onload_device(kwargs["model"], torch.device("meta"))  # onloaded copies live elsewhere, as on CUDA
        return result

    monkeypatch.setattr(llmcompressor, "oneshot", oneshot)


@pytest.mark.parametrize("host", ["cpu", "gpu-like"])
@pytest.mark.parametrize("algorithm", ["rtn", "fp8"])
def test_unquantized_tensors_keep_the_models_dtype_and_the_label_says_what_is_stored(
        bf16_model: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str,
        host: str) -> None:
    from tasks import models
    from tasks.quantize import quantize

    source, methods = bf16_model
    if host == "gpu-like":
        _dispatched_like_on_a_gpu_host(monkeypatch)
    out = tmp_path / algorithm
    quantize(source, out, methods[algorithm])
    dtypes = _dtypes(out)
    fp8_weights = {n for n, d in dtypes.items() if d == "F8_E4M3"}
    unquantized = {n: d for n, d in dtypes.items() if not n.endswith(QUANTIZED_SUFFIXES) and n not in fp8_weights}
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
            "model.layers.0.input_layernorm.weight"} <= set(unquantized)
    assert set(unquantized.values()) == {"BF16"}, unquantized
    scales = {d for n, d in dtypes.items() if n.endswith(".weight_scale")}
    assert scales == ({"F16"} if algorithm == "rtn" else {"F32"})  # method.dtype; fp8 keeps exact fp32 scales
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert models.stored_dtype(out) == LABELS[algorithm]
    assert models.stored_dtype(source) == "bfloat16"  # a dense checkpoint: its dtype, as before


def test_engines_report_the_label(bf16_model: tuple[Path, dict], tmp_path: Path) -> None:
    from tasks.backends.torch.hf_engine import HFEngine
    from tasks.quantize import quantize

    source, methods = bf16_model
    quantize(source, tmp_path / "rtn", methods["rtn"])
    engine = HFEngine(tmp_path / "rtn", "cpu", "float32")
    assert engine.stored_dtype == LABELS["rtn"]
    assert engine.dtype_label() == f"stored {LABELS['rtn']}, computed float32 on cpu"
