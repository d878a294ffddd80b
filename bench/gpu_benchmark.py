"""What int4 buys on one GPU: a Llama-2-7B-shaped model with RANDOM weights, fp16 (bf16) vs int4 g128.

No Ray, no checkpoint: the model is built on the GPU with random weights (its text is meaningless; speed
and memory do not depend on the values).  Modes:

- ``check``: int4 kernel output vs the de-quantized reference (fp32 on the GPU) on fresh random inputs
  for every (M, K, N) the model runs: decode M = batch sizes, prefill M = batch x input_len; and, at M <= 8,
  the fused GEMV each linear runs with the decode fusions (layout "mma-fused").
- ``kernels``: per-shape timing of bf16 cuBLAS, torch's tinygemm int4 op, the engine's current int4
  choice and a grid of candidates (old and new Triton kernels, de-quantize + cuBLAS), each inside a CUDA
  graph over weight copies that do not fit in L2; writes the fastest correct path per shape to
  ``--configs-out`` (the engine reads that JSON) after every linear.
- ``mma``: the same timing for the tensor-core kernels of ``int4_mma`` (weights in the "mma" layout) over
  their launch configs (``--mma-modes``: 0 and 1 the mma.sync kernels, 2 the Hopper wgmma kernel, 3 the
  batch <= 8 kernel that folds the zero point out), against bf16 cuBLAS and the Triton kernels; writes the
  fastest per shape to ``--configs-out`` (the engine reads ``int4_mma_configs.json``).
- ``dense``: the fp16 baseline's linears at M <= 8: cuBLAS vs the ``bf16_gemv`` kernel over its launch
  configs; writes the shapes where the kernel wins to ``--configs-out`` (the engine reads
  ``dense_configs.json``).
- ``smoke``: the orchestrator's path without Ray on small checkpoints (``--smoke-dir`` with ``fp`` and
  ``rtn``): TorchBackend build -> load (KV cache from the profile options) -> profile_engine -> lm-eval.
- ``attention``: per batch size, the decode-attention kernels over a grid of launch configs; writes the
  fastest to ``--configs-out`` (the engine reads ``attention_configs.json``).
- ``e2e``: method (fp16; int4 with the default kernels; int4-triton; fp8: W8A8 e4m3, see ``fp8_bench.py``; a
  suffix -nofuse or -silu runs fp16 or
  int4 with the engine option gemv_fusion=off or all instead of the default norm) x batch -> output tok/s (batch x
  output_len / end-to-end, prefill included), decode tok/s, TTFT, inter-token latency, peak memory, and % of
  the bandwidth roofline (bytes a decode step must read / the device-to-device copy bandwidth measured here).
  Each method runs in its own process, so one method's memory never shows in the other's peak.
- ``all``: check, then e2e.

Usage: python bench/gpu_benchmark.py --mode all --out results/
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tasks.backends.torch.cuda import dense, fused, int4, int4_mma  # noqa: E402
from tasks.backends.torch.cuda.generate import Generator  # noqa: E402
from tasks.backends.torch.cuda.loader import random_model  # noqa: E402
from tasks.backends.torch.cuda.model import DEFAULT_GEMV_FUSION, kv_bytes_per_token, llama2_7b_args  # noqa: E402
from tasks.backends.torch.cuda.rope import rope_tables  # noqa: E402
from tasks import roofline  # noqa: E402

GIB = 1024**3
RANDOM_NOTICE = "*** RANDOM WEIGHTS: Llama-2-7B-shaped model, no checkpoint; outputs are meaningless ***"


def shapes_kn() -> dict[str, tuple[int, int]]:
    """The model's int4 linears as (K, N): q|k|v and gate|up are fused as in the engine."""
    a = llama2_7b_args()
    return {"wqkv": (a.dim, 3 * a.dim), "wo": (a.dim, a.dim), "w13": (a.dim, 2 * a.intermediate_size),
            "w2": (a.intermediate_size, a.dim)}


def random_int4(k: int, n: int, gs: int = 128) -> tuple[torch.Tensor, ...]:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    scales = (0.002 + 0.004 * torch.rand(k // gs, n, device="cuda")).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // gs, n), device="cuda").to(torch.bfloat16)
    return q, int4.pack_int4(q), scales, zeros


def copy_bandwidth(nbytes: int = 2 * GIB, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, bytes read plus bytes written (median): the product's
    own measurement (:func:`tasks.roofline.copy_bandwidth`) over a larger buffer."""
    return roofline.copy_bandwidth("cuda", nbytes, repeats)


# ------------------------------------------------------------------------------------ numerical check


def numerical_check(batch_sizes: list[int], input_len: int, out_dir: Path) -> list[dict]:
    """Relative error of the int4 op vs x @ dequant(W)^T in fp32, fresh random data for every shape, for
    both weight layouts (Triton kernels, and the tensor-core "mma" kernels where they run)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    ms = sorted(set(batch_sizes) | {b * input_len for b in batch_sizes})
    layouts = ["triton"] + (["mma"] if int4_mma.available(torch.device("cuda"))[0] else [])
    for name, (k, n) in shapes_kn().items():
        for m in ms:
            torch.manual_seed(1000 * m + k + n)
            q, qweight, scales, zeros = random_int4(k, n)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = int4.dequantize(qweight, scales, zeros, k)  # fp32 [N, K], exact
            ref = x.float() @ w.t()
            dense = F.linear(x, w.to(torch.bfloat16)).float()  # what a bf16 model with these weights gives
            rel_dense = ((dense - ref).norm() / ref.norm()).item()
            for layout in layouts:
                words = int4_mma.pack_mma(q) if layout == "mma" else qweight
                out = int4.w4a16_mm(x, words, scales, zeros, k)
                torch.cuda.synchronize()
                rel = ((out.float() - ref).norm() / ref.norm()).item()
                ok = bool(torch.isfinite(out).all()) and rel < 1e-2
                rows.append({"linear": name, "layout": layout, "M": m, "K": k, "N": n, "rel_err_int4": rel,
                             "rel_err_bf16_dense": rel_dense, "pass": ok})
                del out, words
            if "mma" in layouts and int4_mma.fused_config(m, n, k, x.device, 128) is not None:
                rows.append(_check_fused(name, x, q, scales, zeros, w))
                if name == "w13":  # gemv_fusion=all: also SiLU * up, on rows interleaved as the engine stores them
                    rows.append(_check_fused(name, x, q, scales, zeros, w, silu=True))
            del x, w, ref, dense
    torch.cuda.empty_cache()
    _write(rows, out_dir / "numerical_check")
    for layout in layouts + (["mma-fused"] if any(r["layout"] == "mma-fused" for r in rows) else []):
        mine = [r for r in rows if r["layout"] == layout]
        dense_err = "" if layout == "mma-fused" else \
            f"; bf16 dense on the same weights: {max(r['rel_err_bf16_dense'] for r in mine):.2e}"
        print(f"numerical check [{layout}]: {sum(r['pass'] for r in mine)}/{len(mine)} shapes pass (rel err < 1e-2); "
              f"worst int4 rel err {max(r['rel_err_int4'] for r in mine):.2e}{dense_err}")
    return rows


def _check_fused(name: str, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 w: torch.Tensor, silu: bool = False) -> dict:
    """A fused GEMV the engine runs for this linear at this M (fused.py) vs fp32 arithmetic: wqkv and w13 with
    the RMSNorm prologue, wo and w2 with the residual epilogue; with ``silu`` (w13 under gemv_fusion=all) also
    SiLU * up, on rows interleaved as the engine stores them."""
    m, k = x.shape
    n = w.shape[0]
    gamma = (1 + 0.2 * torch.randn(k, device="cuda")).to(torch.bfloat16)
    resid = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.float()
    if silu:
        perm = fused.gate_up_permutation(n, "cuda")
        q, scales, zeros = q[perm], scales[:, perm], zeros[:, perm]
        gate, up = (normed @ w.t()).chunk(2, dim=-1)
        ref, gamma_arg, resid_arg, epi, fusion = F.silu(gate) * up, gamma, None, fused.EPI_SILU, "norm + SiLU * up"
    elif name in ("wqkv", "w13"):
        ref, gamma_arg, resid_arg, epi, fusion = normed @ w.t(), gamma, None, fused.EPI_SPLITS, "norm"
    else:
        ref, gamma_arg, resid_arg, epi, fusion = resid.float() + xf @ w.t(), None, resid, fused.EPI_RESIDUAL, \
            "residual add"
    out = int4_mma.gemv_fused(x, int4_mma.pack_mma(q), scales, zeros, gamma_arg, resid_arg, 1e-5, epi)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    return {"linear": name, "layout": "mma-fused", "M": m, "K": k, "N": n, "rel_err_int4": rel,
            "rel_err_bf16_dense": float("nan"), "pass": bool(torch.isfinite(out).all()) and rel < 1e-2,
            "fusion": fusion}


def attention_check(batch_sizes: list[int], cache_len: int, out_dir: Path) -> list[dict]:
    """The decode-attention kernel vs the fp32 reference (and its cache write) for every batch size, at a
    few positions including the first and the last slot of the cache; fresh random caches each time."""
    from tasks.backends.torch.cuda.attention import _cuda_decode_attention, decode_attention_reference, rope_at

    a = llama2_7b_args()
    rows = []
    cos, sin = rope_tables(a.head_dim, a.rope, cache_len, "cuda")
    for b in batch_sizes:
        for pos in (0, cache_len // 2 + 3, cache_len - 1):
            torch.manual_seed(b * 7919 + pos)
            qkv = torch.randn(b, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, device="cuda", dtype=torch.bfloat16)
            kc = torch.randn(b, a.n_kv_heads, cache_len, a.head_dim, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            kc_ref, vc_ref = kc.clone(), vc.clone()
            p = torch.tensor([pos], device="cuda")
            q, kn, vn = rope_at(qkv, cos, sin, p, a.n_kv_heads, a.head_dim)
            out = _cuda_decode_attention(qkv, cos, sin, kc, vc, p)
            ref = decode_attention_reference(q.float(), kn.float(), vn.float(), kc_ref.float(), vc_ref.float(), p)
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            key_err = (kc[:, :, pos].float() - kn.float()).abs().max().item()  # the kernel ropes k itself
            kc[:, :, pos] = kn
            kc_ref[:, :, pos], vc_ref[:, :, pos] = kn, vn  # the one slot the kernel must have written
            cache_ok = torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref) and key_err <= 2 ** -7 * float(kn.abs().max())
            rows.append({"batch": b, "pos": pos, "cache_len": cache_len, "rel_err": rel, "cache_written": cache_ok,
                         "new_key_max_abs_err": key_err,
                         "pass": bool(torch.isfinite(out).all()) and rel < 1e-2 and cache_ok})
            del qkv, kc, vc, kc_ref, vc_ref
    torch.cuda.empty_cache()
    _write(rows, out_dir / "attention_check")
    print(f"attention check: {sum(r['pass'] for r in rows)}/{len(rows)} cases pass (rel err < 1e-2, cache "
          f"written exactly); worst rel err {max(r['rel_err'] for r in rows):.2e}")
    return rows


def _candidate_is_correct(cfg: tuple, run, ref: torch.Tensor, tol: float = 1e-2) -> bool:
    """A sweep candidate counts only if it runs and matches the fp32 reference (rel. error < tol)."""
    try:
        out = run()
        rel = ((out.float() - ref).norm() / ref.norm()).item()
    except Exception as exc:
        print(f"    {cfg} failed: {type(exc).__name__}: {str(exc)[:160]}")
        return False
    if not rel < tol:
        print(f"    {cfg} WRONG: rel err {rel:.2e}")
        return False
    return True


def attention_sweep(batch_sizes: list[int], cache_len: int, pos: int, out_dir: Path, configs_out: Path | None
                    ) -> list[dict]:
    """Time the decode-attention kernels per batch size over a grid of launch configs (inside CUDA graphs,
    caches rotated so they are cold in L2, pos = the middle of the generation); keep the fastest correct."""
    from tasks.backends.torch.cuda import attention as attn

    a = llama2_7b_args()
    rows, chosen = [], {}
    grid = [(bs, w, st, mc) for bs in (32, 64) for w in (4, 8) for st in (1, 2, 3) for mc in (128, 256)]
    for b in batch_sizes:
        cache_bytes = 2 * b * a.n_kv_heads * cache_len * a.head_dim * 2
        copies = max(2, -(-200_000_000 // cache_bytes))
        qkv = torch.randn(b, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, device="cuda", dtype=torch.bfloat16)
        cos, sin = rope_tables(a.head_dim, a.rope, cache_len, "cuda")
        caches = [(torch.randn(b, a.n_kv_heads, cache_len, a.head_dim, device="cuda", dtype=torch.bfloat16),
                   torch.randn(b, a.n_kv_heads, cache_len, a.head_dim, device="cuda", dtype=torch.bfloat16))
                  for _ in range(copies)]
        p = torch.tensor([pos], device="cuda")
        q, kn, vn = attn.rope_at(qkv, cos, sin, p, a.n_kv_heads, a.head_dim)
        ref = attn.decode_attention_reference(q.float(), kn.float(), vn.float(), caches[0][0].float(),
                                              caches[0][1].float(), p)
        bucket = int4.m_bucket(b)
        saved = dict(attn.TUNED)
        best = (float("inf"), None)
        for cfg in grid:
            attn.TUNED[bucket] = cfg
            if not _candidate_is_correct(
                    cfg, lambda: attn._cuda_decode_attention(qkv, cos, sin, caches[0][0], caches[0][1], p), ref):
                continue
            t = _bench_graph(lambda i: attn._cuda_decode_attention(qkv, cos, sin, caches[i][0], caches[i][1], p), copies)
            rows.append({"batch": b, "config": json.dumps(cfg), "us": t * 1e3,
                         "kv_gb_s": b * a.n_kv_heads * (pos + 1) * a.head_dim * 4 / (t * 1e-3) / 1e9})
            if t < best[0]:
                best = (t, cfg)
        attn.TUNED.clear()
        attn.TUNED.update(saved)
        chosen[bucket] = best[1]
        print(f"  attention B={b:3d}: best {best[0] * 1e3:7.1f} us {best[1]} "
              f"({b * a.n_kv_heads * (pos + 1) * a.head_dim * 4 / (best[0] * 1e-3) / 1e9:.0f} GB/s of KV)", flush=True)
        del caches, qkv, q, kn, vn, ref
        torch.cuda.empty_cache()
    _write(rows, out_dir / "attention_sweep")
    if configs_out is not None:
        configs_out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "cache_len": cache_len,
                                           "configs": {str(k): list(v) for k, v in chosen.items()}}, indent=1))
        print(f"wrote {configs_out}")
    return rows


# ---------------------------------------------------------------------------------------- kernel sweep


def _bench_graph(call, copies: int, reps: int = 4) -> float:
    """Median ms per call of ``call(i)`` (i cycles over ``copies`` weight copies), replayed as a CUDA graph.

    This is how the engine runs the kernels: inside one graph, so no host launch cost, and with weights
    that are cold in L2 (enough copies that they do not fit in it).  ``do_bench`` times single eager
    calls, where host launch overhead (several Triton launches for split-K) can dominate a 20 us kernel.
    """
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(copies):  # compile and allocate outside the capture
                call(i)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                for i in range(copies):
                    call(i)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / (reps * copies))
        del graph
        return statistics.median(times)
    except Exception as exc:
        print(f"    graph bench failed: {type(exc).__name__}: {str(exc)[:160]}")
        return float("inf")


def _tinygemm(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """torch's int4 op on the same weights: w = (q - 8) * s + zero, zero = (8 - zp) * s."""
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    weight = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    s = scales.float()
    sz = torch.stack([s, (8 - zeros.float()) * s], dim=-1).to(torch.bfloat16).contiguous()
    return weight, sz


def candidate_configs(m: int) -> list[tuple]:
    """int4 paths to try at M: ("gemv", BLOCK_N, split, warps) is the old M == 1 kernel; otherwise
    (BLOCK_M, BLOCK_N, split, warps, stages, variant), see ``int4.gemm_config``: 0 = old K=16-slice GEMM,
    2 = de-quantize + cuBLAS, 3 = tensor-core kernel with whole-block unpack (BLOCK_M >= 16, any M),
    4 = CUDA-core GEMV (M == 1; BLOCK_M holds K blocks per iteration), 5 = the same with three instructions
    per weight (``int4._gemv2_kernel`` with ``ONE_PLUS_Q16``).
    """
    if m == 1:
        grid: list[tuple] = [("gemv", bn, sp, 4) for bn in (64, 128) for sp in (8, 16)]
        grid += [(gb, bn, sp, 4, 2, 4) for gb in (1, 2) for bn in (32, 64) for sp in (2, 4, 8)]
        grid += [(16, 64, sp, 4, 2, 3) for sp in (2, 4, 8)]
        grid += [(gb, bn, sp, 4, 2, 5) for gb in (1, 2, 4) for bn in (32, 64, 128) for sp in (1, 2, 4, 8, 16)]
        grid += [(gb, 256, sp, w, 2, 5) for gb in (1, 2) for sp in (4, 8, 16, 32) for w in (4, 8)]
        grid += [(gb, bn, 32, 4, 2, 5) for gb in (1, 2) for bn in (64, 128)]
        return grid
    grid = [(0, 0, 1, 0, 0, 2)]
    if m <= 16:
        grid += [(16, bn, sp, 4, 3, 0) for bn in (64, 128) for sp in (1, 4, 8)]
        grid += [(16, bn, sp, 4, st, 3) for bn in (32, 64, 128) for sp in (1, 2, 4, 8) for st in (2, 4)]
    elif m <= 32:
        grid += [(bm, bn, sp, 4, 3, 0) for bm in (16, 32) for bn in (64, 128) for sp in (1, 4)]
        grid += [(bm, bn, sp, 4, 3, 3) for bm in (16, 32) for bn in (64, 128) for sp in (1, 2, 4)]
    else:
        grid += [(bm, 64, sp, 4, 3, 0) for bm in (32, 64) for sp in (1, 2)]
        grid += [(bm, bn, sp, w, 3, 3) for bm in (32, 64) for bn in (64, 128) for sp in (1, 2, 4) for w in (4, 8)]
    return grid


def _set_config(m: int, n: int, k: int, cfg: tuple | None) -> None:
    """Point the engine's table at ``cfg`` for this shape (None: remove the entries)."""
    gemm_key, gemv_key = ("gemm", int4.m_bucket(m), n, k), ("gemv", 1, n, k)
    int4.TUNED.pop(gemm_key, None)
    if m == 1:
        int4.TUNED.pop(gemv_key, None)
    if cfg is None:
        return
    if cfg[0] == "gemv":
        int4.TUNED[gemv_key] = tuple(cfg[1:])
    else:
        int4.TUNED[gemm_key] = tuple(cfg)


def _write_configs(configs_out: Path, ms: list[int], tuned: list[tuple]) -> None:
    """Merge the chosen configs into the engine's table; shapes not swept keep their entries."""
    data = json.loads(int4.CONFIG_FILE.read_text()) if int4.CONFIG_FILE.exists() else {}
    swept = {("gemm", int4.m_bucket(m), n, k) for m, n, k, _ in tuned}
    swept |= {("gemv", 1, n, k) for m, n, k, _ in tuned if m == 1}
    merged = [t for t in data.get("configs", []) if tuple(t[:4]) not in swept]
    for m, n, k, cfg in tuned:
        merged.append(["gemv", 1, n, k, list(cfg[1:])] if cfg[0] == "gemv"
                      else ["gemm", int4.m_bucket(m), n, k, list(cfg)])
    gemm_max = max([data.get("gemm_max_m", 0)] + [m for m in ms if m <= 1024])
    configs_out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "gemm_max_m": gemm_max,
                                       "configs": merged}, indent=1))
    print(f"wrote {configs_out} (gemm_max_m={gemm_max})", flush=True)


def _weight_copies(k: int, n: int) -> tuple[int, list[tuple], list[torch.Tensor], torch.Tensor]:
    """(int4 bytes of one copy, int4 copies, bf16 copies, fp32 reference W [N, K] of int4 copy 0): enough
    copies of each (~200 MB) that cycling through them keeps the weights cold in L2, as in a decode step."""
    int4_bytes = n * k // 2 + 4 * n * (k // 128)
    weights = [random_int4(k, n) for _ in range(max(2, -(-200_000_000 // int4_bytes)))]
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
             for _ in range(max(2, -(-200_000_000 // (2 * n * k))))]
    _, qweight, scales, zeros = weights[0]
    return int4_bytes, weights, dense, int4.dequantize(qweight, scales, zeros, k)


def kernel_sweep(ms: list[int], out_dir: Path, configs_out: Path | None) -> list[dict]:
    """Per (linear, M): bf16 cuBLAS, tinygemm, the engine's current int4 choice ("old") and every candidate.

    Timed inside CUDA graphs over enough weight copies to be cold in L2 (:func:`_bench_graph`), i.e. as
    the engine's decode step runs them.  A candidate counts only if its output matches x @ dequant(W)^T
    (rel. error < 1e-2).  The fastest int4 path is written to ``configs_out``.
    """
    rows, tuned = [], []
    for name, (k, n) in shapes_kn().items():
        int4_bytes, weights, dense, w_ref = _weight_copies(k, n)
        copies_q, copies_d = len(weights), len(dense)
        try:
            tgs = [_tinygemm(q, s, z) for q, _, s, z in weights]
        except Exception as exc:
            print(f"  tinygemm unavailable: {exc}")
            tgs = None
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w_ref.t()
            row = {"linear": name, "M": m, "K": k, "N": n}
            row["bf16_ms"] = _bench_graph(lambda i: F.linear(x, dense[i]), copies_d)
            if tgs is not None:
                row["tinygemm_ms"] = _bench_graph(
                    lambda i: torch.ops.aten._weight_int4pack_mm(x, tgs[i][0], 128, tgs[i][1]), copies_q)

            def op(i: int) -> torch.Tensor:
                """The kernel plus one fp32 reduction of its split-K partials: the engine's cost when the
                compiled block cannot fold the sum into a neighbouring kernel (the cast always folds)."""
                parts = torch.ops.quantsweep.w4a16_mm_split(x, weights[i][1], weights[i][2], weights[i][3], k)
                return parts.sum(0) if parts.shape[0] > 1 else parts[0]

            saved = dict(int4.TUNED)
            gemm_key = ("gemm", int4.m_bucket(m), n, k)
            old_cfg = saved.get(gemm_key)
            if old_cfg is None:
                old_cfg = ("gemv",) + tuple(int4.gemv_config(n, k)) if m == 1 else tuple(int4.gemm_config(m, n, k))
            row["old_config"] = json.dumps(old_cfg)
            row["old_ms"] = _bench_graph(op, copies_q)  # the engine as it was
            best, best_new = (row["old_ms"], tuple(old_cfg)), (float("inf"), None)
            for cfg in candidate_configs(m):
                _set_config(m, n, k, cfg)
                if not _candidate_is_correct(
                        cfg, lambda: int4.w4a16_mm(x, weights[0][1], weights[0][2], weights[0][3], k), ref):
                    continue
                t = _bench_graph(op, copies_q)
                if cfg[-1] == 2:
                    row["dequant_cublas_ms"] = t
                elif cfg[-1] in (3, 4, 5) and t < best_new[0]:
                    best_new = (t, cfg)
                if t < best[0]:
                    best = (t, tuple(cfg))
            int4.TUNED.clear()
            int4.TUNED.update(saved)
            row["new_best_ms"], row["new_best_config"] = best_new[0], json.dumps(best_new[1])
            row["chosen_ms"], row["chosen_config"] = best[0], json.dumps(best[1])
            tuned.append((m, n, k, best[1]))
            row["chosen_over_bf16"] = row["bf16_ms"] / best[0]
            row["weight_gb_s_chosen"] = int4_bytes / (best[0] * 1e-3) / 1e9
            rows.append(row)
            print(f"  {name:5s} M={m:3d}: bf16 {row['bf16_ms'] * 1e3:7.1f} us  tinygemm "
                  f"{row.get('tinygemm_ms', float('nan')) * 1e3:7.1f}  old {row['old_ms'] * 1e3:7.1f}  "
                  f"new {best_new[0] * 1e3:7.1f} {row['new_best_config']}  deq+cublas "
                  f"{row.get('dequant_cublas_ms', float('nan')) * 1e3:7.1f}  -> chosen {best[0] * 1e3:7.1f} "
                  f"{row['chosen_config']} (x{row['chosen_over_bf16']:.2f} vs bf16, "
                  f"{row['weight_gb_s_chosen']:.0f} GB/s of int4 weights)", flush=True)
            del x, ref
        del weights, dense, w_ref, tgs
        torch.cuda.empty_cache()
        if configs_out is not None:  # after every linear, so a sweep cut short still leaves its results
            _write_configs(configs_out, ms, tuned)
    _write(rows, out_dir / "kernels")
    return rows


def mma_candidates(m: int, modes: tuple[int, ...] = (0, 1, 2, 3)) -> list[tuple[int, ...]]:
    """(TN, WK, U, S, splits, MODE) for the tensor-core kernels at M (see ``int4_mma.config``); MODE 2
    (wgmma) only where the GPU runs it, and only for M > 8 (one 8-row tile wastes the wgmma's width);
    MODE 3 (zero point folded out) only for M <= 8."""
    grid = []
    if int4_mma.SPLIT_K in modes:
        grid += [(tn, wk, u, st, sp, int4_mma.SPLIT_K) for tn in (1, 2) for wk in (2, 4, 8)
                 for u in ((1, 2, 4) if m <= 16 else (1, 2)) for st in ((3, 4, 6) if m <= 8 else (3,))
                 for sp in (1, 2, 4)]
    if int4_mma.SHARED_X in modes and m >= 16:  # warps split N and share the activations through shared memory
        grid += [(tn, wk, 1, st, sp, int4_mma.SHARED_X) for tn in (1, 2, 4) for wk in (2, 4, 8) for st in (2, 3)
                 for sp in (1, 2, 4)]
    if int4_mma.GEMV in modes and m <= int4_mma.GEMV_MAX_M:  # the zero-point-folding kernel, U groups per batch
        # split counts up to 16 and TN 3, for grids that fill the SMs in whole waves (on an H200, with the
        # split-K sum timed, one split still won every M = 1 shape)
        grid += [(tn, wk, u, st, sp, int4_mma.GEMV) for tn in (1, 2, 3, 4) for wk in (1, 2, 4, 8) for u in (1, 2)
                 for st in (3, 4) for sp in (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 16)]
    if int4_mma.WGMMA in modes and m > 8 and int4_mma.wgmma_available(torch.device("cuda")):
        grid += [(tn, wk, u, st, sp, int4_mma.WGMMA) for tn in (1, 2, 4) for wk in (4, 8) for u in (1, 2)
                 for st in (3, 4, 5) for sp in (1, 2, 4, 8)]
    valid = []
    for cfg in grid:
        try:
            int4_mma.check_config(m, cfg)
            valid.append(cfg)
        except ValueError:
            pass
    return valid


def mma_sweep(ms: list[int], out_dir: Path, configs_out: Path | None, modes: tuple[int, ...] = (0, 1, 2, 3)
              ) -> list[dict]:
    """Per (linear, M): bf16 cuBLAS, the Triton kernels' tuned choice, and every tensor-core candidate,
    timed like :func:`kernel_sweep` (CUDA graphs, weights cold in L2, split-K sum included); the fastest
    correct candidate per shape goes to ``configs_out`` (the engine reads ``int4_mma_configs.json``).
    ``modes`` limits the kernels swept; the shape's current config is always a candidate, so a partial
    sweep only replaces it with something faster."""
    rows, tuned = [], {}
    for name, (k, n) in shapes_kn().items():
        int4_bytes, weights, dense, w_ref = _weight_copies(k, n)
        copies_q, copies_d = len(weights), len(dense)
        packed = [int4_mma.pack_mma(q) for q, *_ in weights]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w_ref.t()
            row = {"linear": name, "M": m, "K": k, "N": n}
            row["bf16_ms"] = _bench_graph(lambda i: F.linear(x, dense[i]), copies_d)

            def triton_op(i: int) -> torch.Tensor:
                parts = torch.ops.quantsweep.w4a16_mm_split(x, weights[i][1], weights[i][2], weights[i][3], k)
                return parts.sum(0) if parts.shape[0] > 1 else parts[0]

            row["triton_ms"] = _bench_graph(triton_op, copies_q)
            best = (float("inf"), None)
            current = int4_mma.config(m, n, k, int4_mma.wgmma_available(x.device))
            for cfg in dict.fromkeys([current] + mma_candidates(m, modes)):
                def op(i: int, cfg=cfg) -> torch.Tensor:
                    parts = int4_mma.mma_split(x, packed[i], weights[i][2], weights[i][3], cfg)
                    return parts.sum(0) if parts.shape[0] > 1 else parts[0]

                # The sum over splits is timed as a kernel of its own.  The engine fuses it into the consumer
                # (a norm, the rope, SiLU), but at batch 1 that consumer is a small kernel that pays for
                # reading every split: timed without the sum, the sweep picked 16 splits and the decode
                # step got no faster (H200, 2026-12-01).
                if not _candidate_is_correct(cfg, lambda: op(0), ref):
                    continue
                t = _bench_graph(op, copies_q)
                if t < best[0]:
                    best = (t, cfg)
            row["mma_ms"], row["mma_config"] = best[0], json.dumps(best[1])
            row["mma_kernel"] = int4_mma.KERNEL_NAMES[best[1][5]] if best[1] else ""
            row["mma_over_bf16"] = row["bf16_ms"] / best[0]
            row["mma_over_triton"] = row["triton_ms"] / best[0]
            row["weight_gb_s_mma"] = int4_bytes / (best[0] * 1e-3) / 1e9
            if best[1] is not None:
                tuned[(int4.m_bucket(m), n, k)] = best[1]
            rows.append(row)
            print(f"  {name:5s} M={m:3d}: bf16 {row['bf16_ms'] * 1e3:7.1f} us  triton {row['triton_ms'] * 1e3:7.1f}"
                  f"  mma {best[0] * 1e3:7.1f} {best[1]}  (x{row['mma_over_bf16']:.2f} vs bf16, "
                  f"x{row['mma_over_triton']:.2f} vs triton, {row['weight_gb_s_mma']:.0f} GB/s of int4 weights)",
                  flush=True)
            del x, ref
        del weights, packed, dense, w_ref
        torch.cuda.empty_cache()
        if configs_out is not None:
            data = json.loads(configs_out.read_text()) if configs_out.exists() else {"configs": []}
            merged = {(c[0], c[1], c[2]): c[3] for c in data["configs"]}
            merged.update(tuned)
            configs_out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "configs": [
                [mb, n_, k_, list(cfg)] for (mb, n_, k_), cfg in sorted(merged.items())]}, indent=1))
            print(f"wrote {configs_out}", flush=True)
    _write(rows, out_dir / "mma_kernels")
    return rows


def dense_sweep(ms: list[int], out_dir: Path, configs_out: Path | None) -> list[dict]:
    """Per (linear, M <= 8): cuBLAS bf16 vs every ``bf16_gemv`` launch config (the fp16 baseline's kernel,
    :mod:`tasks.backends.torch.cuda.dense`), timed like :func:`mma_sweep` (split-K sum included).  Only
    shapes where the fastest correct config beats cuBLAS go to ``configs_out`` (the engine reads
    ``dense_configs.json``); the others keep cuBLAS."""
    rows, tuned = [], {}
    for name, (k, n) in shapes_kn().items():
        copies = max(2, -(-200_000_000 // (2 * n * k)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in [m for m in ms if m <= dense.MAX_M]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ weights[0].float().t()
            row = {"linear": name, "M": m, "K": k, "N": n,
                   "cublas_ms": _bench_graph(lambda i: F.linear(x, weights[i]), copies)}
            best = (float("inf"), None)
            for tn, b in ((1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)):  # larger batches run out of registers
                for wk in (1, 2, 4, 8):
                    for sp in (1, 2, 3, 4, 6, 8):
                        cfg = (tn, b, wk, sp)

                        def op(i: int, cfg=cfg) -> torch.Tensor:  # the sum is timed: see mma_sweep
                            return int4.reduce_splits(dense.gemv_split(x, weights[i], cfg), torch.bfloat16)

                        if not _candidate_is_correct(cfg, lambda: op(0).float(), ref):
                            continue
                        t = _bench_graph(op, copies)
                        if t < best[0]:
                            best = (t, cfg)
            row.update(gemv_ms=best[0], gemv_config=json.dumps(best[1]), gemv_over_cublas=row["cublas_ms"] / best[0],
                       cublas_tb_s=2 * n * k / (row["cublas_ms"] * 1e-3) / 1e12,
                       gemv_tb_s=2 * n * k / (best[0] * 1e-3) / 1e12)
            row["engine_uses"] = "gemv" if best[0] < row["cublas_ms"] else "cublas"
            if best[0] < row["cublas_ms"]:
                tuned[(int4.m_bucket(m), n, k)] = best[1]
            rows.append(row)
            print(f"  {name:5s} M={m}: cuBLAS {row['cublas_ms'] * 1e3:6.1f} us ({row['cublas_tb_s']:.2f} TB/s)  gemv "
                  f"{best[0] * 1e3:6.1f} us ({row['gemv_tb_s']:.2f} TB/s) {best[1]}", flush=True)
        del weights
        torch.cuda.empty_cache()
    if configs_out is not None:
        configs_out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "configs": [
            [mb, n_, k_, list(cfg)] for (mb, n_, k_), cfg in sorted(tuned.items())]}, indent=1))
        print(f"wrote {configs_out}", flush=True)
    _write(rows, out_dir / "dense_kernels")
    return rows


# ---------------------------------------------------------------------------------------------- e2e


def decode_bytes_per_step(model, batch: int, input_len: int, output_len: int) -> float:
    """Fewest bytes a decode step must move, as the product's profile rows count them (:mod:`tasks.roofline`)."""
    return roofline.decode_bytes_per_step(model.decode_reads(), kv_bytes_per_token(model.args), batch, input_len, output_len)


def decode_breakdown(gen: Generator, input_len: int, steps: int = 20, top: int = 12) -> list[dict]:
    """Where a decode step's device time goes: torch.profiler over ``steps`` graph replays, kernels grouped
    by name, microseconds per step (the replays write positions input_len.. onwards, inside the cache)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        gen.pos.fill_(input_len)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            gen.graph.replay()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels.setdefault(e.name, []).append(e.device_time_total if hasattr(e, "device_time_total")
                                                  else e.cuda_time_total)
    rows = [{"kernel": name[:90], "us_per_step": sum(t) / steps, "launches_per_step": len(t) / steps}
            for name, t in kernels.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(f"  decode step breakdown: {total:.0f} us of kernels per step, "
          f"{sum(r['launches_per_step'] for r in rows):.0f} launches per step")
    for r in rows[:top]:
        print(f"    {r['us_per_step']:8.1f} us  x{r['launches_per_step']:5.0f}  {r['kernel']}")
    return rows[:top]


def run_method(method: str, batch_sizes: list[int], input_len: int, output_len: int, warmup: int,
               repeats: int, bandwidth: float, compile_blocks: bool, breakdown: bool = False) -> list[dict]:
    from tasks.gpu_metrics import MemorySampler

    print(RANDOM_NOTICE)
    args = llama2_7b_args()
    t0 = time.perf_counter()
    # suffixes for A/B runs: "-nofuse" (gemv_fusion off), "-silu" (gemv_fusion all); else the default
    base, _, suffix = method.partition("-")
    base = method if base == "int4" and suffix == "triton" else base
    fusion = {"nofuse": "off", "silu": "all"}.get(suffix, DEFAULT_GEMV_FUSION)
    weights = {"fp16": "bfloat16", "fp8": "fp8"}.get(base, "int4")
    model = random_model(args, weights, "cuda", group_size=128,
                         int4_kernels="triton" if base == "int4-triton" else "auto", gemv_fusion=fusion)
    gen = Generator(model, compile=compile_blocks, cuda_graph=True)
    print(f"[{method}] built in {time.perf_counter() - t0:.1f} s; weights {model.weight_bytes() / GIB:.2f} GiB")
    rows = []
    for batch in batch_sizes:
        gen.release()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, args.vocab_size, (batch, input_len), device="cuda")
        t0 = time.perf_counter()
        gen.setup(batch, input_len + output_len)  # allocate the cache, compile, capture the decode graph
        setup_s = time.perf_counter() - t0
        try:
            sampler = MemorySampler("cuda:0")
        except Exception as exc:  # NVML missing or the bus id lookup failing must not lose the timings
            print(f"  memory sampler unavailable: {type(exc).__name__}: {exc}")
            sampler = contextlib.nullcontext(types.SimpleNamespace(
                peaks=types.SimpleNamespace(device_used_bytes=None, process_bytes=None)))
        with sampler as sampler:
            for _ in range(warmup):
                gen.generate(ids, output_len)
            runs = [gen.generate(ids, output_len) for _ in range(repeats)]
        tokens = runs[-1].output_token_ids
        assert tokens.shape == (batch, output_len) and int(tokens.min()) >= 0 and int(tokens.max()) < args.vocab_size
        decode_s = [sum(r.decode_step_s) for r in runs]
        steps = [s for r in runs for s in r.decode_step_s]
        bytes_step = decode_bytes_per_step(model, batch, input_len, output_len)
        roofline = batch * bandwidth / bytes_step
        decode_tps = statistics.median(batch * (output_len - 1) / d for d in decode_s)
        row = {
            "method": method, "batch_size": batch,
            "output_tok_s": statistics.median(batch * output_len / r.total_s for r in runs),
            "decode_tok_s": decode_tps,
            "ttft_ms": 1e3 * statistics.median(r.first_token_s for r in runs),
            "itl_median_ms": 1e3 * statistics.median(steps),
            "itl_p90_ms": 1e3 * sorted(steps)[int(0.9 * (len(steps) - 1))],
            "e2e_s": statistics.median(r.total_s for r in runs),
            "peak_nvml_used_gib": (sampler.peaks.device_used_bytes or 0) / GIB,
            "peak_nvml_process_gib": (sampler.peaks.process_bytes or 0) / GIB,
            "torch_max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "torch_max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "decode_bytes_per_step_gb": bytes_step / 1e9,
            "roofline_decode_tok_s": roofline,
            "pct_roofline": 100 * decode_tps / roofline,
            "setup_s": setup_s, "repeats": repeats, "warmup": warmup,
            "weights_gib": model.weight_bytes() / GIB,
            "gpu": torch.cuda.get_device_name(),
            "int4_kernels": model.int4_kernels if base not in ("fp16", "fp8") else "",
            "gemv_fusion": model.gemv_fusion,
        }
        if breakdown:
            try:
                row["breakdown"] = decode_breakdown(gen, input_len)
            except Exception as exc:  # the profiler must not cost the timings
                print(f"  breakdown failed: {type(exc).__name__}: {exc}")
        rows.append(row)
        print(f"[{method}] B={batch:3d}: {row['output_tok_s']:9.1f} out tok/s  {decode_tps:9.1f} decode tok/s  "
              f"TTFT {row['ttft_ms']:7.1f} ms  ITL {row['itl_median_ms']:6.2f} ms  "
              f"NVML {row['peak_nvml_used_gib']:5.1f} GiB  {row['pct_roofline']:5.1f}% roofline  "
              f"(setup {setup_s:.1f} s)", flush=True)
    gen.release()
    return rows


def e2e(args, out_dir: Path, bandwidth: float) -> list[dict]:
    """Each method in a child process (clean memory), then one table."""
    rows = []
    for method in args.methods.split(","):
        part = out_dir / f"e2e_{method}.json"
        cmd = [sys.executable, __file__, "--mode", "method", "--method", method, "--out", str(out_dir),
               "--batch-sizes", args.batch_sizes, "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--bandwidth", str(bandwidth)] + (["--no-compile"] if args.no_compile else []) \
            + (["--breakdown"] if args.breakdown else [])
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not part.exists():
            print(f"[{method}] FAILED (exit {proc.returncode})")
            continue
        rows += json.loads(part.read_text())
    fp16 = {r["batch_size"]: r for r in rows if r["method"] == "fp16"}
    for r in rows:
        base = fp16.get(r["batch_size"])
        r["speedup_vs_fp16"] = r["output_tok_s"] / base["output_tok_s"] if base else float("nan")
        r["decode_speedup_vs_fp16"] = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        r["nvml_vs_fp16"] = r["peak_nvml_used_gib"] / base["peak_nvml_used_gib"] if base else float("nan")
    _write(rows, out_dir / "e2e")
    print_table(rows, bandwidth)
    return rows


def print_table(rows: list[dict], bandwidth: float) -> None:
    print()
    print(RANDOM_NOTICE)
    gpu = rows[0]["gpu"] if rows else "?"
    kernels = sorted({f"{r['method']}: {r['int4_kernels']}" for r in rows if r.get("int4_kernels")})
    print(f"GPU: {gpu}; measured copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); fp16 = bf16 weights; "
          f"int4 = W4A16 g128 asymmetric (kernels: {', '.join(kernels)}), lm_head/embeddings bf16; "
          "input 512, output 200, greedy, EOS ignored")
    cols = [("method", "{}"), ("batch_size", "{}"), ("output_tok_s", "{:.1f}"), ("decode_tok_s", "{:.1f}"),
            ("ttft_ms", "{:.1f}"), ("itl_median_ms", "{:.2f}"), ("peak_nvml_used_gib", "{:.2f}"),
            ("torch_max_reserved_gib", "{:.2f}"), ("roofline_decode_tok_s", "{:.0f}"), ("pct_roofline", "{:.1f}"),
            ("speedup_vs_fp16", "{:.2f}"), ("decode_speedup_vs_fp16", "{:.2f}"), ("nvml_vs_fp16", "{:.2f}")]
    print("| " + " | ".join(c for c, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f.format(r.get(c, "")) for c, f in cols) + " |")


def _write(rows: list[dict], stem: Path) -> None:
    if not rows:
        return
    stem.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(k):.4g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                       for k in keys) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def smoke(smoke_dir: Path, out_dir: Path) -> None:
    """The orchestrator's path without Ray on small real checkpoints: build -> load -> profile -> lm-eval.

    ``smoke_dir`` holds ``fp`` (a random-weight bf16 Llama with a tokenizer, from ``tasks.models``) and
    ``rtn`` (its int4 compressed-tensors version from ``tasks.quantize``).  Prints the profile rows, how
    close the engine's logits are to transformers' on the dense checkpoint, and lm-eval loglikelihoods.
    """
    from tasks.backends.base import EngineShape
    from tasks.backends.torch.backend import TorchBackend
    from tasks.profile import profile_engine

    kv = {"kv_cache_batch_size": 4, "kv_cache_input_len": 64, "kv_cache_output_len": 16}
    for name in ("fp", "rtn"):
        ckpt = (smoke_dir / name).resolve()
        engine_dir = out_dir / f"engine_{name}"
        method = {"name": name, "algorithm": "none" if name == "fp" else "rtn", "dtype": "bfloat16"}
        TorchBackend().build(ckpt, engine_dir, EngineShape(4, 64, 80), method, {})
        engine = TorchBackend().load(engine_dir, "cuda:0", dict(kv))
        print(f"[smoke {name}] {type(engine).__name__}: {engine.weight_format}; cache {engine.cache_shape}; "
              f"{engine.kv_cache_policy}")
        throughput, memory = profile_engine(engine, 4, 64, 16, 1, 2)
        print(f"[smoke {name}] throughput row: {json.dumps(throughput, default=str)}")
        print(f"[smoke {name}] memory row: {json.dumps(memory, default=str)}")
        if name == "fp":  # the dense checkpoint loads in transformers here: compare logits
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
            ids = torch.randint(100, engine.vocab_size(), (engine.cache_shape[0], 32), device="cuda")
            with torch.inference_mode():
                ours = engine.model(ids, torch.arange(32, device="cuda"), all_logits=True)
                theirs = hf(ids).logits.float()
            rel = ((ours - theirs).norm() / theirs.norm()).item()
            agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
            print(f"[smoke fp] engine vs transformers logits: rel diff {rel:.2e}, argmax agreement {agree:.3f}")
            del hf
        try:
            lm = engine.lm_eval_model(2)
            from lm_eval.api.instance import Instance

            reqs = [Instance("loglikelihood", {}, ("The capital of France is", " Paris"), 0),
                    Instance("loglikelihood", {}, ("2 + 2 =", " 4"), 1)]
            print(f"[smoke {name}] lm-eval loglikelihoods: {lm.loglikelihood(reqs)}")
        except ImportError as exc:
            print(f"[smoke {name}] lm-eval part SKIPPED: {exc} (not installed on this machine)")
        except Exception as exc:  # e.g. compressed-tensors missing for transformers' int4 load
            print(f"[smoke {name}] lm-eval part FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        engine.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["all", "check", "kernels", "mma", "dense", "attention", "e2e", "method",
                                      "smoke"],
                   default="all")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    p.add_argument("--methods", default="fp16,int4")
    p.add_argument("--method", default="fp16")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--kernel-ms", default="1,2,4,8,16,32,64")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s; measured when 0")
    p.add_argument("--configs-out", type=Path, default=None)
    p.add_argument("--mma-modes", default="0,1,2,3",
                   help="mma sweep: kernels to try (0/1 mma.sync, 2 wgmma, 3 zero-point-folding gemv); empty: time "
                        "the current configs only")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--breakdown", action="store_true", help="e2e: profile the decode step's kernels per batch")
    p.add_argument("--smoke-dir", type=Path, default=Path(".smoke"), help="fp/ and rtn/ checkpoints (smoke)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.mode == "method":
        rows = run_method(args.method, batch_sizes, args.input_len, args.output_len, args.warmup, args.repeats,
                          args.bandwidth, not args.no_compile, args.breakdown)
        (args.out / f"e2e_{args.method}.json").write_text(json.dumps(rows))
        return
    if args.mode == "smoke":
        smoke(args.smoke_dir, args.out)
        return
    print(RANDOM_NOTICE)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    bandwidth = args.bandwidth or copy_bandwidth()
    print(f"device-to-device copy bandwidth: {bandwidth / 1e12:.3f} TB/s (bytes read + written, median of 20)")
    if args.mode in ("all", "check"):
        numerical_check(batch_sizes, args.input_len, args.out)
        attention_check(batch_sizes, args.input_len + args.output_len, args.out)
    if args.mode == "kernels":
        kernel_sweep([int(m) for m in args.kernel_ms.split(",")], args.out, args.configs_out)
    if args.mode == "mma":
        mma_sweep([int(m) for m in args.kernel_ms.split(",")], args.out, args.configs_out,
                  tuple(int(v) for v in args.mma_modes.split(",") if v))
    if args.mode == "dense":
        dense_sweep([int(m) for m in args.kernel_ms.split(",")], args.out, args.configs_out)
    if args.mode == "attention":
        attention_sweep(batch_sizes, args.input_len + args.output_len, args.input_len + args.output_len // 2,
                        args.out, args.configs_out)
    if args.mode in ("all", "e2e"):
        e2e(args, args.out, bandwidth)


if __name__ == "__main__":
    main()
