"""MMLU data: where it comes from, and the one conversion lm-eval needs to read it offline.

The study reads the original Hendrycks release (``dev/<subject>_dev.csv``, ``val/<subject>_val.csv``,
``test/<subject>_test.csv``; no header; ``question,A,B,C,D,answer-letter``).  lm-eval's stock MMLU tasks
read the hub data set ``cais/mmlu`` instead, so for offline runs we convert the CSVs once into that
data set's layout (one parquet file per subject and split plus a README ``configs:`` block) and point
the stock tasks' ``dataset_path`` at it (see ``tasks/evaluate.py``).  Only the *layout* changes: rows
keep the CSV order, so lm-eval's ``doc_id`` is the row index in ``<subject>_test.csv``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from tasks.mmlu.categories import SUBJECTS

LETTERS = ("A", "B", "C", "D")
#: Hendrycks folder name -> split name in the cais/mmlu hub layout.
HF_SPLITS = {"dev": "dev", "val": "validation", "test": "test"}
#: Bump when the generated layout changes, so old caches are not reused.
LAYOUT_VERSION = 1
_MANIFEST = "quantsweep_manifest.json"

_LAYOUT_HELP = (
    "Point eval.mmlu_dir at a local copy of the original MMLU release (Hendrycks et al.), e.g. "
    "`eval.mmlu_dir=/path/to/mmlu` on the command line: a folder holding dev/<subject>_dev.csv and "
    "test/<subject>_test.csv (val/<subject>_val.csv optional), as unpacked from "
    "https://people.eecs.berkeley.edu/~hendrycks/data.tar."
)


class MMLUDataError(RuntimeError):
    """The MMLU data cannot be found or read; the message says what to set."""


def _csv_path(mmlu_dir: Path, subject: str, split: str) -> Path:
    return mmlu_dir / split / f"{subject}_{split}.csv"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint: cheap, and enough to tell "no network" from "online"."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_mmlu_dir(mmlu_dir: str | os.PathLike | None,
                     subjects: Iterable[str] | None = None) -> Path | None:
    """Validate the configured MMLU source; ``None`` means "use the hub data set cais/mmlu".

    A local folder must hold ``dev/`` and ``test/`` with ``<subject>_dev.csv``/``<subject>_test.csv``
    for every subject asked for (all present ``*_test.csv`` files when ``subjects`` is None).  Hub mode
    fails early, with the setting to change, when the machine is offline (``HF_HUB_OFFLINE`` /
    ``HF_DATASETS_OFFLINE`` set, or the hub endpoint unreachable), instead of deep inside lm-eval.
    """
    if mmlu_dir is None or str(mmlu_dir) == "":
        if _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE"):
            raise MMLUDataError(
                "eval.mmlu_dir is not set, so MMLU would be read from the Hugging Face hub (cais/mmlu), "
                "but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set. " + _LAYOUT_HELP)
        if not _hub_reachable():
            raise MMLUDataError(
                "eval.mmlu_dir is not set, so MMLU would be read from the Hugging Face hub (cais/mmlu), "
                "but the hub cannot be reached from this machine. " + _LAYOUT_HELP)
        return None

    path = Path(mmlu_dir).expanduser().resolve()
    if not path.is_dir():
        raise MMLUDataError(f"eval.mmlu_dir={mmlu_dir!s}: no such folder. " + _LAYOUT_HELP)
    missing_dirs = [d for d in ("dev", "test") if not (path / d).is_dir()]
    if missing_dirs:
        raise MMLUDataError(
            f"eval.mmlu_dir={path}: missing sub-folder(s) {', '.join(missing_dirs)}/. " + _LAYOUT_HELP)
    wanted = list(subjects) if subjects is not None else available_subjects(path)
    if not wanted:
        raise MMLUDataError(f"eval.mmlu_dir={path}: no test/<subject>_test.csv files. " + _LAYOUT_HELP)
    missing = [str(_csv_path(path, s, sp).relative_to(path))
               for s in wanted for sp in ("dev", "test") if not _csv_path(path, s, sp).is_file()]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise MMLUDataError(f"eval.mmlu_dir={path}: missing {shown}. " + _LAYOUT_HELP)
    return path


def available_subjects(mmlu_dir: Path) -> list[str]:
    """Subjects with a test CSV in ``mmlu_dir``, sorted."""
    return sorted(p.name[: -len("_test.csv")] for p in (Path(mmlu_dir) / "test").glob("*_test.csv"))


def read_subject(mmlu_dir: str | os.PathLike, subject: str, split: str = "test") -> list[dict]:
    """The rows of ``<split>/<subject>_<split>.csv`` in file order.

    Each row: ``subject``, ``question_index`` (0-based row), ``question``, ``choices`` (4 strings),
    ``answer`` (the letter).  Read with the csv module so the answer texts "None"/"NA" stay text, and
    strictly: a quote never closed (or text after a closing quote) is an error, not a field that swallows
    the rows after it.  Any row that is not a question, four choices and a letter A-D raises
    :class:`MMLUDataError` naming the file and the line the row starts on (a question may span lines).
    """
    if split not in HF_SPLITS:
        raise ValueError(f"unknown MMLU split {split!r}; allowed: {', '.join(HF_SPLITS)}")
    path = _csv_path(Path(mmlu_dir), subject, split)
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, strict=True)
        i, line = 0, 1
        while True:
            where = f"{path}, line {line} (row {i})"
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise MMLUDataError(f"{where}: the CSV does not parse ({err}; a quote opened and never "
                                    "closed?)") from err
            except UnicodeDecodeError as err:
                raise MMLUDataError(f"{path}: not UTF-8 text ({err})") from err
            if len(rec) != 6:
                raise MMLUDataError(f"{where}: {len(rec)} fields, expected 6 (question,A,B,C,D,answer-letter): "
                                    f"{rec!r:.200}")
            if rec[5] not in LETTERS:
                raise MMLUDataError(f"{where}: answer {rec[5]!r:.20} is not one of {', '.join(LETTERS)}: "
                                    f"{rec!r:.200}")
            rows.append({"subject": subject, "question_index": i, "question": rec[0],
                         "choices": rec[1:5], "answer": rec[5]})
            i, line = i + 1, reader.line_num + 1
    return rows


def splits_read(mmlu_dir: str | os.PathLike, subjects: Iterable[str]) -> list[str]:
    """The splits an evaluate cell reads (:func:`prepare_hf_layout`), in dev, val, test order: dev and test,
    and val when every subject has one."""
    subjects = list(subjects)
    with_val = all(_csv_path(Path(mmlu_dir), s, "val").is_file() for s in subjects)
    return [sp for sp in HF_SPLITS if sp != "val" or with_val]


def check_subject_files(mmlu_dir: str | os.PathLike, subjects: Iterable[str]) -> None:
    """Read every CSV of ``subjects`` that an evaluate cell will read, with its reader (:func:`read_subject`),
    so a broken row stops the sweep before it quantizes and builds for minutes, naming the file and line
    (:class:`MMLUDataError`).  The sweep's pre-flight runs it on the driver and on every node that evaluates."""
    subjects = list(subjects)
    for split in splits_read(mmlu_dir, subjects):
        for subject in subjects:
            read_subject(mmlu_dir, subject, split)


def _layout_key(mmlu_dir: Path, subjects: list[str], splits: list[str]) -> str:
    """Content hash of the CSVs converted: a changed file or subject set gives a new cache folder."""
    h = hashlib.sha256(f"layout-v{LAYOUT_VERSION}\n".encode())
    for s in subjects:
        for sp in splits:
            h.update(f"{s}/{sp}\n".encode())
            h.update(_csv_path(mmlu_dir, s, sp).read_bytes())
    return h.hexdigest()[:16]


def _readme(subjects: list[str], splits: list[str]) -> str:
    lines = ["---", "configs:"]
    for s in subjects:
        lines += [f"- config_name: {s}", "  data_files:"]
        for sp in splits:
            name = HF_SPLITS[sp]
            lines += [f"  - split: {name}", f"    path: {s}/{name}-*.parquet"]
    lines += ["---", "", "MMLU (Hendrycks et al., ICLR 2021) converted by quantsweep from the original CSVs",
              "into the layout of the hub data set cais/mmlu; rows keep the CSV order.", ""]
    return "\n".join(lines)


def _is_complete(root: Path, subjects: list[str]) -> bool:
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("subjects") == subjects and manifest.get("layout_version") == LAYOUT_VERSION


def _write_layout(mmlu_dir: Path, out: Path, subjects: list[str], splits: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("question", pa.string()), ("subject", pa.string()),
                        ("choices", pa.list_(pa.string())), ("answer", pa.int64())])
    for s in subjects:
        (out / s).mkdir(parents=True)
        for sp in splits:
            rows = read_subject(mmlu_dir, s, sp)
            table = pa.Table.from_pylist(
                [{"question": r["question"], "subject": s, "choices": r["choices"],
                  "answer": LETTERS.index(r["answer"])} for r in rows], schema=schema)
            pq.write_table(table, out / s / f"{HF_SPLITS[sp]}-00000-of-00001.parquet")
    (out / "README.md").write_text(_readme(subjects, splits))
    # Written last: its presence (with the right subjects) marks the folder complete.
    (out / _MANIFEST).write_text(json.dumps(
        {"layout_version": LAYOUT_VERSION, "source": str(mmlu_dir), "subjects": subjects,
         "splits": [HF_SPLITS[sp] for sp in splits]}, indent=1))


def prepare_hf_layout(mmlu_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                      subjects: Iterable[str]) -> Path:
    """Convert ``subjects`` of a Hendrycks CSV folder into the cais/mmlu hub layout; return its folder.

    The folder is ``<cache_dir>/mmlu_hf/<content hash>`` and is reused when already complete.  Several
    processes (Ray tasks of one sweep) may call this at once: each writes a private temporary folder
    next to the target and renames it into place; a loser of that race drops its copy and uses the
    winner's.  ``val/`` is converted to the ``validation`` split when present.
    """
    mmlu_dir = Path(mmlu_dir).resolve()
    subjects = sorted(set(subjects))
    unknown = [s for s in subjects if s not in SUBJECTS]
    if unknown:
        raise ValueError(f"unknown MMLU subjects {unknown}; allowed: {', '.join(SUBJECTS)}")
    splits = splits_read(mmlu_dir, subjects)
    parent = Path(cache_dir).resolve() / "mmlu_hf"
    target = parent / _layout_key(mmlu_dir, subjects, splits)
    if _is_complete(target, subjects):
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{target.name}-"))
    try:
        _write_layout(mmlu_dir, tmp, subjects, splits)
        for attempt in range(3):
            try:
                os.rename(tmp, target)  # atomic; fails if the target exists (another writer won)
                break
            except OSError:
                if _is_complete(target, subjects):
                    break
                if attempt == 2:
                    raise
                # A stale, incomplete folder (e.g. a killed writer of an older version): replace it.
                shutil.rmtree(target, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
