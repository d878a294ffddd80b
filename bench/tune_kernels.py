"""The tuning sweeps that write the engine's launch-config JSONs (one GPU, random weights, no Ray).

Each sweep times its candidates inside CUDA graphs over copies of the weights (or KV caches) that do not fit
in L2, as the decode step runs them, split-K sums included; a candidate counts only if its output matches
the fp32 reference (rel. error < 1e-2).  The fastest correct one per shape goes to ``--configs-out`` (no
file is written without it); the timings go to ``--out``.  The shapes are Llama-2-7B's linears (q|k|v and
gate|up fused as in the engine).

- ``int4``: bf16 cuBLAS, torch's tinygemm int4 op, the engine's current int4 choice and a grid of candidates
  (old and new Triton kernels, de-quantize + cuBLAS) per (linear, M in ``--kernel-ms``); the engine reads
  ``tasks/backends/torch/cuda/int4_configs.json`` (written after every linear).
- ``mma``: the tensor-core kernels of ``int4_mma`` (weights in the "mma" layout) over their launch configs
  (``--mma-modes``: 0 and 1 the mma.sync kernels, 2 the Hopper wgmma kernel, 3 the batch <= 8 kernel that
  folds the zero point out), against bf16 cuBLAS and the Triton kernels; the engine reads
  ``int4_mma_configs.json``.
- ``dense``: the fp16 baseline's linears at M <= 8: cuBLAS vs the ``bf16_gemv`` kernel over its launch
  configs; only the shapes where the kernel wins are written (the engine reads ``dense_configs.json``).
- ``attention``: per batch size, the decode-attention kernels over a grid of launch configs, on a cache of
  input_len + output_len positions at the middle of the generation; the engine reads
  ``attention_configs.json``.

Usage: python bench/tune_kernels.py mma --kernel-ms 1,8 --configs-out tasks/backends/torch/cuda/int4_mma_configs.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tasks.backends.torch.cuda import dense, int4, int4_mma  # noqa: E402
from tasks.backends.torch.cuda.model import llama2_7b_args  # noqa: E402
from tasks.backends.torch.cuda.rope import rope_tables  # noqa: E402
from timing import _bench_graph, _write, add_common_options, ints, print_device, random_int4, shapes_kn  # noqa: E402

SWEEPS = ("int4", "mma", "dense", "attention")


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", choices=SWEEPS, help="which kernels to tune (the config JSON it writes)")
    add_common_options(p)
    p.add_argument("--kernel-ms", default="1,2,4,8,16,32,64", help="int4, mma, dense: the M (rows) to tune")
    p.add_argument("--configs-out", type=Path, default=None, help="the config JSON to write (none: timings only)")
    p.add_argument("--mma-modes", default="0,1,2,3",
                   help="mma sweep: kernels to try (0/1 mma.sync, 2 wgmma, 3 zero-point-folding gemv); empty: time "
                        "the current configs only")
    return p


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    print_device()
    ms = ints(args.kernel_ms)
    if args.sweep == "int4":
        kernel_sweep(ms, args.out, args.configs_out)
    elif args.sweep == "mma":
        mma_sweep(ms, args.out, args.configs_out, tuple(ints(args.mma_modes)))
    elif args.sweep == "dense":
        dense_sweep(ms, args.out, args.configs_out)
    else:
        attention_sweep(ints(args.batch_sizes), args.input_len + args.output_len,
                        args.input_len + args.output_len // 2, args.out, args.configs_out)


if __name__ == "__main__":
    run(parser().parse_args())
