"""The "mma" int4 layout: packing on CPU (against an independent model of mma.m16n8k16's fragments) and
the NVRTC-compiled tensor-core kernels on a GPU (marked ``gpu``)."""
from __future__ import annotations

import pytest
import torch

from tasks.backends.torch.cuda import int4, int4_mma
from tasks.backends.torch.cuda.generate import Generator
from tasks.backends.torch.cuda.loader import random_model
from tasks.backends.torch.cuda.model import ModelArgs

gpu = pytest.mark.gpu
needs_mma = pytest.mark.skipif(not torch.cuda.is_available() or not int4_mma.available(torch.device("cuda"))[0],
                               reason="needs an sm_80+ NVIDIA GPU with NVRTC")
needs_wgmma = pytest.mark.skipif(not torch.cuda.is_available() or not int4_mma.wgmma_available(torch.device("cuda")),
                                 reason="needs a Hopper (sm_90) GPU with NVRTC")


def _random_layer(n: int, k: int, gs: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(n * 7 + k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(k // gs, n, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen).to(torch.bfloat16)
    return q.to(device), scales.to(device), zeros.to(device)


@pytest.mark.parametrize("n,k", [(16, 64), (48, 576), (64, 256)])
def test_pack_mma_round_trip(n: int, k: int) -> None:
    q = _random_layer(n, k, 64)[0]
    packed = int4_mma.pack_mma(q)
    assert packed.shape == (n // 16, k // 64, 32, 4) and packed.dtype == torch.int32
    assert torch.equal(int4_mma.unpack_mma(packed), q)


def test_pack_mma_feeds_the_mma_fragments() -> None:
    """Rebuild each m16n8k16 step from the words and activations exactly as the kernel's registers hold
    them (PTX ISA fragment layouts for .bf16: A row-major 16x16, B 16x8, lane = 4 * groupID + threadID),
    and check that the sum of the 4 K-steps of a chunk is the chunk's true product."""
    n, k, m = 16, 64, 8
    q = _random_layer(n, k, 64)[0].to(torch.int64)
    x = torch.randn(m, k, dtype=torch.float64)
    words = int4_mma.pack_mma(q.to(torch.uint8))[0, 0].to(torch.int64) & 0xFFFFFFFF  # [32 lanes, 4 kt]
    total = torch.zeros(n, m, dtype=torch.float64)
    for kt in range(4):
        a = torch.full((16, 16), float("nan"), dtype=torch.float64)
        b = torch.full((16, 8), float("nan"), dtype=torch.float64)
        for lane in range(32):
            g, t = lane // 4, lane % 4
            w = int(words[lane, kt])
            regs = [(((w >> (4 * i)) & 0xF), ((w >> (4 * i + 16)) & 0xF)) for i in range(4)]  # (low, high) halves
            # A: reg i holds (a_{2i}, a_{2i+1}); rows g / g+8 alternate, columns +8 for regs 2 and 3
            for i, (lo, hi) in enumerate(regs):
                row = g + 8 * (i & 1)
                col = 2 * t + 8 * (i >> 1)
                a[row, col], a[row, col + 1] = lo, hi
            # B from the lane's 16 contiguous activations x[g, 16t : 16t + 16]: words 2kt and 2kt + 1
            xs = x[g, 16 * t:16 * t + 16]
            b[2 * t, g], b[2 * t + 1, g] = xs[4 * kt], xs[4 * kt + 1]
            b[2 * t + 8, g], b[2 * t + 9, g] = xs[4 * kt + 2], xs[4 * kt + 3]
        assert not a.isnan().any() and not b.isnan().any()  # every fragment element written exactly once
        total += a @ b
    torch.testing.assert_close(total, q.double() @ x.t())


def _a_fragments(words: torch.Tensor, kt: int) -> torch.Tensor:
    """The 16x16 A operand of K step ``kt`` from one tile-chunk's words [32 lanes, 4], as the registers hold
    it (PTX: reg i = (a_2i, a_2i+1); rows g / g + 8 alternate, columns + 8 for regs 2 and 3)."""
    a = torch.full((16, 16), float("nan"), dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        w = int(words[lane, kt])
        for i in range(4):
            row, col = g + 8 * (i & 1), 2 * t + 8 * (i >> 1)
            a[row, col], a[row, col + 1] = (w >> (4 * i)) & 0xF, (w >> (4 * i + 16)) & 0xF
    return a


@pytest.mark.parametrize("mt", [1, 2, 3, 4, 8])
def test_wgmma_activation_staging_feeds_the_fragments(mt: int) -> None:
    """The wgmma kernel stores word w (k = 8j + 2w, + 1) of 16-byte piece j of activation row r of a chunk at
    byte ``(2 (j & 1) + (w >> 1)) KT + (w & 1) LBO + 4 (j >> 1) + (r >> 3) SBO + 16 (r & 7)`` of the chunk's
    buffer; thread tid of the block holds piece tid % 8 of rows tid / 8 + 16 i (w4a16_mma.cu).  Read back
    the way PTX defines a K-major, unswizzled wgmma B operand (8x16-byte core matrices; LBO between the
    two along K, SBO between 8-row groups), each K step's B times the packed weights' A fragments must give
    the true product; no two words may share a byte, and each store instruction of a warp (32 threads, one
    word each) must hit 32 different banks."""
    lbo, sbo, kt_bytes = 144, 288, int4_mma._wgmma_k_step_bytes(mt)
    assert kt_bytes >= mt * sbo and kt_bytes % 128 == 32
    rows = 8 * mt
    x = torch.randn(rows, 64, dtype=torch.float64)

    def at(r: int, j: int, w: int) -> int:
        return (2 * (j & 1) + (w >> 1)) * kt_bytes + (w & 1) * lbo + 4 * (j >> 1) + (r >> 3) * sbo + 16 * (r & 7)

    smem: dict[int, float] = {}
    for r in range(rows):
        for j in range(8):
            for w in range(4):
                a = at(r, j, w)
                assert a not in smem and a + 2 not in smem
                smem[a], smem[a + 2] = x[r, 8 * j + 2 * w].item(), x[r, 8 * j + 2 * w + 1].item()
    for warp_first in range(0, rows * 8, 32):  # one warp's store of word w
        for w in range(4):
            banks = {(at(tid // 8, tid % 8, w) // 4) % 32 for tid in range(warp_first, min(warp_first + 32, rows * 8))}
            assert len(banks) == min(32, rows * 8 - warp_first)
    q = _random_layer(16, 64, 64)[0]
    words = int4_mma.pack_mma(q)[0, 0].to(torch.int64) & 0xFFFFFFFF
    total = torch.zeros(16, rows, dtype=torch.float64)
    for kt in range(4):
        b = torch.empty(16, rows, dtype=torch.float64)  # [k, n] = B of K step kt
        for n in range(rows):
            for kk in range(16):
                core = kt * kt_bytes + (n // 8) * sbo + (kk // 8) * lbo  # core matrix (n // 8, kk // 8)
                b[kk, n] = smem[core + 16 * (n % 8) + 2 * (kk % 8)]
        total += _a_fragments(words, kt) @ b
    torch.testing.assert_close(total, q.double() @ x.t())


def test_reference_path_reads_the_mma_layout_on_cpu() -> None:
    n, k, gs = 32, 128, 64
    q, scales, zeros = _random_layer(n, k, gs)
    layer = int4.Int4Linear.from_quantized(q, scales, zeros)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    before = layer(x)
    assert layer.to_mma_layout() and layer.layout == "mma"
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    torch.testing.assert_close(int4.dequantize(layer.qweight, scales, zeros, k),
                               int4.dequantize(int4.pack_int4(q), scales, zeros, k), rtol=0, atol=0)


def test_unsupported_shapes_keep_the_triton_layout() -> None:
    q, scales, zeros = _random_layer(24, 128, 64)  # 24 rows: not whole 16-row tiles
    layer = int4.Int4Linear.from_quantized(q, scales, zeros)
    assert not layer.to_mma_layout() and layer.layout == "triton"
    assert not int4_mma.supported(4096, 4096, 32)
    assert not int4_mma.supported(4096, 4608, 192)  # 3 chunks per group: not a power of two
    assert int4_mma.supported(4096, 4096, 256)


def test_invalid_mma_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="shared memory"):
        int4_mma.check_config(1, (2, 4, 4, 3, 1, 0))  # a 54 KiB ring
    with pytest.raises(ValueError, match="shared memory"):
        int4_mma.check_config(64, (1, 4, 2, 4, 1, 1))  # 4 stages x 2 chunks x 64 rows of activations
    with pytest.raises(ValueError, match="S >= 2"):
        int4_mma.check_config(1, (1, 4, 4, 1, 1, 0))
    with pytest.raises(ValueError, match="MODE 0, 1, 2 or 3"):
        int4_mma.check_config(16, (1, 4, 1, 3, 1, 4))
    with pytest.raises(ValueError, match="WK = 4"):
        int4_mma.check_config(16, (1, 2, 1, 3, 1, int4_mma.WGMMA))
    with pytest.raises(ValueError, match="shared memory"):
        int4_mma.check_config(64, (4, 4, 2, 8, 1, int4_mma.WGMMA))
    int4_mma.check_config(64, (2, 4, 1, 4, 1, int4_mma.WGMMA))  # 55 KiB: dynamic shared memory


def test_gemv_configs_are_checked_and_used_only_where_they_apply(monkeypatch) -> None:
    with pytest.raises(ValueError, match="M <= 8"):
        int4_mma.check_config(16, (2, 4, 1, 3, 1, int4_mma.GEMV))
    with pytest.raises(ValueError, match="shared memory"):  # 8 warps x 3 stages x 2 tiles x 2 chunks
        int4_mma.check_config(8, (2, 8, 1, 3, 1, int4_mma.GEMV))
    int4_mma.check_config(8, (2, 8, 1, 3, 1, int4_mma.GEMV), group_chunks=1)
    monkeypatch.setitem(int4_mma.TUNED, (8, 4096, 4096), (2, 4, 1, 3, 3, int4_mma.GEMV))
    assert int4_mma.config(5, 4096, 4096, group_chunks=2) == (2, 4, 1, 3, 3, int4_mma.GEMV)
    assert int4_mma.config(5, 4096, 4096, group_chunks=8)[5] != int4_mma.GEMV  # groups of 512: no instance
    with pytest.raises(ValueError, match="groups of"):
        int4_mma.check_config(1, (1, 1, 1, 3, 1, int4_mma.GEMV), group_chunks=8)
    # splits hold whole groups: 64 chunks in 3 -> 22 rounded up to 24 chunks per split, still 3 splits;
    # 19 chunks in 5 -> 4 per split, 5 splits; 64 in 7 -> 10 -> 12 per split, only 6 splits launched
    assert int4_mma.chunk_splits(4096, (2, 4, 1, 3, 3, int4_mma.GEMV)) == (24, 3)
    assert int4_mma.chunk_splits(1216, (2, 4, 1, 3, 5, int4_mma.GEMV)) == (4, 5)
    assert int4_mma.chunk_splits(4096, (2, 4, 1, 3, 7, int4_mma.GEMV)) == (12, 6)
    assert int4_mma.chunk_splits(4096, (2, 4, 1, 3, 7, int4_mma.SPLIT_K)) == (10, 7)


def test_tuned_wgmma_configs_are_used_only_where_wgmma_runs(monkeypatch) -> None:
    monkeypatch.setitem(int4_mma.TUNED, (64, 4096, 4096), (2, 4, 1, 4, 2, int4_mma.WGMMA))
    assert int4_mma.config(64, 4096, 4096, wgmma=True) == (2, 4, 1, 4, 2, int4_mma.WGMMA)
    assert int4_mma.config(64, 4096, 4096, wgmma=False)[5] != int4_mma.WGMMA
    assert int4_mma.config(8, 512, 512, wgmma=True)[5] != int4_mma.WGMMA  # one 8-row tile: mma.sync
    assert not int4_mma.wgmma_available(torch.device("cpu"))


def test_select_kernels_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="int4_kernels must be one of auto, mma, triton"):
        int4.select_kernels(torch.nn.Linear(2, 2), "marlin")


def test_select_kernels_on_cpu_keeps_the_reference_layout() -> None:
    q, scales, zeros = _random_layer(32, 128, 64)
    model = torch.nn.Sequential(int4.Int4Linear.from_quantized(q, scales, zeros))
    assert int4.select_kernels(model, "auto") == "reference" and model[0].layout == "triton"
    assert int4.select_kernels(torch.nn.Linear(2, 2), "auto") == "none"
    with pytest.raises(RuntimeError, match="int4_kernels=mma is not available here"):
        int4.select_kernels(model, "mma")


# ------------------------------------------------------------------------------------------------- GPU


@gpu
@needs_mma
@pytest.mark.parametrize("m", [1, 2, 5, 8, 13, 16, 33, 64, 65, 512])
@pytest.mark.parametrize("n,k,gs", [(4096, 4096, 128), (1536, 576, 64), (512, 11008, 128), (272, 1280, 128)])
def test_mma_kernel_matches_reference(m: int, n: int, k: int, gs: int) -> None:
    q, scales, zeros = _random_layer(n, k, gs, "cuda")
    qweight = int4_mma.pack_mma(q)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w_bf16 = int4.dequantize(qweight, scales, zeros, k, torch.bfloat16)
    ref = x.double() @ w_bf16.double().t()
    parts = torch.ops.quantsweep.w4a16_mm_split(x, qweight, scales, zeros, k)
    fake_splits = int4_mma.output_splits(m, n, k, x.device, gs)
    assert parts.shape == (fake_splits, m, n)
    out = int4.reduce_splits(parts, torch.float32)
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 5e-3


def _check_config_on_ragged_shape(cfg: tuple, m: int, k: int = 1216, gs: int = 64) -> None:
    """One launch config on 13 tiles x 19 chunks (ragged tile groups, splits and batches) vs the reference."""
    n = 208
    q, scales, zeros = _random_layer(n, k, gs, "cuda")
    qweight = int4_mma.pack_mma(q)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ int4.dequantize(qweight, scales, zeros, k, torch.bfloat16).double().t()
    out = int4.reduce_splits(int4_mma.mma_split(x, qweight, scales, zeros, cfg), torch.float32)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 5e-3


@gpu
@needs_mma
@pytest.mark.parametrize("cfg", [(1, 1, 1, 2, 1, 0), (1, 4, 4, 4, 3, 0), (2, 2, 2, 3, 5, 0), (4, 1, 2, 2, 2, 0),
                                 (3, 4, 1, 5, 7, 0), (1, 2, 8, 2, 1, 0), (1, 8, 2, 3, 2, 0), (2, 4, 1, 6, 4, 0),
                                 (1, 4, 1, 3, 1, 1), (2, 2, 2, 3, 3, 1), (1, 8, 1, 2, 2, 1), (3, 2, 1, 4, 1, 1)])
@pytest.mark.parametrize("m", [1, 9, 40])
def test_mma_kernel_configs_match_reference(cfg: tuple, m: int) -> None:
    """Every template/launch knob the sweep may pick, on a shape with a ragged last group of tiles and a
    ragged last split (13 tiles, 19 chunks), and more stages than some warps have batches."""
    _check_config_on_ragged_shape(cfg, m)


@gpu
@needs_wgmma
@pytest.mark.parametrize("cfg", [(1, 4, 1, 3, 1, 2), (2, 4, 2, 4, 3, 2), (4, 4, 1, 5, 2, 2), (2, 4, 1, 3, 7, 2),
                                 (1, 4, 2, 6, 1, 2), (3, 4, 1, 4, 4, 2), (1, 8, 1, 3, 2, 2), (2, 8, 2, 4, 1, 2)])
@pytest.mark.parametrize("m", [9, 16, 17, 40, 57, 64])
def test_wgmma_kernel_configs_match_reference(cfg: tuple, m: int) -> None:
    """The Hopper kernel over its knobs, on the ragged shape above (13 tiles: the last warpgroup's wgmma
    covers rows past N; 19 chunks: ragged splits and batches) and M that leave rows of the last 8-row tile
    empty."""
    _check_config_on_ragged_shape(cfg, m)


@gpu
@needs_mma
@pytest.mark.parametrize("cfg", [(1, 1, 1, 3, 1, 3), (2, 2, 1, 3, 3, 3), (4, 1, 1, 4, 2, 3), (3, 2, 1, 3, 1, 3),
                                 (1, 2, 2, 5, 8, 3), (2, 1, 2, 5, 5, 3), (1, 4, 1, 4, 2, 3), (1, 8, 1, 3, 2, 3),
                                 (2, 4, 2, 3, 3, 3)])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("k,gs", [(1216, 64), (1280, 128), (1280, 256)])
def test_gemv_kernel_configs_match_reference(cfg: tuple, m: int, k: int, gs: int) -> None:
    """The zero-point-folding kernel over its knobs and the three group sizes it compiles for, on ragged
    shapes: 13 tiles (TN 2, 3, 4 leave a partial last block), 19 or 20 chunks (ragged splits; more warps
    than some splits have batches, and a last batch with fewer groups than U)."""
    if int4_mma.smem_bytes(m, cfg, gs // 64) > int4_mma.SMEM_LIMIT:
        pytest.skip(f"{cfg} does not fit in shared memory with groups of {gs}")
    _check_config_on_ragged_shape(cfg, m, k, gs)


@gpu
@needs_mma
def test_gemv_zero_point_folding_keeps_precision_with_outlier_activations() -> None:
    """(128 + q) x summed and (128 + z) sum x subtracted: the cancellation must stay far below bf16's
    resolution even when a few activations are ~300x the rest (as in LLM hidden states)."""
    n, k, gs = 4096, 4096, 128
    q, scales, zeros = _random_layer(n, k, gs, "cuda")
    qweight = int4_mma.pack_mma(q)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    x[0, ::509] = 300.0
    ref = x.double() @ int4.dequantize(qweight, scales, zeros, k, torch.float64).t()  # exact (q - z) s
    out = int4.reduce_splits(int4_mma.mma_split(x, qweight, scales, zeros, (2, 4, 1, 3, 2, 3)), torch.float32)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-4  # fp32 partials (2 splits)


@gpu
@needs_mma
def test_mma_dequantize_is_the_reference_bit_for_bit() -> None:
    n, k, gs = 1536, 576, 64
    q, scales, zeros = _random_layer(n, k, gs, "cuda")
    qweight = int4_mma.pack_mma(q)
    got = int4_mma.dequantize_mma_cuda(qweight, scales, zeros)
    assert torch.equal(got, int4.dequantize(qweight, scales, zeros, k, torch.bfloat16))


@gpu
@needs_mma
def test_graph_decode_with_mma_kernels_matches_eager() -> None:
    args = ModelArgs(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=512,
                     head_dim=64)
    model = random_model(args, "int4", "cuda", group_size=128, int4_kernels="mma")
    assert model.int4_kernels == "mma"
    for batch in (1, 3):
        ids = torch.randint(0, 512, (batch, 16), device="cuda")
        fast = Generator(model, compile=True, cuda_graph=True).generate(ids, 8)
        slow = Generator(model, compile=False, cuda_graph=False).generate(ids, 8)
        assert (fast.output_token_ids == slow.output_token_ids).float().mean() > 0.9, batch
