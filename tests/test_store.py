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
