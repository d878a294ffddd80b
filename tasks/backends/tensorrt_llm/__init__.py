"""TensorRT-LLM backend (``backend=tensorrt_llm``); see docs/tensorrt_llm.md.

Importing this package never imports ``tensorrt_llm`` or ``modelopt``: validation
(``check_available``, ``check_method_supported``) runs anywhere, the GPU work only on nodes that have them.
"""
from tasks.backends.tensorrt_llm.availability import TensorRTLLMUnavailableError, check_available, probe
from tasks.backends.tensorrt_llm.backend import EngineBuildError, TensorRTLLMBackend
from tasks.backends.tensorrt_llm.config import (TensorRTLLMOptions, UnsupportedMethodError, check_method_supported,
                                                quant_plan)

__all__ = [
    "EngineBuildError",
    "TensorRTLLMBackend",
    "TensorRTLLMOptions",
    "TensorRTLLMUnavailableError",
    "UnsupportedMethodError",
    "check_available",
    "check_method_supported",
    "probe",
    "quant_plan",
]
