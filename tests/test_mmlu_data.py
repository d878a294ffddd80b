"""MMLU mapping and data: the project's mapping copy, folder checks, CSV reading, hub-layout conversion."""
from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tasks.mmlu import categories
from tasks.mmlu.data import (MMLUDataError, check_subject_files, prepare_hf_layout, read_subject,
                              resolve_mmlu_dir)



def test_mapping_equals_shared_categories_json(mmlu_dir):
    shared = json.loads((mmlu_dir / "categories.json").read_text())
    assert categories.subject_to_subcategory() == shared["subject_to_subcategory"]
    assert categories.subcategory_to_category() == shared["subcategory_to_category"]
    assert {c: list(categories.subcategories_of(c)) for c in categories.CATEGORIES} == \
        shared["category_to_subcategories"]
    assert categories.SUBJECTS == tuple(sorted(shared["subject_to_subcategory"]))
    # and with the subjects that the data folder really holds
    assert categories.SUBJECTS == tuple(sorted(p.name[:-9] for p in (mmlu_dir / "test").glob("*_test.csv")))


def test_mapping_shape():
    assert (len(categories.SUBJECTS), len(categories.SUBCATEGORIES), len(categories.CATEGORIES)) == (57, 17, 4)
    assert list(categories.SUBJECTS) == sorted(categories.SUBJECTS)
    assert categories.CATEGORIES == ("STEM", "humanities", "social sciences", "other (business, health, misc.)")
    assert {categories.subcategory(s) for s in categories.SUBJECTS} == set(categories.SUBCATEGORIES)
    assert categories.subcategory("anatomy") == "health"
    assert categories.category("anatomy") == "other (business, health, misc.)"
    assert categories.category("abstract_algebra") == "STEM"
    with pytest.raises(KeyError, match="astrology"):
        categories.category("astrology")


def test_read_subject_matches_csv_and_keeps_none_text(mmlu_dir):
    rows = read_subject(mmlu_dir, "anatomy", "test")
    assert len(rows) == 135
    with open(mmlu_dir / "test/anatomy_test.csv", newline="") as f:
        raw = list(csv.reader(f))
    assert [r["question"] for r in rows] == [r[0] for r in raw]
    assert [r["answer"] for r in rows] == [r[5] for r in raw]
    assert [r["question_index"] for r in rows] == list(range(135))
    assert len(read_subject(mmlu_dir, "abstract_algebra", "dev")) == 5
    # the answer text "None" stays text (pandas' defaults would turn it into NaN)
    choices = [c for r in read_subject(mmlu_dir, "college_computer_science", "test") for c in r["choices"]]
    assert "None" in choices
    with pytest.raises(ValueError, match="split"):
        read_subject(mmlu_dir, "anatomy", "train")


def test_resolve_errors_name_the_setting(tmp_path, monkeypatch):
    with pytest.raises(MMLUDataError, match=r"eval\.mmlu_dir=.*no such folder.*eval\.mmlu_dir=/path/to/mmlu"):
        resolve_mmlu_dir(tmp_path / "nope")
    (tmp_path / "dev").mkdir()
    with pytest.raises(MMLUDataError, match=r"missing sub-folder\(s\) test/"):
        resolve_mmlu_dir(tmp_path)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "anatomy_test.csv").write_text('q,a,b,c,d,A\n')
    with pytest.raises(MMLUDataError, match=r"missing dev/anatomy_dev.csv"):
        resolve_mmlu_dir(tmp_path)
    (tmp_path / "dev" / "anatomy_dev.csv").write_text('q,a,b,c,d,A\n')
    assert resolve_mmlu_dir(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(MMLUDataError, match=r"missing dev/virology_dev.csv, test/virology_test.csv"):
        resolve_mmlu_dir(tmp_path, subjects=["anatomy", "virology"])
    # hub mode offline: fail early and say how to point at a local copy
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(MMLUDataError, match=r"HF_HUB_OFFLINE.*eval\.mmlu_dir=/path/to/mmlu.*dev/<subject>_dev\.csv"):
        resolve_mmlu_dir(None)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(MMLUDataError, match=r"cannot be reached.*eval\.mmlu_dir"):
        resolve_mmlu_dir(None)


def test_resolve_real_folder(mmlu_dir):
    assert resolve_mmlu_dir(mmlu_dir, subjects=["anatomy", "abstract_algebra"]) == mmlu_dir.resolve()


def test_prepare_hf_layout_loads_like_the_csvs(mmlu_dir, tmp_path, monkeypatch):
    import datasets

    subjects = ["anatomy", "abstract_algebra"]
    root = prepare_hf_layout(mmlu_dir, tmp_path, subjects)
    readme = (root / "README.md").read_text()
    assert "config_name: abstract_algebra" in readme and "path: anatomy/test-*.parquet" in readme
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a local folder needs no network
    ds = datasets.load_dataset(str(root), "anatomy", cache_dir=str(tmp_path / "hf"))
    assert set(ds) == {"dev", "validation", "test"}
    for split, hf_split in (("dev", "dev"), ("val", "validation"), ("test", "test")):
        rows = read_subject(mmlu_dir, "anatomy", split)
        got = ds[hf_split]
        assert got["question"] == [r["question"] for r in rows]  # same order: doc_id == CSV row
        assert got["choices"] == [r["choices"] for r in rows]
        assert ["ABCD"[a] for a in got["answer"]] == [r["answer"] for r in rows]
        assert set(got["subject"]) == {"anatomy"}


def test_prepare_hf_layout_is_idempotent_and_concurrency_safe(mmlu_dir, tmp_path):
    subjects = ["virology", "marketing"]
    with ThreadPoolExecutor(4) as pool:  # several writers race for the same folder
        roots = list(pool.map(lambda _: prepare_hf_layout(mmlu_dir, tmp_path, subjects), range(4)))
    assert len(set(roots)) == 1
    root = roots[0]
    parent = root.parent
    assert [p.name for p in parent.iterdir()] == [root.name]  # no temporary folders left behind
    stamp = (root / "quantsweep_manifest.json").stat().st_mtime_ns
    assert prepare_hf_layout(mmlu_dir, tmp_path, reversed(subjects)) == root  # reused, not rewritten
    assert (root / "quantsweep_manifest.json").stat().st_mtime_ns == stamp
    # another subject set is another folder
    assert prepare_hf_layout(mmlu_dir, tmp_path, ["virology"]) != root
    # an incomplete folder at the target (e.g. a killed older writer) is replaced
    (root / "quantsweep_manifest.json").unlink()
    assert prepare_hf_layout(mmlu_dir, tmp_path, subjects) == root
    assert (root / "quantsweep_manifest.json").is_file()
    with pytest.raises(ValueError, match="unknown MMLU subjects"):
        prepare_hf_layout(mmlu_dir, tmp_path, ["astrology"])


#: subjects copied for the broken-file tests; econometrics has questions over several lines, so a row's line
#: in the file is not its row number + 1
COPIED = ("anatomy", "econometrics", "virology")

#: how a row is broken -> what replaces it (raw CSV text, one line)
BROKEN_ROWS = {
    "unterminated quote": '"Which is it?,one,two,three,four,A\n',
    "3 choices": "Which is it?,one,two,three,A\n",
    "answer E": "Which is it?,one,two,three,four,E\n",
}


def mmlu_copy(mmlu_dir, folder, subjects=COPIED):
    """``subjects`` of the real MMLU folder copied into ``folder`` (dev, val and test)."""
    import shutil

    for split in ("dev", "val", "test"):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for s in subjects:
            shutil.copy(mmlu_dir / split / f"{s}_{split}.csv", folder / split)
    return folder


def break_row(path, row, how):
    """Replace row ``row`` of the CSV at ``path`` as ``how`` says; return the line that row starts on."""
    import io

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    before = io.StringIO()
    csv.writer(before, lineterminator="\n").writerows(rows[:row])
    after = io.StringIO()
    csv.writer(after, lineterminator="\n").writerows(rows[row + 1:])
    path.write_text(before.getvalue() + BROKEN_ROWS[how] + after.getvalue(), encoding="utf-8")
    return before.getvalue().count("\n") + 1


@pytest.mark.parametrize("how, says", [
    ("unterminated quote", "does not parse"),
    ("3 choices", "5 fields"),
    ("answer E", "answer 'E' is not one of A, B, C, D"),
])
def test_a_broken_row_names_its_file_and_line(mmlu_dir, tmp_path, how, says):
    folder = mmlu_copy(mmlu_dir, tmp_path / "mmlu")
    path = folder / "test" / "econometrics_test.csv"
    line = break_row(path, 20, how)
    assert line > 22  # rows 8, 10, 11, 15 and 16 span several lines
    with pytest.raises(MMLUDataError) as err:
        read_subject(folder, "econometrics", "test")
    assert str(err.value).startswith(f"{path}, line {line} (row 20): ") and says in str(err.value), str(err.value)
    with pytest.raises(MMLUDataError, match=f"line {line} "):
        check_subject_files(folder, ["anatomy", "econometrics"])
    check_subject_files(folder, ["anatomy", "virology"])  # the other subjects' files are fine


def test_check_subject_files_reads_what_an_evaluate_cell_reads(mmlu_dir, tmp_path):
    """dev and test always; val only where every subject has one (as the hub layout converts it)."""
    folder = mmlu_copy(mmlu_dir, tmp_path / "mmlu")
    check_subject_files(folder, COPIED)
    line = break_row(folder / "dev" / "virology_dev.csv", 2, "3 choices")
    with pytest.raises(MMLUDataError, match=rf"virology_dev.csv, line {line} "):
        check_subject_files(folder, ["virology"])
    break_row(folder / "val" / "anatomy_val.csv", 0, "answer E")
    with pytest.raises(MMLUDataError, match="anatomy_val.csv, line 1 "):
        check_subject_files(folder, ["anatomy"])
    (folder / "val" / "econometrics_val.csv").unlink()  # val is then not read at all
    check_subject_files(folder, ["anatomy", "econometrics"])
