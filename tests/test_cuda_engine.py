"""The CUDA engine's parts: int4 packing, compressed-tensors loading, the model vs transformers.

Everything except the ``gpu``-marked tests runs on CPU (the int4 op falls back to its pure-PyTorch
reference there); the GPU tests check the Triton kernels, the compiled CUDA-graph decode and the engine.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.backends.torch.cuda import int4
from tasks.backends.torch.cuda.generate import Generator
from tasks.backends.torch.cuda.loader import from_compressed_tensors, load_model, random_model, unpack_nibbles
from tasks.backends.torch.cuda.model import ModelArgs
from tests.family_checkpoints import write_int4

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False)


def _hf_tiny(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("k", [128, 384, 576])
def test_pack_unpack_round_trip(k: int) -> None:
    q = torch.randint(0, 16, (24, k), dtype=torch.uint8)
    packed = int4.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (-(-k // 128) * 16, 24)
    assert torch.equal(int4.unpack_int4(packed, k), q)


def test_pack_layout_puts_slice_j_in_nibble_j() -> None:
    """Word [16*b + i, n] nibble j is weight (n, 128*b + 16*j + i): the layout the kernels rely on."""
    q = torch.randint(0, 16, (3, 256), dtype=torch.uint8)
    words = int4.pack_int4(q).to(torch.int64) & 0xFFFFFFFF
    for b, j, i, n in [(0, 0, 0, 0), (0, 7, 15, 2), (1, 3, 5, 1), (1, 7, 0, 0)]:
        assert (words[16 * b + i, n] >> (4 * j)) & 0xF == q[n, 128 * b + 16 * j + i]


def test_compressed_tensors_layout_round_trip() -> None:
    """Our unpacking of compressed-tensors words agrees with the library's own packer and dequantizer."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    n, k, gs = 40, 256, 64
    q_signed = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    zp_signed = torch.randint(-8, 8, (n, k // gs), dtype=torch.int8)
    scale = torch.rand(n, k // gs, dtype=torch.bfloat16) + 0.1
    packed = helpers.pack_to_int32(q_signed, 4, packed_dim=1)
    packed_zp = helpers.pack_to_int32(zp_signed, 4, packed_dim=0)
    assert torch.equal(unpack_nibbles(packed, k).to(torch.int16) - 8, q_signed.to(torch.int16))
    q, scales, zeros = from_compressed_tensors(packed, scale, packed_zp, (n, k))
    ours = int4.dequantize(int4.pack_int4(q), scales, zeros, k)
    theirs = (q_signed.float() - zp_signed.float().repeat_interleave(gs, 1)) * scale.float().repeat_interleave(gs, 1)
    assert torch.equal(ours, theirs)


def test_symmetric_checkpoint_has_zero_point_eight() -> None:
    q = torch.randint(0, 16, (8, 128), dtype=torch.uint8)
    words = q.view(8, 16, 8).to(torch.int64)
    packed = int4._to_int32_bits((words << (4 * torch.arange(8))).sum(-1))
    _, _, zeros = from_compressed_tensors(packed, torch.ones(8, 1), None, (8, 128))
    assert torch.all(zeros == 8)


def test_int4_linear_matches_dequantized_reference_on_cpu() -> None:
    w = torch.randn(96, 256)
    q, scales, zeros = int4.quantize_rtn(w, 64)
    layer = int4.Int4Linear.from_quantized(q, scales, zeros)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    ref = x.float() @ int4.dequantize(layer.qweight, layer.scales, layer.zeros, 256).t()
    out = layer(x)
    assert out.shape == (5, 96) and out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2
    # and the quantization itself is close to the dense weight it came from
    assert ((int4.dequantize(layer.qweight, layer.scales, layer.zeros, 256) - w).norm() / w.norm()) < 0.15


# ---------------------------------------------------------------------------------------- model/loader


def test_model_matches_transformers_logits(tmp_path: Path) -> None:
    hf = _hf_tiny()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, "cpu", dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    ours.setup_cache(2, 16)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids, torch.arange(12), all_logits=True)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(tmp_path: Path) -> None:
    hf = _hf_tiny(seed=1)
    hf.save_pretrained(tmp_path)
    gen = Generator(load_model(tmp_path, "cpu", dtype=torch.float32))
    ids = torch.randint(0, TINY["vocab_size"], (3, 10))
    timing = gen.generate(ids, 6)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[:, 10:]
    assert torch.equal(timing.output_token_ids, ref)
    assert len(timing.decode_step_s) == 5 and timing.total_s >= timing.first_token_s > 0


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_checkpoint_loads_to_same_weights(tmp_path: Path, symmetric: bool) -> None:
    hf = _hf_tiny(seed=2)
    write_int4(hf, tmp_path, 64, symmetric)
    model = load_model(tmp_path, "cpu", dtype=torch.float32)
    layer = model.layers[1].feed_forward.w13
    assert isinstance(layer, int4.Int4Linear) and layer.group_size == 64
    gate = hf.model.layers[1].mlp.gate_proj.weight
    q, scales, zeros = int4.quantize_rtn(gate, 64, symmetric)
    expect = int4.dequantize(int4.pack_int4(q), scales, zeros, gate.shape[1])
    got = int4.dequantize(layer.qweight, layer.scales, layer.zeros, layer.in_features)[: gate.shape[0]]
    assert torch.equal(got, expect)
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        logits = model(ids, torch.arange(8))
    assert torch.isfinite(logits).all()


@gpu
@needs_cuda
@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_int4_checkpoint_on_gpu_matches_the_cpu_reference(tmp_path: Path, kernels: str) -> None:
    """A compressed-tensors checkpoint loaded on the GPU (repacked for the chosen kernels) gives the CPU
    reference's logits: prefill (de-quantize + cuBLAS) and decode-sized batches (the int4 kernels)."""
    hf = _hf_tiny(seed=3)
    write_int4(hf, tmp_path, 64, False)
    cpu = load_model(tmp_path, "cpu", dtype=torch.float32)
    gpu = load_model(tmp_path, "cuda", int4_kernels=kernels)
    if kernels == "auto" and torch.cuda.get_device_capability() >= (8, 0):
        assert gpu.int4_kernels == "mma" and gpu.layers[0].attention.wqkv.layout == "mma"
    cpu.setup_cache(3, 32)
    gpu.setup_cache(3, 32)
    for length in (1, 24):
        ids = torch.randint(0, TINY["vocab_size"], (3, length))
        with torch.no_grad():
            ref = cpu(ids, torch.arange(length)).float()
            got = gpu(ids.cuda(), torch.arange(length, device="cuda")).float().cpu()
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2, length


def test_random_llama_shapes_and_int4_bytes() -> None:
    args = ModelArgs(vocab_size=256, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=384,
                     head_dim=64)
    dense = random_model(args, "bfloat16", "cpu")
    quant = random_model(args, "int4", "cpu", group_size=128)
    assert quant.layers[0].attention.wqkv.qweight.shape == (256 // 8, 3 * 256)
    # int4 linears take ~1/4 of bf16 + scales/zeros; embeddings and lm_head stay bf16 in both
    assert quant.weight_bytes() < 0.6 * dense.weight_bytes()
    with torch.no_grad():
        assert torch.isfinite(quant(torch.randint(0, 256, (1, 4)), torch.arange(4))).all()


# ----------------------------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 3, 8, 16, 64, 200, 2048])
@pytest.mark.parametrize("k,n,gs", [(4096, 4096, 128), (576, 1536, 64), (11008, 512, 128)])
def test_triton_kernels_match_reference(m: int, k: int, n: int, gs: int) -> None:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(k // gs, n, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // gs, n), device="cuda").to(torch.bfloat16)
    qweight = int4.pack_int4(q)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ int4.dequantize(qweight, scales, zeros, k).double().t()
    out = int4.w4a16_mm(x, qweight, scales, zeros, k)
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@gpu
@needs_cuda
def test_cuda_graph_decode_matches_eager(tmp_path: Path) -> None:
    args = ModelArgs(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=512,
                     head_dim=64)
    for fmt in ("bfloat16", "int4"):
        model = random_model(args, fmt, "cuda", group_size=128)
        for batch in (1, 2):  # batch 1: the int4 split-K sums are fused into the compiled block
            ids = torch.randint(0, 512, (batch, 16), device="cuda")
            fast = Generator(model, compile=True, cuda_graph=True).generate(ids, 8)
            slow = Generator(model, compile=False, cuda_graph=False).generate(ids, 8)
            assert (fast.output_token_ids == slow.output_token_ids).float().mean() > 0.9, (fmt, batch)


@gpu
@needs_cuda
@pytest.mark.parametrize("m,cfg", [(1, (2, 64, 4, 4, 2, 4)), (1, (1, 32, 1, 4, 2, 4)), (1, (16, 64, 2, 4, 2, 3)),
                                   (1, (2, 64, 4, 4, 2, 5)), (1, (4, 32, 1, 4, 2, 5)), (1, (1, 128, 16, 4, 2, 5)),
                                   (5, (16, 128, 1, 4, 4, 3)), (33, (32, 64, 4, 4, 3, 3)), (64, (64, 128, 1, 8, 3, 3))])
def test_new_kernel_variants_match_reference(monkeypatch: pytest.MonkeyPatch, m: int, cfg: tuple) -> None:
    """Each variant the kernel sweep may choose (3: tensor-core unpack, 4 and 5: GEMVs), forced on an odd
    shape; split-K partials come back unsummed (as many as the fake kernel predicts)."""
    k, n, gs = 1280, 544, 128  # K not a power of two, N not a multiple of the tiles
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(k // gs, n, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // gs, n), device="cuda").to(torch.bfloat16)
    qweight = int4.pack_int4(q)
    monkeypatch.setitem(int4.TUNED, ("gemm", int4.m_bucket(m), n, k), cfg)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ int4.dequantize(qweight, scales, zeros, k).double().t()
    parts = torch.ops.quantsweep.w4a16_mm_split(x, qweight, scales, zeros, k)
    assert parts.shape == (int4.output_splits(m, n, k, gs), m, n)
    out = int4.reduce_splits(parts, torch.float32)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("b,h,hkv,s,pos,hd", [(1, 32, 32, 712, 0, 128), (1, 32, 32, 712, 611, 128),
                                              (3, 8, 2, 300, 299, 128), (64, 4, 4, 129, 77, 128),
                                              (2, 9, 3, 5000, 4321, 64)])
def test_decode_attention_kernel_matches_reference(b: int, h: int, hkv: int, s: int, pos: int, hd: int) -> None:
    """Flash-decoding from the raw q/k/v projection (rope, cache write and merge in one kernel) == fp32
    attention over HF-roped q/k, positions 0..pos read from the device.  The cache gets the new roped key
    (to one bf16 rounding: the kernel may fuse the multiply-adds) and value at pos and nothing else.  Run
    twice: the arrival counters must be left at zero for the next launch.  The last case has more chunks
    than one merge block (5000 positions, GQA, head dim 64)."""
    from tasks.backends.torch.cuda.attention import _cuda_decode_attention, decode_attention_reference, rope_at
    from tasks.backends.torch.cuda.rope import Rope, rope_tables

    qkv = torch.randn(b, (h + 2 * hkv) * hd, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_tables(hd, Rope(), s, "cuda")
    k_cache = torch.randn(b, hkv, s, hd, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    p = torch.tensor([pos], device="cuda")
    q, k_new, v_new = rope_at(qkv, cos, sin, p, hkv, hd)
    ref = decode_attention_reference(q.float(), k_new.float(), v_new.float(), k_cache.float(), v_cache.float(), p)
    others = torch.arange(s, device="cuda") != pos
    for _ in range(2):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = _cuda_decode_attention(qkv, cos, sin, kc, vc, p)
        assert torch.equal(kc[:, :, others], k_cache[:, :, others]) and torch.equal(vc[:, :, others],
                                                                                       v_cache[:, :, others])
        assert torch.equal(vc[:, :, pos], v_new)
        torch.testing.assert_close(kc[:, :, pos].float(), k_new.float(), rtol=2 ** -7, atol=1e-6)
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_kv_cache_shape_prefers_profile_options_then_engine_shape() -> None:
    from tasks.backends.torch.cuda.engine import kv_cache_shape

    shape = {"max_batch_size": 8, "max_input_len": 64, "max_seq_len": 96}
    assert kv_cache_shape({"kv_cache_batch_size": 4, "kv_cache_input_len": 64, "kv_cache_output_len": 16,
                           "shape": shape})[0] == (4, 80)
    assert kv_cache_shape({"shape": shape})[0] == (8, 96)
    assert kv_cache_shape({})[0] is None


def test_generator_reuses_a_larger_cache_of_the_same_batch(tmp_path: Path) -> None:
    hf = _hf_tiny(seed=3)
    hf.save_pretrained(tmp_path)
    gen = Generator(load_model(tmp_path, "cpu", dtype=torch.float32))
    gen.setup(2, 32)
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    in_big_cache = gen.generate(ids, 5).output_token_ids
    assert gen.shape == (2, 32)  # reused, not re-allocated to 2 x 15
    gen.generate(torch.randint(0, TINY["vocab_size"], (3, 10)), 5)
    assert gen.shape == (3, 15)
    gen.release()
    assert torch.equal(gen.generate(ids, 5).output_token_ids, in_big_cache)  # same tokens in an exact cache


def test_generator_follows_the_prompt_it_is_given(tmp_path: Path) -> None:
    """The prompt goes through a static buffer (what the prefill graph reads): a new prompt of the same
    shape must be copied in, and a new prompt length must replace the buffer, never reuse a stale one."""
    hf = _hf_tiny(seed=4)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, "cpu", dtype=torch.float32)
    gen = Generator(model)
    gen.setup(2, 40)
    prompts = [torch.randint(0, TINY["vocab_size"], (2, length)) for length in (12, 12, 7)]
    reused = [gen.generate(ids, 4).output_token_ids for ids in prompts]
    assert gen.shape == (2, 40)
    for ids, tokens in zip(prompts, reused):
        fresh = Generator(model).generate(ids, 4).output_token_ids
        assert torch.equal(tokens, fresh)
    assert not torch.equal(reused[0], reused[1])  # different prompts of one shape: not the buffered one


def test_decode_logits_score_every_position_like_a_forward_pass(tmp_path: Path) -> None:
    """Teacher-forced decode steps (the fidelity stage's scoring path) give transformers' logits at every
    position, for two windows of different lengths through one cache."""
    hf = _hf_tiny(seed=4)
    hf.save_pretrained(tmp_path)
    gen = Generator(load_model(tmp_path, "cpu", dtype=torch.float32), compile=False)
    for length in (20, 9):
        ids = torch.randint(0, TINY["vocab_size"], (length,))
        with torch.no_grad():
            ref = hf(ids[None]).logits[0]
        got = gen.decode_logits(ids)
        assert got.shape == (length, TINY["vocab_size"])
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


@gpu
@needs_cuda
def test_decode_logits_on_gpu_use_the_graph_and_match_the_cpu_reference(tmp_path: Path) -> None:
    """On CUDA the scoring step is a captured graph over the int4 decode kernels; its logits match the
    CPU reference's (de-quantized fp32) within bf16 accuracy."""
    hf = _hf_tiny(seed=5)
    write_int4(hf, tmp_path, 64, False)
    cpu = Generator(load_model(tmp_path, "cpu", dtype=torch.float32), compile=False)
    gpu = Generator(load_model(tmp_path, "cuda"), compile=False)
    ids = torch.randint(0, TINY["vocab_size"], (40,))
    ref = cpu.decode_logits(ids)
    got = gpu.decode_logits(ids.cuda()).cpu()
    assert gpu.score_graph is not None
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2
    again = gpu.decode_logits(ids.cuda()).cpu()  # a second window through the same graph and cache
    assert ((again - got).norm() / got.norm()).item() < 1e-3
