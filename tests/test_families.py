"""Every family the fast engine implements computes transformers' logits; everything else is refused.

Tiny random checkpoints saved by transformers (tests/family_checkpoints.py), loaded by the engine's loader
on the CPU in fp32: prefill logits at every position and teacher-forced decode logits (the fidelity stage's
scoring path) against transformers' own, for dense and int4 weights (the int4 reference is transformers
with the de-quantized weights).  Sequences run past the llama3 configs' ``original_max_position_embeddings``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from tasks.backends.torch.cuda.families import FAMILIES as ENGINE_FAMILIES
from tasks.backends.torch.cuda.families import UnsupportedModel, check_config
from tasks.backends.torch.cuda.generate import Generator
from tasks.backends.torch.cuda.loader import load_model
from tests.family_checkpoints import FAMILIES, LLAMA3_ROPE, hf_config, hf_model, save, write_int4

LENGTH = 80  # > LLAMA3_ROPE's original_max_position_embeddings (64)
TOL = dict(atol=2e-4, rtol=2e-4)
BASE_HEAD_DIM = 16  # hidden 64 / 4 heads (tests/family_checkpoints.BASE)


def _ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


def _compare(ours, reference, ids: torch.Tensor) -> None:
    """Prefill logits at every position and teacher-forced decode logits of row 0 against ``reference``."""
    with torch.no_grad():
        ref = reference(ids).logits
    ours.setup_cache(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        prefill = ours(ids, torch.arange(ids.shape[1]), all_logits=True)
    assert torch.allclose(prefill, ref, **TOL), (prefill - ref).abs().max()
    decode = Generator(ours, compile=False).decode_logits(ids[0])
    assert torch.allclose(decode, ref[0], **TOL), (decode - ref[0]).abs().max()


@pytest.mark.parametrize("name", FAMILIES)
def test_dense_logits_match_transformers(name: str, tmp_path: Path) -> None:
    hf = hf_model(name)
    save(hf, tmp_path)
    _compare(load_model(tmp_path, "cpu", dtype=torch.float32), hf, _ids())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_logits_match_the_dequantized_reference(name: str, symmetric: bool, tmp_path: Path) -> None:
    """The engine's int4 linears (reference kernels on the CPU) with biases and norms kept dense."""
    reference = write_int4(hf_model(name, seed=1), tmp_path, group_size=32, symmetric=symmetric)
    model = load_model(tmp_path, "cpu", dtype=torch.float32)
    assert type(model.layers[0].attention.wqkv).__name__ == "Int4Linear"
    _compare(model, reference, _ids(seed=1))


def test_llama3_uses_all_three_frequency_bands() -> None:
    """The test config's wavelengths fall in each band of the llama3 scaling (else a band goes untested)."""
    hd, ctx = BASE_HEAD_DIM, LLAMA3_ROPE["original_max_position_embeddings"]
    wavelengths = [2 * math.pi * LLAMA3_ROPE["rope_theta"] ** (i / hd) for i in range(0, hd, 2)]
    high, low = ctx / LLAMA3_ROPE["high_freq_factor"], ctx / LLAMA3_ROPE["low_freq_factor"]
    assert any(w < high for w in wavelengths) and any(w > low for w in wavelengths)
    assert any(high <= w <= low for w in wavelengths)


def test_transformers_5_writes_rope_parameters_and_old_rope_scaling_reads_the_same(tmp_path: Path) -> None:
    """transformers 5 saves the llama3 scaling as ``rope_parameters``; a hub config of the 4.x era says
    ``rope_scaling`` plus a top-level ``rope_theta``: both give transformers' logits."""
    hf = hf_model("llama3.1", seed=2)
    save(hf, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in config
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(config))
    _compare(load_model(tmp_path, "cpu", dtype=torch.float32), hf, _ids(seed=2))


def _without(model, feature: str):
    """The loaded model with one family feature taken out (what a loader that ignores it would run)."""
    if feature == "rope scaling":
        model.args = dataclasses.replace(model.args, rope=dataclasses.replace(model.args.rope, type="default"))
        model.cache_shape = None
    for layer in model.layers:
        if feature == "qkv bias":
            layer.attention.wqkv_bias.data.zero_()
        if feature == "qk norm":
            layer.attention.q_norm = layer.attention.k_norm = None
    return model


@pytest.mark.parametrize("name, feature", [("llama3.1", "rope scaling"), ("qwen2", "qkv bias"),
                                           ("qwen3", "qk norm")])
def test_the_comparison_fails_without_each_feature(name: str, feature: str, tmp_path: Path) -> None:
    """The logit comparison above can fail: the same model less one feature misses transformers' logits."""
    hf = hf_model(name)
    save(hf, tmp_path)
    with pytest.raises(AssertionError):
        _compare(_without(load_model(tmp_path, "cpu", dtype=torch.float32), feature), hf, _ids())


ARCHITECTURES = {"gpt_neox": "GPTNeoXForCausalLM", "phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}


@pytest.mark.parametrize("model_type, overrides, field", [
    ("gpt_neox", {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}, "architectures"),
    ("phi3", {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}, "architectures"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters.rope_type"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     "rope_parameters.rope_type"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen2", {"attention_bias": True}, "attention_bias"),
])
def test_unsupported_architectures_and_features_are_refused_by_name(model_type: str, overrides: dict,
                                                                    field: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **overrides).to_dict()
    config["architectures"] = config.get("architectures") or [ARCHITECTURES[model_type]]
    with pytest.raises(UnsupportedModel) as err:
        check_config(config)
    assert err.value.field == field
    assert f"config.json {field}" in str(err.value) and "backend.options.engine=hf" in str(err.value)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_test_family_passes_the_check(name: str) -> None:
    config = hf_config(name).to_dict()
    config["architectures"] = [a for a, f in ENGINE_FAMILIES.items() if f.model_type == config["model_type"]]
    assert check_config(config) in {f.name for f in ENGINE_FAMILIES.values()}


def test_tensors_the_engine_would_drop_are_refused(tmp_path: Path) -> None:
    """A checkpoint with a tensor the engine has no place for (here an o_proj bias) is not loaded."""
    from safetensors.torch import load_file, save_file

    save(hf_model("llama2"), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.ones(64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModel, match="o_proj.bias"):
        load_model(tmp_path, "cpu", dtype=torch.float32)


def test_mistral_runs_up_to_its_window_and_refuses_longer(tmp_path: Path) -> None:
    hf = hf_model("mistral", sliding_window=LENGTH)
    save(hf, tmp_path)
    model = load_model(tmp_path, "cpu", dtype=torch.float32)
    assert model.args.sliding_window == LENGTH
    _compare(model, hf, _ids())  # the whole sequence fits the window: full attention is exact
    with pytest.raises(ValueError, match="sliding_window of 80"):
        model.setup_cache(1, LENGTH + 1)


def test_qwen_window_applies_only_when_switched_on() -> None:
    off = hf_config("qwen2", sliding_window=32).to_dict()
    on = hf_config("qwen2", sliding_window=32, use_sliding_window=True, max_window_layers=0).to_dict()
    from tasks.backends.torch.cuda.families import model_args

    assert model_args(off).sliding_window is None
    assert model_args(on).sliding_window == 32


# ----------------------------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_every_family_under_the_cuda_kernels_matches_the_cpu_reference(name: str, weights: str,
                                                                       tmp_path: Path) -> None:
    """The CUDA engine (bf16 GEMV/mma and int4 kernels, the decode-attention kernel, CUDA-graph decode)
    against the same checkpoint on the CPU in fp32: prefill and teacher-forced decode logits within bf16
    accuracy, and the same top-1 token at nearly every position."""
    hf = hf_model(name, seed=3)
    if weights == "int4":
        write_int4(hf, tmp_path, group_size=32, symmetric=False)
    else:
        save(hf, tmp_path)
    cpu = load_model(tmp_path, "cpu", dtype=torch.float32)
    gpu = load_model(tmp_path, "cuda")
    ids = _ids(seed=3)
    cpu.setup_cache(*ids.shape)
    gpu.setup_cache(*ids.shape)
    with torch.no_grad():
        ref = cpu(ids, torch.arange(LENGTH), all_logits=True)
        got = gpu(ids.cuda(), torch.arange(LENGTH, device="cuda"), all_logits=True).float().cpu()
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2
    ref_decode = Generator(cpu, compile=False).decode_logits(ids[0])
    generator = Generator(gpu, compile=False)
    got_decode = generator.decode_logits(ids[0].cuda()).cpu()
    assert generator.score_graph is not None
    assert ((got_decode - ref_decode).norm() / ref_decode.norm()).item() < 2e-2
    # random tiny models have near-tied logits, which bf16 may order differently (H100, qwen2 bf16: 75 of 80)
    assert (got_decode.argmax(-1) == ref_decode.argmax(-1)).float().mean().item() >= 0.9
