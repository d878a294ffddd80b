"""Rotary position embedding as Hugging Face does it (``rotate_half``), so HF checkpoints load without
permuting q/k.  Prefill rotates q/k here; the decode-attention kernel rotates them itself from the same
tables (:mod:`.attention`), and its CPU reference calls :func:`apply_rope`.

The scalings a family may declare (``rope_scaling`` in older configs, ``rope_parameters`` in those that
transformers 5 writes) only change the inverse frequencies, never the rotation, so they live in one
function, :func:`inverse_frequencies`, with transformers' arithmetic (``modeling_rope_utils``): ``default``,
``linear`` (Llama-2 long-context fine-tunes) and ``llama3`` (Llama-3.1/3.2/3.3).  Any other type is refused
by the family table (:mod:`.families`) before a weight loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Rope:
    """What the rotary tables depend on; ``factor`` etc. are read only by the types that use them."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3: the pre-training context


def inverse_frequencies(head_dim: int, rope: Rope, device: Any = None) -> torch.Tensor:
    """[hd/2] fp32 inverse frequencies of ``rope``, as transformers computes them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.type == "default":
        return inv_freq
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        # wavelengths shorter than the pre-training context / high_freq_factor are kept, those longer than
        # context / low_freq_factor divided by factor, and the band between interpolated smoothly
        context = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = context / rope.low_freq_factor, context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope type {rope.type!r} is not implemented (implemented: {', '.join(ROPE_TYPES)})")


def rope_tables(head_dim: int, rope: Rope, max_seq: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq, hd] in fp32 (HF's layout: the hd/2 frequencies repeated twice)."""
    inv_freq = inverse_frequencies(head_dim, rope, device)
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, h, hd]; cos/sin [L, hd] -> rotated x, computed in fp32."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos[None, :, None] + rotated * sin[None, :, None]).to(x.dtype)
