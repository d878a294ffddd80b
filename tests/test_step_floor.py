"""bench/step_floor.py replays a decode step's memory traffic; its byte counts must be the engine's own."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tasks.backends.torch.cuda.loader import random_model
from tasks.backends.torch.cuda.model import ModelArgs, kv_bytes_per_token

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import step_floor  # noqa: E402

ARGS = ModelArgs(vocab_size=320, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=512, head_dim=64)


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@pytest.mark.parametrize("weights, weight_format", [("int4", "int4"), ("fp16", "bfloat16")])
def test_each_launch_reads_the_bytes_the_engine_holds(weights: str, weight_format: str) -> None:
    model = random_model(ARGS, weight_format, "cpu")
    segments = step_floor.step_segments(ARGS, weights, context=100)
    linears = {"wqkv": lambda b: b.attention.wqkv, "wo": lambda b: b.attention.wo,
               "w13": lambda b: b.feed_forward.w13, "w2": lambda b: b.feed_forward.w2}
    for kind, module_of in linears.items():
        assert [s.nbytes for s in segments if s.kind == kind] == [_bytes(module_of(b)) for b in model.layers], kind
    assert [s.nbytes for s in segments if s.kind == "lm_head"] == [_bytes(model.output)]
    per_layer_kv = 100 * kv_bytes_per_token(ARGS) // ARGS.n_layers
    assert [s.nbytes for s in segments if s.kind == "attention"] == [per_layer_kv] * ARGS.n_layers
    # the engine's launches with gemv_fusion=norm: 6 per layer, then norm, lm_head, argmax and bookkeeping
    assert [s.kind for s in segments[:6]] == ["wqkv", "attention", "wo", "w13", "silu", "w2"]
    assert len(segments) == 6 * ARGS.n_layers + 6


def test_segments_are_laid_out_aligned_and_apart() -> None:
    segments = step_floor.step_segments(ARGS, "int4", context=7)
    offsets = step_floor._offsets(segments)
    assert all(o % step_floor.ALIGN == 0 for o in offsets)
    assert all(b - a >= s.nbytes for a, b, s in zip(offsets, offsets[1:], segments))
