"""Engine backends, by name (the ``backend`` config group)."""
from __future__ import annotations

from tasks.backends.base import Backend


def get_backend(name: str) -> Backend:
    """Import lazily: TensorRT-LLM is optional and heavy."""
    if name == "torch":
        from tasks.backends.torch.backend import TorchBackend

        return TorchBackend()
    if name == "tensorrt_llm":
        from tasks.backends.tensorrt_llm.backend import TensorRTLLMBackend

        return TensorRTLLMBackend()
    raise ValueError(f"backend.name: unknown backend {name!r} (allowed: torch, tensorrt_llm)")
