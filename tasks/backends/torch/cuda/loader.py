"""Build the fast engine's model: from a Hugging Face folder of a family it implements (:mod:`.families`:
Llama, Mistral, Qwen2, Qwen3), or with random weights for benchmarks.

Checkpoints: dense safetensors (any float dtype; cast to bf16) and compressed-tensors ``pack-quantized``
int4 as llm-compressor's ``save_pretrained(save_compressed=True)`` writes them (AWQ, GPTQ, RTN alike):
``weight_packed`` int32 [N, K/8] (value i in bits 4*(i%8) of word i//8, stored as signed + 8),
``weight_scale`` [N, K/gs], optional ``weight_zero_point`` int32 [N/8, K/gs] packed the same way along
dim 0, and ``W = (q - zp) * s``.  The stored unsigned nibbles are (q + 8) and (zp + 8), so their difference
is already q - zp: they are repacked into :mod:`.int4`'s layout without touching the values.  And
compressed-tensors ``float-quantized`` FP8 (method ``fp8``, llm-compressor's FP8_DYNAMIC): ``weight``
float8_e4m3fn [N, K] and ``weight_scale`` [N, 1] per output channel, loaded as they are into
:class:`~.fp8.Fp8Linear` (activations are quantized per token at run time).  ``lm_head`` stays dense
(llm-compressor's recipes ignore it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.backends.torch.cuda import fp8
from tasks.backends.torch.cuda.int4 import Int4Linear, PACK_BLOCK, pack_int4, select_kernels
from tasks.backends.torch.cuda.families import UnsupportedModel, family_of, model_args
from tasks.backends.torch.cuda.model import DEFAULT_GEMV_FUSION, LinearFactory, ModelArgs, Transformer, dense_linear


def read_config(checkpoint_dir: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint_dir) / "config.json").read_text())


def is_fp8(config: dict[str, Any]) -> bool:
    """Whether ``config`` is a compressed-tensors FP8 W8A8 checkpoint this engine runs: e4m3 weights with
    per-channel scales and dynamic per-token activations (FP8_DYNAMIC); other float schemes are refused."""
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors" or quant.get("format") != "float-quantized":
        return False
    for group in quant.get("config_groups", {}).values():
        w, a = group.get("weights") or {}, group.get("input_activations") or {}
        if (w.get("type"), w.get("num_bits"), w.get("strategy")) != ("float", 8, "channel") or \
                (a.get("type"), a.get("num_bits"), a.get("strategy"), a.get("dynamic")) != ("float", 8, "token", True):
            raise NotImplementedError(f"float-quantized scheme weights={w} input_activations={a} is not supported "
                                      "(FP8_DYNAMIC only: channel-wise e4m3 weights, token-wise dynamic activations)")
    return True


def int4_scheme(config: dict[str, Any]) -> dict[str, Any] | None:
    """{"group_size", "symmetric"} of a compressed-tensors int4 checkpoint; None for a dense or fp8 one."""
    quant = config.get("quantization_config")
    if not quant or is_fp8(config):
        return None
    if quant.get("quant_method") != "compressed-tensors" or quant.get("format") != "pack-quantized":
        raise NotImplementedError(f"quantization_config {quant.get('quant_method')}/{quant.get('format')} "
                                  "is not supported (compressed-tensors pack-quantized only)")
    groups = list(quant.get("config_groups", {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if len({json.dumps(w, sort_keys=True) for w in weights}) != 1:
        raise NotImplementedError("checkpoints mixing several weight schemes are not supported")
    w = weights[0]
    if w.get("num_bits") != 4 or w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
        raise NotImplementedError(f"weight scheme {w} is not int4 group/channel")
    if (groups[0].get("input_activations") or None) is not None:
        raise NotImplementedError("activation quantization is not supported (W4A16 only)")
    return {"group_size": w.get("group_size"), "symmetric": bool(w.get("symmetric", True)),
            "strategy": w["strategy"]}


def unpack_nibbles(packed: torch.Tensor, length: int) -> torch.Tensor:
    """compressed-tensors int32 words [R, W] packed along dim 1 -> stored unsigned nibbles uint8 [R, length]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=packed.device, dtype=torch.int64)
    nibbles = (words[:, :, None] >> shifts) & 0xF  # [R, W, 8]: value i is word i // 8, nibble i % 8
    return nibbles.reshape(packed.shape[0], -1)[:, :length].to(torch.uint8)


def from_compressed_tensors(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                            shape: tuple[int, int], g_idx: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's compressed-tensors tensors -> (q uint8 [N, K] 0..15, scales [G, N], zeros [G, N]).

    ``zeros`` are integer zero points in the same unsigned domain as ``q`` (8 for symmetric weights).
    """
    n, k = shape
    q = unpack_nibbles(packed, k)  # [N, K]
    groups = scale.shape[1]
    if g_idx is not None:
        expected = torch.arange(k, device=g_idx.device) // (k // groups)
        if not torch.equal(g_idx.to(expected.dtype), expected):
            raise NotImplementedError("activation-ordered groups (weight_g_idx) are not supported by the int4 kernel")
    if zero_point is None:
        zeros = torch.full((groups, n), 8.0, dtype=torch.bfloat16, device=packed.device)
    else:
        zeros = unpack_nibbles(zero_point.t().contiguous(), n).to(torch.bfloat16)  # [G, N]
    return q, scale.t().to(torch.bfloat16).contiguous(), zeros.contiguous()


def int4_linear_factory(group_size: int) -> LinearFactory:
    return lambda k, n: Int4Linear(k, n, group_size if group_size else k, device="meta")


class _Tensors:
    """All tensors of a safetensors checkpoint folder, read lazily by name."""

    def __init__(self, checkpoint_dir: Path):
        from safetensors import safe_open

        self.files = {}
        self.read: set[str] = set()  # names handed out so far (see unread)
        for f in sorted(Path(checkpoint_dir).glob("*.safetensors")):
            handle = safe_open(str(f), framework="pt", device="cpu")
            for name in handle.keys():
                self.files[name] = handle
        if not self.files:
            raise FileNotFoundError(f"no *.safetensors in {checkpoint_dir}")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, device: Any) -> torch.Tensor:
        self.read.add(name)
        return self.files[name].get_tensor(name).to(device)

    def unread(self, ignorable: tuple[str, ...] = ()) -> list[str]:
        """Tensors never read: each is a part of the model the engine would silently leave out."""
        return sorted(n for n in set(self.files) - self.read if not n.endswith(ignorable))


def load_model(checkpoint_dir: Path, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
               int4_kernels: str = "auto", gemv_fusion: str = DEFAULT_GEMV_FUSION) -> Transformer:
    """A :class:`Transformer` on ``device`` from a HF folder of a family in :mod:`.families` (dense,
    compressed-tensors int4 or FP8); any other architecture or feature raises
    :class:`~.families.UnsupportedModel` before a tensor is read, and so does a checkpoint tensor the engine
    has no place for, once the rest is read.

    ``int4_kernels`` picks the int4 kernels on CUDA (:func:`~.int4.select_kernels`); CPU runs the reference.
    ``gemv_fusion`` (off | norm | all; CUDA only) decodes through the fused GEMV kernels
    (:meth:`~.model.Transformer.fuse_decode`).
    """
    config = read_config(checkpoint_dir)
    arch, family = family_of(config)
    args = model_args(config)
    scheme, fp8_weights = int4_scheme(config), is_fp8(config)
    if fp8_weights:
        fp8.check_device(device)
    linear = fp8.fp8_linear_factory() if fp8_weights else dense_linear(dtype, "meta") if scheme is None \
        else int4_linear_factory(scheme["group_size"] if scheme["strategy"] == "group" else 0)
    with torch.device("meta"):
        model = Transformer(args, linear, dtype)
    model.to_empty(device=device)
    model.tie_weights()
    tensors = _Tensors(checkpoint_dir)

    def dense(name: str) -> torch.Tensor:
        return tensors.get(name, device).to(dtype)

    with torch.no_grad():
        model.tok_embeddings.weight.copy_(dense(family.embed))
        model.norm.weight.copy_(dense(family.norm))
        if not args.tie_word_embeddings:
            model.output.weight.copy_(dense(family.head if family.head in tensors else family.embed))
        for i in range(args.n_layers):
            for ours, theirs in family.layer_dense(i).items():  # norms and biases stay dense
                missing = [t for t in theirs if t not in tensors]
                if missing:
                    raise UnsupportedModel(arch, "tensors", f"{missing} missing from {checkpoint_dir}")
                model.get_parameter(ours).copy_(torch.cat([dense(t) for t in theirs]))
            for ours, theirs in family.layer_linears(i).items():
                module = model.get_submodule(ours)
                if fp8_weights:
                    _load_fp8(module, theirs, tensors, device)
                elif scheme is None:
                    module.weight.copy_(torch.cat([dense(t + ".weight") for t in theirs], dim=0))
                else:
                    _load_int4(module, theirs, tensors, device)
    # a tied head may still be saved (a copy of the embedding); rotary tables are recomputed
    unread = tensors.unread(("rotary_emb.inv_freq",) + ((family.head,) if args.tie_word_embeddings else ()))
    if unread:
        raise UnsupportedModel(arch, "tensors", f"{len(unread)} tensors of {checkpoint_dir} have no place in the "
                               f"engine (e.g. {', '.join(unread[:3])})")
    model.requires_grad_(False)  # inference only: no autograd graphs in compiled code
    _prepare_decode(model, device, gemv_fusion)
    model.int4_kernels = select_kernels(model, int4_kernels)
    model.setup_cache(1, min(16, args.sliding_window or 16))  # rope tables and a small cache so the model
    return model.eval()  # runs at once; engines resize it


def _load_int4(module: nn.Module, theirs: list[str], tensors: _Tensors, device: Any) -> None:
    parts = []
    for t in theirs:
        if t + ".weight_packed" not in tensors:
            raise NotImplementedError(f"{t} is not int4 in this checkpoint (mixed dense/int4 layers unsupported)")
        shape = tuple(int(v) for v in tensors.get(t + ".weight_shape", "cpu").tolist())
        zp = tensors.get(t + ".weight_zero_point", device) if t + ".weight_zero_point" in tensors else None
        g_idx = tensors.get(t + ".weight_g_idx", device) if t + ".weight_g_idx" in tensors else None
        parts.append(from_compressed_tensors(tensors.get(t + ".weight_packed", device),
                                             tensors.get(t + ".weight_scale", device), zp, shape, g_idx))
    q = torch.cat([p[0] for p in parts], dim=0)  # [N_total, K]
    module.qweight.copy_(pack_int4(q))
    module.scales.copy_(torch.cat([p[1] for p in parts], dim=1))
    module.zeros.copy_(torch.cat([p[2] for p in parts], dim=1))


def _load_fp8(module: fp8.Fp8Linear, theirs: list[str], tensors: _Tensors, device: Any) -> None:
    """Concatenate the HF linears' e4m3 weights [N_i, K] and scales [N_i, 1] into ours, values untouched."""
    for t in theirs:
        if t + ".weight_scale" not in tensors:
            raise NotImplementedError(f"{t} is not fp8 in this checkpoint (mixed dense/fp8 layers unsupported)")
    weights = [tensors.get(t + ".weight", device) for t in theirs]
    if any(w.dtype != torch.float8_e4m3fn for w in weights):
        raise NotImplementedError(f"{theirs}: fp8 weights must be float8_e4m3fn, got {[w.dtype for w in weights]}")
    module.weight.view(torch.uint8).copy_(torch.cat([w.view(torch.uint8) for w in weights], dim=0))
    module.weight_scale.copy_(torch.cat([tensors.get(t + ".weight_scale", device).float().reshape(-1)
                                         for t in theirs]))


def _prepare_decode(model: Transformer, device: str | torch.device, gemv_fusion: str) -> None:
    """The decode fusions on CUDA (before select_kernels: "all" interleaves w13 in the Triton layout)."""
    if torch.device(device).type == "cuda":
        model.fuse_decode(gemv_fusion)


def random_model(args: ModelArgs, weight_format: str, device: str | torch.device, group_size: int = 128,
                 seed: int = 0, int4_kernels: str = "auto", gemv_fusion: str = DEFAULT_GEMV_FUSION) -> Transformer:
    """A model of ``args``' shape with RANDOM weights, built directly on ``device`` (no checkpoint).

    ``weight_format``: "bfloat16" (dense), "int4" (uniform random nibbles, asymmetric zero points,
    scales chosen so that weights have std ~0.02 like a trained Llama) or "fp8" (std 0.02 Gaussian weights
    quantized per channel, :func:`~.fp8.quantize_weight`).  For speed and memory only: its outputs mean
    nothing.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    factories = {"bfloat16": lambda: dense_linear(torch.bfloat16, "meta"), "fp8": fp8.fp8_linear_factory,
                 "int4": lambda: int4_linear_factory(group_size)}
    if weight_format not in factories:
        raise ValueError(f"weight_format must be one of {sorted(factories)}, got {weight_format!r}")
    if weight_format == "fp8":
        fp8.check_device(device)
    linear = factories[weight_format]()
    with torch.device("meta"):
        model = Transformer(args, linear, torch.bfloat16)
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("qweight"):
                t.copy_(torch.randint(-2**31, 2**31 - 1, t.shape, generator=gen, device=device, dtype=torch.int32))
            elif name.endswith("scales"):
                t.copy_(0.02 / 4.6 * (0.5 + torch.rand(t.shape, generator=gen, device=device)))
            elif name.endswith("zeros"):
                t.copy_(torch.randint(6, 10, t.shape, generator=gen, device=device).to(t.dtype))
            elif name.endswith("norm.weight"):
                t.fill_(1.0)
            elif t.dtype == torch.float8_e4m3fn:  # with its weight_scale, set here too
                module = model.get_submodule(name.rsplit(".", 1)[0])
                w = 0.02 * torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32)
                codes, scale = fp8.quantize_weight(w)
                t.view(torch.uint8).copy_(codes.view(torch.uint8))
                module.weight_scale.copy_(scale)
            elif name.endswith("weight_scale"):
                continue
            elif t.is_floating_point():
                t.copy_(0.02 * torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32))
    model.requires_grad_(False)
    _prepare_decode(model, device, gemv_fusion)
    model.int4_kernels = select_kernels(model, int4_kernels)
    model.setup_cache(1, 16)
    return model.eval()


__all__ = ["load_model", "random_model", "read_config", "int4_scheme", "is_fp8", "from_compressed_tensors",
           "unpack_nibbles", "PACK_BLOCK"]
