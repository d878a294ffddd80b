"""bf16 linear layers for the fp16 baseline: cuBLAS, except at decode batch <= 8 on shapes where the
``bf16_gemv`` kernel of ``w4a16_mma.cu`` measured faster.

Why: the fp16 baseline must itself run near the memory-bandwidth roofline, or int4's speed-up is
overstated.  At batch 1 on an H200, cuBLAS reads Llama-2-7B's 4096 x 4096 (wo) weight at 2.5 TB/s and the
4096 x 11008 (w2) one at 3.2 TB/s, while the GPU's copy test moves 4.2.  The kernel reads nn.Linear's own
weight tensor (no second copy) with the int4 kernels' tiling and split-K partials, and
``bench/tune_kernels.py dense`` writes the shapes and launch configs where it wins (timed with the
split-K sum, as the engine pays for it) to ``dense_configs.json``; every other shape, batch and device
keeps ``F.linear``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tasks.backends.torch.cuda import fused, gemv_configs, int4, int4_mma

CONFIG_FILE = Path(__file__).with_name("dense_configs.json")
MAX_M = 8  # one 8-row activation tile


#: {(M bucket, N, K): (TN, B, WK, splits)}: 16-row tiles per warp, 64-deep chunks per batch, warps per block,
#: split-K slices; only shapes where the kernel beat cuBLAS on the sweep's GPU
TUNED = gemv_configs.load_tuned(CONFIG_FILE)


def check_config(cfg: tuple[int, ...]) -> None:
    gemv_configs.check_config(cfg, "bf16 gemv")


def config(m: int, n: int, k: int) -> gemv_configs.GemvConfig | None:
    """The tuned launch config for this shape, or None: cuBLAS."""
    return gemv_configs.lookup(TUNED, m, n, k, max_m=MAX_M, tile=int4_mma.TILE, chunk=int4_mma.CHUNK)


def output_splits(k: int, cfg: tuple[int, ...]) -> int:
    return int4_mma.split_k(k // int4_mma.CHUNK, cfg[3])[1]


def gemv_split(x: torch.Tensor, weight: torch.Tensor, cfg: tuple[int, ...]) -> torch.Tensor:
    """x [M, K] bf16 (M <= 8) @ weight [N, K]^T -> split-K partials [S, M, N] (fp32 when S > 1)."""
    check_config(cfg)
    m, k = x.shape
    n = weight.shape[0]
    tn, b, wk, _ = cfg
    per, splits = int4_mma.split_k(k // int4_mma.CHUNK, cfg[3])
    out = torch.empty(splits, m, n, dtype=torch.float32 if splits > 1 else torch.bfloat16, device=x.device)
    int4_mma._kernel(f"bf16_gemv<{tn}, {b}, {wk}, 0, 0>")(
        grid=(math.ceil(n / int4_mma.TILE / tn), splits, 1), block=(32 * wk, 1, 1),
        args=[x, weight, out, m, n, k, per, int(splits > 1), x, x, 0])
    return out


def gemv_fused(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor | None, resid: torch.Tensor | None,
               eps: float, epilogue: int, cfg: tuple[int, ...]) -> torch.Tensor:
    """The kernel with the decode-step fusions (see :func:`.int4_mma.gemv_fused`), one split."""
    check_config(cfg)
    m, k = x.shape
    n = weight.shape[0]
    tn, b, wk, _ = cfg
    out = torch.empty(m, n // 2 if epilogue == fused.EPI_SILU else n, dtype=torch.bfloat16, device=x.device)
    int4_mma._kernel(f"bf16_gemv<{tn}, {b}, {wk}, {int(gamma is not None)}, {epilogue}>")(
        grid=(math.ceil(n / int4_mma.TILE / tn), 1, 1), block=(32 * wk, 1, 1),
        args=[x, weight, out, m, n, k, k // int4_mma.CHUNK, 0, x if gamma is None else gamma,
              x if resid is None else resid, int4_mma.float_bits(eps)])
    return out


def _config_for(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The kernel's config where it applies (bf16, a tuned shape, NVRTC kernels on this GPU), else None."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16):
        return None
    cfg = config(int(x.shape[0]), int(weight.shape[0]), int(x.shape[1]))
    return cfg if cfg is not None and int4_mma.kernels_available(x.device) else None


def _fused_config_for(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int] | None:
    """:func:`_config_for` if it runs in one split (what the decode-step fusions need), else None."""
    cfg = _config_for(x, weight)
    return cfg if cfg is not None and output_splits(int(x.shape[1]), cfg) == 1 else None


@torch.library.custom_op("quantsweep::bf16_mm_split", mutates_args=())
def bf16_mm_split(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` [M, K] @ ``weight``^T as [S, M, N] split-K partials: the kernel on tuned shapes, else cuBLAS
    (S = 1).  Opaque to torch.compile (the choice is made here, outside tracing); recorded by CUDA graphs."""
    cfg = _config_for(x, weight)
    if cfg is None:
        return F.linear(x, weight).unsqueeze(0)
    return gemv_split(x.contiguous(), weight, cfg)


@bf16_mm_split.register_fake
def _(x, weight):
    cfg = _config_for(x, weight)
    splits = 1 if cfg is None else output_splits(int(x.shape[1]), cfg)
    return x.new_empty(splits, x.shape[0], weight.shape[0], dtype=torch.float32 if splits > 1 else x.dtype)


@torch.library.custom_op("quantsweep::bf16_gemv_fused", mutates_args=())
def bf16_gemv_fused(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor | None, resid: torch.Tensor | None,
                    eps: float, epilogue: int) -> torch.Tensor:
    """:func:`gemv_fused` as an op (opaque to torch.compile, recorded by CUDA graphs); only where
    :meth:`DenseLinear.fused_gemv` found a one-split config."""
    cfg = _fused_config_for(x, weight)
    if cfg is None:
        raise ValueError(f"no one-split bf16 GEMV config for M={x.shape[0]}, N={weight.shape[0]}, K={x.shape[1]}")
    return gemv_fused(x.contiguous(), weight, gamma, resid, eps, epilogue, cfg)


@bf16_gemv_fused.register_fake
def _(x, weight, gamma, resid, eps, epilogue):
    return x.new_empty(x.shape[0], weight.shape[0] // 2 if epilogue == fused.EPI_SILU else weight.shape[0])


class DenseLinear(fused.GateUpRows, nn.Linear):
    """``nn.Linear`` (same parameters) whose forward, for CUDA bf16 inputs of at most 8 rows, goes through
    :func:`bf16_mm_split` (the tuned kernel where it won, cuBLAS elsewhere).  After
    :meth:`interleave_gate_up` its weight rows are stored interleaved (so is its state dict) while
    ``forward`` still returns the original order."""

    def _permute_out_rows(self, perm: torch.Tensor) -> None:
        """For :meth:`~.fused.GateUpRows.interleave_gate_up`."""
        if self.bias is not None:
            raise ValueError("interleave_gate_up: a gate/up projection has no bias here")
        self.weight.data = self.weight.data[perm.to(self.weight.device)]

    def raw_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product in storage order."""
        if self.bias is not None or not x.is_cuda or x.numel() // x.shape[-1] > MAX_M:
            return F.linear(x, self.weight, self.bias)
        parts = torch.ops.quantsweep.bf16_mm_split(x.reshape(-1, x.shape[-1]), self.weight)
        y = int4.reduce_splits(parts, x.dtype)  # fused into the consumer when compiled
        return y.view(*x.shape[:-1], self.out_features)

    def fused_gemv(self, x: torch.Tensor, gamma: torch.Tensor | None, eps: float, resid: torch.Tensor | None,
                   epilogue: int) -> torch.Tensor | None:
        """x [M, K] through the kernel with the decode-step fusions (:mod:`.fused`), or None where it does not
        run (CPU, M > 8, cuBLAS's shapes, a config with more than one split)."""
        if self.bias is not None or _fused_config_for(x, self.weight) is None:
            return None
        return torch.ops.quantsweep.bf16_gemv_fused(x, self.weight, gamma, resid, float(eps), int(epilogue))
