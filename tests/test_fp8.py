"""Method fp8 on the torch backend: the FP8_DYNAMIC checkpoint, its loaders, the config checks, the kernels.

CPU: a tiny random Llama is quantized once with llm-compressor's FP8_DYNAMIC; the stored codes and scales
must be the per-channel rule of the format, transformers (the reference engine) and the CUDA engine's
loader (run on CPU, where Fp8Linear computes its fp32 reference) must see exactly q * s, and the two
models' logits must agree.  GPU (``gpu``, skipped without an FP8 GPU): Fp8Linear's kernels (_scaled_mm and
the NVRTC GEMV) against the de-quantized reference on ragged shapes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.accelerators import Gpu, accelerator_gpu, lacks_fp8
from orchestrator.validate import ConfigError, _check_fp8_gpus
from tasks.backends.torch.cuda import fp8
from tasks.quantize import (FORMAT_FP8, dequantize_fp8, load_fp8_layer, quantize, quantize_fp8_per_token)

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# head_dim 64 as in test_cuda_engine (the decode-attention kernel's smallest tested head size); K and N
# multiples of 128 and 16, so the FP8 GEMV and _scaled_mm both take every linear
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
METHOD = {"name": "fp8", "algorithm": "fp8", "bits": 8, "dtype": "bfloat16", "ignore": ["lm_head"], "options": {}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The fp checkpoint (float32, random weights) and its fp8 artifact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.models import train_tokenizer

    root = tmp_path_factory.mktemp("fp8")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model.save_pretrained(root / "fp")
    train_tokenizer(512).save_pretrained(root / "fp")
    result = quantize(root / "fp", root / "fp8", METHOD, seed=0)
    return {"model": model, "fp": root / "fp", "q": root / "fp8", "result": result}


def test_artifact_is_fp8_dynamic_with_float32_channel_scales(tiny):
    config = json.loads((tiny["q"] / "config.json").read_text())["quantization_config"]
    group = next(iter(config["config_groups"].values()))
    assert config["format"] == "float-quantized" and tiny["result"]["format"] == FORMAT_FP8
    assert (group["weights"]["type"], group["weights"]["num_bits"], group["weights"]["strategy"]) == ("float", 8, "channel")
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    assert tiny["result"]["num_quantized_layers"] == 2 * len(LINEARS)
    for i in range(2):
        for name in LINEARS:
            q, s = load_fp8_layer(tiny["q"], f"model.layers.{i}.{name}")
            w = tiny["model"].get_submodule(f"model.layers.{i}.{name}").weight.detach()
            assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (w.shape[0],)
            # the format's rule: s = max|W[n]| / 448, codes = fp8(W / s); so every row reaches +-448
            torch.testing.assert_close(s, w.abs().amax(dim=1) / 448, rtol=1e-6, atol=0)
            assert torch.equal(q.float().abs().amax(dim=1), torch.full_like(s, 448.0))
            rel = ((dequantize_fp8(q, s) - w).norm() / w.norm()).item()
            assert rel < 0.04  # e4m3 has a 3-bit mantissa: ~2.6% relative error on Gaussian weights


def test_transformers_reference_sees_the_dequantized_weights(tiny):
    """The CPU reference engine (HFEngine) de-quantizes to exactly q * s and says so in its rows."""
    from tasks.backends.torch.hf_engine import HFEngine

    engine = HFEngine(tiny["q"], "cpu", "float32")
    engine.model(torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    for name in LINEARS:
        q, s = load_fp8_layer(tiny["q"], f"model.layers.1.{name}")
        assert torch.equal(engine.model.get_submodule(f"model.layers.1.{name}").weight, dequantize_fp8(q, s))
    assert "de-quantized" in engine.weight_format and "fp8-e4m3" in engine.weight_format
    assert "de-quantized" in engine.details["speed_note"]


def test_cuda_loader_on_cpu_matches_the_reference(tiny):
    """The CUDA engine's loader (on CPU) holds the same codes and scales, fused as the engine fuses them,
    and its logits match transformers' (activations quantize-dequantized per token in both)."""
    from transformers import AutoModelForCausalLM

    from tasks.backends.torch.cuda.loader import load_model

    model = load_model(tiny["q"], "cpu", dtype=torch.float32)
    for i in range(2):
        wqkv = model.layers[i].attention.wqkv
        assert isinstance(wqkv, fp8.Fp8Linear) and wqkv.weight.dtype == torch.float8_e4m3fn
        parts = [load_fp8_layer(tiny["q"], f"model.layers.{i}.self_attn.{p}_proj") for p in "qkv"]
        assert torch.equal(wqkv.dequantized(), torch.cat([dequantize_fp8(q, s) for q, s in parts]))
        q, s = load_fp8_layer(tiny["q"], f"model.layers.{i}.mlp.down_proj")
        assert torch.equal(model.layers[i].feed_forward.w2.dequantized(), dequantize_fp8(q, s))
    hf = AutoModelForCausalLM.from_pretrained(tiny["q"], dtype=torch.float32).eval()
    ids = torch.randint(4, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    model.setup_cache(2, 12)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids, torch.arange(12), all_logits=True)
    # same fp32 rule on both sides (measured: identical logits); a wrong layout or scale gives ~1
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5
    plain = AutoModelForCausalLM.from_pretrained(tiny["fp"], dtype=torch.float32).eval()
    with torch.no_grad():
        fp = plain(ids).logits
    assert ((ours - fp).norm() / fp.norm()).item() > 1e-2  # really quantized (measured 5.8e-2), not the fp weights


def test_reference_linear_matches_the_format_rule():
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.02
    q, s = fp8.quantize_weight(w)
    x = torch.randn(5, 256)
    x[2] = 0  # a zero token stays zero
    xq, xs = quantize_fp8_per_token(x)
    expected = (xq.float() * xs) @ dequantize_fp8(q, s).t()
    assert torch.equal(fp8.reference(x, q, s), expected) and torch.equal(expected[2], torch.zeros(48))


def test_quantize_refuses_wrong_bits(tmp_path):
    with pytest.raises(ValueError, match="bits must be 8"):
        quantize(tmp_path, tmp_path / "out", {**METHOD, "bits": 4})
    with pytest.raises(ValueError, match="not used by algorithm 'fp8'"):
        quantize(tmp_path, tmp_path / "out", {**METHOD, "options": {"duo_scaling": True}})


# ------------------------------------------------------------------------------------- validation


def _cfg(accelerator_type=None, device="auto", address=None, methods=("fp16", "fp8"), backend="torch"):
    return {"sweep": {"methods": list(methods)},
            "methods": {"fp16": {"algorithm": "none"}, "fp8": {"algorithm": "fp8"}},
            "backend": {"name": backend, "device": device},
            "cluster": {"accelerator_type": accelerator_type, "address": address}}


@pytest.mark.parametrize("accel", ["A100", "T4", "V100", "A10G"])
@pytest.mark.parametrize("backend", ["torch", "tensorrt_llm"])
def test_fp8_on_a_gpu_below_sm89_is_a_config_error(accel, backend):
    with pytest.raises(ConfigError) as err:
        _check_fp8_gpus(_cfg(accel, backend=backend))
    assert err.value.field == "methods.fp8.algorithm"
    assert f"cluster.accelerator_type={accel}" in str(err.value)
    assert "L40S" in str(err.value) and "H100" in str(err.value)


@pytest.mark.parametrize("accel", ["L4", "L40", "L40S", "H100", "H200", "B200", "nvidia_h100"])
def test_fp8_gpus_pass(accel):
    _check_fp8_gpus(_cfg(accel))


def test_fp8_on_cpu_or_without_fp8_method_passes():
    _check_fp8_gpus(_cfg("A100", device="cpu"))  # de-quantized reference: accuracy only
    _check_fp8_gpus(_cfg("A100", methods=("fp16",)))
    _check_fp8_gpus(_cfg(None, address="ray://head:10001"))  # unknown here: the engine checks at load


def test_local_gpus_come_from_nvml(monkeypatch):
    import orchestrator.accelerators as acc

    monkeypatch.setattr(acc, "local_gpus", lambda: [Gpu("NVIDIA H200", (9, 0)), Gpu("Tesla T4", (7, 5))])
    with pytest.raises(ConfigError, match=r"Tesla T4 \(sm_75\)"):
        _check_fp8_gpus(_cfg())
    monkeypatch.setattr(acc, "local_gpus", lambda: [Gpu("NVIDIA L40S", (8, 9))])
    _check_fp8_gpus(_cfg())
    monkeypatch.setattr(acc, "local_gpus", lambda: [])  # no GPU: CPU run, de-quantized
    _check_fp8_gpus(_cfg())


def test_accelerator_table():
    assert accelerator_gpu("H200").capability == (9, 0) and not lacks_fp8(accelerator_gpu("L40"))
    assert lacks_fp8(accelerator_gpu("A100-80G")) and not lacks_fp8(accelerator_gpu("SomeFutureGPU"))


# ------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@gpu
@needs_fp8
@pytest.mark.parametrize("m", [1, 3, 8, 17, 64, 300])
@pytest.mark.parametrize("n,k", [(48, 128), (400, 1152), (4096, 4096), (4096, 11008)])
def test_fp8_linear_matches_dequantized_reference(m, n, k):
    torch.manual_seed(m + n + k)
    layer = fp8.Fp8Linear(k, n, device="cuda")
    codes, scale = fp8.quantize_weight(torch.randn(n, k, device="cuda") * 0.02)
    layer.weight.copy_(codes)
    layer.weight_scale.copy_(scale)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x[:, :4] *= 20  # outlier channels, as real activations have
    ref = fp8.reference(x, layer.weight, layer.weight_scale)
    assert _rel(layer(x), ref) < 1e-2  # bf16 output rounding: ~3e-3


@gpu
@needs_fp8
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("n,k", [(16, 128), (400, 1152), (4096, 11008)])
@pytest.mark.parametrize("cfg", [(1, 1, 1, 1), (2, 2, 4, 1), (1, 4, 2, 3), (4, 1, 8, 2)])
def test_fp8_gemv_every_config(m, n, k, cfg):
    """The NVRTC GEMV itself (not only where fp8_configs.json picks it), split-K partials summed."""
    if not fp8.gemv_available(torch.device("cuda")):
        pytest.skip("NVRTC cannot build the FP8 GEMV here")
    torch.manual_seed(m * n + k)
    codes, scale = fp8.quantize_weight(torch.randn(n, k, device="cuda") * 0.02)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xq, xs = fp8.quantize_tokens(x)
    ref = fp8.reference(x, codes, scale)
    out = fp8.gemv_split(xq, xs, codes, scale, cfg).float().sum(0)
    assert _rel(out, ref) < 1e-2


@gpu
@needs_fp8
def test_fp8_engine_decodes_like_its_eager_self():
    """The compiled, CUDA-graph fp8 engine generates what the same model does eagerly (greedy)."""
    from tasks.backends.torch.cuda.generate import Generator
    from tasks.backends.torch.cuda.loader import random_model
    from tasks.backends.torch.cuda.model import ModelArgs

    args = ModelArgs(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=768,
                     head_dim=64)
    model = random_model(args, "fp8", "cuda", seed=3)
    ids = torch.randint(0, 512, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fast = Generator(model).generate(ids, 8).output_token_ids
    slow = Generator(model, compile=False, cuda_graph=False).generate(ids, 8).output_token_ids
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("backend,passthrough", [("tensorrt_llm", True), ("torch", False)])
def test_quantize_cell_per_backend(tiny, tmp_path, backend, passthrough):
    """TensorRT-LLM quantizes fp8 itself (ModelOpt at build time): its quantize cell passes the fp
    checkpoint through; the torch backend's cell writes the FP8_DYNAMIC artifact."""
    from orchestrator.execute import _run_quantize
    from orchestrator.plan import Node

    node = Node("k" + backend, "quantize", {"method": {**METHOD, "calibration": {}}, "seed": 0}, (), False)
    cfg = {"backend": {"name": backend}, "store": {"artifacts_dir": str(tmp_path)}}
    result, artifact, _ = _run_quantize(node, [{"artifact_uri": str(tiny["fp"])}], cfg, "cpu")
    assert result["passthrough"] is passthrough
    assert (Path(artifact) == tiny["fp"]) is passthrough
    assert result["format"] == ("hf" if passthrough else FORMAT_FP8)


@gpu
@needs_fp8
def test_fp8_checkpoint_runs_on_the_cuda_engine(tiny):
    """The llm-compressor artifact through the CUDA engine's loader and kernels vs the fp32 reference model
    (same checkpoint, transformers on CPU): only bf16 activations and rounding differ."""
    from transformers import AutoModelForCausalLM

    from tasks.backends.torch.cuda.engine import load_fast_engine

    engine = load_fast_engine(tiny["q"], "cuda", {"kv_cache_batch_size": 2, "kv_cache_input_len": 12,
                                                  "kv_cache_output_len": 4})
    assert engine.weight_format.startswith("fp8-e4m3 W8A8")
    ids = torch.randint(4, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(tiny["q"], dtype=torch.float32).eval()(ids).logits
    with torch.no_grad():
        ours = engine.model(ids.cuda(), torch.arange(12, device="cuda"), all_logits=True).cpu()
    assert _rel(ours, ref) < 3e-2
    timing = engine.timed_generate(ids, 4)
    assert timing.output_token_ids.shape == (2, 4)
    engine.close()
