"""Numerical checks of the engine's CUDA kernels on fresh random inputs (one GPU, no checkpoint, no Ray).

- int4 linears: the kernel's output vs x @ dequant(W)^T in fp32 for every (M, K, N) a Llama-2-7B-shaped
  model runs (decode M = batch sizes, prefill M = batch x input_len), in both weight layouts (Triton
  kernels, and the tensor-core "mma" kernels where they run); at M <= 8 also the fused GEMV each linear runs
  with the decode fusions (layout "mma-fused").
- decode attention: the kernel vs the fp32 reference, and its cache write, for every batch size at the
  first, a middle and the last slot of an input_len + output_len cache.

Writes ``numerical_check`` and ``attention_check`` (.csv and .md) under ``--out`` and prints how many pass.

Usage: python bench/check_numerics.py --out results/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tasks.backends.torch.cuda import fused, int4, int4_mma  # noqa: E402
from tasks.backends.torch.cuda.model import llama2_7b_args  # noqa: E402
from tasks.backends.torch.cuda.rope import rope_tables  # noqa: E402
from timing import _write, add_common_options, ints, print_device, random_int4, shapes_kn  # noqa: E402


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(p)
    return p


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    print_device()
    batch_sizes = ints(args.batch_sizes)
    numerical_check(batch_sizes, args.input_len, args.out)
    attention_check(batch_sizes, args.input_len + args.output_len, args.out)


if __name__ == "__main__":
    run(parser().parse_args())
