"""Decode attention over the filled part of a static KV cache (flash-decoding), with rope, the cache write
and the merge of the chunks fused in: one kernel launch per layer.

Why not ``scaled_dot_product_attention`` with a mask: a CUDA graph fixes every shape, so a masked SDPA reads
the whole static cache (batch x (input + output) positions) on every step, and at batch 1 it runs one
program per head (32 programs on a 132-SM GPU) over a sequence of hundreds of positions.  Here the number of
positions to read comes from the device tensor ``pos`` (the position being decoded), so a replayed graph
reads only the keys written so far, and the cache length is cut into chunks that run in parallel
(flash-decoding: one program per (sequence, KV head, chunk) for all query heads of that KV head, both
products on tensor cores).

Why everything in one kernel: at small batch a decode step is a chain of short kernels, and each launch
costs a microsecond or two of the chain (with the deferred residual add of :mod:`.model`, folding rope and
the merge in cut an H200's decode step by 0.05 ms at batch 1 and 0.17 ms at batch 8).  The kernel
therefore takes the raw q/k/v projection and rotates q and the new key itself (the same fp32 arithmetic as
:func:`~.rope.apply_rope`); the program whose chunk holds ``pos`` writes the new key and value into the
cache, and every program uses them from registers rather than from memory, so no program reads a cache slot
that another program of the same launch is writing.  The last program of a (sequence, KV head) to finish,
found with an arrival counter, merges the chunks' partial softmaxes (the counter is reset for the next launch).

``torch.ops.quantsweep.decode_attention`` is a custom op (opaque to ``torch.compile``, recorded by CUDA-graph
capture); on CPU, or without Triton, it runs :func:`decode_attention_reference`, which the tests compare
the kernel against.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.backends.torch.cuda.int4 import m_bucket
from tasks.backends.torch.cuda.rope import apply_rope

try:  # Triton ships with CUDA builds of torch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None

TARGET_PROGRAMS = 4 * 132  # enough programs to keep every SM of an H100/H200 busy a few times over
CONFIG_FILE = Path(__file__).with_name("attention_configs.json")  # written by bench/tune_kernels.py attention


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


def split_heads(qkv: torch.Tensor, kv_heads: int, head_dim: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, (H + 2 Hkv) hd] (the fused projection) -> q [B, H, hd], k and v [B, Hkv, hd] (views)."""
    b = qkv.shape[0]
    heads = qkv.shape[1] // head_dim - 2 * kv_heads
    q, k, v = qkv.view(b, heads + 2 * kv_heads, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    return q, k, v


def rope_at(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, kv_heads: int,
            head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection at position ``pos`` -> roped q [B, H, hd], roped k and v [B, Hkv, hd]."""
    q, k, v = split_heads(qkv, kv_heads, head_dim)
    c, s = cos[pos.reshape(-1)[:1]], sin[pos.reshape(-1)[:1]]  # [1, hd]
    return apply_rope(q[:, None], c, s)[:, 0], apply_rope(k[:, None], c, s)[:, 0], v


def decode_attention_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                               k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Write the (roped) k/v at ``pos``, then attend over positions ``0..pos`` (fp32 softmax): [B, H, hd]."""
    p = int(pos.reshape(-1)[0])
    k_cache[:, :, p] = k_new
    v_cache[:, :, p] = v_new
    keys, values = k_cache[:, :, :p + 1].float(), v_cache[:, :, :p + 1].float()  # [B, Hkv, P, hd]
    gqa = q.shape[1] != k_cache.shape[1]
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), keys, values, enable_gqa=gqa)  # [B, H, 1, hd]
    return out.squeeze(2).to(q.dtype)


if triton is not None:

    @triton.jit
    def _rotate(x, x_swapped, cos, sin, sign):
        """apply_rope's arithmetic: fp32 x cos + rotate_half(x) sin, rounded back to x's dtype
        (x_swapped is x with its halves swapped, sign is -1 on the first half)."""
        return (x.to(tl.float32) * cos + (sign * x_swapped.to(tl.float32)) * sin).to(x.dtype)

    @triton.jit
    def _decode_kernel(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, count_ptr, out_ptr,
                       qk_scale, H, HKV, S, n_splits, chunk, HD: tl.constexpr, G: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, MERGE: tl.constexpr):
        """One (sequence b, KV head, chunk c) for all G query heads that share the KV head: unnormalised
        sum_s p_s v_s, running max m and sum l of p_s per query head; the last program of (b, KV head) to
        arrive merges all chunks into the output.

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
        swap_d = (offs_d + HD // 2) % HD
        sign = tl.where(offs_d < HD // 2, -1.0, 1.0)
        rope_row = tl.minimum(pos, S - 1) * HD
        cos = tl.load(cos_ptr + rope_row + offs_d)
        sin = tl.load(sin_ptr + rope_row + offs_d)
        row = qkv_ptr + b * (H + 2 * HKV) * HD  # [q heads | k heads | v heads] of sequence b
        q_ptrs = row + (hkv * G + offs_g)[:, None] * HD
        q = _rotate(tl.load(q_ptrs + offs_d[None, :], mask=g_ok[:, None], other=0.0),
                    tl.load(q_ptrs + swap_d[None, :], mask=g_ok[:, None], other=0.0),
                    cos[None, :], sin[None, :], sign[None, :])
        k_ptr = row + (H + hkv) * HD
        k_new = _rotate(tl.load(k_ptr + offs_d), tl.load(k_ptr + swap_d), cos, sin, sign)
        v_new = tl.load(row + (H + HKV + hkv) * HD + offs_d)
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
        q_rows = b * H + hkv * G + offs_g  # query head (b, hkv * G + g)
        part = q_rows * n_splits + c  # its partial of chunk c
        tl.store(o_ptr + part[:, None] * HD + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(m_ptr + part, m, mask=g_ok)
        tl.store(l_ptr + part, l_sum, mask=g_ok)
        tl.debug_barrier()  # every thread's partials are written before the release below publishes them
        arrived = tl.atomic_add(count_ptr + pid_bk, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:  # last of this (b, KV head): sum_c 2^(m_c - M) o_c / sum_c 2^(m_c - M) l_c
            for g in range(G):
                base = (b * H + hkv * G + g) * n_splits
                m_run = tl.full((1,), float("-inf"), tl.float32)
                l_run = tl.zeros((1,), tl.float32)
                o_run = tl.zeros((HD,), tl.float32)
                for c0 in range(0, n_splits, MERGE):  # chunk 0 holds position 0, so the max is finite
                    offs_c = c0 + tl.arange(0, MERGE)
                    ok = offs_c < n_splits
                    m_c = tl.load(m_ptr + base + offs_c, mask=ok, other=float("-inf"), cache_modifier=".cg")
                    m_max = tl.maximum(m_run, tl.max(m_c, axis=0))
                    w = tl.where(m_c > float("-inf"), tl.exp2(m_c - m_max), 0.0)
                    l_c = tl.load(l_ptr + base + offs_c, mask=ok, other=0.0, cache_modifier=".cg")
                    o_c = tl.load(o_ptr + (base + offs_c)[:, None] * HD + offs_d[None, :], mask=ok[:, None],
                                  other=0.0, cache_modifier=".cg")
                    alpha = tl.exp2(m_run - m_max)
                    l_run = l_run * alpha + tl.sum(l_c * w, axis=0)
                    o_run = o_run * alpha + tl.sum(o_c * w[:, None], axis=0)
                    m_run = m_max
                tl.store(out_ptr + (b * H + hkv * G + g) * HD + offs_d,
                         (o_run / l_run).to(out_ptr.dtype.element_ty))
            tl.store(count_ptr + pid_bk, 0)  # ready for the next launch (the next layer, the next step)


_ARRIVAL_COUNTERS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(n: int, device: torch.device) -> torch.Tensor:
    """n zeroed int32 counters that every launch leaves zeroed again, kept per device so a replayed CUDA
    graph does not pay a memset per layer.  Allocated outside graph capture (the warm-up steps run first);
    one first needed during a capture belongs to that graph's pool and is not kept."""
    counters = _ARRIVAL_COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        counters = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            _ARRIVAL_COUNTERS[device] = counters
    return counters


def _cuda_decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    b, hkv, s, hd = k_cache.shape
    h = qkv.shape[1] // hd - 2 * hkv
    assert cos.shape == sin.shape == (s, hd) and cos.dtype == torch.float32, "rope tables must be fp32 [S, hd]"
    block_s, warps, stages, max_chunk = launch_config(b)
    splits = num_splits(b, hkv, s, block_s, max_chunk)
    chunk = -(-s // splits)
    chunk = -(-chunk // block_s) * block_s
    splits = -(-s // chunk)
    o_part = torch.empty(b * h * splits, hd, dtype=torch.float32, device=qkv.device)
    m_part = torch.empty(b * h * splits, dtype=torch.float32, device=qkv.device)
    l_part = torch.empty_like(m_part)
    out = torch.empty(b, h, hd, dtype=qkv.dtype, device=qkv.device)
    qk_scale = math.log2(math.e) / math.sqrt(hd)
    group = h // hkv
    _decode_kernel[(b * hkv, splits)](qkv, cos, sin, k_cache, v_cache, pos, o_part, m_part, l_part,
                                      arrival_counters(b * hkv, qkv.device), out, qk_scale, h, hkv, s, splits,
                                      chunk, HD=hd, G=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
                                      BLOCK=block_s, MERGE=min(16, max(2, triton.next_power_of_2(splits))),
                                      num_warps=warps, num_stages=stages)
    return out


@torch.library.custom_op("quantsweep::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One decode step's attention from the fused projection qkv [B, (H + 2 Hkv) hd] (not yet roped) and the
    rope tables cos/sin [S, hd]: q and the new k rotated for position ``pos`` (int64 [1], on the device),
    the new k/v written into the caches [B, Hkv, S, hd] at ``pos``, attention over positions 0..pos
    -> [B, H, hd]."""
    hkv, hd = k_cache.shape[1], k_cache.shape[3]
    fast = qkv.is_cuda and triton is not None and hd == triton.next_power_of_2(hd)
    if fast:
        return _cuda_decode_attention(qkv.contiguous(), cos, sin, k_cache, v_cache, pos)
    return decode_attention_reference(*rope_at(qkv, cos, sin, pos, hkv, hd), k_cache, v_cache, pos)


@decode_attention.register_fake
def _(qkv, cos, sin, k_cache, v_cache, pos):
    hkv, hd = k_cache.shape[1], k_cache.shape[3]
    return qkv.new_empty(qkv.shape[0], qkv.shape[1] // hd - 2 * hkv, hd)
