"""Profile one engine at one batch size: throughput, latency, memory and energy.

Fixed lengths (input ``input_len`` random tokens, exactly ``output_len`` greedy tokens, EOS ignored), so
every method does the same work.  Output tokens/s is computed the way the study and TensorRT-LLM's
benchmark do: batch × output tokens ÷ end-to-end time of the batch, prefill included.  Each number is
the median over ``repeats`` runs after ``warmup`` untimed runs.
"""
from __future__ import annotations

import statistics
from typing import Any

import torch

from tasks.backends.base import Engine, GenerationTiming
from tasks.gpu_metrics import MemorySampler, device_info, energy_mj
from tasks.roofline import copy_bandwidth, roofline_columns

OUTPUT_TOKENS_NOTE = ("output_tokens_per_s = batch_size * output_len / e2e_s (prefill included, like the "
                      "study and trtllm-bench); decode_tokens_per_s = batch_size * (output_len - 1) / decode time; "
                      "ttft_s = prefill + first token; itl = per-decode-step latency over all steps of all "
                      "repeats; medians over repeats after warm-up; device synchronised around every step")


ROOFLINE_NOTE = ("; roofline_pct = decode tokens/s / (batch x copy bandwidth of this device / fewest bytes a "
                 "decode step moves: weights once, the KV cache so far, embedding rows)")


def random_prompts(vocab_size: int, batch_size: int, input_len: int, seed: int) -> torch.Tensor:
    """Token ids drawn away from the special-token range at the start of most vocabularies."""
    generator = torch.Generator().manual_seed(seed)
    low = min(100, vocab_size // 4)
    return torch.randint(low, vocab_size, (batch_size, input_len), generator=generator)


def _speed_note(engine: Engine) -> str:
    """The engine's caveat about its speed and memory (e.g. weights de-quantized to dense), if any."""
    note = engine.details.get("speed_note")
    return f"; {note}" if note else ""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def profile_engine(engine: Engine, batch_size: int, input_len: int, output_len: int, warmup: int,
                   repeats: int, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (throughput row, memory row) without the store's key columns."""
    prompts = random_prompts(engine.vocab_size(), batch_size, input_len, seed)
    on_cuda = engine.device.startswith("cuda")
    # measured before the peak-memory window opens, so its buffers never count as the engine's memory
    bandwidth = copy_bandwidth(engine.device)
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timings: list[GenerationTiming] = []
    with MemorySampler(engine.device) as sampler:
        for _ in range(warmup):
            engine.timed_generate(prompts, output_len)
        energy_start = energy_mj(engine.device)
        for _ in range(repeats):
            timings.append(engine.timed_generate(prompts, output_len))
        energy_end = energy_mj(engine.device)
    e2e = statistics.median(t.total_s for t in timings)
    decode = statistics.median(sum(t.decode_step_s) for t in timings)
    decode_tps = batch_size * (output_len - 1) / decode if decode > 0 else None
    steps = [s for t in timings for s in t.decode_step_s]
    info = device_info(engine.device)
    output_tokens = batch_size * output_len * repeats
    energy = (None if energy_start is None or energy_end is None
              else (energy_end - energy_start) / 1e3 / output_tokens)
    throughput = {
        "batch_size": batch_size, "input_len": input_len, "output_len": output_len,
        "repeats": repeats, "warmup": warmup,
        "output_tokens_per_s": batch_size * output_len / e2e,
        "decode_tokens_per_s": decode_tps,
        "e2e_s": e2e,
        "ttft_s": statistics.median(t.first_token_s for t in timings),
        "itl_median_s": statistics.median(steps) if steps else None,
        "itl_p90_s": _percentile(steps, 0.9) if steps else None,
        "energy_j_per_token": energy,
        **roofline_columns(engine.details, bandwidth, batch_size, input_len, output_len, decode_tps),
        "device": engine.device, "gpu_name": info["gpu_name"] or f"CPU ({info.get('cpu_count')} cores)",
        "driver_version": info["driver_version"], "dtype": engine.dtype, "stored_dtype": engine.stored_dtype,
        "weight_format": engine.weight_format, "kv_cache_policy": engine.kv_cache_policy,
        "engine": engine.details.get("engine") or type(engine).__name__,
        "method_note": OUTPUT_TOKENS_NOTE + ROOFLINE_NOTE
        + ("" if energy is not None else "; energy: not measured (no NVML)")
        + ("" if engine.details.get("decode_reads") else "; roofline: not computed (the engine does not "
           "report the bytes a decode step reads)") + _speed_note(engine),
    }
    peaks = sampler.peaks
    memory = {
        "batch_size": batch_size, "device": engine.device, "gpu_name": throughput["gpu_name"],
        "peak_device_memory_bytes": peaks.device_used_bytes,
        "peak_process_memory_bytes": peaks.process_bytes,
        "peak_allocator_memory_bytes": int(torch.cuda.max_memory_reserved()) if on_cuda else None,
        "dtype": engine.dtype, "stored_dtype": engine.stored_dtype,  # weights_memory_bytes follows dtype
        "weights_memory_bytes": engine.details.get("weights_bytes"),
        # KV cache for this batch: batch x (input + output) tokens x bytes per token (all layers, K and V).
        "kv_cache_bytes": (engine.details["kv_bytes_per_token"] * batch_size * (input_len + output_len)
                           if engine.details.get("kv_bytes_per_token") else None),
        "method_note": peaks.how + ("; allocator: torch.cuda.max_memory_reserved" if on_cuda else "")
        + _speed_note(engine),
    }
    return throughput, memory
