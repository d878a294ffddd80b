"""Greedy generation over :class:`~.model.Transformer`: batched prefill, then one CUDA-graph replay per token.

The decode step (embed -> 32 compiled blocks -> compiled norm, lm_head and argmax -> feed the token back,
advance the position) is captured once per (batch, cache length) shape, so a step costs one graph launch
instead of hundreds of kernel launches from Python.  The prefill is captured too, once per (batch, prompt
length): eager, its ~1000 launches from Python (and, for int4, the de-quantization kernels' launches) cost
milliseconds of host time at batch 1 and made the time to first token vary with whatever else held the
host (a memory sampler thread, say).  Timings synchronise the device after prefill and after every step,
so each number is the device time of that step plus one host round trip.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from tasks.backends.base import GenerationTiming
from tasks.backends.torch.cuda.model import Transformer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    """Fixed-length greedy generation (EOS ignored) over a static KV cache.

    The cache is the one set up last (:meth:`setup`, e.g. at engine load) when it has this batch size
    and room for input + output; otherwise it is re-allocated to batch x (input + output).
    """

    def __init__(self, model: Transformer, compile: bool = True, cuda_graph: bool = True,
                 compile_options: dict[str, Any] | None = None):
        self.model = model
        self.device = model.tok_embeddings.weight.device
        on_cuda = self.device.type == "cuda"
        self.cuda_graph = cuda_graph and on_cuda
        if compile and on_cuda:
            import torch._dynamo

            # static shapes: one compilation (seconds) per batch size and weight format, and the int4 op's
            # split-K slice count, which depends on the batch size, is known to the compiler; the default
            # recompile limit (8) is too small for a sweep
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            model.compile_decode(**(compile_options or {"dynamic": False}))
        self.compiled = compile and on_cuda
        self.graph: torch.cuda.CUDAGraph | None = None
        self.shape: tuple[int, int] | None = None
        self.prefill_graph: torch.cuda.CUDAGraph | None = None  # for the prompt shape of self.prompt
        self.prompt: torch.Tensor | None = None
        self.score_graph: torch.cuda.CUDAGraph | None = None  # teacher-forced decode step (scoring)
        self.scores: torch.Tensor | None = None  # [S, V] fp32 logits it writes, and self.window [S] it reads

    def _decode_step(self) -> None:
        """tok [B, 1] at pos [1] -> next tok written back into tok; pos advanced (all on the device)."""
        self.tok.copy_(self.model.next_tokens(self.tok, self.pos))
        self.pos.add_(1)

    def _prefill(self) -> None:
        """prompt [B, L] from position 0 -> the first new token written into tok, pos set to L."""
        length = self.prompt.shape[1]
        logits = self.model(self.prompt, self.prompt_pos)  # [B, V] of the last position
        self.tok.copy_(logits.argmax(dim=-1, keepdim=True))
        self.pos.fill_(length)

    def _score_step(self) -> None:
        """Teacher forcing: the window's token at pos -> its logits [V] (fp32) written at row pos; pos advanced."""
        token = self.window.index_select(0, self.pos).view(1, 1)
        logits = self.model(token, self.pos, all_logits=True)[:, 0].float()  # [1, V]
        self.scores.index_copy_(0, self.pos, logits)
        self.pos.add_(1)

    def _capture(self, step: Any, warmup: int) -> torch.cuda.CUDAGraph:
        """Run ``step`` ``warmup`` times on a side stream (compile, autotune, allocate), then capture it."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph

    @torch.inference_mode()
    def setup(self, batch: int, max_seq: int) -> None:
        """Allocate the cache for this shape and capture the decode step (warm-up compiles it first)."""
        if self.shape == (batch, max_seq):
            return
        # release the previous graphs' memory pools before the new cache is allocated (and never replay a
        # prefill graph that writes into a freed cache)
        self.graph, self.prefill_graph, self.prompt, self.score_graph, self.scores = None, None, None, None, None
        self.model.setup_cache(batch, max_seq)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        if self.cuda_graph:
            self.graph = self._capture(self._decode_step, warmup=3)
        self.shape = (batch, max_seq)

    def _load_prompt(self, ids: torch.Tensor) -> None:
        """Copy the prompt into the static buffer the prefill graph reads, capturing it for a new shape."""
        if self.prompt is None or self.prompt.shape != ids.shape:
            self.prefill_graph = None
            self.prompt = ids.clone()
            self.prompt_pos = torch.arange(ids.shape[1], device=self.device)
            if self.cuda_graph:
                self.prefill_graph = self._capture(self._prefill, warmup=1)
        else:
            self.prompt.copy_(ids)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, output_len: int) -> GenerationTiming:
        """input_ids [B, L] -> exactly output_len greedy tokens per row, with synchronised timings."""
        batch, length = input_ids.shape
        if self.shape is None or self.shape[0] != batch or self.shape[1] < length + output_len:
            self.setup(batch, length + output_len)  # else reuse the cache (and graph) already set up
        self._load_prompt(input_ids.to(self.device))
        outputs = torch.empty(batch, output_len, dtype=torch.long, device=self.device)
        _sync(self.device)
        start = time.perf_counter()
        if self.prefill_graph is not None:
            self.prefill_graph.replay()
        else:
            self._prefill()
        outputs[:, 0:1].copy_(self.tok)
        _sync(self.device)
        first = time.perf_counter() - start
        steps = []
        for i in range(1, output_len):
            t0 = time.perf_counter()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._decode_step()
            outputs[:, i:i + 1].copy_(self.tok)
            _sync(self.device)
            steps.append(time.perf_counter() - t0)
        total = time.perf_counter() - start
        return GenerationTiming(batch, length, output_len, first, steps, total, outputs.cpu())

    @torch.inference_mode()
    def decode_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [L] -> the logits [L, V] (fp32) at every position, each computed by a decode step.

        Scoring through the decode step, not a prefill, makes the logits those of the kernels that generate
        tokens (for int4: the GEMV / mma kernels; a long prefill de-quantizes and uses cuBLAS instead), with
        the window's own token fed at each position (teacher forcing).  One graph replay per token, no host
        synchronisation in between.
        """
        length = ids.numel()
        if self.shape is None or self.shape[0] != 1 or self.shape[1] < length:
            self.setup(1, length)
        if self.scores is None:  # once per cache shape (setup drops them with the cache)
            self.window = torch.zeros(self.shape[1], dtype=torch.long, device=self.device)
            self.scores = torch.zeros(self.shape[1], self.model.args.vocab_size, dtype=torch.float32,
                                      device=self.device)
            if self.cuda_graph:
                self.pos.zero_()
                self.score_graph = self._capture(self._score_step, warmup=1)
        self.window[:length].copy_(ids)
        self.pos.zero_()
        for _ in range(length):
            if self.score_graph is not None:
                self.score_graph.replay()
            else:
                self._score_step()
        return self.scores[:length].clone()

    def release(self) -> None:
        self.graph, self.prefill_graph, self.prompt, self.score_graph, self.scores = None, None, None, None, None
        self.model.caches = []
        self.model.cache_shape = None
        self.shape = None
