"""The quantize task: a Hugging Face Llama checkpoint -> a W4A16 group-wise int4 or an FP8 W8A8 checkpoint.

One public entry point, ``quantize(checkpoint_dir, out_dir, method, seed)``, plain Python (no Ray).
The algorithms are llm-compressor 0.14's maintained implementations (the vLLM project's successor
of AutoAWQ and AutoGPTQ), all running on CPU and on CUDA:

===========  =================================================================================
algorithm    llm-compressor recipe
===========  =================================================================================
``rtn``      ``QuantizationModifier`` alone: min/max round-to-nearest per group (no data needed,
             but the same calibration path runs so every method is timed alike)
``gptq``     ``GPTQModifier(actorder=None)``: GPTQ (Frantar et al. 2022) layer by layer with the
             Hessian of the calibration inputs; **act-order off** (llm-compressor's default is
             ``"static"``, which TensorRT-LLM's int4 kernels cannot run, so it is turned off
             explicitly and an ``options.actorder`` asking for it is refused)
``awq``      ``AWQModifier`` (smoothing: per-input-channel scales found by grid search on the
             calibration activations and folded into the previous RMSNorm / Linear) followed by
             ``QuantizationModifier`` (RTN of the smoothed weights), like AutoAWQ
``fp8``      ``QuantizationModifier(scheme="FP8_DYNAMIC")``: FP8 W8A8, e4m3 weights with one scale
             per output channel (min/max, no data needed, so no calibration runs), activations
             quantized per token at run time by whoever runs the checkpoint (see "FP8 artifact")
``none``     no quantization: a pass-through artifact (see below)
===========  =================================================================================

Grid: W4A16, asymmetric (``symmetric: false``, the default) or symmetric int4, one scale (and zero
point) per ``group_size`` consecutive input columns of each output row.  Every ``nn.Linear`` is
quantized except the modules in ``method.ignore`` (default ``["lm_head"]``; names or ``re:``
patterns as compressed-tensors matches them).  ``group_size`` must divide every quantized layer's
``in_features`` (SmolLM2-135M: 576 and 1536, so 64, not 128); this is checked on a meta-device
model before any weights load or calibration runs.

Calibration runs in ``options.calibration_dtype`` (default float32: exact on CPU, where bf16/fp16
matmuls are also slower).  Just before saving, the int4 layers' tensors are cast to ``method.dtype`` (so
``weight_scale`` is stored in it) and every unquantized tensor back to the source checkpoint's dtype,
which ``config.json`` names: float32 would double their size on disk and in every transfer.

Pass-through (``algorithm: none``): nothing is copied.  ``out_dir`` receives only
``quantsweep_quant.json`` whose ``checkpoint_dir`` points at the original folder and whose
``passthrough`` is true; consumers load that folder in ``method.dtype``.  Copying a 13 GB fp16
Llama-2-7b (or casting it) would cost minutes and disk for no information.

Artifact layout (``out_dir`` of a 4-bit method)
------------------------------------------------
``config.json`` (with ``quantization_config``: ``quant_method: compressed-tensors``,
``format: pack-quantized``, one config group ``{targets: [Linear], weights: {num_bits: 4, type: int,
symmetric, strategy: group, group_size, actorder: null}}``, ``ignore``), ``model.safetensors``
(or shards + ``model.safetensors.index.json``), ``recipe.yaml`` (the llm-compressor recipe),
``generation_config.json``, tokenizer files, and ``quantsweep_quant.json`` (written **last**: the
method config, calibration fingerprint and stats; its presence marks a complete artifact).

For every quantized Linear ``<name>`` (e.g. ``model.layers.0.self_attn.q_proj``) with weight
``W`` of shape ``[N, K]`` (out, in) and ``G = K / group_size`` groups:

- ``<name>.weight_packed``: int32 ``[N, ceil(K/8)]``, the codes ``q``, 8 per int32 along K:
  element k of a row is the nibble at bits ``4*(k%8) .. 4*(k%8)+3`` of word ``k//8``, stored
  unsigned as ``q + 8``.
- ``<name>.weight_scale``: ``method.dtype`` ``[N, G]``, the scale ``s`` of each (row, group).
- ``<name>.weight_zero_point`` (asymmetric only): int32 ``[ceil(N/8), G]``, the zero points ``z``
  packed the same way but along N (dim 0), also stored as ``z + 8``.
- ``<name>.weight_shape``: int64 ``[2]``, ``(N, K)``.

Codes and zero points are **signed int4 in [-8, 7]** once unpacked (compressed-tensors'
``unpack_from_int32`` subtracts the +8 offset).  Dequantization, with g = k // group_size::

    W[n, k] = (q[n, k] - z[n, g]) * s[n, g]        (symmetric: z = 0, no zero-point tensor)

Quantization was ``q = clamp(round(W / s) + z, -8, 7)``.  Unquantized tensors (embeddings, norms,
``lm_head`` when ignored) keep their usual names and the source checkpoint's dtype.  ``load_int4_layer`` returns
``(q, s, z)`` for one layer.  AWQ leaves no extra tensor: its smoothing scales are already folded
into the ``input_layernorm`` / ``post_attention_layernorm`` weights, ``up_proj`` and (without GQA
only) ``v_proj``, so an AWQ artifact has exactly the GPTQ layout (no ``pre_quant_scale`` downstream).

FP8 artifact (``algorithm: fp8``)
--------------------------------
Same files; ``quantization_config.format`` is ``float-quantized`` and its one config group is
FP8_DYNAMIC: ``weights {num_bits: 8, type: float, strategy: channel, symmetric: true, dynamic: false}``,
``input_activations {num_bits: 8, type: float, strategy: token, symmetric: true, dynamic: true}``.
For every quantized Linear with weight ``W`` [N, K]:

- ``<name>.weight``: ``float8_e4m3fn`` [N, K], ``q = fp8(clamp(W / s, -448, 448))`` (round to nearest e4m3)
- ``<name>.weight_scale``: **float32** [N, 1], ``s[n] = max_k |W[n, k]| / 448`` computed in the
  calibration dtype (float32 by default) and stored unrounded, so ``W[n, k] = q[n, k] * s[n]`` is the
  exact de-quantization (llm-compressor would cast it to ``method.dtype``; an fp16 scale of a small row
  would be subnormal)

At run time each token's activations ``x`` [K] are quantized the same way with their own scale
``a = max_k |x_k| / 448``, and ``y[n] = a * s[n] * sum_k fp8(x_k / a) * q[n, k]``.  ``load_fp8_layer``
returns ``(q, s)`` for one layer, :func:`dequantize_fp8` the weight.  The TensorRT-LLM backend does not
use this artifact: it quantizes fp8 itself with ModelOpt at build time (a pass-through artifact, made in
the orchestrator's quantize step).

Mapping to TensorRT-LLM's int4 weight-only group-wise checkpoint (spec for the converter)
-----------------------------------------------------------------------------------------
TensorRT-LLM's ``weight_only_groupwise_quant_matmul`` computes ``W = q * s + zero`` per group with
signed int4 ``q`` and a *float* ``zero`` (it stores "zeros times scales").  Since
``(q - z) * s = q * s + (-z * s)``, the mapping is exact, with no re-rounding:

- quant config: ``quant_algo: W4A16_GPTQ`` (used for **both** AWQ and GPTQ artifacts: the AWQ
  smoothing is folded), ``group_size: method.group_size``, ``has_zero_point: true`` (false for
  ``symmetric: true``), ``pre_quant_scale: false``, ``exclude_modules: method.ignore``.
- ``<tllm>.weight``: the signed codes transposed to ``[K, N]``, packed two per int8 with
  ``torch.ops.trtllm.pack_int8_tensor_to_packed_int4`` and then
  ``preprocess_weights_for_mixed_gemm(..., torch.quint4x2, act_dtype)`` (TensorRT-LLM's
  GPTQ loader does the same after its own ``unpack - 8``; our codes are already signed).
- ``<tllm>.weights_scaling_factor``: ``s.T`` -> ``[G, N]`` in the activation dtype (fp16).
- ``<tllm>.zero``: ``(-z * s).T`` -> ``[G, N]`` (zeros for symmetric).
  (TensorRT-LLM's GPTQ loader writes ``(-qzeros + 8 - 1) * scales`` from AutoGPTQ's unsigned,
  off-by-one ``qzeros = z + 8 - 1``; that is the same number.)
- Names (Llama): ``model.layers.i.self_attn.{q,k,v}_proj`` -> concatenated along N (q, k, v order)
  into ``transformer.layers.i.attention.qkv`` (concatenate ``q``, ``s`` and ``z`` row-wise before
  transposing; the groups run along K so they concatenate cleanly); ``o_proj`` ->
  ``attention.dense``; ``mlp.gate_proj`` -> ``mlp.fc``; ``mlp.up_proj`` -> ``mlp.gate``;
  ``mlp.down_proj`` -> ``mlp.proj``; ``input_layernorm`` -> ``input_layernorm``;
  ``post_attention_layernorm`` -> ``post_layernorm``; ``model.norm`` -> ``transformer.ln_f``;
  ``model.embed_tokens`` -> ``transformer.vocab_embedding`` (and ``lm_head`` when tied).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from tasks.calibration import calibration_fingerprint, calibration_samples
from tasks.models import DTYPES, checkpoint_dtype

#: Written last into ``out_dir``; its presence marks a complete artifact.
MARKER = "quantsweep_quant.json"
FORMAT_INT4 = "compressed-tensors/pack-quantized"
FORMAT_FP8 = "compressed-tensors/float-quantized"
FORMAT_HF = "hf"
ALGORITHMS = ("none", "rtn", "awq", "gptq", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
#: ``method.options`` keys quantize() consumes itself; the others go to the algorithm's modifier.
_OWN_OPTIONS = ("calibration_dtype",)


def quantize(checkpoint_dir: Path, out_dir: Path, method: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Quantize ``checkpoint_dir`` with ``method`` into ``out_dir``; return the artifact's metadata.

    ``method`` is the Hydra MethodConfig as a dict (name, algorithm, bits, group_size, symmetric,
    dtype, calibration {dataset, num_samples, seq_len}, ignore, options).  ``seed`` picks the
    calibration windows and seeds torch.  The returned dict is also stored as ``quantsweep_quant.json``.
    Runs with torch's current thread count: on a shared CPU host the caller should set it to the
    cores the task owns (two OpenMP threads on an oversubscribed 2-core host made GPTQ 10-100x slower).
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    spec = _normalize_method(method)
    out_dir.mkdir(parents=True, exist_ok=True)
    start, start_cpu = time.perf_counter(), time.process_time()
    if spec["algorithm"] == "none":
        result = {"checkpoint_dir": str(checkpoint_dir), "passthrough": True, "format": FORMAT_HF,
                  "bits": spec["bits"], "group_size": None, "algorithm": "none", "dtype": spec["dtype"],
                  "num_quantized_layers": 0, "checkpoint_bytes": _dir_bytes(checkpoint_dir),
                  "quantize_s": time.perf_counter() - start, "calibration": None}
        return _write_marker(out_dir, spec, result)

    if spec["algorithm"] == "fp8":
        return _quantize_fp8(checkpoint_dir, out_dir, spec, start, start_cpu)
    quantized = validate_group_size(checkpoint_dir, spec["group_size"], spec["ignore"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    samples = calibration_samples(tokenizer, spec["calibration"], seed)
    calib_dtype = DTYPES[spec["options"].get("calibration_dtype", "float32")]
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=calib_dtype)
    t_calib = time.perf_counter()
    _run_oneshot(model, tokenizer, samples, spec)
    calibrate_s = time.perf_counter() - t_calib

    _cast_for_saving(model, other=_source_dtype(checkpoint_dir, spec), quantized=DTYPES[spec["dtype"]])
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    result = {
        "checkpoint_dir": str(out_dir), "passthrough": False, "format": FORMAT_INT4,
        "bits": spec["bits"], "group_size": spec["group_size"], "algorithm": spec["algorithm"],
        "symmetric": spec["symmetric"], "dtype": spec["dtype"],
        "num_quantized_layers": _count_packed(out_dir), "expected_quantized_layers": len(quantized),
        "checkpoint_bytes": _dir_bytes(out_dir), "source_checkpoint_dir": str(checkpoint_dir),
        "quantize_s": time.perf_counter() - start, "calibrate_s": calibrate_s,
        "quantize_cpu_s": time.process_time() - start_cpu,  # all threads; wall time on a shared host varies
        "calibration": {**spec["calibration"], "num_tokens": sum(len(s) for s in samples),
                        "fingerprint": calibration_fingerprint(samples), "seed": seed},
    }
    if result["num_quantized_layers"] != len(quantized):
        raise RuntimeError(f"expected {len(quantized)} quantized layers in {out_dir}, "
                           f"found {result['num_quantized_layers']}")
    return _write_marker(out_dir, spec, result)


def _quantize_fp8(checkpoint_dir: Path, out_dir: Path, spec: dict[str, Any], start: float,
                  start_cpu: float) -> dict[str, Any]:
    """FP8_DYNAMIC through llm-compressor's data-free path; weight scales kept in float32 (module docstring)."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = quantized_linears(checkpoint_dir, spec["ignore"])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint_dir, dtype=DTYPES[spec["options"].get("calibration_dtype", "float32")])
    t_quant = time.perf_counter()
    oneshot(model=model, recipe=_recipe(spec))
    calibrate_s = time.perf_counter() - t_quant
    # The quantized linears keep the calibration-dtype weight and scale, so the compressor rounds W / s to e4m3
    # once and the stored scale is the one it divided by.
    _cast_for_saving(model, other=_source_dtype(checkpoint_dir, spec), quantized=None)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    result = {
        "checkpoint_dir": str(out_dir), "passthrough": False, "format": FORMAT_FP8, "bits": 8,
        "group_size": None, "algorithm": "fp8", "symmetric": True, "dtype": spec["dtype"],
        "scheme": "FP8_DYNAMIC (e4m3 weights, per-channel scales; per-token dynamic activations)",
        "num_quantized_layers": _count_fp8(out_dir), "expected_quantized_layers": len(quantized),
        "checkpoint_bytes": _dir_bytes(out_dir), "source_checkpoint_dir": str(checkpoint_dir),
        "quantize_s": time.perf_counter() - start, "calibrate_s": calibrate_s,
        "quantize_cpu_s": time.process_time() - start_cpu, "calibration": None,
    }
    if result["num_quantized_layers"] != len(quantized):
        raise RuntimeError(f"expected {len(quantized)} fp8 layers in {out_dir}, found {result['num_quantized_layers']}")
    return _write_marker(out_dir, spec, result)


def quantized_linears(checkpoint_dir: Path, ignore: list[str]) -> dict[str, int]:
    """{name: in_features} of the Linears a recipe with ``ignore`` quantizes, from a meta-device model."""
    from compressed_tensors.utils import match_named_modules
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = {name: int(m.in_features) for name, m in match_named_modules(model, ["Linear"], ignore)}
    if not layers:
        raise ValueError(f"no Linear layer left to quantize in {checkpoint_dir} with ignore={ignore}")
    return layers


def validate_group_size(checkpoint_dir: Path, group_size: int, ignore: list[str]) -> dict[str, int]:
    """Check that ``group_size`` divides every quantized Linear's in_features; return {name: in_features}.

    Runs on a meta-device model built from ``config.json`` (no weights read), so a bad config fails
    in a second instead of after loading and calibrating.  The error names the layer and the group
    sizes that would work (the divisors of the gcd of all quantized in_features).
    """
    layers = quantized_linears(checkpoint_dir, ignore)
    bad = {name: k for name, k in layers.items() if k % group_size}
    if bad:
        name, k = next(iter(bad.items()))
        common = math.gcd(*layers.values())
        allowed = [d for d in range(1, common + 1) if common % d == 0]
        raise ValueError(
            f"method.group_size={group_size} does not divide in_features={k} of layer {name!r} "
            f"({len(bad)} of {len(layers)} quantized layers affected); allowed group sizes for this "
            f"model are the divisors of {common}: {allowed} (int4 kernels usually take 32, 64 or 128)")
    return layers


def load_int4_layer(checkpoint_dir: Path, layer_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int4 codes, scales and zero points of one quantized Linear of an artifact.

    Returns ``(q, scale, zero_point)``: ``q`` int8 ``[N, K]`` with values in **[-8, 7]** (signed,
    compressed-tensors' convention), ``scale`` ``[N, K/group_size]`` in the stored dtype, and
    ``zero_point`` int8 ``[N, K/group_size]`` in [-8, 7] (all zeros for a symmetric artifact).
    ``dequantize_int4(q, scale, zero_point)`` gives the weight.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    checkpoint_dir = Path(checkpoint_dir)
    weights = _quant_args(checkpoint_dir)
    bits = int(weights["num_bits"])
    tensors = _read_tensors(checkpoint_dir, layer_name, ("weight_packed", "weight_scale", "weight_shape",
                                                          "weight_zero_point"))
    if "weight_packed" not in tensors:
        raise KeyError(f"{layer_name!r} is not a quantized layer of {checkpoint_dir}")
    shape = torch.Size(tensors["weight_shape"].tolist())
    scale = tensors["weight_scale"]
    q = unpack_from_int32(tensors["weight_packed"], bits, shape)
    if "weight_zero_point" in tensors:
        zp = unpack_from_int32(tensors["weight_zero_point"], bits, torch.Size((shape[0], scale.shape[1])),
                               packed_dim=0)
    else:
        zp = torch.zeros(scale.shape, dtype=torch.int8)
    return q, scale, zp


def load_fp8_layer(checkpoint_dir: Path, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The e4m3 weight ``q`` [N, K] and float32 per-channel scale ``s`` [N] of one fp8 Linear of an artifact."""
    tensors = _read_tensors(Path(checkpoint_dir), layer_name, ("weight", "weight_scale"))
    if "weight_scale" not in tensors or tensors["weight"].dtype != torch.float8_e4m3fn:
        raise KeyError(f"{layer_name!r} is not an fp8 layer of {checkpoint_dir}")
    return tensors["weight"], tensors["weight_scale"].float().reshape(-1)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W[n, k] = q[n, k] * s[n]`` in fp32 (exact: an e4m3 value times an fp32 scale, one rounding)."""
    return q.float() * scale.float().reshape(-1, 1)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 codes [..., K], float32 scales [..., 1]) with one scale per token (row):
    ``a = max|x| / 448`` (a zero row gets the smallest normal fp32, so it stays zero), codes
    ``fp8(clamp(x / a, -448, 448))``.  The reference of the engine's compiled producer kernels."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``W[n, k] = (q[n, k] - z[n, g]) * s[n, g]`` with ``g = k // group_size``, in fp32."""
    group_size = q.shape[1] // scale.shape[1]
    s = scale.float().repeat_interleave(group_size, dim=1)
    z = zero_point.float().repeat_interleave(group_size, dim=1)
    return (q.float() - z) * s


# --- internals -------------------------------------------------------------------------------------

def _normalize_method(method: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and reject contradictory method configs before any work starts."""
    spec = {
        "name": method.get("name", method.get("algorithm")),
        "algorithm": method.get("algorithm", "none"),
        "bits": int(method.get("bits", 16)),
        "group_size": int(method.get("group_size") or 128),
        "symmetric": bool(method.get("symmetric", False)),
        "dtype": method.get("dtype", "float16"),
        "calibration": dict(method.get("calibration") or {}),
        "ignore": list(method.get("ignore", ["lm_head"])),
        "options": dict(method.get("options") or {}),
    }
    spec["calibration"].setdefault("dataset", "pydoc_topics")
    spec["calibration"].setdefault("num_samples", 32)
    spec["calibration"].setdefault("seq_len", 256)
    if spec["algorithm"] not in ALGORITHMS:
        raise ValueError(f"method.algorithm must be one of {ALGORITHMS}, got {spec['algorithm']!r}")
    if spec["dtype"] not in DTYPES:
        raise ValueError(f"method.dtype must be one of {sorted(DTYPES)}, got {spec['dtype']!r}")
    if spec["algorithm"] == "none":
        if spec["bits"] != 16:
            raise ValueError(f"method.algorithm 'none' keeps the weights in {spec['dtype']}; bits must be 16")
        return spec
    if spec["algorithm"] == "fp8":
        if spec["bits"] != 8:
            raise ValueError(f"method.bits must be 8 for algorithm 'fp8' (e4m3 W8A8), got {spec['bits']}")
        extra = sorted(k for k in spec["options"] if k not in _OWN_OPTIONS)
        if extra:
            raise ValueError(f"method.options {extra} are not used by algorithm 'fp8'")
        if spec["options"].get("calibration_dtype", "float32") not in DTYPES:
            raise ValueError(f"method.options.calibration_dtype must be one of {sorted(DTYPES)}")
        return spec
    if spec["bits"] not in (2, 3, 4, 8):
        raise ValueError(f"method.bits must be 2, 3, 4 or 8 for algorithm {spec['algorithm']!r} (weight-only "
                         f"integer, W4A16 being the study's), got {spec['bits']}")
    if spec["group_size"] <= 0:
        raise ValueError(f"method.group_size must be a positive int, got {spec['group_size']}")
    if spec["options"].get("actorder") not in (None, False):
        raise ValueError("method.options.actorder must be null/false: TensorRT-LLM's int4 kernels cannot "
                         "run act-order (permuted group) GPTQ checkpoints")
    if spec["options"].get("calibration_dtype", "float32") not in DTYPES:
        raise ValueError(f"method.options.calibration_dtype must be one of {sorted(DTYPES)}")
    return spec


def _recipe(spec: dict[str, Any]) -> list[Any]:
    """The llm-compressor modifiers of one method (see the module docstring's table)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    scheme = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": spec["bits"], "type": "int", "symmetric": spec["symmetric"],
        "strategy": "group", "group_size": spec["group_size"], "actorder": None}}}
    if spec["algorithm"] == "fp8":  # llm-compressor's preset: e4m3, channel-wise weights, token-wise activations
        return [QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=spec["ignore"])]
    extra = {k: v for k, v in spec["options"].items() if k not in _OWN_OPTIONS}
    if spec["algorithm"] == "gptq":
        extra.pop("actorder", None)
        return [GPTQModifier(config_groups=scheme, ignore=spec["ignore"], actorder=None, **extra)]
    quant = QuantizationModifier(config_groups=scheme, ignore=spec["ignore"])
    if spec["algorithm"] == "awq":
        return [AWQModifier(**extra), quant]
    if extra:
        raise ValueError(f"method.options {sorted(extra)} are not used by algorithm 'rtn'")
    return [quant]


def _source_dtype(checkpoint_dir: Path, spec: dict[str, Any]) -> torch.dtype:
    """The dtype the source checkpoint stores its tensors in (``method.dtype`` where it does not say)."""
    return DTYPES.get(checkpoint_dtype(checkpoint_dir) or "", DTYPES[spec["dtype"]])


def _cast_for_saving(model: Any, other: torch.dtype, quantized: torch.dtype | None) -> None:
    """Give every tensor the dtype it is saved in: the quantized Linears' ``quantized`` (None: as calibrated),
    every other tensor ``other``, the source checkpoint's dtype, which ``config.json`` then names.

    The tensors a method leaves unquantized (embeddings, norms, ``lm_head``) keep the model's dtype:
    calibration runs in float32, which would double their size on disk and in every transfer.  On a GPU host
    llm-compressor leaves the model dispatched (compressed-tensors' offload caches: each module's tensors
    live on the CPU and are copied to the GPU for each use), where a cast (``model.to``, ``param.data =``)
    changes only the copies and the checkpoint kept the float32 of calibration; the dispatch is removed
    first, so the casts reach the tensors that are saved.
    """
    from compressed_tensors.offload import remove_dispatch

    remove_dispatch(model)
    for module in model.modules():
        target = quantized if hasattr(module, "weight_scale") else other
        for param in module.parameters(recurse=False):
            if target is not None and param.is_floating_point():
                param.data = param.data.to(target)
    model.config.dtype = other


def _run_oneshot(model: Any, tokenizer: Any, samples: list[list[int]], spec: dict[str, Any]) -> None:
    """Calibrate and quantize ``model`` in place with llm-compressor's ``oneshot``."""
    from datasets import Dataset
    from llmcompressor import oneshot

    dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    with _cpu_awq_patch(spec["algorithm"] == "awq"):
        oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=_recipe(spec),
                max_seq_length=max(len(s) for s in samples), num_calibration_samples=len(samples),
                shuffle_calibration_samples=False)


@contextlib.contextmanager
def _cpu_awq_patch(needed: bool) -> Iterator[None]:
    """Make llm-compressor 0.14's AWQ run on a CPU-only torch, only while it runs.

    ``AWQModifier._apply_smoothing`` calls ``IntermediatesCache.pin_memory``, which raises
    "Cannot access accelerator device when none is available" without an accelerator.  Pinning is
    only a host->device copy speed-up, so without an accelerator it is a no-op.  With an
    accelerator nothing is patched.
    """
    if not needed or torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def _write_marker(out_dir: Path, spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Write ``quantsweep_quant.json`` atomically (temp file + rename), as the artifact's last file.

    It holds ``{"method": <normalized method>, "result": <quantize()'s return>}``, except that a
    ``checkpoint_dir`` equal to ``out_dir`` is stored as ``"."`` so the artifact stays valid when moved.
    """
    stored = dict(result)
    if Path(result["checkpoint_dir"]).resolve() == out_dir.resolve():
        stored["checkpoint_dir"] = "."  # relative: the orchestrator renames the folder after this
    tmp = out_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"method": spec, "result": stored}, indent=2, sort_keys=True, default=str))
    os.replace(tmp, out_dir / MARKER)
    return result


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _safetensors_files(checkpoint_dir: Path) -> list[Path]:
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {checkpoint_dir}")
    return files


def _count_packed(checkpoint_dir: Path) -> int:
    from safetensors import safe_open

    count = 0
    for f in _safetensors_files(checkpoint_dir):
        with safe_open(str(f), framework="pt") as st:
            count += sum(1 for k in st.keys() if k.endswith(".weight_packed"))
    return count


def _count_fp8(checkpoint_dir: Path) -> int:
    from safetensors import safe_open

    count = 0
    for f in _safetensors_files(checkpoint_dir):
        with safe_open(str(f), framework="pt") as st:
            names = set(st.keys())
            count += sum(1 for k in names if k.endswith(".weight_scale") and k[:-6] in names
                         and st.get_slice(k[:-6]).get_dtype() == "F8_E4M3")
    return count


def _read_tensors(checkpoint_dir: Path, prefix: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    wanted = {f"{prefix}.{n}": n for n in names}
    found: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(checkpoint_dir):
        with safe_open(str(f), framework="pt") as st:
            for key in wanted.keys() & set(st.keys()):
                found[wanted[key]] = st.get_tensor(key)
    return found


def _quant_args(checkpoint_dir: Path) -> dict[str, Any]:
    """The weight quantization args of an artifact's single config group."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{checkpoint_dir} is not a compressed-tensors checkpoint")
    groups = list(qc["config_groups"].values())
    if len(groups) != 1:
        raise ValueError(f"expected one config group in {checkpoint_dir}, found {len(groups)}")
    return groups[0]["weights"]
