"""lm-eval ``LM`` over a TensorRT-LLM engine: log-likelihoods from logits, greedy generation.

The wrapper is split in two so everything but the engine call is tested on CPU with recorded logits:
- pure functions: scoring windows (HFLM's truncation), the prefix queries that give each continuation
  token's logits, deduplication and length-sorted batching, log-prob summation with the greedy check,
  and generation post-processing (stop strings);
- ``TensorRTLLMLM``, an ``lm_eval.api.model.TemplateLM`` (so context/continuation tokenisation is
  lm-eval's own ``_encode_pair``, identical to HFLM) that calls a ``TokenScorer``.

Two ways to get the logits of continuation tokens, same numbers for a causal model:
- ``prompt`` mode (engine built with ``gather_context_logits``): one pass over the window
  ``(context + continuation)[-(max_len + 1):][:-1]``; row ``L - n + j`` predicts continuation token j;
- ``next_token`` mode (default engine): one query per continuation token, the window's prefix of
  length ``L - n + j + 1``, scored from the first generated step's logits.  MMLU's continuations are one
  token and its four choices share one context, so after deduplication MMLU costs one prefill per
  question in either mode.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

try:  # lm-eval is a core dependency of quantsweep; keep the pure helpers importable without it
    from lm_eval.api.model import TemplateLM
except ImportError:  # pragma: no cover - exercised only in a stripped TensorRT-LLM container
    TemplateLM = object  # type: ignore[misc,assignment]


class TokenScorer(Protocol):
    """What the wrapper needs from an engine; ``TensorRTLLMEngine`` and test fakes implement it."""

    max_input_len: int
    has_prompt_logits: bool

    def next_token_logits(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """For each token list, the logits [V] of the token that would follow it."""

    def prompt_logits(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """For each token list of length L, logits [L, V]; row i predicts token i + 1."""

    def greedy_generate(self, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each token list, stopping at EOS (EOS not included)."""


# --------------------------------------------------------------------------------------------------
# pure helpers


def scoring_window(context: Sequence[int], continuation: Sequence[int], max_len: int) -> list[int]:
    """HFLM's input for one request: ``(context + continuation)[-(max_len + 1):][:-1]``."""
    if not continuation:
        raise ValueError("empty continuation")
    if len(continuation) > max_len:
        raise ValueError(f"continuation of {len(continuation)} tokens exceeds the engine's {max_len} inputs")
    return (list(context) + list(continuation))[-(max_len + 1):][:-1]


def prefix_queries(window: Sequence[int], n_cont: int) -> list[tuple[int, ...]]:
    """The ``n_cont`` window prefixes whose next-token logits predict continuation tokens 0..n-1."""
    length = len(window)
    return [tuple(window[: length - n_cont + j + 1]) for j in range(n_cont)]


def continuation_logprob(rows: torch.Tensor, targets: Sequence[int]) -> tuple[float, bool]:
    """Sum of ``log_softmax(rows)[j, targets[j]]`` and whether every target is the argmax.

    ``rows`` [n, V] are the logits that predict the n continuation tokens (computed in fp32).
    """
    if rows.shape[0] != len(targets):
        raise ValueError(f"{rows.shape[0]} logit rows for {len(targets)} targets")
    logprobs = torch.log_softmax(rows.float(), dim=-1)
    target = torch.tensor(list(targets), dtype=torch.long)
    total = logprobs.gather(1, target[:, None]).sum().item()
    greedy = bool(torch.equal(logprobs.argmax(dim=-1), target))
    return float(total), greedy


def length_sorted_batches(items: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``items`` grouped into batches, longest first (like lm-eval's Collator).

    Longest first makes an out-of-memory batch fail at once rather than at the end, and keeps the
    lengths inside a batch similar.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def run_deduplicated(queries: Sequence[tuple[int, ...]], batch_size: int,
                     run: Callable[[list[list[int]]], list[Any]]) -> dict[tuple[int, ...], Any]:
    """Run each distinct query once, in length-sorted batches; map query -> result."""
    unique = list(dict.fromkeys(queries))
    results: dict[tuple[int, ...], Any] = {}
    for batch in length_sorted_batches(unique, batch_size):
        outputs = run([list(unique[i]) for i in batch])
        if len(outputs) != len(batch):
            raise RuntimeError(f"engine returned {len(outputs)} results for {len(batch)} inputs")
        for i, out in zip(batch, outputs):
            results[unique[i]] = out
    return results


def score_requests(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], scorer: TokenScorer,
                   batch_size: int) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) for (context tokens, continuation tokens) pairs, in input order."""
    windows = [scoring_window(ctx, cont, scorer.max_input_len) for ctx, cont in pairs]
    if scorer.has_prompt_logits:
        logits = run_deduplicated([tuple(w) for w in windows], batch_size, scorer.prompt_logits)
        out = []
        for w, (_, cont) in zip(windows, pairs):
            rows = logits[tuple(w)][len(w) - len(cont): len(w)]
            out.append(continuation_logprob(rows, cont))
        return out
    per_request = [prefix_queries(w, len(cont)) for w, (_, cont) in zip(windows, pairs)]
    logits = run_deduplicated([q for qs in per_request for q in qs], batch_size, scorer.next_token_logits)
    return [continuation_logprob(torch.stack([logits[q] for q in qs]), cont)
            for qs, (_, cont) in zip(per_request, pairs)]


@dataclass(frozen=True)
class GenerationRequest:
    """One ``generate_until`` request after parsing lm-eval's ``gen_kwargs``."""

    until: tuple[str, ...]
    max_gen_toks: int


def parse_gen_kwargs(gen_kwargs: dict[str, Any] | None, default_max_gen_toks: int,
                     eos_text: str | None) -> GenerationRequest:
    """lm-eval ``gen_kwargs`` -> stop strings and token budget; decoding is always greedy.

    Sampling arguments (``do_sample``, ``temperature``) are rejected unless they ask for greedy
    decoding: the study's generative MMLU scoring is greedy, and a silent switch would change results.
    """
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    if isinstance(until, str):
        until = [until]
    if eos_text and eos_text not in until:
        until = [*until, eos_text]
    max_gen_toks = int(kwargs.pop("max_gen_toks", default_max_gen_toks))
    if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0.0:
        raise ValueError("backend=tensorrt_llm: only greedy generation is supported (do_sample/temperature)")
    return GenerationRequest(tuple(until), max_gen_toks)


def truncate_at_stop(text: str, until: Iterable[str]) -> str:
    """Cut ``text`` at the earliest stop string (lm-eval's ``generate_until`` contract)."""
    cut = len(text)
    for stop in until:
        if stop:
            pos = text.find(stop)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]


# --------------------------------------------------------------------------------------------------
# the lm-eval model


class TensorRTLLMLM(TemplateLM):  # type: ignore[misc,valid-type]
    """lm-eval model over a ``TokenScorer`` (a loaded TensorRT-LLM engine, or a test fake)."""

    def __init__(self, scorer: TokenScorer, tokenizer: Any, batch_size: int = 8, max_gen_toks: int = 256):
        super().__init__()
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return int(self.scorer.max_input_len)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            return list(self.tokenizer.encode(string))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              **kwargs: Any) -> list[tuple[float, bool]]:
        return score_requests([(ctx, cont) for _, ctx, cont in requests], self.scorer, self.batch_size)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("backend=tensorrt_llm: loglikelihood_rolling (perplexity tasks) is not "
                                  "implemented; MMLU needs only loglikelihood and generate_until")

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.tokenizer.eos_token_id is not None else None
        parsed = [(ctx, parse_gen_kwargs(kw, self.max_gen_toks, eos_text)) for ctx, kw in
                  (req.args for req in requests)]
        results: list[str | None] = [None] * len(parsed)
        # group by token budget so one batch shares max_new_tokens
        for budget in sorted({p.max_gen_toks for _, p in parsed}):
            idx = [i for i, (_, p) in enumerate(parsed) if p.max_gen_toks == budget]
            max_ctx = max(1, self.max_length - budget)
            prompts = [self.tok_encode(parsed[i][0])[-max_ctx:] for i in idx]
            for batch in length_sorted_batches(prompts, self.batch_size):
                outs = self.scorer.greedy_generate([prompts[b] for b in batch], budget)
                for b, toks in zip(batch, outs):
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
                    results[idx[b]] = truncate_at_stop(text, parsed[idx[b]][1].until)
        return [r if r is not None else "" for r in results]
