"""``backend=tensorrt_llm``: quantized checkpoint -> TensorRT-LLM checkpoint -> engine -> loaded runner.

Build (on a GPU node of the target type: the int4 weight layout and the engine are GPU-specific):
1. ``check_available`` and ``check_method_supported`` (FP8 needs sm89+), before anything heavy;
2. a TensorRT-LLM checkpoint: ``convert.convert_checkpoint`` for fp16 and for compressed-tensors
   GPTQ (and AWQ with ``awq_source=checkpoint``), ModelOpt calibration (``modelopt_quantize``) for AWQ
   and FP8; a folder that already is a TensorRT-LLM checkpoint is used as is;
3. ``trtllm-build`` as a subprocess (its log goes to ``engine_dir/build.log``; a failure raises
   ``EngineBuildError`` carrying the log's tail, which the orchestrator stores in the row's ``error``);
4. tokenizer files and ``quantsweep_engine.json`` next to the engine, so ``load`` needs only the folder.

Load sizes the paged KV cache explicitly (``config.runtime_kv_cache``): TensorRT-LLM otherwise takes
90% of free GPU memory, which makes peak memory meaningless across methods and batch sizes.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from typing import Any, ClassVar

from tasks.backends.base import Backend, EngineShape
from tasks.backends.tensorrt_llm import convert
from tasks.backends.tensorrt_llm.availability import check_available
from tasks.backends.tensorrt_llm.config import (QuantPlan, TensorRTLLMOptions, check_method_supported, engine_limits,
                                                runtime_kv_cache, trtllm_build_args)
from tasks.backends.tensorrt_llm.engine import ENGINE_META, TensorRTLLMEngine, read_engine_meta


class EngineBuildError(RuntimeError):
    """``trtllm-build`` (or checkpoint preparation) failed; the message ends with the log excerpt."""


def log_excerpt(text: str, max_lines: int = 60, max_chars: int = 6000) -> str:
    """The part of a build log worth storing: the tail, extended back to the last traceback if near."""
    lines = text.splitlines()
    start = max(0, len(lines) - max_lines)
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    if tracebacks and tracebacks[-1] < start and len(lines) - tracebacks[-1] <= 3 * max_lines:
        start = tracebacks[-1]
    return "\n".join(lines[start:])[-max_chars:]


def run_logged(cmd: list[str], log_path: Path, timeout_s: float) -> float:
    """Run ``cmd`` with stdout+stderr to ``log_path``; raise ``EngineBuildError`` with the excerpt on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout_s:.0f} s"
    if rc != 0:
        text = log_path.read_text(errors="replace")
        raise EngineBuildError(f"{Path(cmd[0]).name} failed ({rc}); log {log_path}, last lines:\n{log_excerpt(text)}")
    return time.perf_counter() - t0


def trtllm_build_executable() -> list[str]:
    """``trtllm-build`` of this Python's environment (Ray workers may not have it on PATH)."""
    local = Path(sys.executable).parent / "trtllm-build"
    if local.exists():
        return [str(local)]
    found = shutil.which("trtllm-build")
    return [found] if found else [sys.executable, "-m", "tensorrt_llm.commands.build"]


def dense_source(checkpoint_dir: Path) -> Path:
    """The fp16 checkpoint ModelOpt must calibrate from.

    ``checkpoint_dir`` itself when it is dense; for a quantize-task artifact (int4 compressed-tensors)
    the ``source_checkpoint_dir`` it records in ``quantsweep_quant.json``, so ModelOpt AWQ works behind
    the same task graph as the PyTorch backend.
    """
    cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    if not cfg.get("quantization_config"):
        return Path(checkpoint_dir)
    marker = Path(checkpoint_dir) / "quantsweep_quant.json"
    source = json.loads(marker.read_text()).get("source_checkpoint_dir") if marker.exists() else None
    if not source or not (Path(source) / "config.json").exists():
        raise EngineBuildError(
            f"{checkpoint_dir} is already quantized and names no readable fp16 source; ModelOpt AWQ/FP8 "
            "needs the fp16 checkpoint (or set backend.options.awq_source=checkpoint for AWQ)")
    return Path(source)


def _capability() -> tuple[int, int]:
    if not torch.cuda.is_available():
        raise EngineBuildError("backend=tensorrt_llm needs a CUDA GPU to build and run engines")
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def prepare_checkpoint(checkpoint_dir: Path, out_dir: Path, plan: QuantPlan, method: dict[str, Any],
                       opts: TensorRTLLMOptions, sm_version: int) -> dict[str, Any]:
    """Make (or reuse) the TensorRT-LLM checkpoint for ``plan``; returns metadata for the row."""
    if convert.is_trtllm_checkpoint(checkpoint_dir):
        return {"checkpoint_source": "trtllm", "trtllm_checkpoint": str(checkpoint_dir)}
    if plan.route == "convert":
        report = convert.convert_checkpoint(checkpoint_dir, out_dir, plan, opts.dtype,
                                            preprocess=convert.trtllm_weight_preprocessor(sm_version))
        return {"checkpoint_source": "converted", **report.__dict__}
    from transformers import AutoTokenizer  # noqa: PLC0415

    from tasks.backends.tensorrt_llm import modelopt_quantize  # noqa: PLC0415 - needs modelopt
    from tasks.calibration import calibration_samples  # noqa: PLC0415

    source = dense_source(checkpoint_dir)
    calibration = {"dataset": "pydoc_topics", "num_samples": opts.calib_size, "seq_len": opts.calib_seq_len,
                   **dict(method.get("calibration") or {})}
    samples = calibration_samples(AutoTokenizer.from_pretrained(source), calibration, seed=0)
    batches = [torch.tensor([s]) for s in samples]  # the quantize task's calibration source and sizes (seed 0)
    meta = modelopt_quantize.quantize_and_export(source, out_dir, plan, batches, opts.dtype)
    return {"checkpoint_source": "modelopt", "modelopt_source_dir": str(source), **meta}


class TensorRTLLMBackend(Backend):
    """Engines built with ``trtllm-build`` and run with TensorRT-LLM's C++ executor."""

    name: ClassVar[str] = "tensorrt_llm"

    def build(self, checkpoint_dir: Path, engine_dir: Path, shape: EngineShape, method: dict[str, Any],
              options: dict[str, Any]) -> dict[str, Any]:
        opts = TensorRTLLMOptions.from_dict(options)
        check_available(import_module=True)
        cc = _capability()
        plan = check_method_supported(method, cc, opts)
        checkpoint_dir, engine_dir = Path(checkpoint_dir), Path(engine_dir)
        engine_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir = engine_dir / "trtllm_checkpoint"
        t0 = time.perf_counter()
        try:
            prep = prepare_checkpoint(checkpoint_dir, ckpt_dir, plan, method, opts, cc[0] * 10 + cc[1])
        except Exception as exc:
            raise EngineBuildError(
                f"preparing the TensorRT-LLM checkpoint failed: {type(exc).__name__}: {exc}") from exc
        prepare_s = time.perf_counter() - t0
        trt_ckpt = Path(prep.get("trtllm_checkpoint") or ckpt_dir)
        trt_cfg = json.loads((trt_ckpt / "config.json").read_text())
        limits = engine_limits(shape, opts, trt_cfg.get("max_position_embeddings"))
        cmd = trtllm_build_executable() + trtllm_build_args(trt_ckpt, engine_dir, limits, opts)
        build_s = run_logged(cmd, engine_dir / "build.log", opts.build_timeout_s)
        tokenizer_files = convert.copy_tokenizer(checkpoint_dir, engine_dir / "tokenizer")
        if not any(f.startswith("tokenizer") for f in tokenizer_files):
            raise EngineBuildError(f"{checkpoint_dir} has no tokenizer files; save the tokenizer with the checkpoint")
        import tensorrt_llm  # noqa: PLC0415

        meta = {
            "backend": self.name, "method": plan.method, "quant_algo": plan.quant_algo,
            "quantization": plan.quantization_json(), "weight_format": plan.weight_format(),
            "dtype": opts.dtype, "limits": limits.__dict__, "gather_context_logits": opts.gather_context_logits,
            "vocab_size": int(trt_cfg["vocab_size"]), "compute_capability": list(cc),
            "num_hidden_layers": int(trt_cfg["num_hidden_layers"]),
            "num_key_value_heads": int(trt_cfg.get("num_key_value_heads") or trt_cfg["num_attention_heads"]),
            "head_size": int(trt_cfg.get("head_size") or trt_cfg["hidden_size"] // trt_cfg["num_attention_heads"]),
            "tensorrt_llm_version": getattr(tensorrt_llm, "__version__", "unknown"),
            "engine_bytes": sum(p.stat().st_size for p in engine_dir.glob("*.engine")),
            "prepare_s": prepare_s, "build_s": build_s, "build_command": cmd, **prep,
        }
        (engine_dir / ENGINE_META).write_text(json.dumps(meta, indent=2))
        if not opts.keep_checkpoint and trt_ckpt == ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        return meta

    def load(self, engine_dir: Path, device: str, options: dict[str, Any]) -> TensorRTLLMEngine:
        opts = TensorRTLLMOptions.from_dict(options)
        check_available(import_module=True)
        meta = read_engine_meta(Path(engine_dir))
        tokens, policy = runtime_kv_cache(opts, meta["limits"]["max_batch_size"], meta["limits"]["max_seq_len"])
        from tensorrt_llm.runtime import ModelRunnerCpp  # noqa: PLC0415
        from transformers import AutoTokenizer  # noqa: PLC0415

        device_index = int(device.split(":")[1]) if ":" in device else 0
        runner = ModelRunnerCpp.from_dir(
            str(engine_dir), rank=0, max_tokens_in_paged_kv_cache=tokens,
            kv_cache_free_gpu_memory_fraction=opts.kv_cache_free_gpu_memory_fraction,
            kv_cache_enable_block_reuse=False, gather_generation_logits=True, device_ids=[device_index])
        tokenizer = AutoTokenizer.from_pretrained(Path(engine_dir) / "tokenizer")
        return TensorRTLLMEngine(runner, tokenizer, f"cuda:{device_index}", meta, policy, tokens)
