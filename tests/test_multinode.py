"""A real multi-process Ray cluster (head + worker raylets on 127.0.0.1, its own temp dir): requests no
single node can satisfy, a GPU node killed mid-sweep, Ctrl-C, Ray's retries counted, rows naming nodes."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.cli import run
from orchestrator.store import ResultStore
from tests.cluster_helpers import GPU_NODE, REPO, cli, local_cluster, sweep_args
from tests.sweep_helpers import compose_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """Head with 2 CPUs and no GPU; one L40 node with 1 CPU, 1 GPU; one node with an ``nvme`` resource."""
    with local_cluster(head_cpus=2) as (c, temp):
        c.gpu_node = c.add_node(**GPU_NODE)
        c.add_node(num_cpus=1, resources={"nvme": 1}, node_ip_address="127.0.0.1")
        c.wait_for_nodes()
        yield c


def _ensure_gpu_node(cluster) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=cluster.address)
    if not any(n["Alive"] and n["Resources"].get("GPU") for n in ray.nodes()):
        cluster.gpu_node = cluster.add_node(**GPU_NODE)
        cluster.wait_for_nodes()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("override, field, says", [
    # 4 CPUs per task: every node has 1 or 2
    ("cluster.cpus_per_task=4", "cluster.cpus_per_task", "largest: CPU 2"),
    # the GPU is on one node and nvme on another: the cluster as a whole has both, no node has both
    ("+cluster.resources={nvme:1}", "cluster:", "no single live node has all of it"),
    ("cluster.accelerator_type=H100", "cluster.accelerator_type", "accelerator_type:L40"),
    ("cluster.memory_per_task_gb=100000", "cluster.memory_per_task_gb", "memory"),
])
def test_requests_no_single_node_can_satisfy_fail_before_submitting(cluster, tmp_path: Path, capsys, override,
                                                                     field, says) -> None:
    import ray

    _ensure_gpu_node(cluster)
    args = [a for a in sweep_args(cluster, str(tmp_path / "store"), tmp_path, [override]) if "hydra." not in a]
    started = time.monotonic()
    assert run(compose_config(args)) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration: {field}" in err and says in err, err
    assert "127.0.0.1" in err  # what each node offers
    assert time.monotonic() - started < 60
    assert not (tmp_path / "store" / "runs").exists() or not any(
        p.name.startswith("profile") for p in (tmp_path / "store" / "runs").iterdir())
    ray.shutdown()


def _rows(store: Path):
    return ResultStore(str(store)).read("runs").to_pandas()


def _wait_started(driver: subprocess.Popen, markers: Path, timeout: float = 240) -> None:
    """Until a profile cell is running (its start marker exists); fails at once if the driver exited."""
    deadline = time.monotonic() + timeout
    while not (markers.exists() and any(markers.iterdir())):
        if driver.poll() is not None:
            out, err = driver.communicate()
            pytest.fail(f"the sweep ended (exit {driver.returncode}) before a cell started: {err[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting for a profile cell to start"
        time.sleep(0.2)


@pytest.mark.timeout(400)
def test_gpu_node_lost_mid_sweep_ends_within_stall_timeout_then_rerun_completes(cluster, tmp_path: Path) -> None:
    """kill -9 of the GPU node's raylet while a cell runs there; the node never comes back.  The sweep
    records every queued cell and exits 3 with the resume hint; a new GPU node + the same command finishes
    with every node exactly once."""
    _ensure_gpu_node(cluster)
    store, markers, stall = tmp_path / "store", tmp_path / "markers", 30
    args = sweep_args(cluster, str(store), tmp_path, [
        "sweep.batch_sizes=[1,2,3]", "cluster.max_retries=1", f"cluster.stall_timeout_s={stall}",
        "+cluster.runtime_env={worker_process_setup_hook:tests.multinode_fakes.slow_profile,"
        f"env_vars:{{QUANTSWEEP_TEST_MARKERS:'{markers}',PYTHONPATH:'{REPO}'}}}}"])
    driver = cli(args)
    try:
        _wait_started(driver, markers)
        lost = cluster.gpu_node
        lost_id = lost.node_id
        lost.all_processes["raylet"][0].process.kill()  # SIGKILL; the node never restarts
        killed = time.monotonic()
        out, err = driver.communicate(timeout=stall + 90)
        took = time.monotonic() - killed
    finally:
        if driver.poll() is None:
            driver.kill()
    cluster.remove_node(lost, allow_graceful=False)  # the node's leftover agents
    assert driver.returncode == 3, err[-3000:]
    assert "rerun the same command to resume" in err
    assert took < stall + 45, f"the sweep took {took:.0f} s after the node died (stall timeout {stall} s)"
    runs = _rows(store)
    cells = runs[runs.kind == "profile"]
    assert len(cells) == 3, cells[["status", "error"]]
    # the cell running there when the raylet died is recorded by the driver as failed, naming the node,
    # unless its worker outlived the raylet and committed its own result first (then it is simply ok)
    ran_there = cells[cells.ray_node_id == lost_id]
    assert len(ran_there) >= 1 and (ran_there.node_ip == "127.0.0.1").all() and (ran_there.attempt >= 1).all()
    recorded = cells[cells.status != "ok"]
    assert len(recorded) >= 2 and set(recorded.status) == {"failed"}, cells[["status", "error"]]
    assert recorded.error.str.contains("no live Ray node can run this cell|no progress", regex=True).all()
    assert recorded.error.str.contains(lost_id).all(), "every row the driver wrote names the lost node"
    assert (cells[cells.ray_node_id != lost_id].attempt == 0).all()  # the queued cells never started

    # restart: a new GPU node, the same command
    _ensure_gpu_node(cluster)
    shutil.rmtree(markers)
    again = cli(args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    runs = _rows(store)
    nodes = runs[runs.kind != "sweep"]
    assert nodes.node_key.is_unique and len(nodes) == 1 + 1 + 1 + 3  # model, quantize, build, 3 profiles
    assert set(nodes.status) == {"ok"}
    assert (runs.kind == "sweep").sum() == 1
    assert sum(1 for _ in (store / "throughput").glob("*.parquet")) == 3
    assert len(ResultStore(str(store)).read("throughput")) == 3  # 0 lost, 0 duplicated
    assert nodes.node_ip.eq("127.0.0.1").all()


@pytest.mark.timeout(300)
def test_ctrl_c_stops_cleanly_with_the_resume_hint(cluster, tmp_path: Path) -> None:
    _ensure_gpu_node(cluster)
    markers = tmp_path / "markers"
    args = sweep_args(cluster, str(tmp_path / "store"), tmp_path, [
        "sweep.batch_sizes=[1,2]",
        "+cluster.runtime_env={worker_process_setup_hook:tests.multinode_fakes.slow_profile,"
        f"env_vars:{{QUANTSWEEP_TEST_MARKERS:'{markers}',PYTHONPATH:'{REPO}'}}}}"])
    driver = cli(args)
    try:
        _wait_started(driver, markers)
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, err[-3000:]
    assert "interrupted; rerun the same command to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


@pytest.mark.timeout(300)
def test_attempt_counts_rays_retries(cluster, tmp_path: Path) -> None:
    """The profile cell's first worker dies; Ray retries it and the row says attempt 2."""
    _ensure_gpu_node(cluster)
    store, markers = tmp_path / "store", tmp_path / "markers"
    args = sweep_args(cluster, str(store), tmp_path, [
        "sweep.batch_sizes=[1]", "cluster.max_retries=2",
        "+cluster.runtime_env={worker_process_setup_hook:tests.multinode_fakes.crash_first_profile,"
        f"env_vars:{{QUANTSWEEP_TEST_MARKERS:'{markers}',PYTHONPATH:'{REPO}'}}}}"])
    driver = cli(args)
    out, err = driver.communicate(timeout=280)
    assert driver.returncode == 0, err[-3000:]
    runs = _rows(store).set_index("kind")
    assert runs.loc["profile", "status"] == "ok" and runs.loc["profile", "attempt"] == 2
    assert runs.loc["build", "attempt"] == 1
    assert runs.loc["profile", "ray_node_id"] == cluster.gpu_node.node_id
    assert runs.loc["profile", "node_ip"] == "127.0.0.1"
