"""The Parquet store: atomic per-node files, replace-not-append, explicit schemas."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.schema import SCHEMA_VERSION
from orchestrator.store import ResultStore


def _row(key: str, batch: int, tok_s: float) -> dict:
    return {"schema_version": SCHEMA_VERSION, "node_key": key, "method": "fp16", "batch_size": batch,
            "output_tokens_per_s": tok_s}


def test_write_read_replace(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "store"))
    assert store.read("throughput").num_rows == 0
    store.write("throughput", "profile-a", [_row("profile-a", 1, 10.0)])
    store.write("throughput", "profile-b", [_row("profile-b", 2, 20.0)])
    store.write("throughput", "profile-a", [_row("profile-a", 1, 11.0)])  # rerun of the same node
    table = store.read("throughput").to_pandas().sort_values("node_key")
    assert table["node_key"].tolist() == ["profile-a", "profile-b"]
    assert table["output_tokens_per_s"].tolist() == [11.0, 20.0]


def test_temp_files_are_ignored_and_schema_is_enforced(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path))
    store.write("throughput", "profile-a", [_row("profile-a", 1, 10.0)])
    (tmp_path / "throughput" / ".tmp-profile-b-crashed.parquet").write_bytes(b"half a file")
    assert store.read("throughput").num_rows == 1
    assert not [p for p in (tmp_path / "throughput").iterdir() if p.name.startswith(".tmp") and p.stat().st_size > 11]
    with pytest.raises(ValueError, match="unknown columns"):
        store.write("throughput", "profile-c", [{**_row("profile-c", 1, 1.0), "tokens": 3}])
    assert pq.read_schema(tmp_path / "throughput" / "profile-a.parquet").field("batch_size").type == "int32"


def test_remote_uri_and_unknown_table(tmp_path: Path) -> None:
    store = ResultStore(f"file://{tmp_path}/remote")
    store.check_writable()
    store.write("runs", "model-x", [{"schema_version": SCHEMA_VERSION, "node_key": "model-x", "status": "ok"}])
    assert store.finished_nodes()["model-x"]["status"] == "ok"
    with pytest.raises(ValueError, match="allowed"):
        store.read("nope")


def test_an_ok_node_without_its_data_files_runs_again(tmp_path: Path, mmlu_dir: Path) -> None:
    """A worker that outlived its lost node can commit ``ok`` after the driver cleared its rows; a rerun must
    redo that node (and only it), or its throughput rows would be lost for good."""
    from orchestrator.plan import plan_sweep
    from orchestrator.schedule import select_nodes_to_run
    from orchestrator.validate import validate
    from tests.sweep_helpers import TINY, compose_config

    cfg = validate(compose_config(TINY + [f"store.uri={tmp_path}", "sweep.stages=[profile,fidelity]",
                                          "sweep.methods=[fp16,rtn]", "sweep.batch_sizes=[1,2]"]))
    plan = plan_sweep(cfg)
    store = ResultStore(str(tmp_path))
    for node in plan.nodes.values():
        for table in {"profile": ("throughput", "memory"), "fidelity": ("fidelity",)}.get(node.kind, ()):
            store.write(table, node.key, [{"schema_version": 1, "node_key": node.key}])
    stored = {k: {"status": "ok", "kind": n.kind, "artifact_uri": None} for k, n in plan.nodes.items()}
    broken = plan.by_kind("profile")[1]
    store.delete("throughput", broken.key)
    keys = {t: store.node_keys(t) for t in ("mmlu_predictions", "throughput", "memory", "fidelity")}
    assert broken.key not in keys["throughput"] and broken.key in keys["memory"]
    to_run, reused = select_nodes_to_run(plan, stored, "failed", data_keys=keys)
    assert [n.key for n in to_run] == [broken.key] and len(reused) == len(plan.nodes) - 1
    assert select_nodes_to_run(plan, stored, "failed")[0] == []  # without the listing: trusts the runs rows
