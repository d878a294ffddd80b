"""The Parquet result store: one file per (table, node), written atomically, read as datasets.

Layout under the store root (a local folder or any pyarrow filesystem URI, e.g. ``s3://bucket/sweeps``)::

    runs/<node_key>.parquet               one row per node: status, error, timings, where it ran
    mmlu_predictions/<node_key>.parquet   one row per MMLU question (evaluate nodes)
    throughput/<node_key>.parquet         one row per profiled batch size (profile nodes)
    memory/<node_key>.parquet             one row per profiled batch size (profile nodes)

A node writes its data tables first and its ``runs`` row last: the ``runs`` row is the commit marker.
Each file is written to a dot-prefixed temporary name and renamed into place, so a crash leaves either
the previous complete file or nothing (pyarrow.dataset ignores dot-files); a rerun of a node replaces its
files instead of appending, so no row is ever duplicated.  On object stores, which have no rename, a
single PUT is already atomic, so files are written in place there.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.schema import TABLES, table_from_rows


@dataclass
class ResultStore:
    """A handle on one store root; cheap to create, picklable, safe to use from many Ray tasks.

    ``options`` (``store.options``) are the filesystem's connection settings that are not secret, e.g.
    ``{endpoint_override: "host:9000", scheme: "http", region: "us-east-1"}`` for S3; they are passed as
    the URI's query parameters (pyarrow's own ``?endpoint_override=`` form).  Credentials come from the
    environment, which the scheduler forwards to every task (:mod:`orchestrator.secrets`).
    """

    uri: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "://" not in self.uri:
            self.uri = str(Path(self.uri).expanduser().resolve())
        self.options = dict(self.options or {})
        self._connect()

    @classmethod
    def from_config(cls, store: dict[str, Any]) -> "ResultStore":
        """The store a config's ``store`` section names (``uri`` and ``options``)."""
        return cls(store["uri"], store.get("options") or {})

    def _connect(self) -> None:
        uri = self.uri
        if self.options and "://" in uri:
            query = urlencode({k: str(v).lower() if isinstance(v, bool) else v for k, v in self.options.items()})
            uri = f"{uri}{'&' if '?' in uri else '?'}{query}"
        self._fs, self._root = pafs.FileSystem.from_uri(uri)

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.uri, self.options = state["uri"], state.get("options") or {}
        self._connect()

    @property
    def is_local(self) -> bool:
        return isinstance(self._fs, pafs.LocalFileSystem)

    def _table_dir(self, table: str) -> str:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; allowed: {sorted(TABLES)}")
        return f"{self._root}/{table}"

    def check_writable(self) -> None:
        """Create the root and write/delete a probe file, so an unusable store fails before any work."""
        self._fs.create_dir(self._root, recursive=True)
        probe = f"{self._root}/.probe-{uuid.uuid4().hex}"
        with self._fs.open_output_stream(probe) as out:
            out.write(b"ok")
        self._fs.delete_file(probe)

    def write(self, table: str, node_key: str, rows: list[dict]) -> None:
        """Replace ``node_key``'s file in ``table`` with ``rows`` (atomically where the filesystem allows)."""
        data = table_from_rows(table, rows)
        directory = self._table_dir(table)
        self._fs.create_dir(directory, recursive=True)
        final = f"{directory}/{node_key}.parquet"
        if not self.is_local:
            pq.write_table(data, final, filesystem=self._fs)
            return
        tmp = f"{directory}/.tmp-{node_key}-{uuid.uuid4().hex}.parquet"
        try:
            pq.write_table(data, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def delete(self, table: str, node_key: str) -> None:
        path = f"{self._table_dir(table)}/{node_key}.parquet"
        if self._fs.get_file_info(path).type != pafs.FileType.NotFound:
            self._fs.delete_file(path)

    def read(self, table: str, columns: list[str] | None = None,
             filter: ds.Expression | None = None) -> pa.Table:
        """All rows of ``table`` under the documented schema (empty table when nothing is stored yet)."""
        directory = self._table_dir(table)
        schema = TABLES[table]
        if self._fs.get_file_info(directory).type == pafs.FileType.NotFound:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        dataset = ds.dataset(directory, filesystem=self._fs, format="parquet", schema=schema)
        return dataset.to_table(columns=columns, filter=filter)

    def node_keys(self, table: str) -> set[str]:
        """The nodes that have a committed file in ``table`` (temporary dot-files excluded)."""
        selector = pafs.FileSelector(self._table_dir(table), allow_not_found=True)
        return {Path(info.path).stem for info in self._fs.get_file_info(selector)
                if info.type == pafs.FileType.File and info.path.endswith(".parquet")
                and not Path(info.path).name.startswith((".", "_"))}

    def finished_nodes(self) -> dict[str, dict]:
        """node_key → its committed runs row (status, artifact_uri, ...)."""
        runs = self.read("runs", columns=["node_key", "status", "kind", "artifact_uri", "error", "result_json"])
        return {row["node_key"]: row for row in runs.to_pylist()}
