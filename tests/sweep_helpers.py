"""Compose real Hydra configs in tests, exactly as the CLI does."""
from __future__ import annotations

from typing import Any

from hydra import compose, initialize_config_dir

from orchestrator.cli import CONF_DIR

# A tiny random Llama, fp32 on CPU: real code paths in seconds.
TINY = ["model=tiny_random", "sweep.name=test", "sweep.warmup=0", "sweep.repeats=1",
        "sweep.input_len=8", "sweep.output_len=4", "eval.num_fewshot=1", "eval.limit_per_subject=3",
        "cluster.num_cpus=2", "methods.rtn.group_size=32", "methods.awq.group_size=32",
        "methods.gptq.group_size=32", "methods.awq.calibration.num_samples=4", "methods.awq.calibration.seq_len=64",
        "methods.gptq.calibration.num_samples=4", "methods.gptq.calibration.seq_len=64"]


def compose_config(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)
