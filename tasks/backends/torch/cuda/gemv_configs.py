"""Tuned launch configs of the engine's batch <= 8 GEMV kernels (the bf16 baseline's and FP8's).

Each kernel family has a JSON of ``[M bucket, N, K, (TN, B, WK, splits)]`` entries written by a bench sweep
(``bench/tune_kernels.py dense``, ``bench/fp8_bench.py --mode sweep``) for the shapes where the GEMV
beat the vendor GEMM on the sweep's GPU; a shape without an entry goes to the vendor GEMM.
"""
from __future__ import annotations

import json
from pathlib import Path

from tasks.backends.torch.cuda.int4_mma import m_bucket

GemvConfig = tuple[int, int, int, int]  # TN 16-row tiles per warp, B chunks per load batch, WK warps, splits


def load_tuned(path: Path) -> dict[tuple[int, int, int], GemvConfig]:
    """{(M bucket, N, K): config} from ``path`` (empty when the sweep never ran)."""
    if not path.exists():
        return {}
    return {(int(m), int(n), int(k)): tuple(cfg) for m, n, k, cfg in json.loads(path.read_text())["configs"]}


def check_config(cfg: tuple[int, ...], kernel: str) -> None:
    if len(cfg) != 4 or min(cfg) < 1 or cfg[2] not in (1, 2, 4, 8):
        raise ValueError(f"{kernel} config {cfg} must be (TN, B, WK, splits), all >= 1, WK in 1, 2, 4, 8")


def lookup(tuned: dict[tuple[int, int, int], GemvConfig], m: int, n: int, k: int, *, max_m: int, tile: int,
           chunk: int) -> GemvConfig | None:
    """The tuned config for an [m, k] x [k, n] product, or None (vendor GEMM): the GEMV takes at most
    ``max_m`` rows, N in whole ``tile``s and K in whole ``chunk``s; a smaller M bucket falls back to the
    largest one's entry."""
    if m > max_m or n % tile or k % chunk:
        return None
    return tuned.get((m_bucket(m), n, k)) or tuned.get((max_m, n, k))
