"""A loaded TensorRT-LLM engine: timed streaming generation and the scorer behind the lm-eval wrapper.

The runtime is ``tensorrt_llm.runtime.ModelRunnerCpp`` (the C++ executor TensorRT-LLM's own
``examples/run.py``/``summarize.py``/``mmlu.py`` use), read from
``tensorrt_llm/runtime/model_runner_cpp.py``: ``from_dir(engine_dir, max_tokens_in_paged_kv_cache=,
kv_cache_free_gpu_memory_fraction=, kv_cache_enable_block_reuse=, gather_generation_logits=,
device_ids=)``; ``generate(batch_input_ids, max_new_tokens, end_id, pad_id, streaming, return_dict,
output_sequence_lengths, output_generation_logits, top_k)``.  With ``streaming=True`` it yields after
every ``await_responses`` with the tokens accumulated so far (``sequence_lengths`` = input + generated),
so per-step times come from the moment every sequence of the batch has its k-th token.

Only ``stream_step_times`` (pure) is unit-tested on CPU; the rest needs TensorRT-LLM and a GPU.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tasks.backends.base import Engine, GenerationTiming, Unsupported
from tasks.backends.tensorrt_llm.lm_wrapper import TensorRTLLMLM

ENGINE_META = "quantsweep_engine.json"


def stream_step_times(events: Sequence[tuple[float, Sequence[int]]], output_len: int
                      ) -> tuple[float, list[float], float]:
    """(time to first token, per-decode-step times, total) from streaming events.

    ``events`` are ``(seconds since submit, tokens generated so far per sequence)``.  Step k ends when
    the slowest sequence has k tokens.  When one event delivers several steps at once (the consumer
    fell behind), its interval is split evenly over those steps so the steps still sum to the total.
    """
    step_end: list[float] = []
    prev_t, prev_done = 0.0, 0
    for t, counts in events:
        done = min(min(counts), output_len) if counts else 0
        if done > prev_done:
            span = t - prev_t
            for k in range(prev_done + 1, done + 1):
                step_end.append(prev_t + span * (k - prev_done) / (done - prev_done))
            prev_t, prev_done = t, done
    if len(step_end) < output_len:
        raise RuntimeError(f"stream ended after {len(step_end)} of {output_len} tokens "
                           "(EOS must be ignored for timed generation)")
    decode = [step_end[k] - step_end[k - 1] for k in range(1, output_len)]
    return step_end[0], decode, step_end[-1]


def kv_cache_bytes(meta: dict[str, Any], tokens: int) -> int:
    """Bytes of a KV cache of ``tokens`` tokens: K and V per layer, kv heads x head size each."""
    fp8 = (meta.get("quantization") or {}).get("kv_cache_quant_algo") == "FP8"
    element = 1 if fp8 else 2  # fp16/bf16 cache unless FP8 KV
    return tokens * 2 * meta["num_hidden_layers"] * meta["num_key_value_heads"] * meta["head_size"] * element


class TensorRTLLMEngine(Engine):
    """``Engine`` over a ``ModelRunnerCpp``; also the ``TokenScorer`` of the lm-eval wrapper."""

    logits_how = "context logits of one forward pass (engine built with gather_context_logits)"

    def __init__(self, runner: Any, tokenizer: Any, device: str, meta: dict[str, Any], kv_cache_policy: str,
                 kv_cache_tokens: int):
        self.runner = runner
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = meta["dtype"]
        self.weight_format = meta["weight_format"]
        self.kv_cache_policy = kv_cache_policy
        self.max_input_len = int(meta["limits"]["max_input_len"])
        self.has_prompt_logits = bool(meta["gather_context_logits"])
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.details = {**meta, "kv_cache_tokens": kv_cache_tokens, "vocab_size": meta["vocab_size"],
                        "kv_cache_bytes": kv_cache_bytes(meta, kv_cache_tokens),
                        "kv_bytes_per_token": kv_cache_bytes(meta, 1),
                        "weights_bytes": meta.get("engine_bytes")}  # the serialized engine: weights + kernels

    # ---- Engine -----------------------------------------------------------------------------------
    def lm_eval_model(self, batch_size: int) -> TensorRTLLMLM:
        return TensorRTLLMLM(self, self.tokenizer, batch_size=batch_size)

    def timed_generate(self, input_ids: torch.Tensor, output_len: int) -> GenerationTiming:
        batch = [row.to(torch.int32).cpu() for row in input_ids]
        input_len = int(input_ids.shape[1])
        events: list[tuple[float, list[int]]] = []
        last: dict[str, Any] = {}
        t0 = time.perf_counter()
        # end_id=-1: no token ends a sequence, so every row generates exactly output_len tokens
        for out in self.runner.generate(batch, max_new_tokens=output_len, end_id=-1, pad_id=self.pad_id,
                                        streaming=True, return_dict=True, output_sequence_lengths=True,
                                        top_k=1):
            lengths = out["sequence_lengths"][:, 0].tolist()
            events.append((time.perf_counter() - t0, [n - input_len for n in lengths]))
            last = out
        first, decode, total = stream_step_times(events, output_len)
        ids = last["output_ids"][:, 0, input_len:input_len + output_len].cpu()
        return GenerationTiming(len(batch), input_len, output_len, first, decode, total, ids)

    def close(self) -> None:
        shutdown = getattr(getattr(self.runner, "executor", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        self.runner = None
        torch.cuda.empty_cache()

    # ---- TokenScorer ------------------------------------------------------------------------------
    def next_token_logits(self, batch: list[list[int]]) -> list[torch.Tensor]:
        out = self.runner.generate([torch.tensor(b, dtype=torch.int32) for b in batch], max_new_tokens=1,
                                   end_id=-1, pad_id=self.pad_id, return_dict=True,
                                   output_generation_logits=True, top_k=1)
        logits = out["generation_logits"]  # [batch, sequences, steps, vocab]
        return [logits[i, 0, 0].float().cpu() for i in range(len(batch))]

    def prompt_logits(self, batch: list[list[int]]) -> list[torch.Tensor]:
        if not self.has_prompt_logits:
            raise Unsupported("this TensorRT-LLM engine was built without context logits; rebuild it with "
                              "backend.options.gather_context_logits=true to measure fidelity")
        out = self.runner.generate([torch.tensor(b, dtype=torch.int32) for b in batch], max_new_tokens=1,
                                   end_id=-1, pad_id=self.pad_id, return_dict=True, top_k=1)
        logits = out["context_logits"]  # [batch, max_input_len, vocab]
        return [logits[i, : len(b)].float().cpu() for i, b in enumerate(batch)]

    def greedy_generate(self, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        eos = int(self.tokenizer.eos_token_id)
        out = self.runner.generate([torch.tensor(b, dtype=torch.int32) for b in batch],
                                   max_new_tokens=max_new_tokens, end_id=eos, pad_id=self.pad_id,
                                   return_dict=True, output_sequence_lengths=True, top_k=1)
        ids, lengths = out["output_ids"][:, 0].cpu(), out["sequence_lengths"][:, 0].tolist()
        result = []
        for i, b in enumerate(batch):
            toks = ids[i, len(b): int(lengths[i])].tolist()
            result.append(toks[: toks.index(eos)] if eos in toks else toks)
        return result


def read_engine_meta(engine_dir: Path) -> dict[str, Any]:
    path = Path(engine_dir) / ENGINE_META
    if not path.exists():
        raise FileNotFoundError(f"{engine_dir}: no {ENGINE_META}; was it built by quantsweep's tensorrt_llm backend?")
    return json.loads(path.read_text())
