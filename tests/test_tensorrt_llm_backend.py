"""TensorRT-LLM backend: everything that does not need TensorRT-LLM runs here on CPU.

- config: method/shape/options -> quantization block, build arguments, KV-cache sizing, FP8 gating;
- availability: the clear error when tensorrt_llm is missing, raised before any GPU work;
- convert: a real llm-compressor int4 checkpoint (RTN W4A16 g32, tiny random Llama) converted to
  TensorRT-LLM's GPTQ layout, de-quantised with TensorRT-LLM's rule and compared with the source;
- lm wrapper: log-likelihoods and generation against lm-eval's own HFLM on the same tiny model;
- backend plumbing with a stand-in ``trtllm-build``;
- integration (``-m trtllm``): build and run real engines where TensorRT-LLM and a GPU exist.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.backends.base import EngineShape
from tasks.backends.tensorrt_llm import availability, backend as trt_backend, convert
from tasks.backends.tensorrt_llm.config import (TensorRTLLMOptions, UnsupportedMethodError, check_method_supported,
                                                engine_limits, kv_cache_max_tokens, quant_plan, runtime_kv_cache,
                                                trtllm_build_args)
from tasks.backends.tensorrt_llm.engine import kv_cache_bytes, stream_step_times
from tasks.backends.tensorrt_llm.lm_wrapper import (TensorRTLLMLM, continuation_logprob, length_sorted_batches,
                                                    parse_gen_kwargs, prefix_queries, run_deduplicated,
                                                    scoring_window, truncate_at_stop)

GROUP = 32


# --------------------------------------------------------------------------------------------------
# fixtures: an in-code tokenizer, a tiny random Llama, and its llm-compressor int4 checkpoints


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(240)] + ["A", "B", "C", "D", "Answer", ".", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """dense fp16 tiny Llama + its int4 RTN checkpoints (asymmetric and symmetric), all with tokenizer."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    tok = make_tokenizer()
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    dirs = {"dense": root / "dense"}
    for name, symmetric in (("asym", False), ("sym", True)):
        model = LlamaForCausalLM.from_pretrained(root / "dense", dtype=torch.float16)
        scheme = {"group_0": {"targets": ["Linear"], "weights": {"type": "int", "num_bits": 4, "symmetric": symmetric,
                                                                 "strategy": "group", "group_size": GROUP}}}
        oneshot(model=model, recipe=[QuantizationModifier(config_groups=scheme, ignore=["lm_head"])])
        model.save_pretrained(root / name, save_compressed=True)
        tok.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def gptq_plan(group_size=GROUP, symmetric=False):
    """The gptq plan with the tiny model's group size (32 is convertible, but not buildable)."""
    plan = quant_plan({"name": "gptq", "group_size": 128, "symmetric": symmetric})
    return dataclasses.replace(plan, group_size=group_size)


def decompressed_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """compressed-tensors' own de-quantisation, through transformers."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    return model.state_dict()


# --------------------------------------------------------------------------------------------------
# config


def test_quant_plan_maps_methods_to_trtllm_quantization():
    fp16 = quant_plan({"name": "fp16"})
    assert (fp16.quant_algo, fp16.route) == (None, "convert")
    assert fp16.quantization_json() == {"quant_algo": None, "kv_cache_quant_algo": None}

    gptq = quant_plan({"name": "gptq", "bits": 4, "group_size": 128})
    assert gptq.route == "convert"
    assert gptq.quantization_json() == {"quant_algo": "W4A16_GPTQ", "kv_cache_quant_algo": None, "group_size": 128,
                                        "has_zero_point": True, "pre_quant_scale": False,
                                        "exclude_modules": ["lm_head"]}
    assert gptq.weight_format() == "int4-g128-asym (W4A16_GPTQ)"
    assert quant_plan({"name": "gptq", "group_size": 64, "symmetric": True}).has_zero_point is False

    awq = quant_plan({"name": "AWQ", "group_size": 128})
    assert (awq.quant_algo, awq.route, awq.modelopt_config) == ("W4A16_AWQ", "modelopt", "INT4_AWQ_CFG")
    assert awq.pre_quant_scale and not awq.has_zero_point
    awq_ckpt = quant_plan({"name": "awq", "group_size": 128}, TensorRTLLMOptions(awq_source="checkpoint"))
    assert (awq_ckpt.quant_algo, awq_ckpt.route) == ("W4A16_GPTQ", "convert")

    fp8 = quant_plan({"name": "fp8"})
    assert (fp8.quant_algo, fp8.kv_cache_quant_algo, fp8.modelopt_config) == ("FP8", None, "FP8_DEFAULT_CFG")
    assert quant_plan({"name": "fp8"}, TensorRTLLMOptions(fp8_kv_cache=True)).kv_cache_quant_algo == "FP8"


def test_quant_plan_reads_the_method_configs_algorithm():
    """conf/method/*.yaml give ``algorithm``; the name is free (e.g. rtn, awq_g64)."""
    fp16 = {"name": "fp16", "algorithm": "none", "bits": 16, "dtype": "float16"}
    assert quant_plan(fp16).quant_algo is None
    assert quant_plan({**fp16, "name": "bf16", "dtype": "bfloat16"}).quant_algo is None
    rtn = {"name": "rtn", "algorithm": "rtn", "bits": 4, "group_size": 128, "symmetric": False}
    assert (quant_plan(rtn).quant_algo, quant_plan(rtn).route) == ("W4A16_GPTQ", "convert")
    awq64 = {"name": "awq_g64", "algorithm": "awq", "bits": 4, "group_size": 64,
             "calibration": {"dataset": "pydoc_topics", "num_samples": 32, "seq_len": 256}}
    plan = quant_plan(awq64)
    assert (plan.method, plan.quant_algo, plan.group_size) == ("awq_g64", "W4A16_AWQ", 64)
    with pytest.raises(UnsupportedMethodError, match="bfloat16"):
        check_method_supported({**fp16, "dtype": "bfloat16"}, (7, 5))


@pytest.mark.parametrize("method, needle", [
    ({"name": "gptq", "group_size": 32}, "(64, 128)"),
    ({"name": "awq", "bits": 8, "group_size": 128}, "bits=8"),
    ({"name": "gptq", "group_size": 128, "actorder": "group"}, "g_idx"),
    ({"name": "smoothquant"}, "not supported"),
    ({"bits": 4}, "no 'name'"),
])
def test_quant_plan_rejects_what_trtllm_cannot_run(method, needle):
    with pytest.raises(UnsupportedMethodError, match="backend=tensorrt_llm") as err:
        quant_plan(method)
    assert needle in str(err.value)


def test_options_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown options \\['max_batch'\\]"):
        TensorRTLLMOptions.from_dict({"max_batch": 3})
    with pytest.raises(ValueError, match="awq_source"):
        TensorRTLLMOptions.from_dict({"awq_source": "autoawq"})
    assert TensorRTLLMOptions.from_dict({"dtype": "bfloat16"}).dtype == "bfloat16"


def test_fp8_needs_ada_or_hopper():
    with pytest.raises(UnsupportedMethodError, match=r"compute capability >= 8\.9, this GPU has 8\.0") as err:
        check_method_supported({"name": "fp8"}, (8, 0))  # A100
    assert "L40" in str(err.value) and "H100" in str(err.value)
    for cc in ((8, 9), (9, 0), (10, 0)):  # L40/L40S, H100/H200, Blackwell
        assert check_method_supported({"name": "fp8"}, cc).quant_algo == "FP8"
    with pytest.raises(UnsupportedMethodError, match="7.5"):
        check_method_supported({"name": "gptq", "group_size": 128}, (7, 0))
    assert check_method_supported({"name": "gptq", "group_size": 128}, (8, 9)).quant_algo == "W4A16_GPTQ"


def test_engine_limits_cover_profile_and_mmlu_prompts():
    shape = EngineShape(max_batch_size=64, max_input_len=512, max_seq_len=712)
    opts = TensorRTLLMOptions()
    limits = engine_limits(shape, opts)
    assert (limits.max_batch_size, limits.max_input_len, limits.max_seq_len) == (64, 4096, 4096 + 32)
    assert limits.max_num_tokens == 64 * 512  # whole-batch prefill in one engine step
    capped = engine_limits(shape, opts, model_max_positions=4096)  # Llama-2 context
    assert (capped.max_input_len, capped.max_seq_len) == (4096 - 32, 4096)
    small = engine_limits(EngineShape(1, 512, 712), TensorRTLLMOptions(eval_max_input_len=256, max_num_tokens=999))
    assert (small.max_input_len, small.max_seq_len, small.max_num_tokens) == (512, 712, 999)


def _as_dict(args: list[str]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]] = args[i + 1]
            i += 2
        else:
            out[args[i]] = True
            i += 1
    return out


def test_trtllm_build_args():
    limits = engine_limits(EngineShape(64, 512, 712), TensorRTLLMOptions())
    args = _as_dict(trtllm_build_args(Path("/ck"), Path("/eng"), limits, TensorRTLLMOptions()))
    assert args["--checkpoint_dir"] == "/ck" and args["--output_dir"] == "/eng"
    assert (args["--max_batch_size"], args["--max_input_len"], args["--max_seq_len"]) == ("64", "4096", "4128")
    assert args["--max_num_tokens"] == "32768" and args["--kv_cache_type"] == "paged"
    assert args["--gather_generation_logits"] is True and "--gather_context_logits" not in args
    assert args["--logits_dtype"] == "float32" and args["--tokens_per_block"] == "64"
    opts = TensorRTLLMOptions(gather_context_logits=True, extra_build_args=["--use_paged_context_fmha", "enable"])
    args2 = trtllm_build_args(Path("/ck"), Path("/eng"), limits, opts)
    assert "--gather_context_logits" in args2 and args2[-2:] == ["--use_paged_context_fmha", "enable"]


def test_kv_cache_sized_for_batch_times_input_plus_output():
    assert kv_cache_max_tokens(8, 512, 200, 64) == 8 * 768  # 712 tokens -> 12 blocks of 64
    assert kv_cache_max_tokens(1, 64, 0, 64) == 64
    opts = TensorRTLLMOptions(kv_cache_batch_size=16, kv_cache_input_len=512, kv_cache_output_len=200)
    tokens, policy = runtime_kv_cache(opts, engine_max_batch_size=64, engine_max_seq_len=4128)
    assert tokens == 16 * 768
    assert "batch 16 x (input 512 + output 200)" in policy and str(tokens) in policy
    tokens, policy = runtime_kv_cache(TensorRTLLMOptions(), 64, 4128)
    assert tokens == 64 * 4160 and "max_batch_size 64" in policy
    llama2_7b = {"num_hidden_layers": 32, "num_key_value_heads": 32, "head_size": 128,
                 "quantization": {"kv_cache_quant_algo": None}}
    assert kv_cache_bytes(llama2_7b, 768) == 768 * 512 * 1024  # 0.5 MiB per token in fp16
    llama2_7b["quantization"]["kv_cache_quant_algo"] = "FP8"
    assert kv_cache_bytes(llama2_7b, 768) == 768 * 256 * 1024


# --------------------------------------------------------------------------------------------------
# availability


def _hide_tensorrt_llm(monkeypatch):
    real = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        if name == "tensorrt_llm" or name.startswith("tensorrt_llm."):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(availability.importlib.util, "find_spec", fake_find_spec)
    monkeypatch.delitem(sys.modules, "tensorrt_llm", raising=False)


def test_missing_tensorrt_llm_error_says_how_to_install(monkeypatch):
    _hide_tensorrt_llm(monkeypatch)
    with pytest.raises(availability.TensorRTLLMUnavailableError) as err:
        availability.check_available()
    msg = str(err.value)
    assert isinstance(err.value, ImportError)
    for needle in ("backend=tensorrt_llm", "pip install 'quantsweep[trtllm]'",
                   "--extra-index-url https://pypi.nvidia.com",
                   "Python 3.10 and 3.12", "nvcr.io/nvidia/tensorrt-llm/release", "backend=torch"):
        assert needle in msg, needle
    info = availability.probe()
    assert info["tensorrt_llm"] is None and "backend=tensorrt_llm" in info["error"]


def test_broken_tensorrt_llm_install_is_reported(monkeypatch):
    monkeypatch.setattr(availability.importlib.util, "find_spec", lambda name, *a, **k: object())

    def failing_import(name):
        raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(availability.importlib, "import_module", failing_import)
    availability.check_available()  # presence only: fine
    with pytest.raises(availability.TensorRTLLMUnavailableError, match="failed to import: OSError: libcudart"):
        availability.check_available(import_module=True)


def test_backend_fails_before_any_gpu_work_without_tensorrt_llm(monkeypatch, tmp_path):
    _hide_tensorrt_llm(monkeypatch)

    def no_gpu_work(*args, **kwargs):
        raise AssertionError("GPU/checkpoint work started before the availability check")

    monkeypatch.setattr(trt_backend, "_capability", no_gpu_work)
    monkeypatch.setattr(trt_backend, "prepare_checkpoint", no_gpu_work)
    backend = trt_backend.TensorRTLLMBackend()
    with pytest.raises(availability.TensorRTLLMUnavailableError, match="backend=tensorrt_llm"):
        backend.build(tmp_path, tmp_path / "engine", EngineShape(1, 8, 16), {"name": "fp16"}, {})
    with pytest.raises(availability.TensorRTLLMUnavailableError, match="backend=tensorrt_llm"):
        backend.load(tmp_path / "engine", "cuda:0", {})
    assert not (tmp_path / "engine").exists()


def test_fp8_on_an_a100_fails_before_quantizing(monkeypatch, tmp_path):
    monkeypatch.setattr(trt_backend, "check_available", lambda import_module=False: None)
    monkeypatch.setattr(trt_backend, "_capability", lambda: (8, 0))
    monkeypatch.setattr(trt_backend, "prepare_checkpoint",
                        lambda *a, **k: pytest.fail("quantization started for an unsupported method"))
    with pytest.raises(UnsupportedMethodError, match="FP8"):
        trt_backend.TensorRTLLMBackend().build(tmp_path, tmp_path / "e", EngineShape(1, 8, 16), {"name": "fp8"}, {})


# --------------------------------------------------------------------------------------------------
# int4 packing and checkpoint conversion


@pytest.mark.parametrize("rows, cols", [(16, 64), (72, 8), (5, 40)])
def test_unpack_matches_compressed_tensors_packing(rows, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(rows * cols)
    q = torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8)
    assert torch.equal(convert.unpack_int4_rows(pack_to_int32(q, 4, packed_dim=1), cols), q)
    packed0 = pack_to_int32(q, 4, packed_dim=0)  # zero points are packed along dim 0
    assert torch.equal(convert.unpack_int4_rows(packed0.t().contiguous(), rows).t(), q)


def test_pack_int4_pairs_uses_trtllm_nibble_order():
    q = torch.tensor([[1, -2, 3, -8], [7, 0, -1, 5]], dtype=torch.int8)
    packed = convert.pack_int4_pairs(q)
    # column 2j in the low nibble, 2j+1 in the high one, two's complement nibbles
    assert packed.view(torch.uint8).tolist() == [[0xE1, 0x83], [0x07, 0x5F]]
    nib = q.to(torch.int16) & 0xF  # TensorRT-LLM's formula: q[:, 1::2] * 16 + q[:, ::2]
    assert torch.equal(packed.view(torch.uint8).to(torch.int16), nib[:, 1::2] * 16 + nib[:, ::2])
    r = torch.randint(-8, 8, (32, 64), dtype=torch.int8)
    assert torch.equal(convert.unpack_int4_pairs(convert.pack_int4_pairs(r)), r)


LINEARS = {"attention.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
           "attention.dense": ["self_attn.o_proj"], "mlp.fc": ["mlp.gate_proj"], "mlp.gate": ["mlp.up_proj"],
           "mlp.proj": ["mlp.down_proj"]}


@pytest.mark.slow
def test_gptq_conversion_reproduces_compressed_tensors_dequantisation(tiny_dirs, tmp_path):
    src_dir = tiny_dirs["asym"]
    plan = gptq_plan()
    report = convert.convert_checkpoint(src_dir, tmp_path / "trt", plan, weight_layout="packed")
    assert (report.quantized_linears, report.dense_linears, report.scale_dtype_source) == (10, 0, "float16")
    out = load_file(str(tmp_path / "trt" / "rank0.safetensors"))
    cfg = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert cfg["quantization"] == plan.quantization_json()
    assert (cfg["num_key_value_heads"], cfg["head_size"], cfg["rotary_base"]) == (2, 32, 10000.0)
    src = convert.HFCheckpoint(src_dir)
    hf = decompressed_state_dict(src_dir)
    checked = 0
    for layer in range(2):
        for trt_name, hf_names in LINEARS.items():
            base = f"transformer.layers.{layer}.{trt_name}"
            parts = [convert.read_quantized_linear(src, f"model.layers.{layer}.{n}", GROUP) for n in hf_names]
            q_src = torch.cat([p.q for p in parts])  # [N, K]
            s_src = torch.cat([p.scale for p in parts])
            zp_src = torch.cat([p.zero_point for p in parts])
            q_trt = convert.unpack_int4_pairs(out[f"{base}.weight"])  # [K, N]
            scales, zero = out[f"{base}.weights_scaling_factor"], out[f"{base}.zero"]
            n, k = q_src.shape
            assert out[f"{base}.weight"].shape == (k, n // 2) and scales.shape == zero.shape == (k // GROUP, n)
            # integers and scales are carried over exactly
            assert torch.equal(q_trt, q_src.t()) and torch.equal(scales, s_src.t())
            # TensorRT-LLM's rule with zero = -zp * s is exactly (q - zp) * s in fp32 ...
            exact_zero = (-zp_src.float() * s_src.float()).t()
            w_ct = convert.dequantize_compressed_tensors(q_src, s_src, zp_src, GROUP)
            assert torch.equal(convert.dequantize_trtllm_int4(q_trt, scales, exact_zero, GROUP), w_ct)
            # ... and the stored fp16 zero is that value rounded once
            assert torch.equal(zero, exact_zero.to(torch.float16))
            # de-quantising the stored tensors matches compressed-tensors' own fp16 weights to fp16 rounding
            w_trt = convert.dequantize_trtllm_int4(q_trt, scales, zero, GROUP)
            w_hf = torch.cat([hf[f"model.layers.{layer}.{h}.weight"] for h in hf_names]).float()
            zero_full = exact_zero.t().repeat_interleave(GROUP, dim=1)
            bound = (zero_full.abs() + w_hf.abs()) * 2.0 ** -11 + 2.0 ** -24
            assert torch.all((w_trt - w_hf).abs() <= bound)
            assert (w_trt - w_hf).abs().max() > 0 or zp_src.abs().max() == 0  # fp16 zero really rounds here
            checked += 1
    assert checked == 10
    for trt_name, hf_name in (("transformer.vocab_embedding.weight", "model.embed_tokens.weight"),
                              ("transformer.ln_f.weight", "model.norm.weight"), ("lm_head.weight", "lm_head.weight"),
                              ("transformer.layers.1.post_layernorm.weight",
                               "model.layers.1.post_attention_layernorm.weight")):
        assert torch.equal(out[trt_name], src.get(hf_name))


@pytest.mark.slow
def test_gptq_conversion_gemm_layout_and_errors(tiny_dirs, tmp_path):
    calls = []

    def fake_preprocessor(packed):  # stands in for preprocess_weights_for_mixed_gemm (same shape/dtype)
        calls.append((packed.dtype, tuple(packed.shape)))
        return packed.flip(0)

    convert.convert_checkpoint(tiny_dirs["asym"], tmp_path / "gemm", gptq_plan(), preprocess=fake_preprocessor)
    out = load_file(str(tmp_path / "gemm" / "rank0.safetensors"))
    qkv = out["transformer.layers.0.attention.qkv.weight"]
    # WeightOnlyGroupwiseQuantLinear.weight: [in_features, out_features // 4] in the model dtype
    assert qkv.dtype == torch.float16 and qkv.shape == (128, 256 // 4)
    assert len(calls) == 10 and calls[0] == (torch.int8, (128, 128))
    with pytest.raises(ValueError, match="preprocessor"):
        convert.convert_checkpoint(tiny_dirs["asym"], tmp_path / "x", gptq_plan())
    with pytest.raises(convert.CheckpointFormatError, match="dense"):
        convert.convert_checkpoint(tiny_dirs["dense"], tmp_path / "x", gptq_plan(), weight_layout="packed")
    with pytest.raises(convert.CheckpointFormatError, match="group_size 32 != method 64"):
        convert.convert_checkpoint(tiny_dirs["asym"], tmp_path / "x", gptq_plan(64), weight_layout="packed")
    with pytest.raises(convert.CheckpointFormatError, match="has_zero_point"):
        convert.convert_checkpoint(tiny_dirs["sym"], tmp_path / "x", gptq_plan(), weight_layout="packed")
    # activation-order checkpoints carry g_idx, which TensorRT-LLM cannot use
    gidx = tmp_path / "gidx"
    gidx.mkdir()
    for f in tiny_dirs["asym"].iterdir():
        (gidx / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(gidx / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight_g_idx"] = torch.zeros(128, dtype=torch.int32)
    save_file(tensors, str(gidx / "model.safetensors"))
    with pytest.raises(convert.CheckpointFormatError, match="g_idx"):
        convert.convert_checkpoint(gidx, tmp_path / "x", gptq_plan(), weight_layout="packed")


@pytest.mark.slow
def test_symmetric_conversion_has_no_zero(tiny_dirs, tmp_path):
    plan = gptq_plan(symmetric=True)
    convert.convert_checkpoint(tiny_dirs["sym"], tmp_path / "s", plan, weight_layout="packed")
    out = load_file(str(tmp_path / "s" / "rank0.safetensors"))
    assert not [k for k in out if k.endswith(".zero")]
    hf = decompressed_state_dict(tiny_dirs["sym"])
    w = convert.dequantize_trtllm_int4(convert.unpack_int4_pairs(out["transformer.layers.1.mlp.proj.weight"]),
                                       out["transformer.layers.1.mlp.proj.weights_scaling_factor"], None, GROUP)
    ref = hf["model.layers.1.mlp.down_proj.weight"].float()
    assert torch.all((w - ref).abs() <= w.abs() * 2.0 ** -11 + 2.0 ** -24)


@pytest.mark.slow
def test_dense_conversion_fuses_qkv_and_keeps_weights(tiny_dirs, tmp_path):
    report = convert.convert_checkpoint(tiny_dirs["dense"], tmp_path / "d", quant_plan({"name": "fp16"}))
    assert (report.quantized_linears, report.dense_linears, report.weight_layout) == (0, 10, "dense")
    out = load_file(str(tmp_path / "d" / "rank0.safetensors"))
    src = convert.HFCheckpoint(tiny_dirs["dense"])
    qkv = torch.cat([src.get(f"model.layers.1.{n}.weight") for n in LINEARS["attention.qkv"]])
    assert torch.equal(out["transformer.layers.1.attention.qkv.weight"], qkv)
    assert torch.equal(out["transformer.layers.0.mlp.fc.weight"], src.get("model.layers.0.mlp.gate_proj.weight"))
    assert torch.equal(out["transformer.layers.0.mlp.gate.weight"], src.get("model.layers.0.mlp.up_proj.weight"))
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] is None and cfg["architecture"] == "LlamaForCausalLM"
    assert convert.is_trtllm_checkpoint(tmp_path / "d") and not convert.is_trtllm_checkpoint(tiny_dirs["dense"])


# --------------------------------------------------------------------------------------------------
# ModelOpt (AWQ/FP8 recipe)


def test_modelopt_config_sets_group_size_and_fp8_kv_dict_format():
    from tasks.backends.tensorrt_llm.modelopt_quantize import modelopt_quant_config

    fake_mtq = types.SimpleNamespace(  # the dict layout of older ModelOpt releases
        INT4_AWQ_CFG={"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 128}},
                                    "default": {"enable": False}}, "algorithm": {"method": "awq_lite"}},
        FP8_DEFAULT_CFG={"quant_cfg": {"*weight_quantizer": {"num_bits": (4, 3)}}, "algorithm": "max"},
        FP8_KV_CFG={"quant_cfg": {"*[kv]_bmm_quantizer": {"num_bits": (4, 3)}}})
    cfg = modelopt_quant_config(fake_mtq, quant_plan({"name": "awq", "group_size": 64}))
    assert cfg["quant_cfg"]["*weight_quantizer"]["block_sizes"][-1] == 64
    assert fake_mtq.INT4_AWQ_CFG["quant_cfg"]["*weight_quantizer"]["block_sizes"][-1] == 128  # not mutated
    fp8 = modelopt_quant_config(fake_mtq, quant_plan({"name": "fp8"}, TensorRTLLMOptions(fp8_kv_cache=True)))
    assert "*[kv]_bmm_quantizer" in fp8["quant_cfg"]
    with pytest.raises(ValueError, match="not quantized through ModelOpt"):
        modelopt_quant_config(fake_mtq, quant_plan({"name": "fp16"}))


def test_modelopt_config_real_modelopt():
    mtq = pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")
    from tasks.backends.tensorrt_llm.modelopt_quantize import modelopt_quant_config

    cfg = modelopt_quant_config(mtq, quant_plan({"name": "awq", "group_size": 64}))
    weight = [e["cfg"] for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"]
    assert weight and all(w["block_sizes"][-1] == 64 for w in weight)
    assert cfg["algorithm"]["method"] == "awq_lite"
    fp8 = modelopt_quant_config(mtq, quant_plan({"name": "fp8"}, TensorRTLLMOptions(fp8_kv_cache=True)))
    assert len(fp8["quant_cfg"]) == len(mtq.FP8_DEFAULT_CFG["quant_cfg"]) + len(mtq.FP8_KV_CFG["quant_cfg"])


@pytest.mark.slow
def test_modelopt_export_matches_converter_names_and_config(tiny_dirs, tmp_path):
    """ModelOpt's TensorRT-LLM export of the same model uses the converter's tensor names and config."""
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")
    from tasks.backends.tensorrt_llm.modelopt_quantize import quantize_and_export

    torch.manual_seed(0)
    calib = [torch.randint(3, 240, (2, 16)) for _ in range(2)]
    meta = quantize_and_export(tiny_dirs["dense"], tmp_path / "mo", quant_plan({"name": "fp8"}), calib, device="cpu")
    assert meta["modelopt_config"] == "FP8_DEFAULT_CFG"
    convert.convert_checkpoint(tiny_dirs["dense"], tmp_path / "ours", quant_plan({"name": "fp16"}))
    theirs = load_file(str(tmp_path / "mo" / "rank0.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "rank0.safetensors"))
    assert {k for k in theirs if k.endswith(".weight")} == set(ours)
    cfg_mo = json.loads((tmp_path / "mo" / "config.json").read_text())
    cfg_ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg_mo["quantization"]["quant_algo"] == "FP8" and cfg_mo["quantization"]["exclude_modules"] == ["lm_head"]
    assert theirs["transformer.layers.0.attention.qkv.weight"].dtype == torch.float8_e4m3fn
    assert theirs["lm_head.weight"].dtype == torch.float16
    for key in ("architecture", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                "intermediate_size", "head_size", "vocab_size", "max_position_embeddings", "hidden_act",
                "norm_epsilon", "position_embedding_type", "mapping"):
        assert cfg_ours[key] == cfg_mo[key], key


# --------------------------------------------------------------------------------------------------
# lm-eval wrapper


def test_scoring_window_and_prefix_queries():
    assert scoring_window([1, 2, 3], [4, 5], max_len=10) == [1, 2, 3, 4]
    assert scoring_window([1, 2, 3, 4, 5, 6], [7, 8], max_len=4) == [4, 5, 6, 7]  # HFLM's left truncation
    with pytest.raises(ValueError):
        scoring_window([1], [2, 3, 4], max_len=2)
    window = [4, 5, 6, 7]
    assert prefix_queries(window, 2) == [(4, 5, 6), (4, 5, 6, 7)]
    assert prefix_queries(window, 1) == [(4, 5, 6, 7)]


def test_continuation_logprob_hand_computed():
    rows = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    lp, greedy = continuation_logprob(rows, [3, 0])
    expected = -torch.log(torch.tensor(4.0)) + (2 - torch.log(torch.exp(torch.tensor(2.0)) + 3))
    assert lp == pytest.approx(float(expected), abs=1e-6) and greedy is False  # row 0 argmax is 0, not 3
    assert continuation_logprob(rows[1:], [0])[1] is True


def test_batching_and_deduplication():
    items = [[1], [1, 2, 3], [1, 2], [4, 5, 6]]
    assert length_sorted_batches(items, 2) == [[1, 3], [2, 0]]
    seen = []

    def run(batch):
        seen.append([list(b) for b in batch])
        return [sum(b) for b in batch]

    res = run_deduplicated([(1, 2), (3,), (1, 2), (3,), (9, 9, 9)], 2, run)
    assert res == {(1, 2): 3, (3,): 3, (9, 9, 9): 27}
    assert sum(len(b) for b in seen) == 3 and seen[0][0] == [9, 9, 9]


def test_generation_helpers():
    assert truncate_at_stop("B. because\n\nQuestion", ["\n\n", "Question"]) == "B. because"
    assert truncate_at_stop("abc", []) == "abc"
    req = parse_gen_kwargs({"until": "\n", "max_gen_toks": 5, "do_sample": False}, 256, "</s>")
    assert req.until == ("\n", "</s>") and req.max_gen_toks == 5
    assert parse_gen_kwargs(None, 7, None).max_gen_toks == 7
    with pytest.raises(ValueError, match="greedy"):
        parse_gen_kwargs({"do_sample": True, "temperature": 0.7}, 8, None)


def test_stream_step_times():
    events = [(0.10, [1, 1]), (0.12, [2, 1]), (0.13, [2, 2]), (0.20, [4, 4])]
    first, decode, total = stream_step_times(events, 4)
    assert first == pytest.approx(0.10) and total == pytest.approx(0.20)
    assert decode == pytest.approx([0.03, 0.035, 0.035])  # last event carried two steps
    with pytest.raises(RuntimeError, match="EOS"):
        stream_step_times([(0.1, [1, 1]), (0.2, [2, 1])], 3)


class HFScorer:
    """A ``TokenScorer`` whose logits are recorded from a HF model on CPU (stands in for the engine)."""

    def __init__(self, model, max_input_len: int, has_prompt_logits: bool):
        self.model, self.max_input_len, self.has_prompt_logits = model, max_input_len, has_prompt_logits
        self.calls = 0

    def prompt_logits(self, batch):
        self.calls += 1
        with torch.no_grad():
            return [self.model(torch.tensor([b])).logits[0].float() for b in batch]

    def next_token_logits(self, batch):
        return [rows[-1] for rows in self.prompt_logits(batch)]

    def greedy_generate(self, batch, max_new_tokens):
        self.calls += 1
        outs = []
        for b in batch:
            with torch.no_grad():
                out = self.model.generate(torch.tensor([b]), max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=2, pad_token_id=2)[0, len(b):].tolist()
            outs.append(out[: out.index(2)] if 2 in out else out)
        return outs


def _requests(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


@pytest.mark.slow
def test_loglikelihood_matches_lm_eval_hflm(tiny_dirs):
    """Both scoring modes give HFLM's (logprob, is_greedy) on the same model, including truncation."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["dense"], dtype=torch.float32).eval()
    tok = make_tokenizer()
    g = torch.Generator().manual_seed(1)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(0, 240, (n,), generator=g))  # noqa: E731
    long_ctx = words(300)  # longer than the 256-token window: exercises left truncation
    reqs = []
    for ctx in (words(12), words(40), long_ctx):
        reqs += [(ctx + " Answer", f" {c}") for c in "ABCD"]
    reqs += [(words(5), " " + words(3)), ("", " w1 w2")]
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", max_length=256)
    expected = hflm.loglikelihood(_requests("loglikelihood", reqs))
    for prompt_mode in (True, False):
        scorer = HFScorer(model, 256, prompt_mode)
        got = TensorRTLLMLM(scorer, tok, batch_size=3).loglikelihood(_requests("loglikelihood", reqs))
        assert [g_ for _, g_ in got] == [e for _, e in expected]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=2e-4)
    # MMLU shape: 4 one-token choices per question share one prefill after deduplication
    scorer = HFScorer(model, 256, has_prompt_logits=False)
    TensorRTLLMLM(scorer, tok, batch_size=64).loglikelihood(_requests("loglikelihood", reqs[:12]))
    assert scorer.calls == 1


@pytest.mark.slow
def test_generate_until_matches_lm_eval_hflm(tiny_dirs):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["dense"], dtype=torch.float32).eval()
    tok = make_tokenizer()
    reqs = [("w1 w2 w3 Answer", {"until": ["w7"], "max_gen_toks": 6, "do_sample": False}),
            ("w9 w8", {"until": ["\n\n"], "max_gen_toks": 4})]
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu", max_length=256)
    expected = hflm.generate_until(_requests("generate_until", reqs))
    lm = TensorRTLLMLM(HFScorer(model, 256, False), tok, batch_size=2)
    got = lm.generate_until(_requests("generate_until", reqs))
    assert got == expected and all(isinstance(x, str) for x in got)


class FakeModelRunnerCpp:
    """Mimics ``ModelRunnerCpp.generate``'s outputs (shapes/padding per model_runner_cpp.py) from a HF model."""

    max_seq_len = 64

    def __init__(self, model):
        self.model = model

    def _greedy(self, ids, steps, end_id):
        out, logits = list(ids), []
        with torch.no_grad():
            for _ in range(steps):
                row = self.model(torch.tensor([out])).logits[0, -1]
                logits.append(row)
                out.append(int(row.argmax()))
                if out[-1] == end_id:
                    break
        return out, logits

    def generate(self, batch_input_ids, max_new_tokens, end_id, pad_id, streaming=False, return_dict=False,
                 output_sequence_lengths=False, output_generation_logits=False, top_k=None):
        assert return_dict and top_k == 1
        runs = [self._greedy(t.tolist(), max_new_tokens, end_id) for t in batch_input_ids]

        def outputs(n_steps):
            seqs = [ids[: len(t) + n_steps] for (ids, _), t in zip(runs, batch_input_ids)]
            padded = [[s + [end_id] * (self.max_seq_len - len(s))] for s in seqs]
            out = {"output_ids": torch.tensor(padded, dtype=torch.int32),
                   "sequence_lengths": torch.tensor([[len(s)] for s in seqs], dtype=torch.int32)}
            if output_generation_logits:
                out["generation_logits"] = torch.stack([torch.stack(lg)[None] for _, lg in runs])
            return out

        if streaming:
            return (outputs(k) for k in range(1, max_new_tokens + 1))
        return outputs(max_new_tokens)


@pytest.mark.slow
def test_engine_glue_with_a_fake_runner(tiny_dirs):
    """TensorRTLLMEngine's calls on ModelRunnerCpp-shaped outputs: timing, logits, generation."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from tasks.backends.tensorrt_llm.engine import TensorRTLLMEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["dense"], dtype=torch.float32).eval()
    tok = make_tokenizer()
    meta = {"dtype": "float16", "weight_format": "float16", "limits": {"max_input_len": 48},
            "gather_context_logits": False, "vocab_size": 256, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "head_size": 32, "quantization": {}, "engine_bytes": 123}
    engine = TensorRTLLMEngine(FakeModelRunnerCpp(model), tok, "cuda:0", meta, "policy", 640)
    assert engine.details["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 2 and engine.details["weights_bytes"] == 123
    prompts = torch.randint(3, 240, (2, 10))
    timing = engine.timed_generate(prompts, output_len=5)
    assert timing.output_token_ids.shape == (2, 5) and len(timing.decode_step_s) == 4
    assert timing.first_token_s <= timing.total_s
    ref, _ = FakeModelRunnerCpp(model)._greedy(prompts[0].tolist(), 5, -1)
    assert timing.output_token_ids[0].tolist() == ref[10:]
    reqs = [("w1 w2 w3 Answer", f" {c}") for c in "ABCD"] + [("w5 " * 60 + "w6", " w7 w8")]
    expected = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu",
                    max_length=48).loglikelihood(_requests("loglikelihood", reqs))
    got = engine.lm_eval_model(batch_size=4).loglikelihood(_requests("loglikelihood", reqs))
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=2e-4)
    from tasks.backends.base import Unsupported

    with pytest.raises(Unsupported, match="gather_context_logits=true"):  # a fidelity cell's skipped row
        engine.prompt_logits([[3, 4, 5]])
    gen_req = [("w1 w2", {"until": ["w9"], "max_gen_toks": 4})]
    want = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu",
                max_length=48).generate_until(_requests("generate_until", gen_req))
    assert engine.lm_eval_model(batch_size=1).generate_until(_requests("generate_until", gen_req)) == want


# --------------------------------------------------------------------------------------------------
# backend plumbing with a stand-in trtllm-build


FAKE_BUILD = """
import json, pathlib, sys
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--output_dir") + 1])
out.mkdir(parents=True, exist_ok=True)
(out / "argv.json").write_text(json.dumps(args))
if "--fail" in args:
    print("[TRT-LLM] building...")
    print("Traceback (most recent call last):")
    print("RuntimeError: fake builder failure: weight shape mismatch")
    sys.exit(7)
(out / "rank0.engine").write_bytes(b"0" * 1000)
"""


@pytest.fixture
def fake_trtllm(monkeypatch, tmp_path):
    script = tmp_path / "fake_trtllm_build.py"
    script.write_text(FAKE_BUILD)
    monkeypatch.setattr(trt_backend, "check_available", lambda import_module=False: None)
    monkeypatch.setattr(trt_backend, "_capability", lambda: (8, 9))
    monkeypatch.setattr(trt_backend, "trtllm_build_executable", lambda: [sys.executable, str(script)])
    monkeypatch.setattr(convert, "trtllm_weight_preprocessor", lambda sm: (lambda packed: packed))
    monkeypatch.setitem(sys.modules, "tensorrt_llm", types.SimpleNamespace(__version__="0.0-fake"))


@pytest.mark.slow
def test_build_plumbing_with_fake_builder(tiny_dirs, tmp_path, fake_trtllm):
    engine_dir = tmp_path / "engine"
    backend = trt_backend.TensorRTLLMBackend()
    meta = backend.build(tiny_dirs["dense"], engine_dir, EngineShape(8, 64, 96), {"name": "fp16"},
                         {"eval_max_input_len": 128})
    argv = _as_dict(json.loads((engine_dir / "argv.json").read_text()))
    assert argv["--max_batch_size"] == "8" and argv["--max_input_len"] == "128" and argv["--max_seq_len"] == "160"
    assert argv["--checkpoint_dir"] == str(engine_dir / "trtllm_checkpoint")
    assert not (engine_dir / "trtllm_checkpoint").exists()  # removed after the build by default
    assert (engine_dir / "tokenizer" / "tokenizer.json").exists()
    saved = json.loads((engine_dir / "quantsweep_engine.json").read_text())
    assert saved == json.loads(json.dumps(meta))
    assert meta["engine_bytes"] == 1000 and meta["checkpoint_source"] == "converted"
    assert meta["limits"]["max_batch_size"] == 8 and meta["tensorrt_llm_version"] == "0.0-fake"
    assert (meta["num_hidden_layers"], meta["num_key_value_heads"], meta["head_size"]) == (2, 2, 32)


@pytest.mark.slow
def test_failed_build_raises_with_log_excerpt(tiny_dirs, tmp_path, fake_trtllm):
    with pytest.raises(trt_backend.EngineBuildError) as err:
        trt_backend.TensorRTLLMBackend().build(tiny_dirs["dense"], tmp_path / "e", EngineShape(1, 16, 32),
                                               {"name": "fp16"}, {"extra_build_args": ["--fail"]})
    msg = str(err.value)
    assert "failed (7)" in msg and "fake builder failure: weight shape mismatch" in msg and "Traceback" in msg
    assert (tmp_path / "e" / "build.log").exists()


@pytest.mark.slow
def test_modelopt_route_calibrates_the_fp16_source_with_the_methods_windows(tiny_dirs, tmp_path, monkeypatch):
    """AWQ through ModelOpt behind the quantize task: the int4 artifact points back to its fp16 source."""
    from tasks.backends.tensorrt_llm import modelopt_quantize

    artifact = tmp_path / "awq_artifact"
    artifact.mkdir()
    for f in tiny_dirs["asym"].iterdir():
        (artifact / f.name).write_bytes(f.read_bytes())
    seen = {}

    def fake_export(source, out_dir, plan, batches, dtype):
        seen.update(source=Path(source), plan=plan, batches=list(batches), dtype=dtype)
        return {"quantizer": "modelopt"}

    monkeypatch.setattr(modelopt_quantize, "quantize_and_export", fake_export)
    method = {"name": "awq", "algorithm": "awq", "bits": 4, "group_size": 128,
              "calibration": {"dataset": "pydoc_topics", "num_samples": 3, "seq_len": 8}}
    plan = quant_plan(method)
    with pytest.raises(trt_backend.EngineBuildError, match="fp16 source"):
        trt_backend.prepare_checkpoint(artifact, tmp_path / "ck", plan, method, TensorRTLLMOptions(), 89)
    (artifact / "quantsweep_quant.json").write_text(json.dumps({"source_checkpoint_dir": str(tiny_dirs["dense"])}))
    meta = trt_backend.prepare_checkpoint(artifact, tmp_path / "ck", plan, method, TensorRTLLMOptions(), 89)
    assert seen["source"] == tiny_dirs["dense"] and meta["modelopt_source_dir"] == str(tiny_dirs["dense"])
    assert [tuple(b.shape) for b in seen["batches"]] == [(1, 8)] * 3 and seen["batches"][0][0, 0].item() == 1  # BOS
    assert seen["plan"].quant_algo == "W4A16_AWQ" and seen["dtype"] == "float16"


def test_log_excerpt_keeps_the_traceback():
    log = "\n".join([f"info {i}" for i in range(200)] + ["Traceback (most recent call last):"]
                    + [f"  frame {i}" for i in range(70)] + ["ValueError: boom"])
    excerpt = trt_backend.log_excerpt(log, max_lines=60)
    assert excerpt.startswith("Traceback") and excerpt.endswith("ValueError: boom")
    assert trt_backend.log_excerpt("a\nb\nc", max_lines=2) == "b\nc"


# --------------------------------------------------------------------------------------------------
# integration: needs TensorRT-LLM and a GPU


def _trtllm_ready() -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed (see docs/tensorrt_llm.md)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


@pytest.mark.trtllm
@pytest.mark.parametrize("method", ["fp16", "gptq"])
def test_tiny_engine_end_to_end(method, tmp_path_factory):
    reason = _trtllm_ready()
    if reason:
        pytest.skip(reason)
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp(f"e2e_{method}")
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(root / "dense")
    make_tokenizer().save_pretrained(root / "dense")
    src, method_cfg = root / "dense", {"name": "fp16"}
    if method == "gptq":
        model = LlamaForCausalLM.from_pretrained(root / "dense", dtype=torch.float16)
        scheme = {"g": {"targets": ["Linear"], "weights": {"type": "int", "num_bits": 4, "symmetric": False,
                                                           "strategy": "group", "group_size": 64}}}
        oneshot(model=model, recipe=[QuantizationModifier(config_groups=scheme, ignore=["lm_head"])])
        model.save_pretrained(root / "ct", save_compressed=True)
        make_tokenizer().save_pretrained(root / "ct")
        src, method_cfg = root / "ct", {"name": "gptq", "group_size": 64}
    backend = trt_backend.TensorRTLLMBackend()
    options = {"eval_max_input_len": 256, "kv_cache_batch_size": 2, "kv_cache_input_len": 16,
               "kv_cache_output_len": 8}
    backend.build(src, root / "engine", EngineShape(2, 16, 24), method_cfg, {"eval_max_input_len": 256})
    engine = backend.load(root / "engine", "cuda:0", options)
    try:
        timing = engine.timed_generate(torch.randint(3, 240, (2, 16)), output_len=8)
        assert timing.output_token_ids.shape == (2, 8) and len(timing.decode_step_s) == 7
        assert "batch 2 x (input 16 + output 8)" in engine.kv_cache_policy
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        reqs = _requests("loglikelihood", [("w1 w2 w3 Answer", f" {c}") for c in "ABCD"])
        got = engine.lm_eval_model(batch_size=4).loglikelihood(reqs)
        want = TensorRTLLMLM(HFScorer(ref, 256, False), make_tokenizer(), 4).loglikelihood(reqs)
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=0.05)
        gen = engine.lm_eval_model(batch_size=2).generate_until(
            _requests("generate_until", [("w1 w2", {"until": ["\n"], "max_gen_toks": 4})]))
        assert isinstance(gen[0], str)
    finally:
        engine.close()
