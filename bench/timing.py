"""What the GPU benchmarks share: Llama-2-7B's int4 linear shapes, random int4 weights, the copy-bandwidth
test, CUDA-graph timing of a kernel over weight copies cold in L2, and the CSV + Markdown result tables.

Used by ``tune_kernels.py`` (the sweeps that write the engine's config JSONs), ``check_numerics.py``,
``e2e.py`` (the end-to-end table), ``fp8_bench.py`` and ``step_floor.py``; not a tool of its own.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tasks.backends.torch.cuda import int4  # noqa: E402
from tasks.backends.torch.cuda.model import llama2_7b_args  # noqa: E402
from tasks import roofline  # noqa: E402

GIB = 1024**3


def random_notice(shape: str = "Llama-2-7B") -> str:
    return f"*** RANDOM WEIGHTS: {shape}-shaped model, no checkpoint; outputs are meaningless ***"


RANDOM_NOTICE = random_notice()


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


def print_device(notice: str = RANDOM_NOTICE) -> None:
    """The lines every GPU run's log starts with: what the weights are, which device, which torch."""
    print(notice)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")


def add_common_options(p: argparse.ArgumentParser) -> None:
    """The options the checks, the tuning sweeps and the end-to-end run share (same defaults in each)."""
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=200)


def ints(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4] (an empty item is skipped)."""
    return [int(v) for v in text.split(",") if v]


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
