"""The task graph: one quantize and build per method, stable keys that move only downstream of a change."""
from __future__ import annotations

from pathlib import Path

from orchestrator.plan import plan_sweep, shard_subjects
from orchestrator.validate import validate
from tests.sweep_helpers import TINY, compose_config


def _plan(tmp_path: Path, mmlu_dir: Path, extra: list[str]):
    cfg = validate(compose_config(TINY + [f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}"] + extra))
    return plan_sweep(cfg)


def test_graph_shape(tmp_path: Path, mmlu_dir: Path) -> None:
    plan = _plan(tmp_path, mmlu_dir, ["sweep.methods=[fp16,awq,gptq]", "sweep.batch_sizes=[1,2,4]",
                                      "sweep.subjects=[anatomy,virology,marketing,philosophy,econometrics]",
                                      "sweep.num_shards=2"])
    counts = {k: len(plan.by_kind(k)) for k in ("model", "quantize", "build", "evaluate", "fidelity", "profile")}
    assert counts == {"model": 1, "quantize": 3, "build": 3, "evaluate": 6, "fidelity": 3, "profile": 9}
    builds = {n.labels["method"]: n.key for n in plan.by_kind("build")}
    for node in plan.by_kind("fidelity"):  # (the method's engine, the baseline's engine)
        assert node.upstream == (builds[node.labels["method"]], builds["fp16"])
    for node in plan.by_kind("profile") + plan.by_kind("evaluate"):
        (build_key,) = node.upstream
        assert plan.nodes[build_key].kind == "build"
        assert plan.nodes[build_key].labels["method"] == node.labels["method"]
    build = plan.by_kind("build")[0]
    assert build.config["shape"] is None  # the torch engine sizes its KV cache per cell
    keys = list(plan.nodes)
    assert keys.index(build.key) < min(keys.index(n.key) for n in plan.downstream(build.key))


def test_keys_are_stable_and_change_only_downstream_of_a_change(tmp_path: Path, mmlu_dir: Path) -> None:
    base = ["sweep.methods=[fp16,awq]", "sweep.subjects=[anatomy,virology]"]
    first = _plan(tmp_path, mmlu_dir, base)
    again = _plan(tmp_path, mmlu_dir, base)
    assert list(first.nodes) == list(again.nodes)
    changed = _plan(tmp_path, mmlu_dir, base + ["methods.awq.group_size=16"])
    moved = set(first.nodes) - set(changed.nodes)
    assert moved and all(first.nodes[k].labels.get("method") == "awq" for k in moved)
    assert {first.nodes[k].kind for k in moved} == {"quantize", "build", "evaluate", "fidelity", "profile"}
    # a change to the baseline moves every fidelity cell (each hangs off the baseline's engine too)
    rebased = _plan(tmp_path, mmlu_dir, base + ["methods.fp16.dtype=bfloat16"])
    assert not {n.key for n in first.by_kind("fidelity")} & set(rebased.nodes)
    assert {n.key for n in first.by_kind("evaluate") if n.labels["method"] == "awq"} <= set(rebased.nodes)


def test_new_batch_sizes_and_lengths_add_only_profile_cells(tmp_path: Path, mmlu_dir: Path) -> None:
    """Growing the batch grid or changing the profile lengths must reuse every build, evaluate and
    fidelity cell of the torch backend (its engine does not depend on them): only profile cells are new."""
    base = ["sweep.methods=[fp16,rtn]", "sweep.subjects=[econometrics,world_religions]", "sweep.batch_sizes=[1,2]"]
    first = _plan(tmp_path, mmlu_dir, base)
    for change in (["sweep.batch_sizes=[1,4,8]"], ["sweep.input_len=24", "sweep.output_len=6"]):
        later = _plan(tmp_path, mmlu_dir, base + change)
        new = set(later.nodes) - set(first.nodes)
        assert new and {later.nodes[k].kind for k in new} == {"profile"}, change
        kept = {k for k, n in first.nodes.items() if n.kind != "profile"}
        assert kept <= set(later.nodes)
    batch_4 = _plan(tmp_path, mmlu_dir, base + ["sweep.batch_sizes=[1,4,8]"])
    assert {n.labels["batch_size"] for n in batch_4.by_kind("profile") if n.key not in first.nodes} == {4, 8}


def test_a_local_text_files_content_is_part_of_the_key(tmp_path: Path, mmlu_dir: Path) -> None:
    text = tmp_path / "heldout.txt"
    text.write_text("first version of the held-out text\n" * 50)
    extra = ["sweep.methods=[fp16,rtn]", "sweep.subjects=[econometrics]", f"fidelity.text={text}",
             f"methods.rtn.calibration.dataset={text}"]
    first = _plan(tmp_path, mmlu_dir, extra)
    text.write_text("an edited held-out text\n" * 50)
    edited = _plan(tmp_path, mmlu_dir, extra)
    moved = set(first.nodes) - set(edited.nodes)
    assert {n.key for n in first.by_kind("fidelity")} <= moved  # re-measured on the new text
    assert {first.nodes[k].kind for k in moved} >= {"fidelity", "quantize"}
    assert not {k for k in moved if first.nodes[k].kind == "quantize" and first.nodes[k].labels["method"] == "fp16"}


def test_shards_cover_every_subject_once() -> None:
    subjects = [f"s{i:02d}" for i in range(11)]
    shards = shard_subjects(subjects, 4)
    assert len(shards) == 4 and sorted(s for shard in shards for s in shard) == subjects
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shard_subjects(subjects[:2], 5) == [["s00"], ["s01"]]
