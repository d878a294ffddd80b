"""One line saying what a sweep measured, built from its resolved config (never from fixed text).

The summary header and the report's "Experiment" row both use it, so a run with overridden model, subjects,
batch sizes or device says what it ran, not what its experiment preset describes.
"""
from __future__ import annotations

from typing import Any


def _subject_count(cfg: dict[str, Any]) -> int:
    """Resolved subjects when validation added them, else ``sweep.subjects`` with ``all`` = the 57."""
    if cfg.get("subjects_resolved"):
        return len(cfg["subjects_resolved"])
    subjects = list(cfg["sweep"].get("subjects") or [])
    if subjects == ["all"]:
        from tasks.mmlu.categories import SUBJECTS

        return len(SUBJECTS)
    return len(set(subjects))


def _evaluate_part(cfg: dict[str, Any]) -> str:
    ev = cfg.get("eval") or {}
    limit = ev.get("limit_per_subject")
    questions = f"{limit} questions each" if limit else "all test questions"
    return f"MMLU {_subject_count(cfg)} subjects x {questions}, {ev.get('num_fewshot', '?')}-shot"


def _profile_part(sweep: dict[str, Any]) -> str:
    sizes = ", ".join(str(b) for b in sweep["batch_sizes"])
    return f"batch {sizes}, {sweep['input_len']} in / {sweep['output_len']} out tokens"


def _fidelity_part(cfg: dict[str, Any]) -> str:
    fid, sweep = cfg.get("fidelity") or {}, cfg["sweep"]
    return (f"fidelity {fid.get('num_sequences', '?')} x {fid.get('seq_len', '?')} tokens "
            f"vs {sweep.get('baseline', '?')}")


def _device_part(cfg: dict[str, Any]) -> str:
    backend = cfg.get("backend") or {}
    device = backend.get("device", "?")
    accelerator = (cfg.get("cluster") or {}).get("accelerator_type")
    where = {"auto": "the task's GPU if it has one, else CPU"}.get(device, device)
    return f"{backend.get('name', '?')} backend on {where}" + (f" ({accelerator})" if accelerator else "")


def describe_setup(cfg: dict[str, Any]) -> str:
    """``<sweep name>: model ...; methods ...; <one part per stage>; <backend and device>``.

    ``cfg`` is the resolved config (or a sweep row's ``config_json``, which holds the same sections).
    """
    sweep = cfg["sweep"]
    stages = list(sweep.get("stages") or [])
    parts = [f"model {cfg['model'].get('name', '?')}", f"methods {', '.join(sweep['methods'])}"]
    if "evaluate" in stages:
        parts.append(_evaluate_part(cfg))
    if "fidelity" in stages:
        parts.append(_fidelity_part(cfg))
    if "profile" in stages:
        parts.append(_profile_part(sweep))
    parts.append(_device_part(cfg))
    return f"{sweep.get('name') or 'sweep'}: " + "; ".join(parts)
