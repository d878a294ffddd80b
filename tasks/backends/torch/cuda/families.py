"""The model families the fast engine implements, and the refusal of everything else.

One table, :data:`FAMILIES`, keyed by the ``architectures`` name of a checkpoint's ``config.json`` (as vLLM's
model registry is): what each family adds to the Llama-2 block the engine is built on, and the names of
its tensors.  :func:`model_args` reads a config through it and either returns the engine's
:class:`~.model.ModelArgs` or raises :class:`UnsupportedModel` naming the config field the engine does not
implement.  Nothing is loaded that the engine does not compute: a feature the table does not list (another
rope type, biases on other projections, a sliding window shorter than the sequence) is refused, never
dropped.  Adding a family is one :class:`Family` entry plus, if it names tensors differently, its names.

What each family adds to Llama-2 (pre-norm RMSNorm blocks, rotary attention, SwiGLU MLP):

- Llama 1/2/3/3.1/3.2/3.3: grouped-query attention, an explicit ``head_dim``, tied embeddings (3.2), rope
  scaling ``linear`` or ``llama3`` (3.1 and later).
- Mistral: a sliding window (v0.1: 4096 tokens; null from v0.2 on).  Attention over at most ``window``
  positions equals full attention, so sequences up to the window run and longer ones are refused.
- Qwen2 / Qwen2.5: a bias on the q, k and v projections; tied embeddings in the small sizes; an optional
  sliding window (``use_sliding_window``, off in the released models).
- Qwen3: an RMSNorm over each head of q and of k, before rotary; an explicit ``head_dim``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.backends.torch.cuda.model import ModelArgs
from tasks.backends.torch.cuda.rope import ROPE_TYPES, Rope

#: per layer: our linear -> the HF projections concatenated into it, in output order (prefix
#: ``model.layers.{i}.``); every family here names them as Llama does
LLAMA_LINEARS: dict[str, tuple[str, ...]] = {
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.wo": ("self_attn.o_proj",),
    "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
    "feed_forward.w2": ("mlp.down_proj",),
}
#: per layer: our dense tensor -> the HF tensors concatenated into it
LLAMA_DENSE: dict[str, tuple[str, ...]] = {
    "attention_norm.weight": ("input_layernorm.weight",),
    "ffn_norm.weight": ("post_attention_layernorm.weight",),
}
QKV_BIAS: dict[str, tuple[str, ...]] = {
    "attention.wqkv_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")}
QK_NORM: dict[str, tuple[str, ...]] = {
    "attention.q_norm.weight": ("self_attn.q_norm.weight",),
    "attention.k_norm.weight": ("self_attn.k_norm.weight",)}

ENGINE_HINT = "backend.options.engine=hf runs it on the transformers reference engine"


@dataclass(frozen=True)
class Family:
    """What one architecture adds to the Llama-2 block, and where its tensors are."""

    name: str
    model_type: str
    qkv_bias: bool = False  # a bias on q/k/v (not on o): Qwen2
    qk_norm: bool = False  # RMSNorm per head on q and k before rotary: Qwen3
    sliding_window: str = "none"  # "none" | "always" (Mistral: the key is the window) | "opt_in" (Qwen:
    #                               the window applies only with use_sliding_window)
    linears: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LLAMA_LINEARS))
    dense: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LLAMA_DENSE))
    embed: str = "model.embed_tokens.weight"
    norm: str = "model.norm.weight"
    head: str = "lm_head.weight"

    def layer_linears(self, i: int) -> dict[str, list[str]]:
        """``layers.{i}.<ours>`` -> the HF module names whose weights it concatenates."""
        return {f"layers.{i}.{ours}": [f"model.layers.{i}.{t}" for t in theirs] for ours, theirs in self.linears.items()}

    def layer_dense(self, i: int) -> dict[str, list[str]]:
        """``layers.{i}.<ours>`` -> the HF tensor names it concatenates (norms, biases: never quantized)."""
        return {f"layers.{i}.{ours}": [f"model.layers.{i}.{t}" for t in theirs] for ours, theirs in self.dense.items()}


#: architectures name (config.json) -> family
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("Llama", "llama"),
    "MistralForCausalLM": Family("Mistral", "mistral", sliding_window="always"),
    "Qwen2ForCausalLM": Family("Qwen2", "qwen2", qkv_bias=True, sliding_window="opt_in",
                               dense={**LLAMA_DENSE, **QKV_BIAS}),
    "Qwen3ForCausalLM": Family("Qwen3", "qwen3", qk_norm=True, sliding_window="opt_in",
                               dense={**LLAMA_DENSE, **QK_NORM}),
}
HIDDEN_ACTS = ("silu",)


class UnsupportedModel(NotImplementedError):
    """A checkpoint the fast engine would compute wrongly; ``field`` is the config.json key to blame."""

    def __init__(self, architecture: str, field: str, problem: str):
        self.architecture, self.field = architecture, field
        super().__init__(f"{architecture}: config.json {field}: {problem}; the fast engine implements "
                         f"{supported()}; {ENGINE_HINT}")


def supported() -> str:
    """The families and features in words (for errors and the README)."""
    names = ", ".join(f"{f.name} ({arch})" for arch, f in FAMILIES.items())
    return f"{names}, rope types {'/'.join(ROPE_TYPES)}"


def family_of(config: dict[str, Any]) -> tuple[str, Family]:
    """(architecture name, family) of a config.json dict, from ``architectures`` (else ``model_type``)."""
    archs = config.get("architectures") or []
    if archs:
        arch = archs[0]
        if len(archs) > 1 or arch not in FAMILIES:
            raise UnsupportedModel(arch, "architectures", f"{archs} is not implemented")
        family = FAMILIES[arch]
        if config.get("model_type", family.model_type) != family.model_type:
            raise UnsupportedModel(arch, "model_type", f"{config['model_type']!r} does not match {arch} "
                                   f"({family.model_type!r})")
        return arch, family
    model_type = config.get("model_type")
    for arch, family in FAMILIES.items():
        if family.model_type == model_type:
            return arch, family
    raise UnsupportedModel(str(model_type), "model_type", f"{model_type!r} is not implemented")


def rope_of(arch: str, config: dict[str, Any]) -> Rope:
    """The rope of a config whether it says ``rope_scaling`` (older hub configs) or ``rope_parameters``
    (transformers 5); the theta may sit at the top level or inside either."""
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    rope_type = params.get("rope_type", params.get("type")) or "default"
    key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModel(arch, f"{key}.rope_type", f"{rope_type!r} is not implemented "
                               f"(implemented: {', '.join(ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModel(arch, "partial_rotary_factor", f"{partial} (rotary on part of each head) is not "
                               "implemented")
    theta = params.get("rope_theta") or config.get("rope_theta") or 10000.0
    if rope_type == "default":
        return Rope(theta=float(theta))
    missing = [k for k in (("factor",) if rope_type == "linear" else ("factor", "low_freq_factor",
                                                                       "high_freq_factor")) if k not in params]
    if missing:
        raise UnsupportedModel(arch, key, f"rope_type {rope_type!r} without {', '.join(missing)}")
    context = (params.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
               or config.get("max_position_embeddings") or 8192)
    return Rope(theta=float(theta), type=rope_type, factor=float(params["factor"]),
                low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(context))


def sliding_window_of(family: Family, config: dict[str, Any]) -> int | None:
    """The attention window the engine must respect (None: full attention)."""
    window = config.get("sliding_window")
    if family.sliding_window == "none" or not window:
        return None
    layer_types = config.get("layer_types")  # transformers 5 spells out each layer's attention
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    if family.sliding_window == "opt_in" and not config.get("use_sliding_window", False):
        return None
    return int(window)


def _refuse_unimplemented(arch: str, family: Family, config: dict[str, Any]) -> None:
    """Config keys whose non-default values change the computation in a way the engine does not do."""
    act = config.get("hidden_act", config.get("hidden_activation", "silu"))
    if act not in HIDDEN_ACTS:
        raise UnsupportedModel(arch, "hidden_act", f"{act!r} is not implemented (implemented: "
                               f"{', '.join(HIDDEN_ACTS)})")
    if config.get("attention_bias"):
        raise UnsupportedModel(arch, "attention_bias", "true (a bias on every attention projection, o_proj "
                               "included) is not implemented" + (" (Qwen2's q/k/v bias is)" if family.qkv_bias else ""))
    if config.get("mlp_bias"):
        raise UnsupportedModel(arch, "mlp_bias", "true (biases on the MLP projections) is not implemented")
    if (config.get("num_experts") or config.get("num_local_experts") or 0) > 1:
        raise UnsupportedModel(arch, "num_experts", "mixture-of-experts MLPs are not implemented")


def model_args(config: dict[str, Any]) -> ModelArgs:
    """config.json dict -> the engine's ModelArgs, or :class:`UnsupportedModel`."""
    arch, family = family_of(config)
    _refuse_unimplemented(arch, family, config)
    heads = config["num_attention_heads"]
    return ModelArgs(
        vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=heads, n_kv_heads=config.get("num_key_value_heads") or heads,
        intermediate_size=config["intermediate_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),  # transformers' default for all four
        rope=rope_of(arch, config), tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias, qk_norm=family.qk_norm, sliding_window=sliding_window_of(family, config),
        family=family.name)


def check_config(config: dict[str, Any]) -> str:
    """The family's name if the fast engine implements ``config`` (else :class:`UnsupportedModel`); no
    torch model is built, so the pre-flight can call it in milliseconds."""
    return model_args(config).family
