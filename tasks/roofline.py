"""How close a decode step runs to the memory-bandwidth limit of the device it ran on.

Why: at small batches a decode step is bound by the bytes it must read (every weight once, the KV cache
so far), so "tokens/s" alone cannot tell a slow kernel from a slow GPU, and int4's speed-up over bf16 is
only meaningful if both run near their limit.  The limit is taken from the same device, measured by a
copy (bytes read + written / time), not from a datasheet, so it holds for any GPU (or CPU) a cell runs on.

    roofline decode tokens/s = batch × copy bandwidth / bytes one decode step must move
    % of roofline            = 100 × measured decode tokens/s / roofline decode tokens/s
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

_MIB = 2**20


def copy_bandwidth(device: str, nbytes: int | None = None, repeats: int = 10, warmup: int = 3) -> float:
    """Memory bandwidth of ``device`` in bytes/s: a ``nbytes`` copy, bytes read plus bytes written, median.

    On CUDA the copy is timed with events and sized to 1 GiB (at most a quarter of the free memory); on CPU
    with the wall clock over 128 MiB (source + destination 256 MiB, beyond a server's last-level cache),
    about half a second on a 2-core machine.  The buffers are freed before returning, so a later
    peak-memory measurement does not see them.
    """
    on_cuda = device.startswith("cuda")
    if nbytes is None:
        if on_cuda:
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            nbytes = max(64 * _MIB, min(1024 * _MIB, free // 4))
        else:
            nbytes = 128 * _MIB
    if on_cuda:
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    else:  # randint over 128 MiB takes 0.6 s of a 2-core CPU; a constant plus random bytes where the check looks
        src = torch.full((nbytes,), 0xA5, dtype=torch.uint8)
        src[:4096] = torch.randint(0, 255, (4096,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    times: list[float] = []
    for _ in range(repeats):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    if not torch.equal(dst[:4096], src[:4096]):  # a copy that did not happen must not become a bandwidth
        raise RuntimeError(f"copy bandwidth test on {device}: destination differs from source")
    del src, dst
    if on_cuda:
        torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


@dataclass(frozen=True)
class DecodeReads:
    """What one decode step reads besides the KV cache: the weights without the token-embedding table
    (a step gathers only ``batch`` rows of it, unless the table is tied to the output head, which reads
    all of it), and the bytes of one embedding row."""

    weight_bytes: int
    embedding_row_bytes: int


def unique_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, those sharing storage (tied weights) counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def decode_reads(model: nn.Module, embedding: torch.Tensor, head: torch.Tensor | None) -> DecodeReads:
    """``DecodeReads`` of ``model`` whose token-embedding weight is ``embedding`` and output head's weight
    ``head`` (tied when they share storage)."""
    tied = head is not None and head.data_ptr() == embedding.data_ptr()
    table = embedding.numel() * embedding.element_size()
    total = unique_bytes(model)
    return DecodeReads(weight_bytes=total if tied else total - table,
                       embedding_row_bytes=embedding.shape[-1] * embedding.element_size())


def decode_bytes_per_step(reads: DecodeReads, kv_bytes_per_token: int, batch: int, input_len: int,
                          output_len: int) -> float:
    """Fewest bytes an average decode step must move: every weight once, ``batch`` embedding rows, the KV
    cache of the positions so far (averaged over the steps) read once, and one new K/V per sequence."""
    average_context = input_len + output_len / 2
    return reads.weight_bytes + batch * reads.embedding_row_bytes + batch * (average_context + 1) * kv_bytes_per_token


def roofline_columns(details: dict, bandwidth: float | None, batch: int, input_len: int, output_len: int,
                     decode_tokens_per_s: float | None) -> dict[str, float | None]:
    """The throughput row's roofline columns from an engine's ``details`` (``decode_reads`` and
    ``kv_bytes_per_token``); all null when the engine does not say what it reads."""
    reads, kv = details.get("decode_reads"), details.get("kv_bytes_per_token")
    columns: dict[str, float | None] = {"copy_bandwidth_bytes_per_s": bandwidth, "decode_bytes_per_step": None,
                                        "roofline_decode_tokens_per_s": None, "roofline_pct": None}
    if reads is None or not kv or not bandwidth:
        return columns
    step = decode_bytes_per_step(reads, kv, batch, input_len, output_len)
    roofline = batch * bandwidth / step
    columns.update(decode_bytes_per_step=step, roofline_decode_tokens_per_s=roofline,
                   roofline_pct=100 * decode_tokens_per_s / roofline if decode_tokens_per_s else None)
    return columns
