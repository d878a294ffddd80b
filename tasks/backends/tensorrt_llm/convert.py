"""Hugging Face Llama checkpoint (dense, or compressed-tensors int4) -> TensorRT-LLM checkpoint.

Why our own converter: the quantize task writes GPTQ/AWQ checkpoints in compressed-tensors'
``pack-quantized`` format (llm-compressor), which TensorRT-LLM does not read; its GPTQ loaders read
AutoGPTQ tensors (``qweight``/``qzeros``/``scales``).  The conversion is a re-layout of integers plus
one multiply, so doing it directly keeps every quantized value exactly as the quantize task chose it.

Source layout (compressed-tensors 0.19 ``pack-quantized``, per Linear ``W`` of shape [N out, K in]):
- ``weight_packed`` int32 [N, K/8]: 8 values per word, element i in bits 4i..4i+3, stored as q + 8;
- ``weight_scale`` [N, K/gs]; ``weight_zero_point`` int32 [N/8, K/gs], packed the same way along dim 0;
- signed q, zp in [-8, 7]; dequantisation ``W[n, k] = (q[n, k] - zp[n, g]) * s[n, g]``, g = k // gs.
  (``compressed_tensors/compressors/pack_quantized/helpers.py``: ``pack_to_int32``/``unpack_from_int32``.)

Target layout, TensorRT-LLM ``W4A16_GPTQ`` (NVIDIA/TensorRT-LLM):
- names: ``tensorrt_llm/models/llama/convert.py`` ``load_weights_from_gptq``:
  ``transformer.vocab_embedding.weight``, ``transformer.layers.{i}.input_layernorm.weight``,
  ``.attention.qkv`` (q, k, v fused along the output dim), ``.attention.dense`` (o_proj),
  ``.post_layernorm.weight``, ``.mlp.fc`` (gate_proj), ``.mlp.gate`` (up_proj), ``.mlp.proj``
  (down_proj), ``transformer.ln_f.weight``, ``lm_head.weight``;
- per quantized linear (``tensorrt_llm/quantization/layers.py`` ``WeightOnlyGroupwiseQuantLinear``):
  ``weight`` [K, N/4] in the model dtype (int4 values packed 4 per 16 bits), ``weights_scaling_factor``
  [K/gs, N] and ``zero`` [K/gs, N] in the model dtype;
- ``tensorrt_llm/quantization/functional.py`` ``postprocess_weight_only_groupwise`` (GPTQ branch):
  signed int4 q laid out [K, N], packed two per byte along N with the even column in the low nibble
  (``q[:, 1::2] * 16 + q[:, ::2]``), then ``preprocess_weights_for_mixed_gemm(q, torch.quint4x2,
  torch.float16)`` (a GPU-architecture-specific interleave; it depends on the SM version, so the final
  step runs on the build node) viewed as the model dtype; ``zero = (-qzeros + 8 - 1) * scales`` for
  AutoGPTQ's stored ``qzeros = zp_unsigned - 1``.
- TensorRT-LLM's de-quantisation rule is therefore ``W[n, k] = q[k, n] * scale[g, n] + zero[g, n]``
  with signed q: for our signed zero point, ``zero = -zp * s``.  In exact (fp32) arithmetic this equals
  ``(q - zp) * s`` bit for bit; storing ``zero`` in fp16 rounds ``-zp * s`` once (at most half an fp16
  ulp of ``|zp * s|``), which is also what TensorRT-LLM's own GPTQ converter does.
- checkpoint ``config.json`` fields: as ModelOpt's ``convert_to_tensorrt_llm_config``
  (``modelopt/torch/export/tensorrt_llm_utils.py``) writes them for Llama.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tasks.backends.tensorrt_llm.config import QuantPlan
from tasks.models import DTYPES

#: Turns a packed int4 [K, N/2] int8 tensor into TensorRT-LLM's GEMM layout (GPU-arch specific).
WeightPreprocessor = Callable[[torch.Tensor], torch.Tensor]

_LINEAR_NAMES = {  # HF suffix -> TensorRT-LLM suffix, per decoder layer
    "self_attn.o_proj": "attention.dense",
    "mlp.gate_proj": "mlp.fc",
    "mlp.up_proj": "mlp.gate",
    "mlp.down_proj": "mlp.proj",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
CHECKPOINT_MARKER = "quantsweep_trtllm_checkpoint.json"


class CheckpointFormatError(ValueError):
    """The source checkpoint is not something this converter can represent exactly."""


# --------------------------------------------------------------------------------------------------
# int4 packing helpers (pure torch)


def unpack_int4_rows(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """compressed-tensors int32 [R, ceil(cols/8)] -> signed int8 [R, cols] (element i at bits 4i)."""
    if packed.dtype != torch.int32:
        raise CheckpointFormatError(f"expected int32 packed weights, got {packed.dtype}")
    nibbles = packed.contiguous().view(torch.uint8)  # little-endian: byte j holds elements 2j, 2j+1
    unpacked = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(packed.shape[0], -1)
    return (unpacked[:, :cols].to(torch.int16) - 8).to(torch.int8)


def pack_int4_pairs(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values int8 [R, C] -> int8 [R, C/2], column 2j in the low nibble, 2j+1 in the high.

    TensorRT-LLM's packing (``q[:, 1::2] * 16 + q[:, ::2]`` on two's-complement nibbles), before its
    architecture-specific ``preprocess_weights_for_mixed_gemm``.
    """
    if q.shape[-1] % 2:
        raise CheckpointFormatError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    u = q.to(torch.int16) & 0x0F
    return ((u[:, 1::2] << 4) | u[:, ::2]).to(torch.uint8).view(torch.int8)


def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4_pairs``: int8 [R, C/2] -> signed int8 [R, C]."""
    u = packed.view(torch.uint8).to(torch.int16)
    nib = torch.stack([u & 0x0F, u >> 4], dim=-1).reshape(packed.shape[0], -1)
    return torch.where(nib > 7, nib - 16, nib).to(torch.int8)


def dequantize_compressed_tensors(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                                  group_size: int) -> torch.Tensor:
    """compressed-tensors rule ``(q - zp) * s`` in fp32 -> W [N, K]."""
    s = scale.float().repeat_interleave(group_size, dim=1)[:, : q.shape[1]]
    zp = 0 if zero_point is None else zero_point.float().repeat_interleave(group_size, dim=1)[:, : q.shape[1]]
    return (q.float() - zp) * s


def dequantize_trtllm_int4(q_kn: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor | None,
                           group_size: int) -> torch.Tensor:
    """TensorRT-LLM's groupwise rule ``W^T[k, n] = q[k, n] * scale[k // gs, n] + zero[k // gs, n]``.

    Computed in fp32 from the stored tensors; returns W [N, K] to compare with the source model.
    """
    s = scales.float().repeat_interleave(group_size, dim=0)[: q_kn.shape[0]]
    w_t = q_kn.float() * s
    if zero is not None:
        w_t = w_t + zero.float().repeat_interleave(group_size, dim=0)[: q_kn.shape[0]]
    return w_t.t()


# --------------------------------------------------------------------------------------------------
# reading the source checkpoint


class HFCheckpoint:
    """Lazy tensor access over a HF folder's ``*.safetensors`` files (one or sharded)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config: dict[str, Any] = json.loads((self.path / "config.json").read_text())
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointFormatError(f"{self.path}: no *.safetensors files")
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    self._where[k] = f

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointFormatError(f"{self.path}: tensor {name} missing")
        with safe_open(self._where[name], "pt") as h:
            return h.get_tensor(name)

    def names(self) -> list[str]:
        return list(self._where)


@dataclass
class QuantizedLinear:
    """One int4 linear in signed form: q [N, K], scale [N, G], zero_point [N, G] (or None)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    group_size: int


def int4_scheme(hf_config: dict[str, Any]) -> dict[str, Any] | None:
    """The compressed-tensors int4 weight scheme of a checkpoint, or None if it is not quantized.

    Raises for quantized checkpoints this converter cannot represent (other formats, bit widths,
    activation quantization, activation-order group indices).
    """
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "compressed-tensors":
        raise CheckpointFormatError(f"quantization_config.quant_method={qc.get('quant_method')!r}; "
                                    "only compressed-tensors int4 checkpoints (llm-compressor) are converted")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise CheckpointFormatError(f"expected one compressed-tensors config group, got {len(groups)}")
    group = groups[0]
    fmt = group.get("format") or qc.get("format")
    w = group.get("weights") or {}
    if fmt != "pack-quantized" or w.get("num_bits") != 4 or w.get("type") != "int" or w.get("strategy") != "group":
        raise CheckpointFormatError(f"unsupported compressed-tensors scheme: format={fmt}, weights={w}")
    if group.get("input_activations"):
        raise CheckpointFormatError("activation quantization is not a weight-only int4 checkpoint")
    if w.get("actorder") not in (None, "static"):
        raise CheckpointFormatError(f"actorder={w.get('actorder')!r}: TensorRT-LLM has no g_idx support")
    return {"group_size": int(w["group_size"]), "symmetric": bool(w.get("symmetric")),
            "ignore": list(qc.get("ignore") or [])}


def read_quantized_linear(src: HFCheckpoint, prefix: str, group_size: int) -> QuantizedLinear:
    """Unpack one compressed-tensors linear (``prefix`` = HF module name)."""
    if src.has(f"{prefix}.weight_g_idx"):
        raise CheckpointFormatError(f"{prefix}: has weight_g_idx (activation-order groups)")
    n, k = (int(x) for x in src.get(f"{prefix}.weight_shape").tolist())
    q = unpack_int4_rows(src.get(f"{prefix}.weight_packed"), k)
    scale = src.get(f"{prefix}.weight_scale")
    groups = scale.shape[1]
    if groups != -(-k // group_size):
        raise CheckpointFormatError(f"{prefix}: scale has {groups} groups for K={k}, group_size={group_size}")
    zp = None
    if src.has(f"{prefix}.weight_zero_point"):
        zp_packed = src.get(f"{prefix}.weight_zero_point")
        zp = unpack_int4_rows(zp_packed.t().contiguous(), n).t().contiguous()  # packed along dim 0
    return QuantizedLinear(q[:n], scale, zp, group_size)


# --------------------------------------------------------------------------------------------------
# conversion


def to_trtllm_int4(parts: list[QuantizedLinear], dtype: torch.dtype, with_zero: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fuse linears along the output dim and lay them out as TensorRT-LLM wants, before packing.

    Returns signed int4 q [K, N] (int8), ``weights_scaling_factor`` [K/gs, N] and ``zero`` [K/gs, N]
    in ``dtype`` (``zero = -zp * s``, computed in fp32 and rounded once).
    """
    q = torch.cat([p.q for p in parts], dim=0).t().contiguous()
    scale32 = torch.cat([p.scale.float() for p in parts], dim=0)
    scales = scale32.to(dtype)
    zero = None
    if with_zero:
        zps = [p.zero_point if p.zero_point is not None else torch.zeros_like(p.scale, dtype=torch.int8)
               for p in parts]
        # the scale TensorRT-LLM multiplies by is the stored (rounded) one: build zero from it
        zero = (-torch.cat(zps, dim=0).float() * scales.float()).to(dtype).t().contiguous()
    return q, scales.t().contiguous(), zero


def _check_groupwise_dims(name: str, k: int, n: int, group_size: int) -> None:
    multiple = max(64, group_size)  # WeightOnlyGroupwiseQuantLinear pads to this; we do not pad
    if k % multiple or n % multiple:
        raise CheckpointFormatError(
            f"{name}: in={k}, out={n} are not multiples of {multiple}; TensorRT-LLM would pad this "
            "layer and the checkpoint shapes would not match")


def checkpoint_config(hf_config: dict[str, Any], plan: QuantPlan, dtype: str, logits_dtype: str = "float32"
                      ) -> dict[str, Any]:
    """TensorRT-LLM ``config.json`` for a Llama-architecture HF config."""
    archs = hf_config.get("architectures") or []
    if archs != ["LlamaForCausalLM"]:
        raise CheckpointFormatError(f"architectures={archs}: only LlamaForCausalLM is converted")
    heads = int(hf_config["num_attention_heads"])
    rope = dict(hf_config.get("rope_parameters") or {})
    rope_theta = float(rope.pop("rope_theta", hf_config.get("rope_theta", 10000.0)))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    rotary_scaling = hf_config.get("rope_scaling") or ({"type": rope_type, **rope} if rope_type != "default" else None)
    return {
        "producer": {"name": "quantsweep", "converter": "tasks.backends.tensorrt_llm.convert"},
        "architecture": "LlamaForCausalLM",
        "dtype": dtype,
        "logits_dtype": logits_dtype,
        "num_hidden_layers": int(hf_config["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(hf_config.get("num_key_value_heads") or heads),
        "hidden_size": int(hf_config["hidden_size"]),
        "intermediate_size": int(hf_config["intermediate_size"]),
        "head_size": int(hf_config.get("head_dim") or hf_config["hidden_size"] // heads),
        "vocab_size": int(hf_config["vocab_size"]),
        "max_position_embeddings": int(hf_config["max_position_embeddings"]),
        "hidden_act": hf_config.get("hidden_act", "silu"),
        "norm_epsilon": float(hf_config.get("rms_norm_eps", 1e-6)),
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rope_theta,
        "rotary_scaling": rotary_scaling,
        "attn_bias": bool(hf_config.get("attention_bias", False)),
        "mlp_bias": bool(hf_config.get("mlp_bias", False)),
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,  # lm_head is always written, tied or not
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": plan.quantization_json(),
    }


@dataclass
class ConversionReport:
    """What the converter wrote (goes into the build row's metadata)."""

    output_dir: str
    quant_algo: str | None
    weight_layout: str  # "trtllm" (GEMM-ready) or "packed" (int8 [K, N/2], not preprocessed)
    quantized_linears: int
    dense_linears: int
    scale_dtype_source: str | None
    bytes_written: int


def convert_checkpoint(src_dir: Path, out_dir: Path, plan: QuantPlan, dtype: str = "float16",
                       preprocess: WeightPreprocessor | None = None, weight_layout: str = "trtllm",
                       logits_dtype: str = "float32") -> ConversionReport:
    """Write a TensorRT-LLM checkpoint (``config.json`` + ``rank0.safetensors``) for ``src_dir``.

    ``weight_layout="trtllm"`` needs ``preprocess`` (``trtllm_weight_preprocessor`` on the build node)
    and produces the GEMM-ready ``weight`` [K, N/4] in ``dtype``.  ``"packed"`` stops before the
    architecture-specific step and stores int8 [K, N/2]; it cannot be built, but lets the layout be
    checked on any machine (tests).  Dense checkpoints ignore both.
    """
    if weight_layout not in ("trtllm", "packed"):
        raise ValueError(f"weight_layout must be 'trtllm' or 'packed', got {weight_layout!r}")
    src = HFCheckpoint(Path(src_dir))
    scheme = int4_scheme(src.config)
    if (scheme is None) != (plan.quant_algo is None):
        raise CheckpointFormatError(
            f"method {plan.method} expects {'a dense' if plan.quant_algo is None else 'an int4 compressed-tensors'}"
            f" checkpoint, {src_dir} is {'dense' if scheme is None else 'int4 compressed-tensors'}")
    if scheme is not None:
        if plan.quant_algo != "W4A16_GPTQ":
            raise CheckpointFormatError(f"{plan.quant_algo} is not produced by this converter")
        if scheme["group_size"] != plan.group_size:
            raise CheckpointFormatError(f"checkpoint group_size {scheme['group_size']} != method {plan.group_size}")
        if scheme["symmetric"] == plan.has_zero_point:
            raise CheckpointFormatError(f"checkpoint symmetric={scheme['symmetric']} but the method expects "
                                        f"has_zero_point={plan.has_zero_point}")
        if weight_layout == "trtllm" and preprocess is None:
            raise ValueError("weight_layout='trtllm' needs the TensorRT-LLM weight preprocessor")
    tdtype = DTYPES[dtype]
    cfg = checkpoint_config(src.config, plan, dtype, logits_dtype)
    weights: dict[str, torch.Tensor] = {}
    counts = {"q": 0, "d": 0}
    scale_dtype: list[str] = []

    def linear(hf_names: list[str], trt_name: str) -> None:
        if scheme is None:
            weights[f"{trt_name}.weight"] = torch.cat([src.get(f"{n}.weight") for n in hf_names], 0).to(tdtype)
            counts["d"] += 1
            return
        parts = [read_quantized_linear(src, n, scheme["group_size"]) for n in hf_names]
        scale_dtype.append(str(parts[0].scale.dtype).removeprefix("torch."))
        q_kn, scales, zero = to_trtllm_int4(parts, tdtype, plan.has_zero_point)
        _check_groupwise_dims(trt_name, q_kn.shape[0], q_kn.shape[1], scheme["group_size"])
        packed = pack_int4_pairs(q_kn)
        weights[f"{trt_name}.weight"] = packed if weight_layout == "packed" else preprocess(packed).view(tdtype)
        weights[f"{trt_name}.weights_scaling_factor"] = scales
        if zero is not None:
            weights[f"{trt_name}.zero"] = zero
        counts["q"] += 1

    for i in range(cfg["num_hidden_layers"]):
        hf, trt = f"model.layers.{i}", f"transformer.layers.{i}"
        weights[f"{trt}.input_layernorm.weight"] = src.get(f"{hf}.input_layernorm.weight").to(tdtype)
        weights[f"{trt}.post_layernorm.weight"] = src.get(f"{hf}.post_attention_layernorm.weight").to(tdtype)
        linear([f"{hf}.{n}" for n in _QKV], f"{trt}.attention.qkv")
        for hf_suffix, trt_suffix in _LINEAR_NAMES.items():
            linear([f"{hf}.{hf_suffix}"], f"{trt}.{trt_suffix}")
    embed = src.get("model.embed_tokens.weight")
    weights["transformer.vocab_embedding.weight"] = embed.to(tdtype)
    weights["transformer.ln_f.weight"] = src.get("model.norm.weight").to(tdtype)
    lm_head = src.get("lm_head.weight") if src.has("lm_head.weight") else embed  # tied embeddings
    if lm_head.dtype == torch.int32 or src.has("lm_head.weight_packed"):
        raise CheckpointFormatError("a quantized lm_head is not supported (quantize with ignore=['lm_head'])")
    weights["lm_head.weight"] = lm_head.to(tdtype)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "rank0.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    report = ConversionReport(str(out_dir), plan.quant_algo, weight_layout if scheme else "dense",
                              counts["q"], counts["d"], scale_dtype[0] if scale_dtype else None,
                              sum(v.numel() * v.element_size() for v in weights.values()))
    (out_dir / CHECKPOINT_MARKER).write_text(json.dumps(report.__dict__, indent=2))
    return report


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy tokenizer files next to the engine so ``load`` needs nothing but the engine folder."""
    names = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "generation_config.json", "config.json"]
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        if (Path(src_dir) / name).exists():
            shutil.copy2(Path(src_dir) / name, dst_dir / name)
            copied.append(name)
    return copied


def is_trtllm_checkpoint(path: Path) -> bool:
    """A folder that already is a TensorRT-LLM checkpoint (ours, ModelOpt's or TensorRT-LLM's)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists() or not (Path(path) / "rank0.safetensors").exists():
        return False
    cfg = json.loads(cfg_path.read_text())
    return "architecture" in cfg and "mapping" in cfg


def trtllm_weight_preprocessor(sm_version: int | None = None) -> WeightPreprocessor:
    """TensorRT-LLM's ``preprocess_weights_for_mixed_gemm`` for int4, for the GPU this runs on.

    Newer releases implement it in Python (``tensorrt_llm/quantization/functional.py``, with an
    explicit ``sm_`` argument); older ones only as ``torch.ops.trtllm.preprocess_weights_for_mixed_gemm``
    (which reads the SM of the current GPU).  Imported lazily: only the build node has TensorRT-LLM.
    """
    try:
        from tensorrt_llm.quantization.functional import preprocess_weights_for_mixed_gemm  # noqa: PLC0415

        def run(packed: torch.Tensor) -> torch.Tensor:
            kwargs = {"sm_": sm_version} if sm_version else {}
            return preprocess_weights_for_mixed_gemm(packed, torch.quint4x2, torch.float16, **kwargs)
        return run
    except ImportError:
        import tensorrt_llm  # noqa: F401,PLC0415 - registers torch.ops.trtllm

        def run_op(packed: torch.Tensor) -> torch.Tensor:
            return torch.ops.trtllm.preprocess_weights_for_mixed_gemm(packed.contiguous(), torch.quint4x2,
                                                                       torch.float16)
        return run_op
