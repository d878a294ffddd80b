"""Is TensorRT-LLM usable in this Python?  Answered before any GPU work, with an actionable error.

TensorRT-LLM is an optional dependency with an unusual install story: PyPI only carries ~10 kB
"wheel-stub" sdists that fetch the real multi-GB wheel from NVIDIA's own index at install time, real
wheels exist for CPython 3.10 and 3.12 only, and each release pins its own torch.  So the common
failure is "chosen on the command line, not installed on the worker", and the error must say how to
fix it, not just ``ModuleNotFoundError: tensorrt_llm``.

``check_available`` only *finds* the package by default (``importlib.util.find_spec``): importing
``tensorrt_llm`` initialises CUDA, MPI and TensorRT plugins (seconds, and it needs a GPU driver), which
the orchestrator's validation step must not do.  In a Ray cluster the driver and the GPU workers may
use different environments (TensorRT-LLM usually lives in NVIDIA's container on the workers only), so
the orchestrator should run ``probe`` inside a small Ray task with the same resources as the build
tasks, not in the driver.
"""
from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from typing import Any

INSTALL_HINT = (
    "Install it into the GPU workers' environment with\n"
    "    pip install 'quantsweep[trtllm]' --extra-index-url https://pypi.nvidia.com\n"
    "(real TensorRT-LLM wheels exist only on NVIDIA's index, for Python 3.10 and 3.12 on Linux "
    "x86_64/aarch64, and each release pins its own torch/CUDA), or run the workers in NVIDIA's NGC "
    "container nvcr.io/nvidia/tensorrt-llm/release:<version>, which ships it preinstalled. "
    "Without it, choose backend=torch. See docs/tensorrt_llm.md."
)

SUPPORTED_PYTHONS = ((3, 10), (3, 12))


class TensorRTLLMUnavailableError(ImportError):
    """``backend=tensorrt_llm`` was chosen but ``tensorrt_llm`` cannot be imported here.

    An ``ImportError`` subclass so callers that already treat missing optional packages as
    ``ImportError`` keep working, with a message that names the backend and the fix.
    """


def _message(reason: str) -> str:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    note = ""
    if (sys.version_info.major, sys.version_info.minor) not in SUPPORTED_PYTHONS:
        note = f" This Python is {py}; TensorRT-LLM publishes no wheel for it."
    return (f"backend=tensorrt_llm: {reason} (Python {platform.python_version()} at {sys.executable})."
            f"{note}\n{INSTALL_HINT}")


def check_available(import_module: bool = False) -> None:
    """Raise ``TensorRTLLMUnavailableError`` unless ``tensorrt_llm`` can be used from this Python.

    With ``import_module=False`` (validation) only the package's presence is checked, which is cheap
    and touches no GPU.  ``import_module=True`` (build/load, already on the GPU worker) also imports
    it, turning a broken install (wrong CUDA, wrong torch ABI) into the same clear error.
    """
    try:
        spec = importlib.util.find_spec("tensorrt_llm")
    except (ImportError, ValueError) as exc:  # a broken parent package or a half-installed stub
        raise TensorRTLLMUnavailableError(_message(f"looking up tensorrt_llm failed: {exc!r}")) from exc
    if spec is None:
        raise TensorRTLLMUnavailableError(_message("the tensorrt_llm package is not installed"))
    if import_module:
        try:
            importlib.import_module("tensorrt_llm")
        except Exception as exc:  # noqa: BLE001 - any failure here means "not usable", with its cause
            raise TensorRTLLMUnavailableError(
                _message(f"tensorrt_llm is installed but failed to import: {type(exc).__name__}: {exc}")
            ) from exc


def probe() -> dict[str, Any]:
    """What a worker can offer this backend: Python, tensorrt_llm version or the error, GPU capability.

    Meant to run as a tiny Ray task on a node of the target accelerator type; never raises.
    """
    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    try:
        check_available(import_module=True)
        import tensorrt_llm  # noqa: PLC0415 - imported only after the check succeeded

        info["tensorrt_llm"] = getattr(tensorrt_llm, "__version__", "unknown")
        info["error"] = None
    except TensorRTLLMUnavailableError as exc:
        info["tensorrt_llm"] = None
        info["error"] = str(exc)
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu_name"] = torch.cuda.get_device_name(0)
            info["compute_capability"] = list(torch.cuda.get_device_capability(0))
    except Exception as exc:  # noqa: BLE001 - a probe reports, it does not fail
        info["gpu_error"] = repr(exc)
    return info
