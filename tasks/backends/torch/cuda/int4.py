"""W4A16 group-wise int4 linear layers: one packed layout, a CPU reference and CUDA kernels.

Layout (``qweight`` int32 [ceil(K/128)*16, N]): the K axis is cut into blocks of 128; word ``[16*b + i, n]``
holds, in nibble ``j`` (bits 4j..4j+3), the unsigned 4-bit value of weight ``(n, k = 128*b + 16*j + i)``.
So one 16-row slab of words is a whole 128-deep K block, and shifting it by 4j gives the 16 x N slice
``k = 128*b + 16*j + [0, 16)`` with no reshuffling: a Triton program unpacks in registers with one shift
and mask per nibble and feeds a K=16 slice straight to the multiply.  Consecutive ``n`` are consecutive
words, so every load is coalesced along N.  ``scales`` and ``zeros`` are bf16 [K/group_size, N]; ``zeros``
holds the *integer* zero point (0..15, exact in bf16) so that ``w = (q - zero) * scale`` is the same
arithmetic as compressed-tensors' ``(q - zp) * s`` (a symmetric checkpoint has zero 8 everywhere).

Kernels (CUDA, Triton), chosen per (M, N, K) from ``int4_configs.json`` (written on an H100, then re-tuned
on an H200 for M = 1, 16 and 64, by ``bench/tune_kernels.py int4``, which times every candidate
inside CUDA graphs with weights cold in L2, as the decode step runs them; heuristics fill shapes it lacks):
Split-K kernels write each split's partial sums to its own slice of a [splits, M, N] fp32 output (no
atomics: no zeroed buffer, no memset launch, deterministic sums); the sum over splits is fused by
torch.compile into whatever consumes the product (the decode step's norms, residual adds and SiLU).
- M == 1: a split-K GEMV keeping a [16, BLOCK_N] accumulator per group, or
  :func:`_gemv2_kernel` (zero point folded out per group, several K blocks per load).
- 2 <= M <= ``GEMM_MAX_M``: a tensor-core GEMM (``tl.dot`` on K=16 slices, split-K for small M), or
  :func:`_tc_kernel` (the whole 128-deep block unpacked at once, nibbles turned into bf16 by one OR with
  the bits of 128.0, zero point folded out after the dot), or de-quantize + cuBLAS where that measured
  fastest.
- larger M (prefill): de-quantize the weight to bf16 once (a 4-bit read and a 16-bit write) and use cuBLAS;
  at M in the thousands the matmul is compute-bound and cuBLAS beats any dequantizing kernel.
torch's tinygemm (``aten._weight_int4pack_mm``) is faster than these kernels at M <= 4 on the H100 (graph-
timed: 16 vs 20 us for 4096x12288 at M=1, 7 vs 10 us for 4096x4096) but 1.5-5x slower than them from
M=8-16 up, and it needs its own opaque weight layout: keeping both layouts would cost the memory int4 is
meant to save, so it is not used.
On sm_80+ NVIDIA GPUs the loader normally repacks the weights into the "mma" layout of :mod:`.int4_mma`
(:func:`select_kernels`), whose NVRTC-compiled tensor-core kernels are 1.3-2.2x faster than these at
M <= 32 on an H200 and, with Hopper's wgmma, 1.3-1.7x at M = 64; a 4-D ``qweight`` selects that path in
:func:`w4a16_mm_split`.
CPU (and any device without Triton) runs the pure-PyTorch reference, which the tests compare against.

``torch.ops.quantsweep.w4a16_mm_split`` is a custom op, so ``torch.compile`` treats it as one opaque call and
CUDA-graph capture records the kernels it launches.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from tasks.backends.torch.cuda import fused, int4_mma
from tasks.backends.torch.cuda.int4_mma import m_bucket

try:  # Triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None

PACK_BLOCK = 128  # K rows per 16-word slab
CONFIG_FILE = Path(__file__).with_name("int4_configs.json")  # written by bench/tune_kernels.py int4


# ----------------------------------------------------------------------------------------------- packing


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits (two's complement, written out)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values ``q`` [N, K] (0..15, any int dtype) -> ``qweight`` int32 [ceil(K/128)*16, N]."""
    n, k = q.shape
    k_pad = math.ceil(k / PACK_BLOCK) * PACK_BLOCK
    qt = torch.zeros(k_pad, n, dtype=torch.int64, device=q.device)
    qt[:k] = q.t().to(torch.int64)
    slabs = qt.view(k_pad // PACK_BLOCK, 8, 16, n)  # [blocks, nibble j, row i, N]
    shifts = (4 * torch.arange(8, device=q.device, dtype=torch.int64)).view(1, 8, 1, 1)
    words = (slabs << shifts).sum(dim=1)  # nibbles are disjoint bit fields: sum == bitwise or
    return _to_int32_bits(words.reshape(-1, n)).contiguous()


def unpack_int4(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 [ceil(K/128)*16, N] -> uint8 [N, K] in 0..15."""
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    blocks, n = words.shape[0] // 16, words.shape[1]
    shifts = (4 * torch.arange(8, device=qweight.device, dtype=torch.int64)).view(1, 8, 1, 1)
    nibbles = (words.view(blocks, 1, 16, n) >> shifts) & 0xF  # [blocks, j, i, N]
    return nibbles.reshape(blocks * PACK_BLOCK, n)[:k].t().to(torch.uint8).contiguous()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference de-quantization ``W[n, k] = (q - zero) * scale`` -> [N, K] in ``dtype``, from either
    layout (a 4-D ``qweight`` is the "mma" layout of :mod:`.int4_mma`).

    Computed in float32 (exact for these integers; one rounding of the product), then cast.
    """
    q = (int4_mma.unpack_mma(qweight) if qweight.dim() == 4 else unpack_int4(qweight, in_features)).to(torch.float32)
    group_size = in_features // scales.shape[0]
    s = scales.to(torch.float32).t().repeat_interleave(group_size, dim=1)  # [N, K]
    z = zeros.to(torch.float32).t().repeat_interleave(group_size, dim=1)
    return ((q - z) * s).to(dtype)


def quantize_rtn(weight: torch.Tensor, group_size: int, symmetric: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 of a dense [N, K] weight -> (q uint8 [N, K], scales [G, N], zeros [G, N]).

    Only for tests and examples: the study's int4 weights come from AWQ/GPTQ checkpoints.
    """
    n, k = weight.shape
    w = weight.to(torch.float32).view(n, k // group_size, group_size)
    if symmetric:
        s = (w.abs().amax(-1) / 7.5).clamp(min=1e-8)
        zp = torch.full_like(s, 8.0)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-8)
        zp = torch.round(-lo / s).clamp(0, 15)
    q = torch.clamp(torch.round(w / s[..., None]) + zp[..., None], 0, 15).to(torch.uint8).view(n, k)
    return q, s.t().to(torch.bfloat16).contiguous(), zp.t().to(torch.bfloat16).contiguous()


# ------------------------------------------------------------------------------------ Triton kernels

if triton is not None:

    @triton.jit
    def _store_split(out_ptr, offsets, acc, mask):
        """Every kernel's epilogue: write this program's split-K partial sums into its own slice of the
        [splits, M, N] output (fp32 when split, the activation dtype when not).  No atomics, so no zeroed
        buffer and no separate memset launch, and the result is deterministic; the split sum is left to
        the caller, where torch.compile fuses it into the next elementwise kernel."""
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, K, n_groups, blocks_per_split,
                     GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[n] (+)= sum_k x[k] * (q[k, n] - z) * s over this program's K blocks; x is one row."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_i = tl.arange(0, 16)
        SLICES: tl.constexpr = (GROUP_SIZE if GROUP_SIZE < 128 else 128) // 16  # K=16 slices per scale
        acc2 = tl.zeros((16, BLOCK_N), dtype=tl.float32)  # reduced over its 16 rows once, at the end
        n_blocks = tl.cdiv(K, 128)
        kb_start = pid_k * blocks_per_split
        kb_end = tl.minimum(kb_start + blocks_per_split, n_blocks)
        for kb in range(kb_start, kb_end):
            qw = tl.load(qw_ptr + (kb * 16 + offs_i)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            part = tl.zeros((16, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(8):
                k0 = kb * 128 + j * 16
                if j % SLICES == 0:
                    g = k0 // GROUP_SIZE
                    g_ok = n_mask & (g < n_groups)
                    s = tl.load(s_ptr + g * N + offs_n, mask=g_ok, other=0.0).to(tl.float32)
                    # 2**23 + zero: OR-ing q into the mantissa of 2**23 and subtracting this gives q - zero.
                    c = tl.load(z_ptr + g * N + offs_n, mask=g_ok, other=0.0).to(tl.float32) + 8388608.0
                    part = tl.zeros((16, BLOCK_N), dtype=tl.float32)
                x = tl.load(x_ptr + k0 + offs_i, mask=(k0 + offs_i) < K, other=0.0).to(tl.float32)
                q = ((qw >> (4 * j)) & 0xF) | 0x4B000000
                part += (q.to(tl.float32, bitcast=True) - c[None, :]) * x[:, None]
                if (j + 1) % SLICES == 0:
                    acc2 += part * s[None, :]
        acc = tl.sum(acc2, axis=0)
        _store_split(out_ptr, pid_k * N + offs_n, acc, n_mask)

    @triton.jit
    def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, n_groups, stride_xm, stride_om,
                     blocks_per_split, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        """out[M, N] (+)= x[M, K] @ dequant(W)[K, N]: per 128-deep block, 8 tensor-core dots of K=16."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_i = tl.arange(0, 16)
        SLICES: tl.constexpr = (GROUP_SIZE if GROUP_SIZE < 128 else 128) // 16
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n_blocks = tl.cdiv(K, 128)
        kb_start = pid_k * blocks_per_split
        kb_end = tl.minimum(kb_start + blocks_per_split, n_blocks)
        for kb in range(kb_start, kb_end):
            qw = tl.load(qw_ptr + (kb * 16 + offs_i)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(8):
                k0 = kb * 128 + j * 16
                if j % SLICES == 0:
                    g = k0 // GROUP_SIZE
                    g_ok = n_mask & (g < n_groups)
                    s = tl.load(s_ptr + g * N + offs_n, mask=g_ok, other=0.0).to(tl.float32)
                    c = tl.load(z_ptr + g * N + offs_n, mask=g_ok, other=0.0).to(tl.float32) + 8388608.0
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_i)[None, :],
                            mask=m_mask[:, None] & ((k0 + offs_i) < K)[None, :], other=0.0)
                q = ((qw >> (4 * j)) & 0xF) | 0x4B000000
                w = (q.to(tl.float32, bitcast=True) - c[None, :]).to(x.dtype)  # q - zero: small integers, exact
                part = tl.dot(x, w, part)
                if (j + 1) % SLICES == 0:
                    acc += part * s[None, :]
        _store_split(out_ptr, pid_k * M * N + offs_m[:, None] * stride_om + offs_n[None, :], acc,
                     m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _gemm128_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, n_groups, stride_xm, stride_om,
                        blocks_per_split, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        """As :func:`_gemm_kernel`, but one K=128 tensor-core dot per block: row r of the [128, BLOCK_N]
        weight tile reads word row r % 16 (each word 8 times, from L1) and shifts by 4 * (r // 16)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_k = tl.arange(0, 128)
        word_row = offs_k % 16
        shift = (offs_k // 16) * 4
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n_blocks = tl.cdiv(K, 128)
        kb_start = pid_k * blocks_per_split
        kb_end = tl.minimum(kb_start + blocks_per_split, n_blocks)
        for kb in range(kb_start, kb_end):
            k = kb * 128 + offs_k
            qw = tl.load(qw_ptr + (kb * 16 + word_row)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            qf = (((qw >> shift[:, None]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)  # 2**23 + q
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & (k < K)[None, :],
                        other=0.0)
            if GROUP_SIZE >= 128:  # one group per block: scale after the dot
                g = (kb * 128) // GROUP_SIZE
                g_ok = n_mask & (g < n_groups)
                s = tl.load(s_ptr + g * N + offs_n, mask=g_ok, other=0.0).to(tl.float32)
                c = tl.load(z_ptr + g * N + offs_n, mask=g_ok, other=0.0).to(tl.float32) + 8388608.0
                acc += tl.dot(x, (qf - c[None, :]).to(x.dtype)) * s[None, :]
            else:
                g = k // GROUP_SIZE
                ok = ((k < K) & (g < n_groups))[:, None] & n_mask[None, :]
                s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
                c = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=ok, other=0.0).to(tl.float32) + 8388608.0
                acc = tl.dot(x, ((qf - c) * s).to(x.dtype), acc)
        _store_split(out_ptr, pid_k * M * N + offs_m[:, None] * stride_om + offs_n[None, :], acc,
                     m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _tc_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, n_groups, stride_xm, stride_om,
                   blocks_per_split, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ):
        """Tensor-core W4A16 for group sizes that are multiples of 128 (variant 3).

        Each 16-word slab is loaded once and widened in registers to the whole [128, BLOCK_N] K block
        (nibble j of word row i is row 16j + i: a shift per nibble, then a reshape).  A nibble becomes a
        bf16 with one OR: 0x4300 | q is exactly 128 + q, so no float conversion or subtraction is done
        per weight.  The zero point and the 128 are folded out per group after the dot, using the group's
        row sums of x: sum_k x (q - z) = sum_k x (128 + q) - (128 + z) sum_k x (exact integers; fp32 sums).
        """
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_i = tl.arange(0, 16)
        offs_k = tl.arange(0, 128)
        shifts = tl.arange(0, 8) * 4
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n_blocks = tl.cdiv(K, 128)
        for it in range(0, blocks_per_split):  # a fixed trip count; blocks past K are masked out
            kb = pid_k * blocks_per_split + it
            qw = tl.load(qw_ptr + (kb * 16 + offs_i)[:, None] * N + offs_n[None, :],
                         mask=n_mask[None, :] & (kb < n_blocks), other=0)
            q3 = ((qw[None, :, :] >> shifts[:, None, None]) & 0xF) | 0x4300  # [8, 16, BLOCK_N]: bf16 bits of 128 + q
            w = tl.reshape(q3.to(tl.int16).to(tl.bfloat16, bitcast=True), (128, BLOCK_N))
            k = kb * 128 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & (k < K)[None, :],
                        other=0.0).to(tl.bfloat16)
            part = tl.dot(x, w)  # [BLOCK_M, BLOCK_N] = sum_k x (128 + q), fp32
            xs = tl.sum(x.to(tl.float32), axis=1)  # [BLOCK_M]
            g = (kb * 128) // GROUP_SIZE
            g_ok = n_mask & (g < n_groups)
            s = tl.load(s_ptr + g * N + offs_n, mask=g_ok, other=0.0).to(tl.float32)
            c = tl.load(z_ptr + g * N + offs_n, mask=g_ok, other=0.0).to(tl.float32) + 128.0
            acc += (part - xs[:, None] * c[None, :]) * s[None, :]
        _store_split(out_ptr, pid_k * M * N + offs_m[:, None] * stride_om + offs_n[None, :], acc,
                     m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _gemv2_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, K, blocks_per_split, GROUP_SIZE: tl.constexpr,
                      BLOCK_N: tl.constexpr, GB: tl.constexpr, ONE_PLUS_Q16: tl.constexpr):
        """M == 1 on CUDA cores, group sizes that are multiples of 128 (variants 4 and 5).

        GB 128-deep K blocks per iteration as one [GB, 16, BLOCK_N] tile of words (more bytes in flight
        per load), products accumulated per (block, row, column) and scaled per group with the zero point
        folded out; the cross-thread reduction happens once, at the end.  How a nibble becomes a float:
        - variant 4 (``ONE_PLUS_Q16`` False): OR it into the mantissa of 2**23 and subtract 2**23 (a shift,
          an and-or, a subtract and an FMA per weight); sum x (q - z) = sum x q - z sum x.
        - variant 5 (True): shift it into the top four mantissa bits of 1.0, which is the float 1 + q/16
          exactly (a shift, an and-or and an FMA per weight, no subtraction); per group
          sum x (q - z) = 16 sum x (1 + q/16) - (16 + z) sum x.  All terms are of the size of x, so the
          fp32 sums lose nothing to cancellation.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_g = tl.arange(0, GB)
        offs_i = tl.arange(0, 16)
        acc = tl.zeros((GB, 16, BLOCK_N), dtype=tl.float32)
        n_blocks = tl.cdiv(K, 128)
        kb_start = pid_k * blocks_per_split
        for it in range(0, blocks_per_split, GB):  # a fixed trip count; blocks past the split are masked out
            kb = kb_start + it + offs_g  # [GB]
            b_ok = (kb < n_blocks) & (it + offs_g < blocks_per_split)
            rows = kb[:, None, None] * 16 + offs_i[None, :, None]  # [GB, 16, 1]
            qw = tl.load(qw_ptr + rows * N + offs_n[None, None, :], mask=b_ok[:, None, None] & n_mask[None, None, :],
                         other=0)
            dot = tl.zeros((GB, 16, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((GB, 16), dtype=tl.float32)
            for j in tl.static_range(8):
                k = kb[:, None] * 128 + j * 16 + offs_i[None, :]  # [GB, 16]
                x = tl.load(x_ptr + k, mask=b_ok[:, None] & (k < K), other=0.0).to(tl.float32)
                if ONE_PLUS_Q16:
                    if 4 * j <= 19:
                        moved = qw << (19 - 4 * j)
                    else:
                        moved = qw >> (4 * j - 19)
                    q = ((moved & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q/16
                else:
                    q = (((qw >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                dot += q * x[:, :, None]
                xs += x
            g = (kb * 128) // GROUP_SIZE
            sz_off = g[:, None, None] * N + offs_n[None, None, :]
            sz_ok = b_ok[:, None, None] & n_mask[None, None, :]
            s = tl.load(s_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)  # [GB, 1, BLOCK_N]
            z = tl.load(z_ptr + sz_off, mask=sz_ok, other=0.0).to(tl.float32)
            if ONE_PLUS_Q16:
                acc += (16.0 * dot - xs[:, :, None] * (16.0 + z)) * s
            else:
                acc += (dot - xs[:, :, None] * z) * s
        res = tl.sum(tl.sum(acc, axis=1), axis=0)  # [BLOCK_N]
        _store_split(out_ptr, pid_k * N + offs_n, res, n_mask)

    @triton.jit
    def _dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
        """w[K, N] (bf16) = (q - zero) * scale, one 128-deep block x BLOCK_N columns per program."""
        kb = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_i = tl.arange(0, 16)
        qw = tl.load(qw_ptr + (kb * 16 + offs_i)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        for j in tl.static_range(8):
            k = kb * 128 + j * 16 + offs_i
            k_ok = k < K
            g = k // GROUP_SIZE
            ok = k_ok[:, None] & n_mask[None, :]
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
            q = ((qw >> (4 * j)) & 0xF).to(tl.float32)
            tl.store(w_ptr + k[:, None] * N + offs_n[None, :], ((q - z) * s).to(w_ptr.dtype.element_ty), mask=ok)


def _load_tuned() -> tuple[dict[tuple[str, int, int, int], tuple[int, ...]], int]:
    """Per-shape kernel configs and the GEMM/cuBLAS cut-over measured by the kernel sweep (optional file)."""
    if not CONFIG_FILE.exists():
        return {}, 1024
    data = json.loads(CONFIG_FILE.read_text())
    table = {(kind, int(m), int(n), int(k)): tuple(cfg) for kind, m, n, k, cfg in data["configs"]}
    return table, int(data.get("gemm_max_m", 1024))


#: {("gemv"|"gemm", M bucket, N, K): config}; the kernel sweep writes it, the heuristics below fill gaps.
#: Above GEMM_MAX_M rows the weight is de-quantized once and the product goes to cuBLAS.
TUNED, GEMM_MAX_M = _load_tuned()


def gemv_config(n: int, k: int) -> tuple[int, ...]:
    """(BLOCK_N, split_k, num_warps) for M == 1; aims at >= ~4 programs per SM so loads stay in flight."""
    if ("gemv", 1, n, k) in TUNED:
        return TUNED[("gemv", 1, n, k)]
    block_n = 128
    n_tiles = triton.cdiv(n, block_n)
    n_blocks = triton.cdiv(k, PACK_BLOCK)
    split = max(1, min(n_blocks, (132 * 4) // n_tiles))
    return block_n, split, 4


def gemm_config(m: int, n: int, k: int) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, split_k, num_warps, num_stages[, variant]) for 2 <= M <= GEMM_MAX_M.

    variant 0: K=16-slice kernel, 1: K=128 kernel, 2: de-quantize + cuBLAS (the rest is ignored),
    3: the tensor-core kernel with whole-block unpack (:func:`_tc_kernel`), 4 and 5: for M == 1 only, the
    CUDA-core GEMV :func:`_gemv2_kernel` in its two dequantization modes (BLOCK_M then holds its K blocks
    per iteration).  A tuned entry
    for M == 1 under "gemm" takes precedence over the older "gemv" entry.
    """
    if ("gemm", m_bucket(m), n, k) in TUNED:
        return TUNED[("gemm", m_bucket(m), n, k)]
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 128 if m <= 64 else 256
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    n_blocks = triton.cdiv(k, PACK_BLOCK)
    split = max(1, min(n_blocks // 4, (132 * 2) // tiles)) if m <= 64 else 1
    return block_m, block_n, split, 4 if block_m * block_n <= 64 * 128 else 8, 3


def _kernel_choice(m: int, n: int, k: int, group_size: int) -> tuple[str, tuple[int, ...]]:
    """("dequant" | "gemv" | "gemm", config) for this shape: the one dispatch rule, shared by the kernels'
    launcher and by :func:`output_splits` (which must agree with it on the number of split-K slices)."""
    if m > GEMM_MAX_M:  # module global, so the sweep can move it
        return "dequant", ()
    cfg = TUNED.get(("gemm", m_bucket(m), n, k))
    if cfg is not None and cfg[-1] in (3, 4, 5) and group_size % PACK_BLOCK:
        cfg = None  # the new kernels need whole 128-deep groups; use the general ones
    if m == 1 and (cfg is None or len(cfg) < 6):
        return "gemv", tuple(gemv_config(n, k))
    cfg = tuple(cfg if cfg is not None else gemm_config(m, n, k))
    return ("dequant", ()) if len(cfg) > 5 and cfg[5] == 2 else ("gemm", cfg)


def _splits(k: int, split: int) -> tuple[int, int]:
    """(128-deep K blocks per split, splits actually launched) for a requested split count."""
    return int4_mma.split_k(-(-k // PACK_BLOCK), split)


def output_splits(m: int, n: int, k: int, group_size: int) -> int:
    """How many split-K slices :func:`w4a16_mm_split` returns for this shape (1 on CPU)."""
    if triton is None:
        return 1
    kind, cfg = _kernel_choice(m, n, k, group_size)
    if kind == "dequant":
        return 1
    return _splits(k, cfg[1] if kind == "gemv" else cfg[2])[1]


def _cuda_w4a16_split(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    """x [M, K] -> split-K partial products [S, M, N]: fp32 when S > 1, x's dtype when S == 1."""
    m, k = x.shape
    n = qweight.shape[1]
    n_groups = scales.shape[0]
    kind, cfg = _kernel_choice(m, n, k, group_size)
    if kind == "dequant":
        return (x @ dequantize_cuda(qweight, scales, zeros, k, x.dtype)).unsqueeze(0)
    if kind == "gemv":
        block_n, split, warps = cfg
        per_split, split = _splits(k, split)
        out = torch.empty(split, 1, n, dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
        _gemv_kernel[(triton.cdiv(n, block_n), split)](
            x, qweight, scales, zeros, out, n, k, n_groups, per_split,
            GROUP_SIZE=group_size, BLOCK_N=block_n, num_warps=warps)
        return out
    block_m, block_n, split, warps, stages, *rest = cfg
    variant = rest[0] if rest else 0
    per_split, split = _splits(k, split)
    out = torch.empty(split, m, n, dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    if variant in (4, 5):  # M == 1 only; block_m holds GB (K blocks per iteration)
        _gemv2_kernel[(triton.cdiv(n, block_n), split)](
            x, qweight, scales, zeros, out, n, k, per_split, GROUP_SIZE=group_size, BLOCK_N=block_n,
            GB=block_m, ONE_PLUS_Q16=variant == 5, num_warps=warps, num_stages=stages)
        return out
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    kernel = {0: _gemm_kernel, 1: _gemm128_kernel, 3: _tc_kernel}[variant]
    kernel[grid](x, qweight, scales, zeros, out, m, n, k, n_groups, x.stride(0), n, per_split,
                 GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out


def dequantize_cuda(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """De-quantize on the GPU with Triton -> W^T [K, N] in ``dtype`` (for ``x @ W^T``)."""
    n = qweight.shape[1]
    w = torch.empty(in_features, n, dtype=dtype, device=qweight.device)
    block_n = 128
    _dequant_kernel[(triton.cdiv(in_features, PACK_BLOCK), triton.cdiv(n, block_n))](
        qweight, scales, zeros, w, n, in_features, GROUP_SIZE=in_features // scales.shape[0], BLOCK_N=block_n,
        num_warps=4)
    return w


# ------------------------------------------------------------------------------------------ custom op


def reduce_splits(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[S, M, N] split-K partials -> [M, N] in ``dtype`` (inside torch.compile this fuses into the consumer)."""
    return y[0].to(dtype) if y.shape[0] == 1 else y.sum(0).to(dtype)


@torch.library.custom_op("quantsweep::w4a16_mm_split", mutates_args=())
def w4a16_mm_split(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   in_features: int) -> torch.Tensor:
    """``x`` [M, K] @ de-quantized W^T as [S, M, N] split-K partials (their sum over S is the product).

    The partials come back unsummed so that a compiled block folds the sum into the kernel that consumes
    the product (a norm, a residual add, SiLU) instead of paying a launch for it: decode steps are short
    enough that every launch shows.  S is a function of the shapes (:func:`output_splits`), so the
    engine compiles with static shapes.
    """
    group_size = in_features // scales.shape[0]
    if x.is_cuda and qweight.dim() == 4:
        if x.shape[0] <= int4_mma.MAX_M and x.dtype == torch.bfloat16:
            return int4_mma.mma_split(x.contiguous(), qweight, scales, zeros)
        return (x @ int4_mma.dequantize_mma_cuda(qweight, scales, zeros).to(x.dtype).t()).unsqueeze(0)
    if x.is_cuda and triton is not None:
        return _cuda_w4a16_split(x.contiguous(), qweight, scales, zeros, group_size)
    w = dequantize(qweight, scales, zeros, in_features, torch.float32)
    return (x.to(torch.float32) @ w.t()).to(x.dtype).unsqueeze(0)


@w4a16_mm_split.register_fake
def _(x, qweight, scales, zeros, in_features):
    m = int(x.shape[0])  # int(): a symbolic batch size is specialised here
    mma = qweight.dim() == 4
    n = qweight.shape[0] * int4_mma.TILE if mma else qweight.shape[1]
    if x.device.type != "cuda":
        return x.new_empty(1, m, n)
    if mma:
        splits = (int4_mma.output_splits(m, n, in_features, x.device, in_features // scales.shape[0])
                  if x.dtype == torch.bfloat16 else 1)
    else:
        splits = output_splits(m, n, in_features, in_features // scales.shape[0])
    return x.new_empty(splits, m, n, dtype=torch.float32 if splits > 1 else x.dtype)


@torch.library.custom_op("quantsweep::w4a16_gemv_fused", mutates_args=())
def w4a16_gemv_fused(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     gamma: torch.Tensor | None, resid: torch.Tensor | None, eps: float, epilogue: int
                     ) -> torch.Tensor:
    """:func:`.int4_mma.gemv_fused` (the GEMV with the decode-step fusions of :mod:`.fused`) as an op that
    torch.compile leaves opaque and CUDA graphs record."""
    return int4_mma.gemv_fused(x.contiguous(), qweight, scales, zeros, gamma, resid, eps, epilogue)


@w4a16_gemv_fused.register_fake
def _(x, qweight, scales, zeros, gamma, resid, eps, epilogue):
    n = qweight.shape[0] * int4_mma.TILE
    return x.new_empty(x.shape[0], n // 2 if epilogue == fused.EPI_SILU else n)


def w4a16_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             in_features: int) -> torch.Tensor:
    """``x`` [M, K] @ de-quantized W^T -> [M, N] in x's dtype (CUDA kernels on GPUs, reference elsewhere)."""
    y = torch.ops.quantsweep.w4a16_mm_split(x, qweight, scales, zeros, in_features)
    return reduce_splits(y, x.dtype)


class Int4Linear(fused.GateUpRows, nn.Module):
    """A bias-free linear layer with int4 weights in the layout above; drop-in for ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, group_size: int,
                 device: torch.device | str | None = None):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        words = math.ceil(in_features / PACK_BLOCK) * 16
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(words, out_features, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("zeros", torch.full((groups, out_features), 8.0, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> "Int4Linear":
        """From unsigned values q [N, K] (0..15), scales [G, N] and integer zero points [G, N]."""
        n, k = q.shape
        layer = cls(k, n, k // scales.shape[0], device=q.device)
        layer.qweight = pack_int4(q)
        layer.scales = scales.to(torch.bfloat16).contiguous()
        layer.zeros = zeros.to(torch.bfloat16).contiguous()
        return layer

    @property
    def layout(self) -> str:
        return "mma" if self.qweight.dim() == 4 else "triton"

    def to_mma_layout(self) -> bool:
        """Repack the weights for the tensor-core kernels of :mod:`.int4_mma` (same bytes, other order);
        False, and nothing changed, where the shape does not fit that layout."""
        if self.layout == "mma":
            return True
        if not int4_mma.supported(self.out_features, self.in_features, self.group_size):
            return False
        self.qweight = int4_mma.pack_mma(unpack_int4(self.qweight, self.in_features))
        return True

    def _permute_out_rows(self, perm: torch.Tensor) -> None:
        """For :meth:`~.fused.GateUpRows.interleave_gate_up`.  Triton layout only (before
        :func:`select_kernels`): the permutation moves whole output columns there."""
        if self.layout != "triton":
            raise RuntimeError("interleave_gate_up must run before the weights move to the mma layout")
        perm = perm.to(self.qweight.device)
        self.qweight, self.scales, self.zeros = (t[:, perm].contiguous() for t in (self.qweight, self.scales, self.zeros))

    def raw_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product in storage order (interleaved gate/up rows where :meth:`interleave_gate_up` ran)."""
        y = w4a16_mm(x.reshape(-1, self.in_features), self.qweight, self.scales, self.zeros, self.in_features)
        return y.view(*x.shape[:-1], self.out_features)

    def fused_gemv(self, x: torch.Tensor, gamma: torch.Tensor | None, eps: float, resid: torch.Tensor | None,
                   epilogue: int) -> torch.Tensor | None:
        """x [M, K] through the GEMV kernel with the decode-step fusions (:mod:`.fused`), or None where it
        does not run (CPU, the Triton layout, M > 8, a shape whose config is not a one-split GEMV)."""
        if not (x.is_cuda and self.layout == "mma" and x.dtype == torch.bfloat16):
            return None
        if int4_mma.fused_config(int(x.shape[0]), self.out_features, self.in_features, x.device,
                                 self.group_size) is None:
            return None
        return torch.ops.quantsweep.w4a16_gemv_fused(x, self.qweight, self.scales, self.zeros, gamma, resid,
                                                     float(eps), int(epilogue))

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def select_kernels(model: nn.Module, kernels: str = "auto") -> str:
    """Put every int4 layer of ``model`` in the layout of the chosen kernels; returns what was used.

    ``kernels``: "mma" (the NVRTC-compiled tensor-core kernels of :mod:`.int4_mma`, which need an sm_80+
    GPU), "triton" (this module's kernels), or "auto" (mma where available, else triton).  Layers whose
    shapes the mma layout does not cover keep the Triton layout either way.  Off CUDA the reference runs
    ("reference"); a model without int4 layers returns "none".
    """
    if kernels not in ("auto", "mma", "triton"):
        raise ValueError(f"int4_kernels must be one of auto, mma, triton; got {kernels!r}")
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not layers:
        return "none"
    device = layers[0].qweight.device
    if device.type != "cuda":
        if kernels == "mma":
            raise RuntimeError(f"int4_kernels=mma is not available here: {device} is not a CUDA device")
        return "reference"
    if kernels == "triton":
        return "triton"
    available, why = int4_mma.available(device)
    if not available:
        if kernels == "mma":
            raise RuntimeError(f"int4_kernels=mma is not available here: {why}")
        return "triton"
    converted = sum(layer.to_mma_layout() for layer in layers)
    return "mma" if converted == len(layers) else f"mma ({converted}/{len(layers)} layers; rest triton)"
