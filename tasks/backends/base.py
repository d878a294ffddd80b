"""The narrow interface every engine backend implements.

A backend turns a (quantized) Hugging Face checkpoint into an *engine* on disk (``build``) and loads
that engine into a process (``load``).  Tasks only talk to these two classes, so the orchestrator never
knows whether PyTorch or TensorRT-LLM is underneath, and a new engine plugs in by implementing them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class EngineShape:
    """The largest work an engine must accept; engines sized from this are comparable across methods."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int  # input + output tokens


@dataclass
class GenerationTiming:
    """Wall-clock timings of one fixed-length batched generation (EOS ignored).

    ``first_token_s`` covers prefill plus the first sampled token (time to first token);
    ``decode_step_s[i]`` is the time of decode step i (one new token for every sequence), so
    ``len(decode_step_s) == output_len - 1``.  Times are taken after device synchronisation.
    """

    batch_size: int
    input_len: int
    output_len: int
    first_token_s: float
    decode_step_s: list[float]
    total_s: float
    output_token_ids: torch.Tensor | None = None  # [batch, output_len], for correctness checks


class Unsupported(RuntimeError):
    """This engine cannot do what a cell asks (e.g. return prompt logits): the cell is a ``skipped`` row
    whose error says why, not a failure."""


class Engine(ABC):
    """A loaded engine: what the evaluate and profile tasks run against."""

    device: str  # "cpu" | "cuda:N"
    dtype: str  # activation/compute dtype, e.g. "bfloat16"
    # what the checkpoint stores (tasks.models.stored_dtype): "bfloat16", "int4 packed g128; other tensors
    # bfloat16"; None when unknown
    stored_dtype: str | None = None

    def dtype_label(self) -> str:
        """``stored bfloat16, computed float32 on cpu``: what rows and the report say about precision.

        A method called "fp16" may be stored in bf16 and computed in fp32 (the CPU demo): the method's name
        and config do not say which dtypes ran, so every engine states both.
        """
        return f"stored {self.stored_dtype or 'unknown'}, computed {self.dtype} on {self.device}"
    weight_format: str  # e.g. "bfloat16", "int4-g128-asym"
    kv_cache_policy: str  # how the KV cache is sized, in words (rows record it)
    #: how :meth:`prompt_logits` computes them, in words (fidelity rows record it)
    logits_how: str = "one forward pass over the whole window"
    details: dict[str, Any]

    @abstractmethod
    def lm_eval_model(self, batch_size: int) -> Any:
        """An ``lm_eval.api.model.LM`` over this engine (loglikelihood and generate_until)."""

    @abstractmethod
    def timed_generate(self, input_ids: torch.Tensor, output_len: int) -> GenerationTiming:
        """Greedy-generate exactly ``output_len`` tokens for every row of ``input_ids`` [B, L]."""

    def prompt_logits(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """Logits [L_i, V] at every position of each token list (one forward pass, no sampling).

        The fidelity stage compares these between a method and its baseline; engines that cannot return
        them raise :class:`Unsupported`.
        """
        raise Unsupported(f"the {type(self).__name__} engine cannot return prompt logits")

    def vocab_size(self) -> int:
        return int(self.details.get("vocab_size", 32000))

    def close(self) -> None:
        """Free device memory; engines are loaded once per task process."""


class Backend(ABC):
    """Builds and loads engines of one kind."""

    name: ClassVar[str]

    @abstractmethod
    def build(self, checkpoint_dir: Path, engine_dir: Path, shape: EngineShape | None,
              method: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """Write an engine for ``checkpoint_dir`` into ``engine_dir``; return metadata for the runs row.

        ``shape`` is None for backends whose engines do not depend on it (the planner's choice)."""

    @abstractmethod
    def load(self, engine_dir: Path, device: str, options: dict[str, Any]) -> Engine:
        """Load a built engine on ``device``."""
