"""AWQ and FP8 for TensorRT-LLM through NVIDIA ModelOpt, the way TensorRT-LLM's own quantize script does.

TensorRT-LLM's ``examples/quantization/quantize.py`` calls ``quantize_and_export`` in
``tensorrt_llm/quantization/quantize_by_modelopt.py``: load the HF model, pick a ModelOpt config
(``int4_awq`` -> ``mtq.INT4_AWQ_CFG`` with the AWQ block size written into the weight quantizer's
``block_sizes[-1]``; ``fp8`` -> ``mtq.FP8_DEFAULT_CFG``, plus ``FP8_KV_CFG`` for an FP8 KV cache),
run ``mtq.quantize(model, cfg, forward_loop)`` over calibration batches and write a TensorRT-LLM
checkpoint with ``modelopt.torch.export.export_tensorrt_llm_checkpoint``.  We do the same steps so
AWQ/FP8 engines are what NVIDIA's recipe produces; ModelOpt's int4 is symmetric with a per-channel
pre-quant scale (``W4A16_AWQ``, ``has_zero_point: false``, ``pre_quant_scale: true``).

ModelOpt is imported lazily: the orchestrator and the unit tests must not need it.  Its ``[hf]`` extra
pins ``transformers<5.15`` and conflicts with llm-compressor, so only the core package is used.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from tasks.backends.tensorrt_llm.config import QuantPlan

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _weight_quantizer_entries(quant_cfg: Any) -> list[dict[str, Any]]:
    """The weight-quantizer attribute dicts of a ModelOpt config (list format >= 0.4x, or dict format)."""
    if isinstance(quant_cfg, dict):  # older ModelOpt: {"*weight_quantizer": {...}, ...}
        entry = quant_cfg.get("*weight_quantizer")
        return [entry] if isinstance(entry, dict) else []
    found = []
    for entry in quant_cfg:  # ModelOpt 0.47: [{"quantizer_name": ..., "cfg": {...}}, ...]
        if entry.get("quantizer_name") == "*weight_quantizer" and isinstance(entry.get("cfg"), dict):
            found.append(entry["cfg"])
    return found


def modelopt_quant_config(mtq: ModuleType | Any, plan: QuantPlan) -> dict[str, Any]:
    """A deep copy of the ModelOpt config for ``plan``, with the AWQ group size and FP8 KV cache set.

    ``mtq`` is ``modelopt.torch.quantization`` (or anything with the same config attributes).
    """
    if plan.modelopt_config is None:
        raise ValueError(f"method {plan.method} is not quantized through ModelOpt")
    cfg = copy.deepcopy(getattr(mtq, plan.modelopt_config))
    if plan.group_size is not None:
        entries = _weight_quantizer_entries(cfg["quant_cfg"])
        if not entries:
            raise ValueError(f"{plan.modelopt_config}: no '*weight_quantizer' entry to set the group size on")
        for entry in entries:
            entry.setdefault("block_sizes", {})[-1] = plan.group_size
    if plan.kv_cache_quant_algo == "FP8":
        kv = copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
        if isinstance(cfg["quant_cfg"], dict):
            cfg["quant_cfg"].update(kv)
        else:
            cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(kv)
    return cfg


def quantize_and_export(hf_dir: Path, out_dir: Path, plan: QuantPlan, calib: Iterable[torch.Tensor],
                        dtype: str = "float16", device: str = "cuda") -> dict[str, Any]:
    """Calibrate ``hf_dir`` with ModelOpt for ``plan`` and write a TensorRT-LLM checkpoint to ``out_dir``.

    ``calib`` yields input-id batches [B, T] (the backend passes the quantize task's calibration
    windows).  Returns metadata for the row.
    """
    import modelopt.torch.quantization as mtq  # noqa: PLC0415 - optional, GPU-node only
    from modelopt.torch.export import export_tensorrt_llm_checkpoint  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch_dtype = _TORCH_DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype).to(device).eval()
    batches = [b.to(device) for b in calib]

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for b in batches:
                m(input_ids=b)

    cfg = modelopt_quant_config(mtq, plan)
    t0 = time.perf_counter()
    model = mtq.quantize(model, cfg, forward_loop)
    quantize_s = time.perf_counter() - t0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch_dtype, export_dir=out_dir,
                                       inference_tensor_parallel=1)
    return {"quantizer": "modelopt", "modelopt_config": plan.modelopt_config, "quantize_s": quantize_s,
            "calibration_batches": len(batches), "checkpoint_dir": str(out_dir)}
