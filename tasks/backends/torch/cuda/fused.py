"""Decode-step fusions around the batch <= 8 GEMV kernels: each RMSNorm folded into the GEMV that reads its
output, the residual adds and SiLU * up into the GEMVs that produce their inputs (the kernels' side is
described in ``w4a16_mma.cu``).

Why: at batch 1 a decode step is 8 kernels per layer, each of a few microseconds, and every kernel pays a
fixed ~2-3 us of launch, ramp-up and tail (measured on an H200); the two norms and SiLU are three of the
eight.  With the fusions (``Transformer.fuse_decode``: "norm", the default, or "all") a layer is wqkv
(normalising) -> attention -> wo (+ residual) -> w13 (normalising; "all": and SiLU * up) [-> SiLU * up]
-> w2 (+ residual): 6 kernels per layer ("norm") or 5 ("all").  H200, random Llama-2-7B weights, batch 1:
int4 2.21 -> 2.10 ("norm") or 2.06 ms ("all") per step, fp16 4.05 either way;
``docs/bench/h200_gemv_fusions.md``.

The helpers below take a linear layer and return the fused result when the layer's ``fused_gemv`` can
compute it (:class:`~.int4.Int4Linear` and :class:`~.dense.DenseLinear` on CUDA, at most 8 rows, a GEMV
launch config with one split), and the same thing through the unfused modules otherwise, so the model
reads the same either way and CPU runs stay the reference.

SiLU * up needs gate and up of the same output in one lane, so "all" stores the gate/up projection (w13)
with the rows interleaved by 8 (:func:`gate_up_permutation`); such a layer's ``forward`` still returns
[gate | up], and :func:`silu_mul` reads its raw output without reordering it (slower past batch 8, where
the compiled SiLU reads the interleaved product: why "all" is not the default).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EPI_SPLITS, EPI_RESIDUAL, EPI_SILU = 0, 1, 2  # the kernels' epilogues (w4a16_mma.cu)
HALF_TILE = 8  # rows of gate, then of up, per 16-row tile of an interleaved projection


def gate_up_permutation(n: int, device: Any = None) -> torch.Tensor:
    """Source row of each row of an interleaved [gate | up] projection with n = 2I rows: 16-row tile i
    holds gate rows 8i..8i+7, then up rows 8i..8i+7."""
    if n % (2 * HALF_TILE):
        raise ValueError(f"an interleaved gate/up projection needs a multiple of 16 rows, got {n}")
    r = torch.arange(n, device=device)
    tile, within = r // (2 * HALF_TILE), r % (2 * HALF_TILE)
    return torch.where(within < HALF_TILE, HALF_TILE * tile + within, n // 2 + HALF_TILE * tile + within - HALF_TILE)


def _tiles(y: torch.Tensor) -> torch.Tensor:
    """[..., 2I] interleaved -> [..., I/8, 2 (gate, up), 8]."""
    return y.view(*y.shape[:-1], y.shape[-1] // (2 * HALF_TILE), 2, HALF_TILE)


def deinterleave(y: torch.Tensor) -> torch.Tensor:
    """An interleaved projection's output [..., 2I] -> [..., 2I] as [gate | up]."""
    return _tiles(y).transpose(-3, -2).reshape(y.shape)


class GateUpRows:
    """Mixin for the linear layers (``Int4Linear``, ``DenseLinear``): :meth:`interleave_gate_up` reorders a
    [gate | up] projection's output rows for the SiLU epilogue; ``forward`` keeps returning [gate | up].
    The layer provides ``raw_forward`` (the product in storage order) and ``_permute_out_rows``."""

    gate_up_interleaved = False

    def raw_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _permute_out_rows(self, perm: torch.Tensor) -> None:
        raise NotImplementedError

    def interleave_gate_up(self) -> None:
        """Store the rows interleaved by 8 (:func:`gate_up_permutation`), once."""
        if not self.gate_up_interleaved:
            self._permute_out_rows(gate_up_permutation(self.out_features))
            self.gate_up_interleaved = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.raw_forward(x)
        return deinterleave(y) if self.gate_up_interleaved else y


def silu_mul(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a gate/up projection (interleaved or not), unfused."""
    if not getattr(linear, "gate_up_interleaved", False):
        gate, up = linear(x).chunk(2, dim=-1)
        return F.silu(gate) * up
    v = _tiles(linear.raw_forward(x))
    return (F.silu(v[..., 0, :]) * v[..., 1, :]).reshape(*x.shape[:-1], -1)


def _fused(linear: nn.Module, x: torch.Tensor, gamma: torch.Tensor | None = None, eps: float = 0.0,
           resid: torch.Tensor | None = None, epilogue: int = EPI_SPLITS) -> torch.Tensor | None:
    fused_gemv = getattr(linear, "fused_gemv", None)
    if fused_gemv is None or getattr(linear, "gate_up_interleaved", False) != (epilogue == EPI_SILU):
        return None  # an interleaved projection's raw product is only ever consumed by the SiLU epilogue
    y = fused_gemv(x.reshape(-1, x.shape[-1]), gamma, eps,
                   None if resid is None else resid.reshape(-1, resid.shape[-1]), epilogue)
    return None if y is None else y.view(*x.shape[:-1], y.shape[-1])


def norm_linear(linear: nn.Module, norm: nn.Module, x: torch.Tensor, fuse: bool) -> torch.Tensor:
    """linear(norm(x)) for an RMSNorm ``norm`` (weight, eps)."""
    y = _fused(linear, x, norm.weight, norm.eps) if fuse else None
    return linear(norm(x)) if y is None else y


def fused_residual(linear: nn.Module, x: torch.Tensor, resid: torch.Tensor, fuse: bool) -> torch.Tensor | None:
    """resid + linear(x) if the fused kernel computes it, else None (the caller may defer the add)."""
    return _fused(linear, x, resid=resid, epilogue=EPI_RESIDUAL) if fuse else None


def linear_residual(linear: nn.Module, x: torch.Tensor, resid: torch.Tensor, fuse: bool) -> torch.Tensor:
    """resid + linear(x)."""
    y = fused_residual(linear, x, resid, fuse)
    return resid + linear(x) if y is None else y


def norm_silu_mul(linear: nn.Module, norm: nn.Module, x: torch.Tensor, fuse: bool) -> torch.Tensor:
    """silu(gate) * up of the gate/up projection ``linear`` of norm(x): the norm always in the kernel where it
    runs, SiLU * up too if the rows are interleaved ("all"), else after it ("norm")."""
    epilogue = EPI_SILU if getattr(linear, "gate_up_interleaved", False) else EPI_SPLITS
    y = _fused(linear, x, norm.weight, norm.eps, epilogue=epilogue) if fuse else None
    if y is None:
        return silu_mul(linear, norm(x))
    if epilogue == EPI_SILU:
        return y
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up
