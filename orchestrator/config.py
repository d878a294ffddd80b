"""Structured configs: the typed shape of everything under ``conf/``.

Hydra merges the YAML files onto these dataclasses, so a typo'd key or a wrong type fails at compose
time.  Values that need the environment (does the model path exist? is the store writable?) are checked
in :mod:`orchestrator.validate` before any Ray task starts.  Defaults a user might want to change live in
``conf/``, not here; the defaults below only make the dataclasses constructible.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class RandomModelConfig:
    """Family and shape of a random-weight model (speed/memory studies, tests); its tokenizer is trained in
    code."""

    #: transformers model_type: llama, mistral, qwen2, qwen3 (the fast engine's families) or any other
    #: type transformers knows (then only the transformers engine runs it)
    model_type: str = "llama"

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    seed: int = 0
    #: further config.json keys of the family: rope_parameters, rope_theta, head_dim, tie_word_embeddings, ...
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "model"
    #: hf: a local Hugging Face folder or a hub id; gguf_package: a GGUF file inside an installed Python
    #: package (the default demo model); gguf_file: a local GGUF file; random: a random-weight Llama.
    source: str = "hf"
    path: Optional[str] = None
    package: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: str = "bfloat16"
    random: RandomModelConfig = field(default_factory=RandomModelConfig)
    note: str = ""


@dataclass
class CalibrationConfig:
    #: "pydoc_topics": English reference prose that ships with every CPython (offline, no download);
    #: or a path to a local .txt / .jsonl ({"text": ...}) file.
    dataset: str = "pydoc_topics"
    num_samples: int = 32
    seq_len: int = 256


@dataclass
class MethodConfig:
    name: str = "fp16"
    algorithm: str = "none"  # none | rtn | awq | gptq | fp8
    bits: int = 16
    group_size: Optional[int] = None
    symmetric: bool = False
    dtype: str = "float16"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackendConfig:
    name: str = "torch"
    #: auto: the task's GPU when Ray gave it one, else CPU.  cpu / cuda force it.
    device: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClusterConfig:
    #: None: start a local Ray instance; "auto" or "ray://host:10001": join an existing cluster.
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # local instance only
    num_gpus: Optional[int] = None  # local instance only (None: Ray detects)
    #: GPUs each GPU task asks for. None: 1 when the cluster has GPUs, else 0 (the CPU demo).
    gpus_per_task: Optional[float] = None
    cpus_per_task: float = 1.0
    #: e.g. "L40", "H100": GPU tasks then run only on nodes with that accelerator (Ray's
    #: ``accelerator_type`` node resource).  None: any GPU.
    accelerator_type: Optional[str] = None
    #: extra custom resources each GPU task requires, e.g. {"l40_node": 1}.
    resources: dict[str, float] = field(default_factory=dict)
    max_retries: int = 2  # retries for transient failures (a dead worker or node)
    #: memory (GiB) each task reserves on its node (Ray's ``memory`` resource); None: no reservation.
    memory_per_task_gb: Optional[float] = None
    #: end the sweep when nothing started or finished for this long and nothing runs on a live node
    #: (a lost node, resources taken by others); unfinished cells become failed/skipped rows, exit 3.
    stall_timeout_s: float = 600.0
    include_dashboard: bool = False
    #: stream every task's stdout/stderr to the driver (errors are always stored in the runs rows).
    show_task_logs: bool = False
    runtime_env: dict[str, Any] = field(default_factory=dict)


@dataclass
class StoreConfig:
    #: local folder or any pyarrow filesystem URI (s3://bucket/prefix, gs://...).
    uri: str = "outputs/store"
    #: where quantized checkpoints and engines go; must be a path every worker can read (a shared
    #: filesystem on multi-node clusters).  None: ``<uri>/artifacts`` for local stores (required when
    #: ``uri`` is an object store).
    artifacts_dir: Optional[str] = None
    #: the filesystem's non-secret connection settings, e.g. for S3 ``{endpoint_override: "host:9000",
    #: scheme: http, region: us-east-1}`` (pyarrow's URI query parameters); credentials come from the
    #: environment (AWS_ACCESS_KEY_ID, ...), which is forwarded to every task and never stored.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    #: local copy of the original MMLU release (Hendrycks CSVs: dev/, val/, test/); None: the hub.
    mmlu_dir: Optional[str] = None
    num_fewshot: int = 5
    scoring: str = "loglikelihood"  # loglikelihood | generate
    limit_per_subject: Optional[int] = None
    batch_size: int = 8


@dataclass
class FidelityConfig:
    """The ``fidelity`` stage: each method's next-token distributions against the baseline's (tasks/fidelity.py)."""

    #: "pydoc_topics_heldout": the held-out half of the default calibration text (never calibrated on);
    #: or a path to a local .txt / .jsonl ({"text": ...}) file.
    text: str = "pydoc_topics_heldout"
    seq_len: int = 512  # tokens per window, the first a BOS/EOS prefix; seq_len - 1 scored
    num_sequences: int = 64


@dataclass
class SweepConfig:
    name: str = "default"
    methods: list[str] = field(default_factory=lambda: ["fp16", "awq", "gptq"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    input_len: int = 512
    output_len: int = 200
    warmup: int = 1
    repeats: int = 3
    subjects: list[str] = field(default_factory=lambda: ["all"])
    num_shards: int = 4
    stages: list[str] = field(default_factory=lambda: ["evaluate", "fidelity", "profile"])
    #: the method every other one is compared with (fidelity's KL, MMLU answer flips, speed-ups)
    baseline: str = "fp16"
    rerun: str = "failed"  # failed | all | none
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    methods: dict[str, MethodConfig] = field(default_factory=dict)
    backend: BackendConfig = field(default_factory=BackendConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    experiment: str = ""  # free text naming the study, shown in the report


def register_configs() -> None:
    """Register the schema so YAML files are validated against it (``defaults: [quantsweep_schema]``).

    One entry, outside every config group: :class:`Config` already types each group's node (``model``,
    ``methods.<name>``, ...), and an entry inside a group would be listed as one of its options (in
    ``--help`` and error messages) though it is no option a user can pick.
    """
    ConfigStore.instance().store(name="quantsweep_schema", node=Config)
