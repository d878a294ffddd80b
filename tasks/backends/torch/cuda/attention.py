"""Decode attention over the filled part of a static KV cache (flash-decoding), with the cache write fused in.

Why not ``scaled_dot_product_attention`` with a mask: a CUDA graph fixes every shape, so a masked SDPA reads
the whole static cache (batch x (input + output) positions) on every step, and at batch 1 it runs one
program per head (32 programs on a 132-SM GPU) over a sequence of hundreds of positions.  Here the number of
positions to read comes from the device tensor ``pos`` (the position being decoded), so a replayed graph
reads only the keys written so far, and the cache length is cut into chunks that run in parallel
(flash-decoding: one program per (sequence, KV head, chunk) for all query heads of that KV head, both
products on tensor cores, then a small kernel that merges the chunks' partial softmaxes).  The new token's
key and value are written into the cache by the program whose chunk holds ``pos``; every program uses the
new key/value from registers rather than from memory, so no program reads a cache slot that another
program of the same launch is writing.

``torch.ops.quantsweep.decode_attention`` is a custom op (opaque to ``torch.compile``, recorded by CUDA-graph
capture); on CPU, or without Triton, it runs :func:`decode_attention_reference`, which the tests compare
the kernels against.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.backends.torch.cuda.int4 import m_bucket

try:  # Triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None

TARGET_PROGRAMS = 4 * 132  # enough programs to keep every SM of an H100/H200 busy a few times over
CONFIG_FILE = Path(__file__).with_name("attention_configs.json")  # bench/gpu_benchmark.py --mode attention


def _load_tuned() -> dict[int, tuple[int, int, int, int]]:
    """{batch bucket: (BLOCK_S, num_warps, num_stages, max chunk)} timed on a GPU (optional file)."""
    if not CONFIG_FILE.exists():
        return {}
    return {int(b): tuple(cfg) for b, cfg in json.loads(CONFIG_FILE.read_text())["configs"].items()}


#: per power-of-two batch size; DEFAULT_CONFIG where the file has no entry
TUNED = _load_tuned()
DEFAULT_CONFIG = (64, 4, 3, 256)


def launch_config(batch: int) -> tuple[int, int, int, int]:
    """(positions per inner iteration, warps, pipeline stages, most positions per program) for a batch."""
    return TUNED.get(m_bucket(batch), DEFAULT_CONFIG)


def num_splits(batch: int, kv_heads: int, cache_len: int, block_s: int, max_chunk: int) -> int:
    """How many chunks the cache length is cut into: enough programs for the GPU, chunks of block_s to
    max_chunk positions (a long sequential loop leaves too few loads in flight)."""
    wanted = max(1, -(-TARGET_PROGRAMS // (batch * kv_heads)), -(-cache_len // max_chunk))
    return max(1, min(wanted, -(-cache_len // block_s)))


def decode_attention_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                               k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Write k/v at ``pos``, then attend over positions ``0..pos`` (fp32 softmax): [B, H, hd] out."""
    p = int(pos.reshape(-1)[0])
    k_cache[:, :, p] = k_new
    v_cache[:, :, p] = v_new
    keys, values = k_cache[:, :, :p + 1].float(), v_cache[:, :, :p + 1].float()  # [B, Hkv, P, hd]
    gqa = q.shape[1] != k_cache.shape[1]
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), keys, values, enable_gqa=gqa)  # [B, H, 1, hd]
    return out.squeeze(2).to(q.dtype)


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, qk_scale,
                      H, HKV, S, n_splits, chunk,
                      HD: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
        """One (sequence b, KV head, chunk c) for all G query heads that share the KV head: unnormalised
        sum_s p_s v_s, running max m and sum l of p_s per query head.

        The G query rows are padded to BLOCK_G (>= 16) so both products run on tensor cores (tl.dot); the
        padding rows compute on zeros and are never stored.  Softmax statistics are fp32, p is rounded to
        the cache dtype for the second product, as flash attention does.
        """
        pid_bk = tl.program_id(0)  # b * HKV + hkv
        c = tl.program_id(1)
        b = pid_bk // HKV
        hkv = pid_bk % HKV
        pos = tl.load(pos_ptr)
        seq_len = tl.minimum(pos + 1, S)  # a position past the cache is never written (nor read)
        offs_d = tl.arange(0, HD)
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        q_rows = b * H + hkv * G + offs_g  # rows of q [B*H, HD]
        q = tl.load(q_ptr + q_rows[:, None] * HD + offs_d[None, :], mask=g_ok[:, None], other=0.0)
        k_new = tl.load(kn_ptr + pid_bk * HD + offs_d)
        v_new = tl.load(vn_ptr + pid_bk * HD + offs_d)
        cache_base = pid_bk.to(tl.int64) * S * HD
        start = c * chunk
        end = tl.minimum(start + chunk, seq_len)
        if (start <= pos) & (pos < end):  # the one program whose chunk holds pos writes the new slot
            tl.store(kc_ptr + cache_base + pos * HD + offs_d, k_new)
            tl.store(vc_ptr + cache_base + pos * HD + offs_d, v_new)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_sum = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, HD), tl.float32)
        for s0 in range(start, end, BLOCK):
            offs_s = s0 + tl.arange(0, BLOCK)
            valid = offs_s < end
            ptrs = cache_base + offs_s[:, None] * HD + offs_d[None, :]
            is_new = (offs_s == pos)[:, None]
            k = tl.load(kc_ptr + ptrs, mask=valid[:, None] & ~is_new, other=0.0)
            k = tl.where(is_new, k_new[None, :], k)
            v = tl.load(vc_ptr + ptrs, mask=valid[:, None] & ~is_new, other=0.0)
            v = tl.where(is_new, v_new[None, :], v)
            scores = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK], log2 domain
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            m = m_new
        part = q_rows * n_splits + c  # partial row of query head (b, hkv * G + g), chunk c
        tl.store(o_ptr + part[:, None] * HD + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(m_ptr + part, m, mask=g_ok)
        tl.store(l_ptr + part, l_sum, mask=g_ok)

    @triton.jit
    def _combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, n_splits, HD: tl.constexpr, SPLITS: tl.constexpr):
        """Merge one (b, h)'s chunk partials: sum_c 2^(m_c - M) o_c / sum_c 2^(m_c - M) l_c."""
        pid_bh = tl.program_id(0)
        offs_c = tl.arange(0, SPLITS)
        offs_d = tl.arange(0, HD)
        ok = offs_c < n_splits
        base = pid_bh * n_splits
        m = tl.load(m_ptr + base + offs_c, mask=ok, other=float("-inf"))
        m_max = tl.max(m, axis=0)  # finite: chunk 0 always holds position 0
        w = tl.where(ok & (m > float("-inf")), tl.exp2(m - m_max), 0.0)
        l_sum = tl.sum(tl.load(l_ptr + base + offs_c, mask=ok, other=0.0) * w, axis=0)
        o = tl.load(o_ptr + (base + offs_c)[:, None] * HD + offs_d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(o * w[:, None], axis=0) / l_sum
        tl.store(out_ptr + pid_bh * HD + offs_d, out.to(out_ptr.dtype.element_ty))


def _cuda_decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    b, h, hd = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    block_s, warps, stages, max_chunk = launch_config(b)
    splits = num_splits(b, hkv, s, block_s, max_chunk)
    chunk = -(-s // splits)
    chunk = -(-chunk // block_s) * block_s
    splits = -(-s // chunk)
    o_part = torch.empty(b * h * splits, hd, dtype=torch.float32, device=q.device)
    m_part = torch.empty(b * h * splits, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    qk_scale = math.log2(math.e) / math.sqrt(hd)
    group = h // hkv
    _split_kernel[(b * hkv, splits)](q, k_new, v_new, k_cache, v_cache, pos, o_part, m_part, l_part, qk_scale,
                                     h, hkv, s, splits, chunk, HD=hd, G=group,
                                     BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK=block_s,
                                     num_warps=warps, num_stages=stages)
    out = torch.empty_like(q)
    _combine_kernel[(b * h,)](o_part, m_part, l_part, out, splits, HD=hd,
                              SPLITS=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out


@torch.library.custom_op("quantsweep::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One decode step's attention: q [B, H, hd] (roped), the new k/v [B, Hkv, hd] written into the caches
    [B, Hkv, S, hd] at ``pos`` (int64 [1], on the device), attention over positions 0..pos -> [B, H, hd]."""
    fast = q.is_cuda and triton is not None and q.shape[-1] == triton.next_power_of_2(q.shape[-1])
    if fast:
        return _cuda_decode_attention(q.contiguous(), k_new.contiguous(), v_new.contiguous(), k_cache, v_cache,
                                      pos)
    return decode_attention_reference(q, k_new, v_new, k_cache, v_cache, pos)


@decode_attention.register_fake
def _(q, k_new, v_new, k_cache, v_cache, pos):
    return torch.empty_like(q)
