"""A simulated two-node Ray cluster: GPU cells go only where the GPUs and the accelerator are."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from orchestrator.plan import plan_sweep
from orchestrator.schedule import run_sweep
from orchestrator.store import ResultStore
from orchestrator.validate import validate
from tests.sweep_helpers import TINY, compose_config

pytestmark = pytest.mark.slow


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "include_dashboard": False})
    # The "GPU node": 2 GPUs of accelerator type L40 (Ray's accelerator_type:<name> node resource).
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=2, resources={"accelerator_type:L40": 1})
    cluster.wait_for_nodes()
    yield cluster, gpu_node.node_id
    ray.shutdown()
    cluster.shutdown()


def test_gpu_cells_run_on_the_accelerator_node_in_parallel_each_on_its_own_gpu(two_node_cluster, tmp_path: Path,
                                                                                mmlu_dir: Path) -> None:
    cluster, gpu_node_id = two_node_cluster
    cfg = validate(compose_config(TINY + [
        f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}", f"cluster.address={cluster.address}",
        "cluster.accelerator_type=L40", "cluster.gpus_per_task=1", "sweep.methods=[fp16]",
        "sweep.stages=[profile]", "sweep.batch_sizes=[1,2,3,4]", "sweep.repeats=3", "sweep.output_len=48"]))
    plan = plan_sweep(cfg)
    outcome = run_sweep(plan, cfg)
    assert outcome.all_ok, {k: r["error"] for k, r in outcome.results.items() if r["status"] != "ok"}
    runs = ResultStore(str(tmp_path)).read("runs").to_pandas()
    gpu_cells = runs[runs.kind == "profile"]
    assert len(gpu_cells) == 4
    assert (gpu_cells["ray_node_id"] == gpu_node_id).all(), "a GPU cell ran on a node without GPUs"
    assert all(len(ids) == 1 for ids in gpu_cells["gpu_ids"]), "each cell must see exactly its own GPU"
    assert set(g for ids in gpu_cells["gpu_ids"] for g in ids) == {"0", "1"}
    # cells that overlap in time hold different GPUs, and some cells did overlap (ran in parallel)
    overlapping = 0
    cells = list(gpu_cells.itertuples())
    for i, a in enumerate(cells):
        for b in cells[i + 1:]:
            if a.started_at < b.finished_at and b.started_at < a.finished_at:
                overlapping += 1
                assert list(a.gpu_ids) != list(b.gpu_ids)
    assert overlapping >= 1
    cpu_cells = runs[runs.kind == "build"]
    assert len(cpu_cells) == 1 and cpu_cells["gpu_ids"].map(len).eq(0).all()
    # a random-weight model is built on a GPU when the cluster has one (issue 20 item 7)
    model_cell = runs[runs.kind == "model"].iloc[0]
    assert len(model_cell["gpu_ids"]) == 1 and model_cell["ray_node_id"] == gpu_node_id
    assert pd.Series(runs["status"]).eq("ok").all()
    assert (runs.kind == "sweep").sum() == 1
