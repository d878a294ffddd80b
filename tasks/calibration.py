"""Calibration (and held-out) text for weight quantization, available offline.

Why ``pydoc_topics`` is the default: AWQ and GPTQ need a few thousand tokens of ordinary text to see
realistic activations, and quantsweep must run with no network.  CPython ships the text of its own
reference manual topics in ``pydoc_data.topics`` (78 distinct texts, ~465k characters of English
prose with some code, in Python 3.11), so every interpreter has it and no data set download is
needed.  The AWQ and GPTQ papers calibrate on a small random sample of generic text (Pile / C4) and
report that the result depends little on the sample's source; technical English prose is a
reasonable offline stand-in, and a local file can replace it (below).  The topics are split: of the
distinct texts in sorted key order, **even** positions are calibration text and **odd** positions
are held out, so a held-out perplexity (``heldout_texts``) never uses text the quantizer saw.

Caveat: the topics differ slightly between Python versions, so the exact calibration tokens depend on
the interpreter; ``calibration_fingerprint`` hashes them so a run records exactly what it used.

Other sources: a path to a local ``.txt`` file (the whole file is one text) or ``.jsonl`` file (one
JSON object per line with a ``"text"`` field, or a bare JSON string per line).
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

PYDOC_TOPICS = "pydoc_topics"


def pydoc_topic_texts(split: str = "calibration") -> list[str]:
    """The ``pydoc_data.topics`` texts of one split: ``"calibration"`` (even keys) or ``"heldout"`` (odd)."""
    from pydoc_data.topics import topics

    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
    unique = list(dict.fromkeys(topics[k] for k in sorted(topics)))  # 'if' and 'else' share a text
    return unique[0 if split == "calibration" else 1::2]


def heldout_texts() -> list[str]:
    """Held-out pydoc text for perplexity checks (never used for calibration)."""
    return pydoc_topic_texts("heldout")


def load_texts(dataset: str) -> list[str]:
    """Texts of a calibration source: ``"pydoc_topics"`` or a local ``.txt`` / ``.jsonl`` path."""
    if dataset == PYDOC_TOPICS:
        return pydoc_topic_texts("calibration")
    path = Path(dataset)
    if not path.is_file():
        raise ValueError(
            f"calibration.dataset must be {PYDOC_TOPICS!r} or a path to a .txt/.jsonl file; {dataset!r} is neither")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl":
        texts = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                texts.append(obj if isinstance(obj, str) else obj["text"])
        return texts
    raise ValueError(f"calibration file must end in .txt or .jsonl, got {path.name!r}")


def token_windows(tokenizer: Any, texts: list[str], seq_len: int, num_samples: int | None,
                  seed: int = 0) -> list[list[int]]:
    """Cut the texts into ``num_samples`` windows of exactly ``seq_len`` token ids.

    The texts are joined with blank lines and tokenized once without special tokens, then cut into
    non-overlapping windows; each window starts with BOS when the tokenizer itself prepends BOS to
    text (Llama does, SmolLM2 does not), so calibration sees what the model sees at inference.
    When more windows exist than are asked for, a ``seed``-ed random subset is taken (kept in corpus
    order), so the samples cover the whole text rather than only its first topics.
    ``num_samples=None`` returns every window.
    """
    if seq_len < 2:
        raise ValueError(f"calibration.seq_len must be >= 2, got {seq_len}")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.bos_token_id
    bos = [bos_id] if bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id] else []
    body = seq_len - len(bos)
    windows = [bos + ids[i:i + body] for i in range(0, len(ids) - body + 1, body)]
    if num_samples is None:
        return windows
    if num_samples > len(windows):
        raise ValueError(
            f"calibration text has {len(ids)} tokens = {len(windows)} windows of {seq_len}; "
            f"calibration.num_samples={num_samples} is too many (lower it or seq_len, or give a larger file)")
    picked = sorted(random.Random(seed).sample(range(len(windows)), num_samples))
    return [windows[i] for i in picked]


def calibration_samples(tokenizer: Any, calibration: dict[str, Any], seed: int = 0) -> list[list[int]]:
    """Token-id samples for a method's ``calibration`` config {dataset, num_samples, seq_len}."""
    return token_windows(tokenizer, load_texts(str(calibration["dataset"])), int(calibration["seq_len"]),
                         int(calibration["num_samples"]), seed)


def calibration_fingerprint(samples: list[list[int]]) -> str:
    """A short hash of the exact calibration token ids (recorded with every quantized checkpoint)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s).encode())
    return h.hexdigest()[:16]
