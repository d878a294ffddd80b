"""Rotary position embedding as Hugging Face's Llama does it (``rotate_half``), so HF checkpoints load
without permuting q/k.  Prefill rotates q/k here; the decode-attention kernel rotates them itself from the
same tables (:mod:`.attention`), and its CPU reference calls :func:`apply_rope`.
"""
from __future__ import annotations

from typing import Any

import torch


def rope_tables(head_dim: int, theta: float, max_seq: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq, hd] in fp32 (HF's layout: the hd/2 frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, h, hd]; cos/sin [L, hd] -> rotated x, computed in fp32."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos[None, :, None] + rotated * sin[None, :, None]).to(x.dtype)
