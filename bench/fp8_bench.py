"""FP8 W8A8 linears on one GPU (method ``fp8``): numerical check and the GEMV-vs-cuBLASLt sweep.

Random weights of Llama-2-7B's linear shapes (q|k|v and gate|up fused as in the engine), quantized per
channel like llm-compressor's FP8_DYNAMIC; random bf16 activations with a few outlier channels,
quantized per token as the engine does.  Modes:

- ``check``: :class:`~tasks.backends.torch.cuda.fp8.Fp8Linear` (what the engine runs: the compiled
  quantization kernel, then _scaled_mm or the GEMV where ``fp8_configs.json`` picks it) against the
  de-quantized reference in fp32 (``fp8.reference``: the same per-token quantized activations times
  q * s), for every (M, K, N) the 7B model runs: decode M = batch sizes, prefill M = batch x input_len;
  and at M <= 8 the GEMV itself with the config the sweep chose (or a default one where cuBLASLt won).
- ``sweep``: per (linear, M <= 8), cuBLASLt's row-wise ``_scaled_mm`` against every GEMV launch config,
  both on the same quantized inputs, inside CUDA graphs over weight copies that do not fit in L2
  (``timing._bench_graph``), split-K sum included; bf16 cuBLAS on the same shape for scale.
  Writes the shapes where the GEMV won, and its config, to ``--configs-out`` (the engine reads
  ``tasks/backends/torch/cuda/fp8_configs.json``).

End to end: ``python bench/e2e.py --methods fp16,fp8``.
Usage: python bench/fp8_bench.py --mode sweep --configs-out tasks/backends/torch/cuda/fp8_configs.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from timing import RANDOM_NOTICE, _bench_graph, _write, shapes_kn  # noqa: E402
from tasks.backends.torch.cuda import fp8, int4  # noqa: E402

DEFAULT_GEMV = (1, 2, 4, 1)  # checked at M <= 8 where the sweep kept cuBLASLt
GEMV_GRID = [(tn, b, wk, sp) for tn, b in ((1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1))
             for wk in (1, 2, 4, 8) for sp in (1, 2, 4)]


def random_fp8_linear(k: int, n: int) -> fp8.Fp8Linear:
    layer = fp8.Fp8Linear(k, n, device="cuda")
    codes, scale = fp8.quantize_weight(torch.randn(n, k, device="cuda") * 0.02)
    layer.weight.copy_(codes)
    layer.weight_scale.copy_(scale)
    return layer


def activations(m: int, k: int) -> torch.Tensor:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x[:, :8] *= 20  # outlier channels, as real activations have: they set each token's scale
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def numerical_check(batch_sizes: list[int], input_len: int, out_dir: Path) -> list[dict]:
    """Relative error of the engine's FP8 linear (and of the GEMV at M <= 8) vs the de-quantized reference."""
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for name, (k, n) in shapes_kn().items():
        torch.manual_seed(k + n)
        layer = random_fp8_linear(k, n)
        w_bf16 = layer.dequantized().to(torch.bfloat16)
        for m in sorted(set(batch_sizes) | {b * input_len for b in batch_sizes}):
            x = activations(m, k)
            ref = fp8.reference(x, layer.weight, layer.weight_scale)
            out = layer(x)
            bf16 = F.linear(x, w_bf16)  # the same weights in bf16 with unquantized activations, for scale
            row = {"linear": name, "M": m, "K": k, "N": n, "path": "engine",
                   "kernel": "gemv" if fp8.config(m, n, k) else "scaled_mm",
                   "rel_err": _rel(out, ref), "rel_err_bf16_unquantized_x": _rel(bf16, ref)}
            row["pass"] = bool(torch.isfinite(out).all()) and row["rel_err"] < 1e-2
            rows.append(row)
            if m <= fp8.MAX_M and fp8.gemv_available(x.device):
                cfg = fp8.config(m, n, k) or DEFAULT_GEMV
                xq, xs = fp8.quantize_tokens(x)
                gemv = int4.reduce_splits(fp8.gemv_split(xq, xs, layer.weight, layer.weight_scale, cfg), torch.bfloat16)
                rows.append({**row, "path": f"gemv {list(cfg)}", "kernel": "gemv", "rel_err": _rel(gemv, ref),
                             "pass": bool(torch.isfinite(gemv).all()) and _rel(gemv, ref) < 1e-2})
            del x, ref, out, bf16
        del layer, w_bf16
        torch.cuda.empty_cache()
    _write(rows, out_dir / "fp8_numerical_check")
    for path in ("engine", "gemv"):
        mine = [r for r in rows if r["path"].startswith(path)]
        if mine:
            print(f"fp8 numerical check [{path}]: {sum(r['pass'] for r in mine)}/{len(mine)} shapes pass "
                  f"(rel err < 1e-2); worst {max(r['rel_err'] for r in mine):.2e}", flush=True)
    return rows


def sweep(ms: list[int], out_dir: Path, configs_out: Path | None) -> list[dict]:
    """cuBLASLt vs every GEMV config per (linear, M <= 8); the winners' configs to ``configs_out``."""
    rows, tuned = [], {}
    for name, (k, n) in shapes_kn().items():
        copies = max(2, -(-200_000_000 // (n * k)))  # > 50 MB of L2, several times over
        layers = [random_fp8_linear(k, n) for _ in range(copies)]
        w_bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, copies // 2))]
        for m in [m for m in ms if m <= fp8.MAX_M]:
            xq, xs = fp8.quantize_tokens(activations(m, k))
            ref = fp8.scaled_mm(xq, xs, layers[0].weight, layers[0].weight_scale).float()
            x_bf16 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"linear": name, "M": m, "K": k, "N": n,
                   "scaled_mm_ms": _bench_graph(lambda i: fp8.scaled_mm(xq, xs, layers[i].weight,
                                                                       layers[i].weight_scale), copies),
                   "bf16_cublas_ms": _bench_graph(lambda i: F.linear(x_bf16, w_bf16[i]), len(w_bf16)),
                   "quantize_ms": _bench_graph(lambda i: fp8.quantize_tokens(x_bf16), 1)}
            best = (float("inf"), None)
            for cfg in GEMV_GRID:
                def op(i: int, cfg=cfg) -> torch.Tensor:  # the split-K sum is timed: the engine pays for it
                    parts = fp8.gemv_split(xq, xs, layers[i].weight, layers[i].weight_scale, cfg)
                    return int4.reduce_splits(parts, torch.bfloat16)

                try:
                    ok = _rel(op(0), ref) < 1e-2
                except Exception as exc:  # noqa: BLE001 - a config that does not build or launch is skipped
                    print(f"    {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                if not ok:
                    print(f"    {cfg}: WRONG result, skipped")
                    continue
                t = _bench_graph(op, copies)
                if t < best[0]:
                    best = (t, cfg)
            row.update(gemv_ms=best[0], gemv_config=json.dumps(best[1]),
                       scaled_mm_tb_s=n * k / (row["scaled_mm_ms"] * 1e-3) / 1e12,
                       gemv_tb_s=n * k / (best[0] * 1e-3) / 1e12,
                       bf16_tb_s=2 * n * k / (row["bf16_cublas_ms"] * 1e-3) / 1e12)
            row["engine_uses"] = "gemv" if best[0] < row["scaled_mm_ms"] else "scaled_mm"
            if row["engine_uses"] == "gemv":
                tuned[(int4.m_bucket(m), n, k)] = best[1]
            rows.append(row)
            print(f"  {name:5s} M={m}: _scaled_mm {row['scaled_mm_ms'] * 1e3:6.1f} us ({row['scaled_mm_tb_s']:.2f} TB/s)"
                  f"  gemv {best[0] * 1e3:6.1f} us ({row['gemv_tb_s']:.2f} TB/s) {best[1]}  bf16 cuBLAS "
                  f"{row['bf16_cublas_ms'] * 1e3:6.1f} us  quantize {row['quantize_ms'] * 1e3:5.1f} us", flush=True)
        del layers, w_bf16
        torch.cuda.empty_cache()
    if configs_out is not None:
        configs_out.write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "how": "bench/fp8_bench.py --mode sweep: CUDA-graph timed, "
            "weights cold in L2, split-K sum included; shapes where the FP8 GEMV beat _scaled_mm",
            "configs": [[mb, n_, k_, list(cfg)] for (mb, n_, k_), cfg in sorted(tuned.items())]}, indent=1))
        print(f"wrote {configs_out}", flush=True)
    _write(rows, out_dir / "fp8_sweep")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["check", "sweep"], default="check")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--kernel-ms", default="1,2,4,8")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--configs-out", type=Path, default=None)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(RANDOM_NOTICE)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    fp8.check_device("cuda")
    if args.mode == "sweep":
        sweep([int(m) for m in args.kernel_ms.split(",")], args.out, args.configs_out)
    else:
        numerical_check([int(b) for b in args.batch_sizes.split(",")], args.input_len, args.out)


if __name__ == "__main__":
    main()
