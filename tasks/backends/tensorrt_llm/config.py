"""quantsweep method + engine shape + backend options -> TensorRT-LLM quantization and build arguments.

Everything here is pure data and arithmetic (no ``tensorrt_llm`` import), so it is unit-tested on CPU
and the orchestrator can validate a sweep before any GPU work.

Where the TensorRT-LLM facts come from (NVIDIA/TensorRT-LLM):
- ``quant_algo`` names and the checkpoint ``quantization`` block: ``tensorrt_llm/quantization/mode.py``
  (``QuantAlgo``) and ``tensorrt_llm/models/modeling_utils.py`` (``QuantConfig``: ``quant_algo``,
  ``kv_cache_quant_algo``, ``group_size``, ``has_zero_point``, ``pre_quant_scale``, ``exclude_modules``).
- AWQ/FP8 through ModelOpt: ``examples/quantization/quantize.py`` ->
  ``tensorrt_llm/quantization/quantize_by_modelopt.py`` (``int4_awq`` -> ``mtq.INT4_AWQ_CFG`` with the
  AWQ block size written into the weight quantizer, ``fp8`` -> ``mtq.FP8_DEFAULT_CFG``).
- Build flags: ``tensorrt_llm/commands/build.py`` (``trtllm-build``).
- Group sizes: the weight-only groupwise GEMM (``WeightOnlyGroupwiseQuantMatmul`` plugin / CUTLASS
  fpA_intB) is instantiated for group 64 and 128; ``WeightOnlyGroupwiseQuantLinear`` in
  ``tensorrt_llm/quantization/layers.py`` pads in/out features to ``max(64, group_size)``.
- FP8 needs Ada (sm89: L4, L40, L40S) or Hopper (sm90) or newer tensor cores.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tasks.backends.base import EngineShape

CheckpointRoute = Literal["convert", "modelopt"]

#: Weight-only int4 group sizes the TensorRT-LLM groupwise GEMM supports.
INT4_GROUP_SIZES = (64, 128)
FP8_MIN_CAPABILITY = (8, 9)
INT4_MIN_CAPABILITY = (7, 5)  # preprocess_weights_for_mixed_gemm asserts sm >= 75


class UnsupportedMethodError(ValueError):
    """A method this backend cannot run (at all, or on this GPU); raised during validation."""


@dataclass
class TensorRTLLMOptions:
    """Backend options (``conf/backend/tensorrt_llm.yaml`` ``options:``); the single place of defaults.

    Attributes that size the engine are deliberately separate from ``EngineShape``: the shape comes
    from the sweep (profile batch sizes and lengths); these add what evaluation needs on top of it.
    """

    dtype: str = "float16"  # activation dtype of the engine; Llama-2 checkpoints are fp16
    #: MMLU 5-shot prompts are longer than the profile's 512 input tokens (up to ~2-3k tokens), so the
    #: engine accepts this many input tokens as well (capped by the model's max_position_embeddings).
    eval_max_input_len: int = 4096
    eval_max_new_tokens: int = 32  # generative MMLU scoring needs only a few tokens
    #: Largest batched token count per engine step; None = max_batch_size * shape.max_input_len, so
    #: the profile's prefill of the whole batch runs in one step, like the torch backend's.
    max_num_tokens: int | None = None
    #: Context logits give one-pass prompt logprobs but make TensorRT-LLM allocate a
    #: [max_num_tokens, vocab] logits buffer (4.2 GB at 64 x 512 x 32000 fp32), which would distort the
    #: memory profile; without it loglikelihood uses next-token logits (one step per continuation token).
    gather_context_logits: bool = False
    logits_dtype: str = "float32"
    #: KV cache: sized to exactly batch x (input + output) tokens (rounded up to whole blocks) when the
    #: caller says the batch/lengths (kv_cache_batch_size/_input_len/_output_len); this fraction of
    #: free memory is only the upper cap TensorRT-LLM applies on top.
    kv_cache_free_gpu_memory_fraction: float = 0.9
    tokens_per_block: int = 64
    kv_cache_batch_size: int | None = None
    kv_cache_input_len: int | None = None
    kv_cache_output_len: int | None = None
    #: what the orchestrator loads the engine for ("evaluate" | "profile"); one engine serves both here.
    purpose: str | None = None
    #: "modelopt": AWQ is calibrated by NVIDIA ModelOpt from the fp16 checkpoint (TensorRT-LLM's own
    #: recipe, symmetric int4 + pre-quant scale); "checkpoint": the quantize task's compressed-tensors
    #: AWQ checkpoint (asymmetric, scales folded) is converted like GPTQ.
    awq_source: str = "modelopt"
    fp8_kv_cache: bool = False  # FP8 method only: also quantize the KV cache to FP8
    calib_size: int = 512  # ModelOpt calibration samples when the method does not say
    calib_seq_len: int = 512
    keep_checkpoint: bool = False  # keep the intermediate TensorRT-LLM checkpoint next to the engine
    build_timeout_s: int = 3600
    workers: int = 1
    extra_build_args: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> TensorRTLLMOptions:
        """Build from the backend's ``options`` mapping; unknown keys are an error (typos fail early)."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"backend=tensorrt_llm: unknown options {unknown}; known: {sorted(known)}")
        opts = cls(**options)
        if opts.awq_source not in ("modelopt", "checkpoint"):
            raise ValueError(f"backend=tensorrt_llm: awq_source must be 'modelopt' or 'checkpoint', "
                             f"got {opts.awq_source!r}")
        if opts.dtype not in ("float16", "bfloat16"):
            raise ValueError(f"backend=tensorrt_llm: dtype must be float16 or bfloat16, got {opts.dtype!r}")
        return opts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QuantPlan:
    """How one quantsweep method becomes a TensorRT-LLM checkpoint and engine."""

    method: str
    quant_algo: str | None  # TensorRT-LLM QuantAlgo name, None = no quantization
    kv_cache_quant_algo: str | None
    group_size: int | None
    has_zero_point: bool
    pre_quant_scale: bool
    exclude_modules: tuple[str, ...]
    route: CheckpointRoute  # convert a HF/compressed-tensors checkpoint, or calibrate with ModelOpt
    modelopt_config: str | None  # name of the ``modelopt.torch.quantization`` config
    min_compute_capability: tuple[int, int]

    def quantization_json(self) -> dict[str, Any]:
        """The ``quantization`` block of a TensorRT-LLM checkpoint ``config.json``."""
        block: dict[str, Any] = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo}
        if self.quant_algo is not None:
            block["exclude_modules"] = list(self.exclude_modules)
        if self.group_size is not None:
            block.update(group_size=self.group_size, has_zero_point=self.has_zero_point,
                         pre_quant_scale=self.pre_quant_scale)
        return block

    def weight_format(self) -> str:
        """Short name for result rows (``Engine.weight_format``)."""
        if self.quant_algo is None:
            return "float16"
        if self.group_size is not None:
            zp = "asym" if self.has_zero_point else "sym"
            return f"int4-g{self.group_size}-{zp} ({self.quant_algo})"
        return self.quant_algo


def method_name(method: dict[str, Any]) -> str:
    """The method's name (``name`` key, as in ``conf/method/*.yaml``), lower-case."""
    name = method.get("name") or method.get("method")
    if not name:
        raise UnsupportedMethodError(f"backend=tensorrt_llm: method config has no 'name': {method}")
    return str(name).lower()


def _check_int4(method: dict[str, Any], name: str) -> int:
    bits = int(method.get("bits", 4))
    if bits != 4:
        raise UnsupportedMethodError(f"backend=tensorrt_llm: method {name} has bits={bits}; "
                                     "only 4-bit weight-only GPTQ/AWQ are mapped")
    group_size = int(method.get("group_size", 128))
    if group_size not in INT4_GROUP_SIZES:
        raise UnsupportedMethodError(
            f"backend=tensorrt_llm: method {name} has group_size={group_size}; TensorRT-LLM's int4 "
            f"groupwise GEMM supports group sizes {INT4_GROUP_SIZES}")
    actorder = method.get("actorder")
    if actorder not in (None, False, "static", "none"):
        raise UnsupportedMethodError(
            f"backend=tensorrt_llm: method {name} uses actorder={actorder!r}; TensorRT-LLM runs GPTQ "
            "without activation-order group indices (g_idx). Use actorder null or 'static'.")
    return group_size


def method_kind(method: dict[str, Any]) -> str:
    """What the method does: its ``algorithm`` (conf/method/*.yaml), else its name."""
    kind = str(method.get("algorithm") or method_name(method)).lower()
    if kind in ("none", "fp16", "float16", "bf16", "bfloat16"):
        dtype = str(method.get("dtype") or ("bfloat16" if kind.startswith("bf") else "float16"))
        return "bf16" if dtype in ("bf16", "bfloat16") else "fp16"
    return kind


def quant_plan(method: dict[str, Any], options: TensorRTLLMOptions | None = None) -> QuantPlan:
    """Map a quantsweep method config to the TensorRT-LLM quantization recipe.

    ``algorithm: none`` (fp16/bf16): no quantization, the HF checkpoint is converted.  ``gptq`` and
    ``rtn``: the quantize task's compressed-tensors int4 checkpoint is converted to ``W4A16_GPTQ``
    (asymmetric unless ``symmetric: true``).  ``awq``: ModelOpt ``W4A16_AWQ`` (symmetric, pre-quant
    scale) or, with ``awq_source=checkpoint``, the compressed-tensors AWQ checkpoint converted like GPTQ.
    ``fp8``: ModelOpt ``FP8`` (W8A8 per-tensor e4m3), optionally with an FP8 KV cache.
    """
    options = options or TensorRTLLMOptions()
    name, kind = method_name(method), method_kind(method)
    if kind in ("fp16", "bf16"):
        return QuantPlan(name, None, None, None, False, False, (), "convert", None, (7, 0))
    if kind in ("gptq", "rtn") or (kind == "awq" and options.awq_source == "checkpoint"):
        group_size = _check_int4(method, name)
        symmetric = bool(method.get("symmetric", False))
        return QuantPlan(name, "W4A16_GPTQ", None, group_size, not symmetric, False, ("lm_head",),
                         "convert", None, INT4_MIN_CAPABILITY)
    if kind == "awq":
        group_size = _check_int4(method, name)
        return QuantPlan(name, "W4A16_AWQ", None, group_size, False, True, ("lm_head",),
                         "modelopt", "INT4_AWQ_CFG", INT4_MIN_CAPABILITY)
    if kind == "fp8":
        kv = "FP8" if options.fp8_kv_cache else None
        return QuantPlan(name, "FP8", kv, None, False, False, ("lm_head",), "modelopt", "FP8_DEFAULT_CFG",
                         FP8_MIN_CAPABILITY)
    raise UnsupportedMethodError(
        f"backend=tensorrt_llm: method {name!r} (algorithm {kind!r}) is not supported; "
        "supported algorithms: none (fp16/bf16), rtn, gptq, awq, fp8")


def check_method_supported(method: dict[str, Any], compute_capability: tuple[int, int],
                           options: TensorRTLLMOptions | None = None) -> QuantPlan:
    """Raise ``UnsupportedMethodError`` if ``method`` cannot run on a GPU of this compute capability.

    Call during validation with the capability of the target accelerator (L40/L40S = (8, 9),
    A100 = (8, 0), H100/H200 = (9, 0)); FP8 on an A100, for example, fails here with a clear message
    instead of deep inside an engine build.  Returns the plan when supported.
    """
    plan = quant_plan(method, options)
    cc = tuple(int(x) for x in compute_capability)
    if cc < plan.min_compute_capability:
        need = ".".join(map(str, plan.min_compute_capability))
        extra = (" FP8 needs Ada (L4/L40/L40S, sm89) or Hopper (H100/H200, sm90) or newer."
                 if plan.quant_algo == "FP8" or plan.kv_cache_quant_algo == "FP8" else "")
        raise UnsupportedMethodError(
            f"backend=tensorrt_llm: method {plan.method} ({plan.quant_algo}) needs compute capability "
            f">= {need}, this GPU has {cc[0]}.{cc[1]}.{extra}")
    if plan.quant_algo is None and method_kind(method) == "bf16" and cc < (8, 0):
        raise UnsupportedMethodError("backend=tensorrt_llm: bfloat16 needs compute capability >= 8.0")
    return plan


@dataclass(frozen=True)
class EngineLimits:
    """The sizes an engine is built for (``trtllm-build`` ``--max_*``)."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int


def engine_limits(shape: EngineShape, options: TensorRTLLMOptions,
                  model_max_positions: int | None = None) -> EngineLimits:
    """Engine sizes: the sweep's shape, widened so MMLU prompts (``eval_max_input_len``) also fit.

    ``max_batch_size`` is the sweep's largest batch; input/sequence limits are the larger of the
    profile's and evaluation's needs, capped by the model's context length.
    """
    cap = model_max_positions or 1 << 30
    max_input_len = min(max(shape.max_input_len, options.eval_max_input_len), cap)
    max_seq_len = min(max(shape.max_seq_len, max_input_len + options.eval_max_new_tokens), cap)
    if max_input_len >= max_seq_len:  # the cap hit both: keep room for generated tokens
        max_input_len = max_seq_len - options.eval_max_new_tokens
    max_num_tokens = options.max_num_tokens or max(shape.max_batch_size * shape.max_input_len, max_input_len)
    return EngineLimits(shape.max_batch_size, max_input_len, max_seq_len, max_num_tokens)


def trtllm_build_args(checkpoint_dir: Path, engine_dir: Path, limits: EngineLimits,
                      options: TensorRTLLMOptions) -> list[str]:
    """Arguments for ``trtllm-build`` (without the executable).

    Paged KV cache with the attention and GEMM plugins (``auto`` = the checkpoint dtype) and removed
    input padding, TensorRT-LLM's recommended setup; generation logits are always gathered (a
    [batch, vocab] buffer) so loglikelihood can read next-token logits; context logits only on request.
    """
    args = [
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(engine_dir),
        "--max_batch_size", str(limits.max_batch_size),
        "--max_input_len", str(limits.max_input_len),
        "--max_seq_len", str(limits.max_seq_len),
        "--max_num_tokens", str(limits.max_num_tokens),
        "--max_beam_width", "1",
        "--kv_cache_type", "paged",
        "--gemm_plugin", "auto",
        "--gpt_attention_plugin", "auto",
        "--remove_input_padding", "enable",
        "--context_fmha", "enable",
        "--tokens_per_block", str(options.tokens_per_block),
        "--logits_dtype", options.logits_dtype,
        "--gather_generation_logits",
        "--workers", str(options.workers),
    ]
    if options.gather_context_logits:
        args.append("--gather_context_logits")
    return args + list(options.extra_build_args)


def kv_cache_max_tokens(batch_size: int, input_len: int, output_len: int, tokens_per_block: int) -> int:
    """KV-cache tokens for ``batch_size`` sequences of ``input_len + output_len`` tokens.

    The paged cache allocates whole blocks per sequence, so each sequence is rounded up to a multiple
    of ``tokens_per_block``; this is the smallest cache that runs the batch without eviction.
    """
    per_sequence = math.ceil((input_len + output_len) / tokens_per_block) * tokens_per_block
    return batch_size * per_sequence


def runtime_kv_cache(options: TensorRTLLMOptions, engine_max_batch_size: int,
                     engine_max_seq_len: int) -> tuple[int, str]:
    """The KV-cache token budget for ``load`` and the policy sentence recorded in result rows.

    With ``kv_cache_batch_size``/``_input_len``/``_output_len`` (the profile task's batch) the cache is
    exactly batch x (input + output), so peak memory is comparable across batch sizes and methods;
    otherwise it holds ``max_batch_size`` full-length sequences.  Either way TensorRT-LLM caps it at
    ``kv_cache_free_gpu_memory_fraction`` of the memory free after loading weights.
    """
    if options.kv_cache_batch_size and options.kv_cache_input_len and options.kv_cache_output_len is not None:
        b, i, o = options.kv_cache_batch_size, options.kv_cache_input_len, options.kv_cache_output_len
        tokens = kv_cache_max_tokens(b, i, o, options.tokens_per_block)
        why = f"batch {b} x (input {i} + output {o})"
    else:
        b, i, o = engine_max_batch_size, engine_max_seq_len, 0
        tokens = kv_cache_max_tokens(b, i, o, options.tokens_per_block)
        why = f"engine max_batch_size {b} x max_seq_len {i}"
    policy = (f"TensorRT-LLM paged KV cache sized to {why} = {tokens} tokens "
              f"(blocks of {options.tokens_per_block}; max_tokens_in_paged_kv_cache), capped at "
              f"{options.kv_cache_free_gpu_memory_fraction:.2f} of free GPU memory; block reuse off")
    return tokens, policy
