"""The "mma" int4 weight layout and its tensor-core kernels (``w4a16_mma.cu``), for NVIDIA GPUs.

Why a second layout: the Triton kernels of :mod:`.int4` decode one nibble per fp32 instruction chain and
run at 1.3-1.6 TB/s of int4 weights on an H200 at batch 1 (issue-bound), and their tensor-core GEMMs trail
cuBLAS bf16 at M = 64.  Here every lane loads its whole MMA fragment for a 64-deep K chunk with one 16-byte
load (a warp reads 512 contiguous bytes), turns two nibbles into two bf16 with one LOP3, and feeds the
weights to ``mma.m16n8k16`` as the A operand with the activations as B ("swap AB"), so batch 1 wastes
tensor-core lanes, not bandwidth, and batches up to 64 reuse each de-quantized fragment for up to 8 MMAs.
On Hopper a third kernel hands the same de-quantized fragments to ``wgmma.m64nNk16`` (four warps' tiles as
one 64-row A operand from registers, the activations as B from shared memory), which beats cuBLAS bf16 at
M = 64 where the mma.sync kernels trail it.  For batch <= 8 a fourth kernel (GEMV mode) folds the zero
point out of the weights (the MMA multiplies 128 + q; an all-ones MMA sums the activations; scale and zero
point are applied once per group in fp32), halving the instructions per weight byte; the H200 sweep picks
it for every M = 1 linear (48.2 vs 51.5 us per layer).  The layout and the kernels are described in
``w4a16_mma.cu``; which kernel and launch config a shape gets is :func:`config`'s answer.

The kernels are compiled at first use by NVRTC through ``torch.cuda._compile_kernel`` (torch's own
runtime-compilation entry point; no CUDA toolkit needed), once per template configuration and process.
A layer uses this layout only where :func:`supported` holds; everything else keeps the Triton layout.
The packing functions are plain torch and run on CPU, where the tests check them.
"""
from __future__ import annotations

import functools
import json
import math
import struct
from pathlib import Path

import torch

from tasks.backends.torch.cuda import fused

SOURCE_FILE = Path(__file__).with_name("w4a16_mma.cu")
CONFIG_FILE = Path(__file__).with_name("int4_mma_configs.json")  # written by bench/tune_kernels.py mma
CHUNK = 64  # K per 16-byte lane vector
TILE = 16  # weight rows per MMA tile
MAX_M = 64  # 8 activation tiles of 8 rows; larger M de-quantizes and uses cuBLAS


# ----------------------------------------------------------------------------------------------- packing

# nibble r of a word <-> (row half h, slot): row = g + 8h, k = 16t + 4kt + slot (see w4a16_mma.cu)
_H_SLOT_OF_NIBBLE = [(r & 1, 2 * ((r >> 1) & 1) + (r >> 2)) for r in range(8)]


def _shifts(device: torch.device) -> torch.Tensor:
    """[2, 4] shift of the nibble holding (row half h, slot)."""
    s = torch.zeros(2, 4, dtype=torch.int64, device=device)
    for r, (h, slot) in enumerate(_H_SLOT_OF_NIBBLE):
        s[h, slot] = 4 * r
    return s


def supported(n: int, k: int, group_size: int) -> bool:
    """Shapes the layout covers: whole 16-row tiles, whole 64-deep chunks, groups of a power-of-two number
    of chunks (the kernel finds a chunk's group with a shift)."""
    chunks = group_size // CHUNK
    return (n % TILE == 0 and k % CHUNK == 0 and group_size % CHUNK == 0 and k % group_size == 0
            and chunks & (chunks - 1) == 0)


def pack_mma(q: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values ``q`` [N, K] (0..15) -> int32 [N/16, K/64, 32, 4] (the "mma" layout)."""
    n, k = q.shape
    if n % TILE or k % CHUNK:
        raise ValueError(f"mma layout needs N % {TILE} == 0 and K % {CHUNK} == 0, got N={n}, K={k}")
    q6 = q.to(torch.int64).view(n // TILE, 2, 8, k // CHUNK, 4, 4, 4)  # (nt, h, g, c, t, kt, slot)
    q6 = q6.permute(0, 3, 2, 4, 5, 1, 6)  # (nt, c, g, t, kt, h, slot)
    words = (q6 << _shifts(q.device)).sum(dim=(-2, -1))  # disjoint bit fields: sum == or
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(n // TILE, k // CHUNK, 32, 4).contiguous()


def unpack_mma(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_mma`: int32 [N/16, K/64, 32, 4] -> uint8 [N, K]."""
    nt, nc = qweight.shape[:2]
    words = (qweight.to(torch.int64) & 0xFFFFFFFF).view(nt, nc, 8, 4, 4, 1, 1)  # (nt, c, g, t, kt, 1, 1)
    q6 = (words >> _shifts(qweight.device)) & 0xF  # (nt, c, g, t, kt, h, slot)
    q6 = q6.permute(0, 5, 2, 1, 3, 4, 6)  # (nt, h, g, c, t, kt, slot)
    return q6.reshape(nt * TILE, nc * CHUNK).to(torch.uint8).contiguous()


# ------------------------------------------------------------------------------------------- kernels


@functools.lru_cache(maxsize=None)
def _kernel(name: str, arch: str | None = None):
    """NVRTC-compiled kernel ``name`` (a template instance like ``w4a16_mma<1, 1, 4, 4>``), cached; ``arch``
    overrides the device's compute capability ("90a": the Hopper-only wgmma instructions)."""
    return torch.cuda._compile_kernel(SOURCE_FILE.read_text(), name, compute_capability=arch,
                                      nvcc_options=["-std=c++17"])


@functools.lru_cache(maxsize=None)
def _wgmma_kernel(mt: int, tn: int, u: int, stages: int, warpgroups: int, smem: int):
    """The compiled wgmma instance, allowed ``smem`` bytes of dynamic shared memory."""
    kernel = _kernel(f"w4a16_wgmma<{mt}, {tn}, {u}, {stages}, {warpgroups}>", "90a")
    if smem >= SMEM_LIMIT:  # past the static limit: dynamic shared memory needs an opt-in
        kernel.set_shared_memory_config(smem)
    return kernel


@torch.compiler.assume_constant_result
def wgmma_available(device: torch.device) -> bool:
    """Whether the Hopper wgmma kernels run on ``device`` (compute capability 9.0 and NVRTC can build them).
    torch.compile takes the answer as a constant: the check builds a kernel with NVRTC, which Dynamo would
    otherwise try to trace (a graph break in every compiled decode block that asks, at trace time)."""
    return _wgmma_builds(device)


@torch.compiler.assume_constant_result
def kernels_available(device: torch.device) -> bool:
    """``available(device)[0]``, which torch.compile takes as a constant (see :func:`wgmma_available`)."""
    return available(device)[0]


@functools.lru_cache(maxsize=None)
def _wgmma_builds(device: torch.device) -> bool:
    if not available(device)[0] or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    try:
        with torch.cuda.device(device):
            _wgmma_kernel(2, 1, 1, 3, 1, smem_bytes(16, (1, 4, 1, 3, 1, WGMMA)))
    except Exception:  # noqa: BLE001 - an NVRTC without sm_90a: the mma.sync kernels serve every M
        return False
    return True


def available(device: torch.device) -> tuple[bool, str]:
    """(whether the kernels run on ``device``, why not): a CUDA sm_80+ GPU and a working NVRTC."""
    if device.type != "cuda" or torch.version.cuda is None:
        return False, f"device {device} is not an NVIDIA CUDA device"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False, "bf16 tensor-core MMA needs compute capability 8.0 or newer"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return False, f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC); torch >= 2.8 does"
    try:
        with torch.cuda.device(device):
            _kernel("w4a16_mma_dequant")
    except Exception as err:  # noqa: BLE001 - any NVRTC/driver failure means: use the Triton kernels
        return False, f"NVRTC compilation failed: {err}"
    return True, ""


def _load_tuned() -> dict[tuple[int, int, int], tuple[int, ...]]:
    if not CONFIG_FILE.exists():
        return {}
    return {(int(m), int(n), int(k)): tuple(cfg) for m, n, k, cfg in json.loads(CONFIG_FILE.read_text())["configs"]}


#: {(M bucket, N, K): (TN, WK, U, S, splits, MODE)}; written by the GPU sweep, heuristics fill gaps
TUNED = _load_tuned()
SMEM_LIMIT = 48 * 1024  # static shared memory per block (mma.sync kernels)
WGMMA_SMEM_LIMIT = 227 * 1024  # dynamic shared memory per block on an H100/H200
SPLIT_K, SHARED_X, WGMMA, GEMV = 0, 1, 2, 3  # MODE: mma.sync, warps split K / split N sharing x in smem;
# Hopper wgmma; batch <= 8 with the zero point folded out (U = groups per batch)
GEMV_MAX_M = 8  # one 8-row activation tile
GEMV_GROUP_CHUNKS = (1, 2, 4)  # quantization groups of 64, 128 or 256 (compile-time group flush)
GEMV_SPLIT_ALIGN = 4  # GEMV splits start on multiples of 4 chunks: whole groups for every GEMV_GROUP_CHUNKS
KERNEL_NAMES = {SPLIT_K: "mma.sync", SHARED_X: "mma.sync", WGMMA: "wgmma", GEMV: "gemv"}  # by MODE


def m_bucket(m: int) -> int:
    """Tuned configs (here, in :mod:`.int4` and :mod:`.attention`) are stored per power-of-two M."""
    return 1 << max(0, (m - 1).bit_length())


def split_k(n_units: int, splits: int) -> tuple[int, int]:
    """K cut into ``n_units`` blocks and a requested split count -> (blocks per split, splits launched)."""
    per = -(-n_units // max(1, splits))
    return per, -(-n_units // per)


def m_tiles(m: int) -> int:
    return max(1, min(8, math.ceil(m / 8)))


def config(m: int, n: int, k: int, wgmma: bool = False, group_chunks: int = 2
           ) -> tuple[int, int, int, int, int, int]:
    """(TN, WK, U, S, splits, MODE) for this shape: 16-row tiles per warp, warps per block, 64-deep chunks
    per pipeline batch, pipeline stages, split-K slices, and the kernel: the mma.sync kernel whose warps
    split K and each read the activations from L2 (SPLIT_K) or split N and share them through shared
    memory (SHARED_X), the Hopper wgmma kernel (WGMMA, WK / 4 warpgroups per block; only where ``wgmma``),
    or, for M <= 8, the zero-point-folding kernel (GEMV: U quantization groups per batch, S unused; only
    for groups of ``group_chunks`` in GEMV_GROUP_CHUNKS 64-deep chunks).
    Tuned entries win; the heuristic aims at a few blocks per SM, each warp with loads in flight."""
    bucket = m_bucket(m)
    while bucket <= MAX_M and m_tiles(bucket) == m_tiles(m):  # a larger M of the same kernel instance
        cfg = TUNED.get((bucket, n, k))
        if (cfg is not None and (wgmma or cfg[5] != WGMMA)
                and (cfg[5] != GEMV or (m <= GEMV_MAX_M and group_chunks in GEMV_GROUP_CHUNKS))):
            return cfg
        bucket *= 2
    n_chunks = k // CHUNK
    if wgmma and m > 8:
        tn, stages = 2, 4
        blocks = math.ceil(n / TILE / tn / 4)
        return tn, 4, 1, stages, max(1, min(n_chunks // 4, round(132 * 2 / blocks))), WGMMA
    tn, wk, u, stages, mode = (2, 4, 1, 3, SPLIT_K) if m <= 16 else (2, 4, 1, 3, SHARED_X)
    blocks = math.ceil(n / TILE / tn / (wk if mode == SHARED_X else 1))
    splits = max(1, min(n_chunks // (wk * u), round(132 * 4 / blocks)))
    return tn, wk, u, stages, splits, mode


def _wgmma_k_step_bytes(mt: int) -> int:
    """Bytes of one 16-deep K step of activations in the wgmma kernel's shared memory (``KT`` there)."""
    return ((mt * 288 - 32 + 127) // 128) * 128 + 32


def smem_bytes(m: int, cfg: tuple[int, ...], group_chunks: int = 2) -> int:
    """Shared memory of a config: the weight/scale ring (+ activations), or the final reduction if larger."""
    tn, wk, u, stages, _, mode = cfg
    if mode == GEMV:  # U groups of weights, scales and zero points per stage; activations in registers
        return max(wk * stages * u * tn * (group_chunks * 32 * 16 + 16 * 4), (wk - 1) * tn * 128 * 4)
    ring = wk * stages * u * tn * (32 * 16 + 16 * 4)
    if mode == WGMMA:
        return ring + stages * u * 4 * _wgmma_k_step_bytes(m_tiles(m))
    ring += stages * u * m_tiles(m) * 8 * 72 * 2 if mode == SHARED_X else 0
    return max(ring, 0 if mode == SHARED_X else (wk - 1) * tn * m_tiles(m) * 128 * 4)


def check_config(m: int, cfg: tuple[int, ...], group_chunks: int = 2) -> None:
    """A config's limits, as a clear error before any launch."""
    if len(cfg) != 6 or min(cfg[:5]) < 1 or cfg[3] < 2 or cfg[5] not in (SPLIT_K, SHARED_X, WGMMA, GEMV):
        raise ValueError(f"int4 mma config {cfg} must be (TN, WK, U, S, splits, MODE), all >= 1, S >= 2, "
                         f"MODE {SPLIT_K}, {SHARED_X}, {WGMMA} or {GEMV}")
    if cfg[5] == GEMV and (m > GEMV_MAX_M or cfg[3] < 3 or group_chunks not in GEMV_GROUP_CHUNKS):
        raise ValueError(f"int4 gemv config {cfg} serves M <= {GEMV_MAX_M} (got M={m}) and groups of "
                         f"{[c * CHUNK for c in GEMV_GROUP_CHUNKS]} weights (got {group_chunks * CHUNK}), "
                         "and needs S >= 3")
    if cfg[5] == WGMMA and (cfg[1] not in (4, 8) or cfg[3] < 3):
        raise ValueError(f"int4 wgmma config {cfg} needs WK = 4 or 8 (one or two warpgroups) and S >= 3")
    limit = WGMMA_SMEM_LIMIT if cfg[5] == WGMMA else SMEM_LIMIT
    if smem_bytes(m, cfg, group_chunks) > limit:
        raise ValueError(f"int4 mma config {cfg} needs {smem_bytes(m, cfg, group_chunks)} B of shared memory "
                         f"at M={m} (limit {limit} B)")


def chunk_splits(k: int, cfg: tuple[int, ...]) -> tuple[int, int]:
    """(64-deep chunks per split, splits launched) of a config; GEMV splits hold whole groups."""
    per, splits = split_k(k // CHUNK, cfg[4])
    if cfg[5] == GEMV:
        per = -(-per // GEMV_SPLIT_ALIGN) * GEMV_SPLIT_ALIGN
        splits = -(-(k // CHUNK) // per)
    return per, splits


def output_splits(m: int, n: int, k: int, device: torch.device, group_size: int) -> int:
    if m > MAX_M:
        return 1
    return chunk_splits(k, config(m, n, k, wgmma_available(device), group_size // CHUNK))[1]


def mma_split(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              cfg: tuple[int, ...] | None = None) -> torch.Tensor:
    """x [M, K] bf16 (M <= 64) -> split-K partials [S, M, N] (fp32 when S > 1, bf16 when S == 1)."""
    m, k = x.shape
    n = qweight.shape[0] * TILE
    group_chunks = k // scales.shape[0] // CHUNK
    cfg = tuple(cfg or config(m, n, k, wgmma_available(x.device), group_chunks))
    check_config(m, cfg, group_chunks)
    tn, wk, u, stages, _, mode = cfg
    per, splits = chunk_splits(k, cfg)
    out = torch.empty(splits, m, n, dtype=torch.float32 if splits > 1 else torch.bfloat16, device=x.device)
    args = [x, qweight, scales, zeros, out, m, n, k, group_chunks.bit_length() - 1, per, int(splits > 1)]
    if mode == GEMV:
        _kernel(f"w4a16_gemv<{tn}, {u}, {wk}, {stages}, {group_chunks}, 0, 0>")(
            grid=(math.ceil(n / TILE / tn), splits, 1), block=(32 * wk, 1, 1), args=args + [x, x, 0])
        return out
    if mode == WGMMA:
        smem = smem_bytes(m, cfg)
        _wgmma_kernel(m_tiles(m), tn, u, stages, wk // 4, smem)(
            grid=(math.ceil(n / TILE / tn / wk), splits, 1), block=(32 * wk, 1, 1), args=args, shared_mem=smem)
        return out
    launch = _kernel(f"w4a16_mma<{m_tiles(m)}, {tn}, {wk}, {u}, {stages}, {'true' if mode == SHARED_X else 'false'}>")
    launch(grid=(math.ceil(n / TILE / tn / (wk if mode == SHARED_X else 1)), splits, 1), block=(32 * wk, 1, 1),
           args=args)
    return out


def fused_config(m: int, n: int, k: int, device: torch.device, group_size: int
                 ) -> tuple[int, int, int, int, int, int] | None:
    """The GEMV config of this shape if it runs in one split (what the decode-step fusions need), else None."""
    if m > GEMV_MAX_M or group_size // CHUNK not in GEMV_GROUP_CHUNKS or not supported(n, k, group_size):
        return None
    cfg = config(m, n, k, wgmma_available(device), group_size // CHUNK)
    return cfg if cfg[5] == GEMV and chunk_splits(k, cfg)[1] == 1 else None


def float_bits(value: float) -> int:
    """An fp32's bits as a C int (kernel arguments pass ints unchanged; floats would go as doubles)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def gemv_fused(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               gamma: torch.Tensor | None, resid: torch.Tensor | None, eps: float, epilogue: int) -> torch.Tensor:
    """The GEMV kernel with the decode-step fusions of ``w4a16_mma.cu``: x [M, K] bf16 (M <= 8) is first
    RMS-normalised with ``gamma`` (if given); the product is returned as bf16 [M, N] (epilogue 0), plus
    ``resid`` [M, N] (1), or as silu(gate) * up [M, N / 2] of gate/up rows interleaved by 8 (2).
    Only for shapes :func:`fused_config` accepts."""
    m, k = x.shape
    n = qweight.shape[0] * TILE
    group_chunks = k // scales.shape[0] // CHUNK
    cfg = fused_config(m, n, k, x.device, group_chunks * CHUNK)
    if cfg is None:
        raise ValueError(f"no one-split GEMV config for M={m}, N={n}, K={k}: the fused kernel does not apply")
    tn, wk, u, stages, _, _ = cfg
    out = torch.empty(m, n // 2 if epilogue == fused.EPI_SILU else n, dtype=torch.bfloat16, device=x.device)
    pro = int(gamma is not None)
    _kernel(f"w4a16_gemv<{tn}, {u}, {wk}, {stages}, {group_chunks}, {pro}, {epilogue}>")(
        grid=(math.ceil(n / TILE / tn), 1, 1), block=(32 * wk, 1, 1),
        args=[x, qweight, scales, zeros, out, m, n, k, group_chunks.bit_length() - 1, k // CHUNK, 0,
              x if gamma is None else gamma, x if resid is None else resid, float_bits(eps)])
    return out


def dequantize_mma_cuda(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """W [N, K] bf16 from the mma layout (prefill: the product then goes to cuBLAS)."""
    nt, nc = qweight.shape[:2]
    n, k = nt * TILE, nc * CHUNK
    w = torch.empty(n, k, dtype=torch.bfloat16, device=qweight.device)
    _kernel("w4a16_mma_dequant")(grid=(math.ceil(nt * nc / 4), 1, 1), block=(128, 1, 1),
                                 args=[qweight, scales, zeros, w, n, k, k // scales.shape[0]])
    return w
