"""Tasks Ray loses (a worker that dies) still end as rows; their downstream nodes are marked skipped."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.plan import Node
from orchestrator.schedule import _upstream_lost
from orchestrator.store import ResultStore
from orchestrator.sweep_record import SweepOutcome, lost_task_row

pytestmark = pytest.mark.slow


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_a_dead_worker_becomes_a_failed_row_and_its_downstream_skipped(local_ray, tmp_path: Path) -> None:
    ray = local_ray

    @ray.remote(max_retries=0)
    def dies() -> dict:
        os._exit(1)  # the worker process vanishes, as with a segfault or a kill

    @ray.remote(max_retries=0)
    def downstream(upstream: dict) -> dict:
        return upstream

    build_ref = dies.remote()
    profile_ref = downstream.remote(build_ref)
    build = Node("build-x", "build", {}, ("quantize-x",), False, {"model": "m", "method": "awq"})
    profile = Node("profile-x", "profile", {"batch_size": 4}, ("build-x",), True,
                   {"model": "m", "method": "awq", "batch_size": 4})
    cfg = {"store": {"uri": str(tmp_path)}, "sweep": {"name": "t"}}
    outcome = SweepOutcome(results={"quantize-x": {"status": "ok"}})
    with pytest.raises(ray.exceptions.RayError) as lost:
        ray.get(profile_ref)
    assert _upstream_lost(profile, {"build-x": build_ref}, outcome)
    assert not _upstream_lost(build, {}, outcome)
    with pytest.raises(ray.exceptions.RayError) as died:
        ray.get(build_ref)
    lost_task_row(build, cfg, died.value, "failed")
    lost_task_row(profile, cfg, lost.value, "skipped")
    runs = ResultStore(str(tmp_path)).read("runs").to_pandas().set_index("node_key")
    assert runs.loc["build-x", "status"] == "failed" and "died" in runs.loc["build-x", "error"].lower()
    assert runs.loc["profile-x", "status"] == "skipped" and runs.loc["profile-x", "batch_size"] == 4
