"""GPU identity, memory and energy from NVML (nvidia-ml-py); process RSS where there is no GPU.

Peaks are sampled by a background thread because NVML reports *current* usage: device-wide ``used``
(what nvidia-smi shows: weights, KV cache, allocator slack, CUDA context), this process's own usage,
and on CPU the process's resident set size.  The torch allocator's own peak is read separately by the
caller, since it needs no sampling.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import psutil

try:
    import pynvml  # provided by nvidia-ml-py
except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
    pynvml = None


def _nvml_ready() -> bool:
    if pynvml is None:
        return False
    try:
        pynvml.nvmlInit()
        return True
    except pynvml.NVMLError:  # NVMLError_LibraryNotFound / DriverNotLoaded on CPU machines
        return False


def nvml_handle_for(device: str) -> Any | None:
    """The NVML handle of torch device ``cuda:N`` (matched by PCI bus id, so CUDA_VISIBLE_DEVICES is honoured)."""
    if not device.startswith("cuda") or not _nvml_ready():
        return None
    import torch

    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode())


def device_info(device: str) -> dict[str, Any]:
    """name, driver version, PCI bus id and UUID of ``device``; CPU model for ``cpu``."""
    handle = nvml_handle_for(device)
    if handle is None:
        import platform

        return {"gpu_name": None, "driver_version": None, "gpu_pci_bus_id": None, "gpu_uuid": None,
                "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}

    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    pci = pynvml.nvmlDeviceGetPciInfo(handle)
    return {"gpu_name": text(pynvml.nvmlDeviceGetName(handle)),
            "driver_version": text(pynvml.nvmlSystemGetDriverVersion()),
            "gpu_pci_bus_id": text(pci.busId),
            "gpu_uuid": text(pynvml.nvmlDeviceGetUUID(handle))}


def energy_mj(device: str) -> int | None:
    """The GPU's total energy counter in millijoules (Volta and newer); None on CPU or when unsupported."""
    handle = nvml_handle_for(device)
    if handle is None:
        return None
    try:
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except pynvml.NVMLError:
        return None


@dataclass
class MemoryPeaks:
    device_used_bytes: int | None = None  # NVML device-wide used (CUDA)
    process_bytes: int | None = None  # NVML per-process (CUDA) or RSS (CPU)
    samples: int = 0
    how: str = ""


@dataclass
class MemorySampler:
    """Samples memory every ``interval_s`` between ``start()`` and ``stop()``; use as a context manager."""

    device: str
    interval_s: float = 0.005
    peaks: MemoryPeaks = field(default_factory=MemoryPeaks)

    def __post_init__(self) -> None:
        self._handle = nvml_handle_for(self.device)
        self._process = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        p = self.peaks
        if self._handle is not None:
            used = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            p.device_used_bytes = max(p.device_used_bytes or 0, used)
            try:
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                    if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                        p.process_bytes = max(p.process_bytes or 0, int(proc.usedGpuMemory))
            except pynvml.NVMLError:
                pass
        else:
            p.process_bytes = max(p.process_bytes or 0, int(self._process.memory_info().rss))
        p.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "MemorySampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.peaks.how = ("NVML device used + NVML per-process used, sampled every "
                          f"{self.interval_s * 1e3:.0f} ms" if self._handle is not None else
                          f"process RSS (psutil), sampled every {self.interval_s * 1e3:.0f} ms; no GPU")

