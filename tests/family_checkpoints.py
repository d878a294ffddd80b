"""Tiny random checkpoints of every family the fast engine implements, saved by transformers itself.

Each is what a new user's checkpoint of that family looks like on disk (config.json as transformers 5 writes
it, safetensors), small enough for CPU tests.  Biases and norm weights are moved off their init values
(zeros, ones), so a norm or bias the engine drops changes the logits.  ``write_int4`` writes the
compressed-tensors int4 checkpoint llm-compressor would (RTN), with the de-quantized reference model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
#: llama3 scaling whose three frequency bands all hold some of head_dim 16's frequencies (theta 1e4):
#: wavelengths 6.3 (< 64/4: kept), 20 and 63 (interpolated), 199.. (> 64: divided by 8)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

#: name -> (model_type, config overrides): one per family, plus the features that differ within one
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama2": ("llama", {}),
    "llama3.1": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama3.2": ("llama", {"tie_word_embeddings": True, "head_dim": 32, "rope_parameters": LLAMA3_ROPE}),
    "llama-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "mistral": ("mistral", {"sliding_window": 256}),
    "qwen2": ("qwen2", {}),
    "qwen2.5-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32}),
}


def hf_config(name: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    model_type, extra = FAMILIES[name]
    return AutoConfig.for_model(model_type, **{**BASE, **extra, **overrides})


def hf_model(name: str, seed: int = 0, **overrides: Any) -> Any:
    """The family's transformers model with random weights, biases and norm weights off their init."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return model


def save(model: Any, path: Path, tokenizer: bool = False) -> Path:
    """save_pretrained (plus a small trained tokenizer when a sweep needs one)."""
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        from tasks.models import train_tokenizer

        tok = train_tokenizer(min(model.config.vocab_size, 512))
        tok.save_pretrained(path)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the family's defaults are real vocab ids
            setattr(model.config, name, getattr(tok, name))
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, name, getattr(tok, name))
    model.save_pretrained(path)
    return path


def write_int4(model: Any, path: Path, group_size: int, symmetric: bool) -> Any:
    """A compressed-tensors pack-quantized (RTN) checkpoint of ``model`` at ``path``, as llm-compressor
    writes it (biases and norms dense); returns the de-quantized reference: ``model`` with each quantized
    linear's weight replaced by ``(q - zp) * s``."""
    import copy

    import pytest
    from safetensors.torch import save_file

    from tasks.backends.torch.cuda import int4

    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    reference = copy.deepcopy(model)
    tensors, state = {}, model.state_dict()
    for name, t in state.items():
        if not (name.endswith("_proj.weight") and ".layers." in name):
            if not (name == "lm_head.weight" and model.config.tie_word_embeddings):
                tensors[name] = t.contiguous()
            continue
        q, scales, zeros = int4.quantize_rtn(t, group_size, symmetric)  # unsigned domain
        base = name[: -len(".weight")]
        tensors[base + ".weight_packed"] = helpers.pack_to_int32((q.to(torch.int16) - 8).to(torch.int8), 4, 1)
        tensors[base + ".weight_scale"] = scales.t().contiguous()
        tensors[base + ".weight_shape"] = torch.tensor(t.shape)
        if not symmetric:
            zp = (zeros.t().to(torch.int16) - 8).to(torch.int8).contiguous()
            tensors[base + ".weight_zero_point"] = helpers.pack_to_int32(zp, 4, packed_dim=0).contiguous()
        with torch.no_grad():
            reference.get_parameter(name).copy_(int4.dequantize(int4.pack_int4(q), scales, zeros, t.shape[1]))
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
            "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size}}}}
    (path / "config.json").write_text(json.dumps(config))
    return reference.eval()
