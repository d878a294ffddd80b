"""The fastest a batch-1 decode step could be if its kernels did nothing but read their bytes.

Why: the int4 engine's decode step at batch 1 is far slower than its byte roofline (bytes / copy bandwidth),
and the question is how much of that gap any engine with the same *structure* would pay.  This script
replays the step's memory traffic with no arithmetic: one read-only kernel per launch of the real step
(wqkv, attention, wo, w13, SiLU, w2 per layer; final norm, lm_head, argmax and the step's bookkeeping),
each reading exactly the bytes its real kernel must read (int4 g128 weights with bf16 scales and zero
points, or bf16 weights; the KV cache of the average decode position), from buffers laid out so nothing is
served from L2.  Every kind of launch gets the read kernel's best launch config for its size.  Then:

- ``per_launch``: those launches captured in one CUDA graph, as the engine runs them;
- ``persistent``: one kernel that reads the same segments in the same order with a grid-wide barrier between
  consecutive ones (a "megakernel" whose stages wait for each other, with nothing overlapped);
- ``stream``: one kernel reading all the step's bytes with no barrier (the bandwidth floor).

If ``per_launch`` for int4 is above a third of the fp16 engine's step time, no engine that runs one kernel
per linear (whatever its GEMV kernel) can reach 3x fp16 at batch 1 on this GPU.

Writes ``step_floor.json`` and prints a table.  Usage: python bench/step_floor.py --out results/
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tasks.backends.torch.cuda.model import ModelArgs, llama2_7b_args  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import _bench_graph, copy_bandwidth  # noqa: E402  (CUDA-graph timing, copy test)

ALIGN = 256  # bytes: every segment starts on a 16-byte vector (and a DRAM burst) boundary
TINY = 8192  # bytes read by a launch that moves almost nothing (norm, argmax, position update)

SOURCE = r"""
struct __align__(16) V4 { unsigned x, y, z, w; };

__device__ __forceinline__ V4 load_stream(const V4* p) {  // read once: no L1 allocation, as the GEMVs do
    V4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Reads vectors [begin, end) with the whole grid, U loads in flight per thread; returns their xor.
template <int U>
__device__ __forceinline__ unsigned read_range(const V4* base, long long begin, long long end) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = begin + (long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned acc = 0;
    for (; i + (U - 1) * stride < end; i += U * stride) {
        V4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = load_stream(base + i + u * stride);
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < end; i += stride) {
        const V4 v = load_stream(base + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    return acc;
}

// The store depends on every load, so none can be removed; it never happens for random data in practice
// (and would be harmless if it did).
template <int U>
__global__ void read_segment(const V4* base, int n_vec, unsigned* sink) {
    const unsigned acc = read_range<U>(base, 0, n_vec);
    if (acc == 0x9E3779B9u) sink[0] = acc;
}

__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counter, 1u);
        unsigned seen, spins = 0;
        do {  // bounded: a grid that is not co-resident reports itself instead of hanging
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter));
        } while (seen < target && ++spins < (1u << 26));
        if (seen < target) counter[1] = 1;
    }
    __syncthreads();
}

// Segments [offsets[s], offsets[s + 1]) in order; with BARRIER, every block waits for the whole grid
// between two segments.  The grid must be co-resident (one wave), which the caller sizes it to be.
template <int U, bool BARRIER>
__global__ void read_segments(const V4* base, const long long* offsets, int n_segments, unsigned* counter,
                              unsigned* sink) {
    unsigned acc = 0;
    for (int s = 0; s < n_segments; ++s) {
        acc ^= read_range<U>(base, offsets[s], offsets[s + 1]);
        if (BARRIER) grid_barrier(counter, (unsigned)(s + 1) * gridDim.x);
    }
    if (acc == 0x9E3779B9u) sink[0] = acc;
}
"""


@dataclass(frozen=True)
class Segment:
    kind: str  # wqkv, attention, wo, w13, silu, w2, final_norm, lm_head, argmax, bookkeeping
    nbytes: int


def linear_bytes(k: int, n: int, weights: str, group_size: int = 128) -> int:
    """Bytes a linear's kernel must read at batch 1: int4 nibbles + bf16 scale and zero point per group."""
    if weights == "int4":
        return n * k // 2 + 2 * 2 * (k // group_size) * n
    return 2 * n * k


def step_segments(args: ModelArgs, weights: str, context: int) -> list[Segment]:
    """The launches of one batch-1 decode step of the engine (gemv_fusion=norm) and the bytes each reads.

    ``context`` is the number of cached positions attention reads (the average decode position of a
    512 + 200 run is 612).  lm_head stays bf16 for both, as in the engine.
    """
    qkv = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    kv = 2 * context * args.n_kv_heads * args.head_dim * 2
    layer = [Segment("wqkv", linear_bytes(args.dim, qkv, weights)),
             Segment("attention", kv),
             Segment("wo", linear_bytes(args.n_heads * args.head_dim, args.dim, weights)),
             Segment("w13", linear_bytes(args.dim, 2 * args.intermediate_size, weights)),
             Segment("silu", 2 * 2 * args.intermediate_size),
             Segment("w2", linear_bytes(args.intermediate_size, args.dim, weights))]
    tail = [Segment("final_norm", TINY), Segment("lm_head", 2 * args.vocab_size * args.dim),
            Segment("argmax", TINY)] + [Segment("bookkeeping", TINY)] * 3
    return layer * args.n_layers + tail


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _offsets(segments: list[Segment]) -> list[int]:
    """Byte offset of each segment in one arena (and the arena's size last)."""
    out = [0]
    for seg in segments:
        out.append(out[-1] + _aligned(seg.nbytes))
    return out


class Floor:
    """The read kernels over one arena holding a step's segments, each in its own place (the 32 layers'
    launches of one kind read 32 different buffers, so none is served from L2)."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.offsets = _offsets(segments)
        self.arena = torch.randint(-2**31, 2**31 - 1, (self.offsets[-1] // 4,), dtype=torch.int32, device="cuda")
        self.sink = torch.zeros(1, dtype=torch.int32, device="cuda")
        self.counter = torch.zeros(2, dtype=torch.int32, device="cuda")  # arrivals, timed-out flag
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count
        self._kernels: dict[str, object] = {}

    def kernel(self, name: str):
        if name not in self._kernels:
            self._kernels[name] = torch.cuda._compile_kernel(SOURCE, name, nvcc_options=["-std=c++17"])
        return self._kernels[name]

    def launch_one(self, index: int, cfg: tuple[int, int, int]) -> None:
        """Segment ``index`` with (threads per block, blocks per SM at most, loads in flight per thread)."""
        threads, per_sm, unroll = cfg
        n_vec = self.segments[index].nbytes // 16
        blocks = max(1, min(self.sms * per_sm, -(-n_vec // (threads * unroll))))
        base = self.arena[self.offsets[index] // 4:]  # a view: the launcher passes tensors as pointers
        self.kernel(f"read_segment<{unroll}>")(grid=(blocks, 1, 1), block=(threads, 1, 1),
                                                args=[base, n_vec, self.sink])

    def per_launch_ms(self, configs: dict[str, tuple[int, int, int]]) -> float:
        def step(_: int) -> None:
            for i, seg in enumerate(self.segments):
                self.launch_one(i, configs[seg.kind])
        return _bench_graph(step, copies=1, reps=1)

    def kind_us(self, kind: str, cfg: tuple[int, int, int], min_launches: int = 32) -> float:
        """µs per launch of one kind, over its launches in the step (different buffers, all cold), repeated to
        at least ``min_launches`` so that a graph replay's own fixed cost (several µs) is spread thin; a kind
        launched once per step re-reads its buffer, which only L2 could shorten (lm_head's 262 MB it cannot)."""
        idx = [i for i, s in enumerate(self.segments) if s.kind == kind]
        return 1e3 * _bench_graph(lambda j: self.launch_one(idx[j], cfg), copies=len(idx),
                                  reps=-(-min_launches // len(idx)))

    def one_kernel_ms(self, barrier: bool, cfg: tuple[int, int]) -> float:
        """All segments in one co-resident grid, in order; with ``barrier``, a grid barrier between each two."""
        threads, unroll = cfg
        per_sm = 1024 // threads  # 1024 threads per SM fit the registers of any unroll here: one wave
        offsets = torch.tensor([o // 16 for o in self.offsets], dtype=torch.int64, device="cuda")
        if not barrier:  # one segment covering the whole arena
            offsets = offsets[[0, -1]]
        kernel = self.kernel(f"read_segments<{unroll}, {'true' if barrier else 'false'}>")

        def step(_: int) -> None:
            self.counter.zero_()
            kernel(grid=(self.sms * per_sm, 1, 1), block=(threads, 1, 1),
                   args=[self.arena, offsets, offsets.numel() - 1, self.counter, self.sink])
        ms = _bench_graph(step, copies=1, reps=1)
        if self.counter[1].item():
            raise RuntimeError(f"grid barrier timed out: {self.sms * per_sm} blocks of {threads} not co-resident")
        return ms


LAUNCH_CONFIGS = [(t, b, u) for t in (128, 256, 512) for b in (1, 2, 4, 8) for u in (2, 4, 8) if t * b <= 2048]
ONE_KERNEL_CONFIGS = [(t, u) for t in (256, 512) for u in (4, 8)]


def measure(weights: str, args: ModelArgs, context: int) -> dict:
    segments = step_segments(args, weights, context)
    floor = Floor(segments)
    kinds = list(dict.fromkeys(s.kind for s in segments))  # in step order
    best: dict[str, tuple[int, int, int]] = {}
    per_kind = []
    for kind in kinds:
        timed = sorted((floor.kind_us(kind, cfg), cfg) for cfg in LAUNCH_CONFIGS)
        us, cfg = timed[0]
        best[kind] = cfg
        nbytes = next(s.nbytes for s in segments if s.kind == kind)
        count = sum(s.kind == kind for s in segments)
        per_kind.append({"kind": kind, "launches": count, "mb": nbytes / 1e6, "best_us": us,
                         "tb_s": nbytes / us / 1e6, "config": list(cfg), "us_per_step": us * count})
        print(f"  {weights} {kind:12s} x{count:3d} {nbytes / 1e6:8.2f} MB  {us:7.2f} us  "
              f"{nbytes / us / 1e6:5.2f} TB/s  threads, blocks/SM, unroll {cfg}", flush=True)
    result = {
        "weights": weights, "launches": len(segments), "step_gb": sum(s.nbytes for s in segments) / 1e9,
        "per_kind": per_kind,
        "per_launch_ms": floor.per_launch_ms(best),
        "persistent_ms": min(floor.one_kernel_ms(True, cfg) for cfg in ONE_KERNEL_CONFIGS),
        "stream_ms": min(floor.one_kernel_ms(False, cfg) for cfg in ONE_KERNEL_CONFIGS),
    }
    del floor
    torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--context", type=int, default=612, help="cached positions attention reads (512 + 200 / 2)")
    p.add_argument("--fp16-step-ms", type=float, default=None,
                   help="the fp16 engine's measured batch-1 step time, to print the 3x target against")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; copy bandwidth "
          f"{bandwidth / 1e12:.3f} TB/s.  Read-only kernels with the byte counts of a Llama-2-7B-shaped "
          f"batch-1 decode step (no weights involved: the bytes are random).", flush=True)
    results = [measure(w, llama2_7b_args(), a.context) for w in ("int4", "fp16")]
    print("\n| weights | launches | GB per step | roofline ms | per_launch ms | persistent ms | stream ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        r["roofline_ms"] = r["step_gb"] * 1e9 / bandwidth * 1e3
        print(f"| {r['weights']} | {r['launches']} | {r['step_gb']:.3f} | {r['roofline_ms']:.3f} | "
              f"{r['per_launch_ms']:.3f} | {r['persistent_ms']:.3f} | {r['stream_ms']:.3f} |")
    if a.fp16_step_ms:
        target = a.fp16_step_ms / 3
        print(f"\n3x the fp16 engine ({a.fp16_step_ms:.3f} ms per step) needs int4 at <= {target:.3f} ms; "
              f"int4 floors: per_launch {results[0]['per_launch_ms']:.3f}, persistent "
              f"{results[0]['persistent_ms']:.3f}, stream {results[0]['stream_ms']:.3f} ms")
    (a.out / "step_floor.json").write_text(json.dumps(
        {"gpu": props.name, "torch": torch.__version__, "copy_bandwidth_tb_s": bandwidth / 1e12,
         "context": a.context, "fp16_step_ms": a.fp16_step_ms, "results": results}, indent=1))


if __name__ == "__main__":
    main()
