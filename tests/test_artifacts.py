"""Artifact folders: written under a temporary name, committed by rename; a killed attempt's leftovers go."""
from __future__ import annotations

from pathlib import Path

from orchestrator.execute import _artifact


def test_a_killed_attempts_temporary_folder_is_removed_when_the_node_runs_again(tmp_path: Path) -> None:
    cfg = {"store": {"artifacts_dir": str(tmp_path)}}
    stale = tmp_path / "quantize" / ".tmp-quantize-abc-1234abcd"  # left by a SIGKILLed worker
    other = tmp_path / "quantize" / ".tmp-quantize-xyz-5678abcd"  # another node's, maybe running now
    for folder in (stale, other):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    with _artifact(cfg, "quantize", "quantize-abc") as artifact:
        (artifact.tmp / "config.json").write_text("{}")
        final = artifact.keep(artifact.tmp)
    assert not stale.exists() and other.exists()
    assert (Path(final) / "config.json").exists() and Path(final).name == "quantize-abc"
    assert sorted(p.name for p in (tmp_path / "quantize").iterdir()) == [".tmp-quantize-xyz-5678abcd",
                                                                         "quantize-abc"]
