"""Which GPUs a sweep will run on, as far as the driver can tell before anything starts.

Why: FP8 (``algorithm: fp8``) needs FP8 tensor cores, compute capability 8.9 or newer, and a sweep that
only found out inside its first GPU task would already have spent the model and quantize cells.  The
driver knows the GPU from ``cluster.accelerator_type`` when it is set (Ray's accelerator names, looked up
in :data:`CAPABILITY`), and for a local cluster from the machine's own GPUs through NVML (not torch.cuda:
a CUDA context in the driver would hold GPU memory for the whole sweep and show in every profile cell's
peak).  A remote cluster without an accelerator type cannot be known here; the CUDA engine checks the
device it gets (:func:`tasks.backends.torch.cuda.fp8.check_device`).
"""
from __future__ import annotations

from typing import NamedTuple

FP8_MIN_CAPABILITY = (8, 9)
FP8_GPUS = ("Ada (sm_89): L4, L40, L40S, RTX 4090/6000 Ada", "Hopper (sm_90): H100, H200, GH200",
            "Blackwell (sm_100/sm_120): B100, B200, GB200, RTX PRO 6000")

#: Ray accelerator types (ray.util.accelerators names, as nodes advertise them) -> compute capability
CAPABILITY: dict[str, tuple[int, int]] = {
    "K80": (3, 7), "P4": (6, 1), "P40": (6, 1), "P100": (6, 0), "V100": (7, 0), "T4": (7, 5),
    "A100": (8, 0), "A100-40G": (8, 0), "A100-80G": (8, 0), "A800": (8, 0), "A30": (8, 0),
    "A10": (8, 6), "A10G": (8, 6), "A40": (8, 6), "A6000": (8, 6), "A16": (8, 6), "A2": (8, 6),
    "L4": (8, 9), "L20": (8, 9), "L40": (8, 9), "L40S": (8, 9),
    "H100": (9, 0), "H800": (9, 0), "H20": (9, 0), "H200": (9, 0), "GH200": (9, 0),
    "B100": (10, 0), "B200": (10, 0), "GB200": (10, 0), "RTX-PRO-6000": (12, 0),
}


class Gpu(NamedTuple):
    name: str
    capability: tuple[int, int] | None  # None: not known here


def accelerator_gpu(accelerator_type: str) -> Gpu:
    """The GPU a Ray ``accelerator_type`` names (capability None for a name not in :data:`CAPABILITY`)."""
    key = accelerator_type.upper().removeprefix("NVIDIA_").removeprefix("TESLA_").replace("_", "-")
    return Gpu(accelerator_type, CAPABILITY.get(key))


def local_gpus() -> list[Gpu]:
    """This machine's NVIDIA GPUs through NVML; [] without NVML or GPUs (the sweep then runs on CPU)."""
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: no GPUs
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(Gpu(name.decode() if isinstance(name, bytes) else str(name), (int(major), int(minor))))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def sweep_gpus(cluster: dict, device: str) -> tuple[list[Gpu], str]:
    """(the GPUs the sweep's GPU tasks may get, where that came from); [] when they run on CPU or the
    driver cannot know (a remote cluster without ``cluster.accelerator_type``)."""
    if device == "cpu":
        return [], "backend.device=cpu"
    if cluster.get("accelerator_type"):
        return [accelerator_gpu(cluster["accelerator_type"])], f"cluster.accelerator_type={cluster['accelerator_type']}"
    if cluster.get("address") is None:
        return local_gpus(), "this machine's GPUs (NVML)"
    return [], "a remote cluster without cluster.accelerator_type"


def lacks_fp8(gpu: Gpu) -> bool:
    """Known to lack FP8 tensor cores (an unknown capability is not refused here)."""
    return gpu.capability is not None and gpu.capability < FP8_MIN_CAPABILITY
