"""Quantization damage measured token by token against the baseline: KL divergence, top-1 agreement, perplexity.

Why this exists next to MMLU: MMLU resolves a 1-point accuracy difference only over all 14,042 questions, and
a small model answers it near chance, so accuracy alone cannot tell AWQ from GPTQ from RTN on the demo model.
Comparing next-token distributions (as llama.cpp's ``perplexity --kl-divergence`` and quantization papers do)
separates them on any model in minutes: every scored token is a sample, not every question.

One cell of the ``fidelity`` stage loads two engines on the same device, the method's and the baseline's,
and streams the same token windows through both, one window at a time, so no logits are ever kept beyond
the window in hand.  For every window it stores one row (:func:`sequence_row`):

- ``nll_sum``: the method's negative log-likelihood of the window's tokens (natural log), so perplexity over
  any set of rows is ``exp(sum(nll_sum) / sum(tokens))``;
- ``kl_*``: KL(P_baseline || P_method) of the full-vocabulary next-token distributions at each scored
  position, computed exactly in float64 from both models' logits (no top-k truncation);
- ``top1_agreement``: the fraction of positions where both models' most likely next token is the same.

A window is ``[prefix] + seq_len - 1`` text tokens, where the prefix is the tokenizer's BOS token (EOS when
it has none), like lm-eval's ``loglikelihood_rolling``; its ``seq_len - 1`` text tokens are scored, the first
conditioned on the prefix only.  Windows are cut from the text tokenized once, non-overlapping, and a seeded
subset of ``num_sequences`` is taken (kept in text order), so every method sees the same tokens.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from tasks.calibration import PYDOC_TOPICS, heldout_texts, load_texts

#: ``fidelity.text`` value for the held-out half of the default calibration source (never calibrated on).
PYDOC_HELDOUT = "pydoc_topics_heldout"

KL_HOW = ("KL(P_baseline || P_method) per scored position, exact over the full vocabulary: "
          "sum_v p_b(v) * (log p_b(v) - log p_m(v)) from both models' log-softmax of the logits in float64")


@dataclass(frozen=True)
class FidelityText:
    """The token windows one fidelity cell scores, and where they came from (stored in every row)."""

    source: str  # "pydoc_topics_heldout" or the path of a local .txt / .jsonl
    windows: list[list[int]]  # num_sequences x seq_len token ids, each starting with the prefix token
    fingerprint: str  # hash of the exact token ids

    @property
    def seq_len(self) -> int:
        return len(self.windows[0])


def fidelity_texts(source: str) -> list[str]:
    """The texts of ``fidelity.text``: the held-out pydoc split, or a local ``.txt`` / ``.jsonl`` file."""
    if source == PYDOC_HELDOUT:
        return heldout_texts()
    if source == PYDOC_TOPICS:
        raise ValueError(f"fidelity.text: {PYDOC_TOPICS!r} is the calibration split; use {PYDOC_HELDOUT!r} "
                         "(its held-out half) or a local .txt/.jsonl file")
    return load_texts(source)


def prefix_token_id(tokenizer: Any) -> int:
    """The token a window starts with: BOS, or EOS for tokenizers without one (lm-eval's choice)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return int(token)


def token_windows(tokenizer: Any, texts: Sequence[str], seq_len: int, num_sequences: int,
                  seed: int = 0) -> list[list[int]]:
    """``num_sequences`` windows of ``[prefix] + seq_len - 1`` text tokens (see the module docstring)."""
    if seq_len < 2:
        raise ValueError(f"fidelity.seq_len must be >= 2, got {seq_len}")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    body = seq_len - 1
    starts = range(0, len(ids) - body + 1, body)
    if num_sequences > len(starts):
        raise ValueError(f"fidelity text has {len(ids)} tokens = {len(starts)} windows of {seq_len}; "
                         f"fidelity.num_sequences={num_sequences} is too many (lower it or fidelity.seq_len, "
                         "or set fidelity.text to a larger local file)")
    prefix = prefix_token_id(tokenizer)
    picked = sorted(random.Random(seed).sample(list(starts), num_sequences))
    return [[prefix] + ids[s:s + body] for s in picked]


def fingerprint(windows: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for window in windows:
        digest.update(json.dumps(window).encode())
    return digest.hexdigest()[:16]


def prepare_text(tokenizer: Any, source: str, seq_len: int, num_sequences: int, seed: int = 0) -> FidelityText:
    windows = token_windows(tokenizer, fidelity_texts(source), seq_len, num_sequences, seed)
    return FidelityText(source, windows, fingerprint(windows))


def token_kl(baseline_logits: torch.Tensor, method_logits: torch.Tensor) -> torch.Tensor:
    """[T, V] logits of both models -> KL(P_baseline || P_method) per position [T], float64, exact."""
    return _kl(*_log_probs(baseline_logits, method_logits))


def _log_probs(baseline_logits: torch.Tensor, method_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.log_softmax(baseline_logits.double(), dim=-1),
            torch.log_softmax(method_logits.to(baseline_logits.device).double(), dim=-1))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def sequence_row(window: Sequence[int], baseline_logits: torch.Tensor, method_logits: torch.Tensor
                 ) -> dict[str, Any]:
    """One window's row: logits [L, V] of both models for the window's L tokens -> the scored metrics.

    Position t's logits predict token t + 1, so positions 0..L-2 score tokens 1..L-1 (L - 1 tokens).
    """
    if baseline_logits.shape != method_logits.shape:
        raise ValueError(f"logits shapes differ: baseline {tuple(baseline_logits.shape)}, method "
                         f"{tuple(method_logits.shape)} (do both checkpoints share one tokenizer?)")
    base = baseline_logits[:-1]
    meth = method_logits[:-1].to(base.device)
    targets = torch.as_tensor(window[1:], device=base.device)
    log_p, log_q = _log_probs(base, meth)
    kl = _kl(log_p, log_q).clamp_min(0.0)  # rounding can leave -1e-17 where both agree
    nll = -log_q.gather(-1, targets[:, None])[:, 0]
    agree = base.argmax(dim=-1) == meth.argmax(dim=-1)
    return {"tokens": int(targets.numel()), "nll_sum": float(nll.sum()), "kl_mean": float(kl.mean()),
            "kl_p99": float(torch.quantile(kl, 0.99)), "kl_max": float(kl.max()),
            "top1_agreement": float(agree.double().mean()), "kl_tokens": kl.float().cpu().tolist()}


def measure(method_engine: Any, baseline_engine: Any, text: FidelityText) -> Iterator[dict[str, Any]]:
    """Stream the windows through both engines; yield one row per window (see :func:`sequence_row`).

    The baseline's own cell passes one engine twice: its logits are computed once (KL 0 exactly, as two
    passes of a deterministic engine would give), which halves the cell that gives the baseline's perplexity."""
    for index, window in enumerate(text.windows):
        baseline_logits = baseline_engine.prompt_logits([window])[0]
        method_logits = (baseline_logits if method_engine is baseline_engine
                         else method_engine.prompt_logits([window])[0])
        yield {"sequence_index": index, **sequence_row(window, baseline_logits, method_logits)}
