"""The fast engine of the torch backend: :class:`FastEngine` and :func:`load_fast_engine`.

Speed and memory come from this engine on GPUs (static KV cache, CUDA-graph prefill and decode,
torch.compile'd blocks, W4A16 tensor-core kernels, :mod:`.int4_mma`, with the Triton kernels of :mod:`.int4`
as the fallback).  On a CPU (``backend.options.engine=fast``) the same model code runs eagerly with the
kernels' pure-PyTorch references, so every family's numerics can be checked against transformers without
a GPU.  Accuracy (lm-eval) runs through transformers on the same checkpoint: the int4 weights
de-quantize to exactly the same values there, so MMLU scores do not depend on which engine computed them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tasks.backends.base import Engine, GenerationTiming
from tasks.backends.torch.cuda.fp8 import Fp8Linear
from tasks.backends.torch.cuda.generate import Generator
from tasks.backends.torch.cuda.int4 import Int4Linear
from tasks.backends.torch.cuda.loader import int4_scheme, load_model, read_config
from tasks.backends.torch.cuda.model import DEFAULT_GEMV_FUSION, Transformer, kv_bytes_per_token
from tasks.models import DTYPES, stored_dtype


def describe_weights(model: Transformer, symmetric: bool | None = None) -> str:
    dtype = str(model.dtype).removeprefix("torch.")
    on_cuda = model.tok_embeddings.weight.is_cuda
    if any(isinstance(m, Fp8Linear) for m in model.modules()):
        kernels = ("cuBLASLt _scaled_mm, the FP8 GEMV at batch <= 8 where it measured faster" if on_cuda
                   else "the PyTorch reference: activations quantize-dequantized per token")
        return ("fp8-e4m3 W8A8 (per-channel weight scales, per-token dynamic activation scales; "
                f"{kernels}; lm_head and embeddings {dtype})")
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not int4:
        return f"dense {dtype}"
    grid = "" if symmetric is None else ("-sym" if symmetric else "-asym")
    return (f"int4-g{int4[0].group_size}{grid} (W4A16, {model.int4_kernels} kernels, {dtype} activations; "
            f"lm_head and embeddings {dtype})")


class FastEngine(Engine):
    """A loaded :class:`Transformer` on one GPU (or the CPU) plus its :class:`Generator`."""

    logits_how = ("teacher-forced decode steps: one CUDA-graph replay of the decode step's kernels per token "
                  "(for int4 the GEMV/mma kernels that generate)")

    def __init__(self, model: Transformer, device: str, checkpoint_dir: Path | None = None,
                 options: dict[str, Any] | None = None, symmetric: bool | None = None):
        options = options or {}
        self.model, self.device, self.checkpoint_dir = model, device, checkpoint_dir
        self._tokenizer: Any = None
        self.dtype = str(model.dtype).removeprefix("torch.")
        # random weights built in place have no checkpoint: they are made in the compute dtype
        self.stored_dtype = stored_dtype(checkpoint_dir) if checkpoint_dir is not None else self.dtype
        self.weight_format = describe_weights(model, symmetric)
        self.cache_shape, why = kv_cache_shape(options)
        self.kv_cache_policy = (f"static {self.dtype} KV cache sized at load to {why}; a generation of another "
                                "batch size, or longer, re-allocates it to batch x (input + output); decode "
                                "attends only over the positions written so far (flash-decoding kernel on GPUs)")
        self.generator = Generator(model, compile=bool(options.get("compile", True)),
                                   cuda_graph=bool(options.get("cuda_graph", True)))
        if self.cache_shape is not None:  # allocate, compile and capture now, not in the first timed call
            self.generator.setup(*self.cache_shape)
        self.details: dict[str, Any] = {
            "vocab_size": model.args.vocab_size,
            "weights_bytes": model.weight_bytes(),
            "kv_bytes_per_token": kv_bytes_per_token(model.args),
            "decode_reads": model.decode_reads(),
            "engine": (f"quantsweep fast engine ({model.args.family}; gpt-fast style): static KV cache, "
                       f"CUDA-graph decode step, torch.compile'd blocks={self.generator.compiled}, "
                       f"cuda_graph={self.generator.cuda_graph}, gemv_fusion={model.gemv_fusion}"
                       if device.startswith("cuda") else
                       f"quantsweep fast engine ({model.args.family}) on the CPU: the same model code, eager, "
                       f"{self.dtype}, with the kernels' PyTorch references"),
        }

    @torch.inference_mode()
    def timed_generate(self, input_ids: torch.Tensor, output_len: int) -> GenerationTiming:
        return self.generator.generate(input_ids, output_len)

    def prompt_logits(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """Logits [L, V] of each token list from the engine's decode step, token by token (teacher forcing),
        so they are those of the kernels that generate (the int4 GEMV / mma kernels): see
        :meth:`.generate.Generator.decode_logits`."""
        return [self.generator.decode_logits(torch.tensor(ids, device=self.device)) for ids in batch]

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (loaded on first use; profiling never needs it)."""
        if self._tokenizer is None:
            if self.checkpoint_dir is None:
                raise RuntimeError("this engine has random weights (no checkpoint): it has no tokenizer")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.checkpoint_dir)
        return self._tokenizer

    def lm_eval_model(self, batch_size: int) -> Any:
        """lm-eval's HFLM over a transformers model of the same checkpoint.

        For an int4 checkpoint transformers de-quantizes the compressed-tensors weights to dense bf16: the
        same ``(q - zp) * s`` values this engine's kernels use, so log-likelihoods agree up to bf16
        rounding.  Loaded lazily (a second copy of the model is only needed for accuracy runs).
        """
        if self.checkpoint_dir is None:
            raise RuntimeError("this engine has random weights (no checkpoint): nothing to evaluate")
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.checkpoint_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        hf_model = AutoModelForCausalLM.from_pretrained(self.checkpoint_dir, dtype=torch.bfloat16)
        hf_model = hf_model.to(self.device).eval()
        return HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size,
                    max_length=getattr(hf_model.config, "max_position_embeddings", 2048))

    def close(self) -> None:
        self.generator.release()
        del self.model
        torch.cuda.empty_cache()


def kv_cache_shape(options: dict[str, Any]) -> tuple[tuple[int, int] | None, str]:
    """(batch, sequence length) of the static KV cache to allocate at load, and why.

    The profile task passes ``kv_cache_batch_size``/``_input_len``/``_output_len`` (its batch), so peak
    memory is comparable across batch sizes and methods; otherwise the engine shape's ``max_batch_size``
    x ``max_seq_len``; with neither, nothing is allocated until the first generation.
    """
    b, i, o = (options.get(f"kv_cache_{k}") for k in ("batch_size", "input_len", "output_len"))
    if b and i and o is not None:
        return (int(b), int(i) + int(o)), f"batch {b} x (input {i} + output {o})"
    shape = options.get("shape") or {}
    if shape.get("max_batch_size") and shape.get("max_seq_len"):
        b, s = int(shape["max_batch_size"]), int(shape["max_seq_len"])
        return (b, s), f"engine max_batch_size {b} x max_seq_len {s}"
    return None, "batch x (input + output) of each generation"


def load_fast_engine(checkpoint_dir: Path, device: str, options: dict[str, Any]) -> Engine:
    """What :class:`~tasks.backends.torch.backend.TorchBackend` calls for the fast engine (CUDA, or the CPU
    with ``engine=fast``).

    options: ``compile`` (default True) and ``cuda_graph`` (default True) switch the two speed-ups off
    for debugging; ``gemv_fusion`` (off | norm | all, default norm: the norms and residual adds inside
    the batch <= 8 GEMV kernels, see :meth:`~.model.Transformer.fuse_decode`); ``int4_kernels`` (auto |
    mma | triton, default auto) picks the int4 kernels;
    ``kv_cache_*`` and ``shape`` size the static KV cache (:func:`kv_cache_shape`); ``cpu_dtype`` (default
    float32) is the compute dtype on a CPU (bf16 on GPUs); other keys are ignored.
    """
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    scheme = int4_scheme(read_config(checkpoint_dir))
    dtype = torch.bfloat16 if on_cuda else DTYPES[str(options.get("cpu_dtype", "float32"))]
    model = load_model(Path(checkpoint_dir), device, dtype=dtype,
                       int4_kernels=str(options.get("int4_kernels", "auto")),
                       gemv_fusion=str(options.get("gemv_fusion", DEFAULT_GEMV_FUSION)))
    return FastEngine(model, device, Path(checkpoint_dir), options,
                           symmetric=None if scheme is None else scheme["symmetric"])
