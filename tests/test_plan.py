"""The task graph: one quantize per method, one build per engine shape, stable keys."""
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
    assert build.config["shape"] == {"max_batch_size": 4, "max_input_len": 8, "max_seq_len": 12}
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


def test_shards_cover_every_subject_once() -> None:
    subjects = [f"s{i:02d}" for i in range(11)]
    shards = shard_subjects(subjects, 4)
    assert len(shards) == 4 and sorted(s for shard in shards for s in shard) == subjects
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shard_subjects(subjects[:2], 5) == [["s00"], ["s01"]]
