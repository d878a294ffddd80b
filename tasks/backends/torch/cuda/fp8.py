"""FP8 W8A8 linear layers (method ``fp8``): e4m3 weights with one fp32 scale per output channel, e4m3
activations with one fp32 scale per token computed at run time, products on the FP8 tensor cores.

Why two kernels: ``torch._scaled_mm`` (cuBLASLt / CUTLASS with row-wise scales) is the fast path for
prefill and large batches, where FP8 doubles tensor-core throughput over bf16; at decode batch <= 8 a
step only streams the weights, and a GEMV of the engine's family (``fp8_gemv.cu``, compiled with NVRTC
like ``w4a16_mma.cu``) may read them faster.  ``bench/fp8_bench.py --mode sweep`` times both per shape
inside CUDA graphs and writes the shapes where the GEMV won, with its launch config, to
``fp8_configs.json``; every other shape uses ``_scaled_mm``.

Activation quantization (``a = max|x| / 448`` per token, codes ``fp8(clamp(x / a))``,
:func:`tasks.quantize.quantize_fp8_per_token` is the reference) is plain torch in :func:`quantize_tokens`,
a ``torch.compile``d function: inside the compiled decode blocks it fuses into the kernel that produces
``x`` (the RMSNorm, SiLU * up, or the residual add), in the eager prefill it is one compiled kernel.

Off CUDA, or on a GPU without FP8 (compute capability < 8.9), the layer computes the reference in fp32
(de-quantized weights times quantize-dequantized activations), which is what the CPU tests check the
loader with; the CUDA engine refuses such GPUs up front (:func:`check_device`).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tasks.backends.torch.cuda import gemv_configs, int4

SOURCE_FILE = Path(__file__).with_name("fp8_gemv.cu")
CONFIG_FILE = Path(__file__).with_name("fp8_configs.json")  # bench/fp8_bench.py --mode sweep
FP8_MAX = 448.0  # largest finite float8_e4m3fn
CHUNK = 128  # K per lane-vector pair of the GEMV (128 bytes of a weight row)
TILE = 16  # weight rows per MMA tile
MAX_M = 8  # one 8-token B operand
MIN_CAPABILITY = (8, 9)
SUPPORTED_GPUS = "Ada L4/L40/L40S (sm_89), Hopper H100/H200 (sm_90), Blackwell (sm_100/sm_120)"
FAST_ACCUM = False  # _scaled_mm's use_fast_accum: off, so cuBLASLt and the GEMV both accumulate in full fp32


def check_device(device: torch.device | str) -> None:
    """Raise a clear error on a CUDA device without FP8 tensor cores (before any weight loads)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(f"method fp8 needs FP8 tensor cores (compute capability >= 8.9); "
                           f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}. GPUs with FP8: {SUPPORTED_GPUS}")


@torch.compiler.assume_constant_result
def fp8_capable(device: torch.device) -> bool:
    """FP8 tensor cores on this CUDA device (a constant to torch.compile, not a traced call)."""
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


#: {(M bucket, N, K): (TN, B, WK, splits)}: 16-row tiles per warp, 128-deep chunks per load batch, warps per
#: block, split-K slices; only shapes where the GEMV beat _scaled_mm on the sweep's GPU
TUNED = gemv_configs.load_tuned(CONFIG_FILE)


def check_config(cfg: tuple[int, ...]) -> None:
    gemv_configs.check_config(cfg, "fp8 gemv")


def config(m: int, n: int, k: int) -> gemv_configs.GemvConfig | None:
    """The tuned GEMV launch config for this shape, or None: _scaled_mm."""
    return gemv_configs.lookup(TUNED, m, n, k, max_m=MAX_M, tile=TILE, chunk=CHUNK)


def split_k(k: int, splits: int) -> tuple[int, int]:
    """(128-deep chunks per split, splits launched)."""
    chunks = k // CHUNK
    per = -(-chunks // max(1, splits))
    return per, -(-chunks // per)


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    """NVRTC-compiled ``fp8_gemv<TN, B, WK>`` instance (the device's own architecture), cached."""
    return torch.cuda._compile_kernel(SOURCE_FILE.read_text(), name, nvcc_options=["-std=c++17"])


@functools.lru_cache(maxsize=None)
def _gemv_builds(device: torch.device) -> bool:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return False
    if not hasattr(torch.cuda, "_compile_kernel"):
        return False
    try:
        with torch.cuda.device(device):
            _kernel("fp8_gemv<1, 1, 1>")
    except Exception:  # noqa: BLE001 - any NVRTC failure: _scaled_mm serves every shape
        return False
    return True


@torch.compiler.assume_constant_result
def gemv_available(device: torch.device) -> bool:
    """Whether the GEMV runs on ``device`` (FP8 GPU, NVRTC builds it); a constant to torch.compile."""
    return _gemv_builds(device)


def gemv_split(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, cfg: tuple[int, ...]
               ) -> torch.Tensor:
    """xq [M, K] e4m3 (M <= 8), xs [M] fp32, w [N, K] e4m3, ws [N] fp32 -> scaled partials [S, M, N]
    (fp32 when S > 1, else bf16)."""
    check_config(cfg)
    m, k = xq.shape
    n = w.shape[0]
    tn, b, wk, _ = cfg
    per, splits = split_k(k, cfg[3])
    out = torch.empty(splits, m, n, dtype=torch.float32 if splits > 1 else torch.bfloat16, device=xq.device)
    _kernel(f"fp8_gemv<{tn}, {b}, {wk}>")(
        grid=(math.ceil(n / TILE / tn), splits, 1), block=(32 * wk, 1, 1),
        args=[xq, xs, w, ws, out, m, n, k, per, int(splits > 1)])
    return out


def scaled_mm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """cuBLASLt's row-wise scaled FP8 GEMM: xq [M, K] e4m3, xs [M] fp32, w [N, K] e4m3, ws [N] fp32 -> [M, N] bf16."""
    return torch._scaled_mm(xq, w.t(), scale_a=xs.reshape(-1, 1), scale_b=ws.reshape(1, -1),
                            out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)


def _gemv_config_for(xq: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int, int] | None:
    cfg = config(int(xq.shape[0]), int(w.shape[0]), int(xq.shape[1]))
    return cfg if cfg is not None and gemv_available(xq.device) else None


@torch.library.custom_op("quantsweep::fp8_mm_split", mutates_args=())
def fp8_mm_split(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """The scaled product as [S, M, N] split-K partials: the GEMV on tuned shapes, else _scaled_mm (S = 1).
    Opaque to torch.compile (the choice is made here, outside tracing); recorded by CUDA graphs."""
    cfg = _gemv_config_for(xq, w)
    if cfg is None:
        return scaled_mm(xq, xs, w, ws).unsqueeze(0)
    return gemv_split(xq, xs, w, ws, cfg)


@fp8_mm_split.register_fake
def _(xq, xs, w, ws):
    cfg = _gemv_config_for(xq, w)
    splits = 1 if cfg is None else split_k(int(xq.shape[1]), cfg[3])[1]
    return xq.new_empty(splits, xq.shape[0], w.shape[0], dtype=torch.float32 if splits > 1 else torch.bfloat16)


def _quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 codes [M, K], fp32 scales [M]); as :func:`tasks.quantize.quantize_fp8_per_token`."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (x32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


#: compiled once per shape family; inlined (and fused with the producer) inside the compiled decode blocks
quantize_tokens = torch.compile(_quantize_tokens, dynamic=None)


class Fp8Linear(nn.Module):
    """y = x @ (q * s)^T with x quantized per token on the fly.  Buffers: ``weight`` e4m3 [N, K] (row-major,
    what _scaled_mm takes transposed and the GEMV reads directly) and ``weight_scale`` fp32 [N]."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))

    def dequantized(self) -> torch.Tensor:
        """W [N, K] fp32 = q * s (exact)."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if not (x.is_cuda and fp8_capable(x.device)):
            y = reference(x2, self.weight, self.weight_scale).to(x.dtype)
        else:
            xq, xs = quantize_tokens(x2)
            y = int4.reduce_splits(torch.ops.quantsweep.fp8_mm_split(xq, xs, self.weight, self.weight_scale),
                                   x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 W8A8"


def reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """What the kernels compute, in fp32: quantize-dequantize x per token, times the de-quantized weight."""
    xq, xs = _quantize_tokens(x)
    return F.linear(xq.float() * xs[:, None], weight.float() * weight_scale.float()[:, None])


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (e4m3 [N, K], fp32 scale [N]) with llm-compressor FP8_DYNAMIC's per-channel rule
    (``s = max|W[n]| / 448``), for random-weight models and tests."""
    codes, scale = _quantize_tokens(w)  # per row of W: the same rule as per token of x
    return codes, scale


def fp8_linear_factory(device: torch.device | str | None = "meta"):
    return lambda k, n: Fp8Linear(k, n, device=device)
