"""The evaluate task: MMLU through lm-eval for one shard of subjects, one row per question.

lm-eval does the prompting (the stock ``mmlu_<subject>`` tasks: the subject description, the first
``num_fewshot`` dev questions with answers, then ``question / A. .. / D. .. / Answer:``) and runs the
model; we only swap where the data comes from and read back every question from lm-eval's samples.
Nothing here uses lm-eval's group scores: the study aggregates the rows itself with the original MMLU
mapping (``tasks/mmlu/stats.py``), because lm-eval's groups differ from it (anatomy is STEM there).

Two scoring modes (``eval.scoring``):

- ``loglikelihood``: lm-eval's stock MMLU.  The prediction is the letter with the highest
  log-likelihood of " A" .. " D" after the prompt; the four log-likelihoods are recorded.
- ``generate``: the TensorRT-LLM MMLU script's way.  Same prompt, greedy generation of 2 tokens (no
  stop string except EOS), correct iff the stripped output starts with the gold letter.  We record
  ``predicted`` as that first character when it is one of A-D, else "" (so ``correct`` is exactly the
  script's ``pred.strip().startswith(label)``), and the raw generation.  The prompt stays lm-eval's,
  so both modes see identical text; TensorRT-LLM's script differs only in whitespace (it does not strip
  the question and writes "about  abstract algebra" with two spaces) and, for prompts over the engine's
  input limit, drops few-shot examples where lm-eval truncates the prompt's left end.

No chat template is applied (lm-eval's default), also for instruct models: MMLU's plain completion
prompt is what published MMLU numbers use.

How lm-eval 0.4.13 is driven (verified in ``shared/notes/orchestration-stack.md`` section 5): a group
YAML generated into an include folder under ``cache_dir`` lists the stock subject tasks with per-task
overrides (``dataset_path`` -> the converted local folder; for ``generate`` also the output type,
generation settings, target and a first-letter filter).  lm-eval's own YAMLs are not copied; the
``TaskManager`` indexes only lm-eval's ``mmlu/default`` folder and ours, which keeps start-up near 0 s
instead of ~8 s for the full index.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from tasks.mmlu.categories import SUBJECTS, category, subcategory
from tasks.mmlu.data import LETTERS, prepare_hf_layout, read_subject, resolve_mmlu_dir

log = logging.getLogger(__name__)

SCORING_MODES = ("loglikelihood", "generate")
#: Tokens generated in ``generate`` mode, as in TensorRT-LLM's examples/mmlu.py (``output_len = 2``).
GENERATE_TOKENS = 2
#: lm-eval filter name of the generate variant; its metric key is ``exact_match,<this>``.
GENERATE_FILTER = "first_letter"
#: The columns of one per-question row (``mmlu_predictions`` minus the orchestrator's key columns).
ROW_KEYS = ("subject", "subcategory", "category", "question_index", "gold", "predicted", "correct",
            "choice_scores", "generation", "scoring", "num_fewshot")


def validate_request(subjects: list[str], scoring: str) -> list[str]:
    """Check the shard and the scoring mode before anything expensive; return the subjects in order."""
    if scoring not in SCORING_MODES:
        raise ValueError(f"eval.scoring={scoring!r} is not a scoring mode; allowed: {', '.join(SCORING_MODES)}")
    if isinstance(subjects, str):
        subjects = [subjects]
    unknown = [s for s in subjects if s not in SUBJECTS]
    if unknown:
        raise ValueError(f"sweep.subjects has unknown MMLU subject(s) {unknown}; allowed: {', '.join(SUBJECTS)}")
    if not subjects:
        raise ValueError("sweep.subjects is empty: a shard needs at least one MMLU subject")
    if len(set(subjects)) != len(subjects):
        raise ValueError(f"sweep.subjects lists a subject twice: {subjects}")
    return list(subjects)


def first_letter(generation: str) -> str:
    """The predicted letter of a generation: its first non-space character if that is A-D, else ""."""
    head = generation.strip()[:1]
    return head if head in LETTERS else ""


def _task_overrides(scoring: str, dataset_path: Path | None, datasets_cache: Path) -> dict[str, Any]:
    """Per-subject overrides of the stock ``mmlu_<subject>`` task."""
    over: dict[str, Any] = {"dataset_kwargs": {"cache_dir": str(datasets_cache)}}
    if dataset_path is not None:
        over["dataset_path"] = str(dataset_path)
    if scoring == "generate":
        over.update({
            "output_type": "generate_until",
            "doc_to_target": "{{['A', 'B', 'C', 'D'][answer]}}",  # the letter, also in the few-shot answers
            "doc_to_choice": None,
            # until [] + lm-eval's HFLM adds the EOS string: stop only at EOS, like model.generate.
            "generation_kwargs": {"until": [], "max_gen_toks": GENERATE_TOKENS, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "filter_list": [{"name": GENERATE_FILTER, "filter": [
                {"function": "regex", "regex_pattern": r"^\s*([ABCD])", "fallback": ""},
                {"function": "take_first"}]}],
        })
    return over


def metric_key(scoring: str) -> str:
    """lm-eval's result key of the per-subject accuracy in this scoring mode."""
    return "acc,none" if scoring == "loglikelihood" else f"exact_match,{GENERATE_FILTER}"


def _write_group_yaml(include_root: Path, subjects: list[str], overrides: dict[str, Any],
                      scoring: str) -> tuple[str, Path]:
    """Write the shard's group YAML in its own include folder, atomically; return (group name, folder).

    Identical content gives the identical name, so repeated and concurrent calls share one file, and
    the TaskManager indexes just this one YAML next to lm-eval's MMLU folder.
    """
    import yaml  # pyyaml comes with lm-eval

    body = {
        "task": [{"task": f"mmlu_{s}", **copy.deepcopy(overrides)} for s in subjects],  # no YAML anchors
        "aggregate_metric_list": [{"metric": metric_key(scoring).split(",")[0],
                                   "filter_list": [metric_key(scoring).split(",")[1]],
                                   "weight_by_size": True}],
    }
    key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    group = f"quantsweep_mmlu_{key}"
    folder = include_root / key
    target = folder / f"{group}.yaml"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")  # not *.yaml: never indexed
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump({"group": group, **body}, f, sort_keys=False)
        os.replace(tmp, target)
    return group, folder


def _rows_from_samples(subject: str, samples: list[dict], scoring: str, num_fewshot: int,
                       csv_rows: list[dict] | None) -> list[dict]:
    rows = []
    for s in sorted(samples, key=lambda x: x["doc_id"]):
        idx, doc = int(s["doc_id"]), s["doc"]
        if csv_rows is not None and doc["question"] != csv_rows[idx]["question"]:
            raise RuntimeError(f"{subject}: lm-eval doc {idx} is not row {idx} of {subject}_test.csv")
        gold = LETTERS[int(doc["answer"])]
        if scoring == "loglikelihood":
            # resps: one [(loglikelihood, is_greedy)] per choice, in A..D order
            scores = [float(r[0][0]) for r in s["resps"]]
            best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first max, like np.argmax
            predicted, generation = LETTERS[best], None
        else:
            generation = s["resps"][0][0]
            scores, predicted = None, first_letter(generation)
        rows.append({"subject": subject, "subcategory": subcategory(subject), "category": category(subject),
                     "question_index": idx, "gold": gold, "predicted": predicted,
                     "correct": predicted == gold, "choice_scores": scores, "generation": generation,
                     "scoring": scoring, "num_fewshot": num_fewshot})
    return rows


def run_mmlu(lm, subjects: list[str], *, mmlu_dir: Path | str | None, cache_dir: Path | str,
             num_fewshot: int = 5, scoring: str = "loglikelihood", limit_per_subject: int | None = None,
             seed: int = 0) -> tuple[list[dict], dict]:
    """:func:`evaluate_mmlu`, also returning lm-eval's own results dict (for cross-checks and logs)."""
    subjects = validate_request(subjects, scoring)
    if num_fewshot < 0:
        raise ValueError(f"eval.num_fewshot={num_fewshot} must be >= 0")
    if limit_per_subject is not None and limit_per_subject < 1:
        raise ValueError(f"eval.limit_per_subject={limit_per_subject} must be >= 1 or null")
    local = resolve_mmlu_dir(mmlu_dir, subjects)
    cache_dir = Path(cache_dir).resolve()
    datasets_cache = cache_dir / "hf_datasets"
    os.environ["HF_DATASETS_CACHE"] = str(datasets_cache)  # for a `datasets` not imported yet
    dataset_path = prepare_hf_layout(local, cache_dir, subjects) if local is not None else None

    import lm_eval
    from lm_eval.tasks import TaskManager

    group, include_dir = _write_group_yaml(cache_dir / "lm_eval_tasks", subjects,
                                           _task_overrides(scoring, dataset_path, datasets_cache), scoring)
    stock = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    tm = TaskManager(include_path=[str(stock), str(include_dir)], include_defaults=False)
    res = lm_eval.simple_evaluate(
        model=lm, tasks=[group], task_manager=tm, num_fewshot=num_fewshot, limit=limit_per_subject,
        log_samples=True, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    if res is None:  # non-zero rank of a distributed lm: rank 0 reports
        return [], {}
    rows = []
    for s in subjects:
        csv_rows = read_subject(local, s, "test") if local is not None else None
        rows += _rows_from_samples(s, res["samples"][f"mmlu_{s}"], scoring, num_fewshot, csv_rows)
    log.info("MMLU %s, %d-shot, %s: %d questions over %d subjects, %d correct", group, num_fewshot, scoring,
             len(rows), len(subjects), sum(r["correct"] for r in rows))
    return rows, res


def evaluate_mmlu(lm, subjects: list[str], *, mmlu_dir: Path | str | None, cache_dir: Path | str,
                  num_fewshot: int = 5, scoring: str = "loglikelihood", limit_per_subject: int | None = None,
                  seed: int = 0) -> list[dict]:
    """Evaluate ``lm`` (an ``lm_eval.api.model.LM``) on MMLU ``subjects``; one row per test question.

    ``mmlu_dir``: a local Hendrycks CSV folder (converted once into ``cache_dir``), or None for the hub
    data set cais/mmlu (fails early when offline).  ``num_fewshot`` dev examples precede each question
    (5 in the study).  ``limit_per_subject`` keeps the first N test questions of each subject.
    Each row has exactly the keys :data:`ROW_KEYS`; ``question_index`` is the row in
    ``<subject>_test.csv``, ``gold``/``predicted`` are letters, and ``choice_scores`` (loglikelihood)
    or ``generation`` (generate) is filled, the other None.
    """
    return run_mmlu(lm, subjects, mmlu_dir=mmlu_dir, cache_dir=cache_dir, num_fewshot=num_fewshot,
                    scoring=scoring, limit_per_subject=limit_per_subject, seed=seed)[0]
