"""Pre-flight checks against the Ray cluster itself: an address nothing (or something else) answers at, and
GPU options on a cluster without GPUs, each ending with exit 2 naming the field before any cell runs.

Only loopback is ever contacted: a closed port, a listening socket that never speaks Ray's protocol, and a
multi-process Ray cluster on 127.0.0.1 (:mod:`tests.cluster_helpers`)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from orchestrator.cli import run
from orchestrator.validate import ConfigError
from tests.cluster_helpers import LOOPBACK, REPO, local_cluster, sweep_args
from tests.sweep_helpers import TINY, compose_config
from tests.test_preflight import PREFIX

#: the issue's bound: a sweep that cannot reach its cluster says so within this many seconds
UNREACHABLE_BOUND_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts TCP connections (the kernel's backlog) and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def _cli_to(address: str, tmp_path: Path, mmlu_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``quantsweep cluster=ray_cluster cluster.address=ADDRESS``; Ray keeps 127.0.0.1 as it is (it would
    otherwise swap it for this machine's outward address) and no RAY_ADDRESS overrides the address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", **LOOPBACK})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", *TINY, "cluster=ray_cluster",
                             f"cluster.address={address}", f"store.uri={tmp_path / 'store'}",
                             f"eval.mmlu_dir={mmlu_dir}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    return result, time.monotonic() - started


def _assert_refused(result: subprocess.CompletedProcess, took: float, address: str, says: str,
                    tmp_path: Path) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{PREFIX}cluster.address: ") and address in line and says in line, line
    assert "ray start --head" in line, line  # how to start Ray
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert took < UNREACHABLE_BOUND_S, f"took {took:.1f} s"
    assert not (tmp_path / "store" / "runs").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_closed_port_is_a_config_error_at_once(tmp_path: Path, mmlu_dir: Path) -> None:
    """Nothing listens: before, Ray retried for minutes (or ended with a traceback and exit 1)."""
    address = f"127.0.0.1:{_free_port()}"
    result, took = _cli_to(address, tmp_path, mmlu_dir)
    _assert_refused(result, took, address, "Connection refused", tmp_path)
    print(f"exit 2 after {took:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_port_that_does_not_speak_ray_is_a_config_error_within_the_bound(tmp_path: Path, mmlu_dir: Path,
                                                                            silent_listener: int) -> None:
    """TCP connects, the Ray handshake never comes (a wrong port, a firewall that accepts and drops)."""
    address = f"127.0.0.1:{silent_listener}"
    result, took = _cli_to(address, tmp_path, mmlu_dir)
    _assert_refused(result, took, address, "did not answer as a Ray head node", tmp_path)
    print(f"exit 2 after {took:.1f} s")


def _refusal(tmp_path: Path, mmlu_dir: Path, address: str, capsys: pytest.CaptureFixture) -> tuple[str, float]:
    """``run()`` in this process (Ray not started), the exit code asserted; its stderr and its wall time."""
    import ray

    assert not ray.is_initialized()
    started = time.monotonic()
    code = run(compose_config(TINY + ["cluster=ray_cluster", f"cluster.address={address}",
                                      f"store.uri={tmp_path / 'store'}", f"eval.mmlu_dir={mmlu_dir}"]))
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert not ray.is_initialized() and not (tmp_path / "store" / "runs").exists()
    return err.strip().splitlines()[-1], took


def test_auto_without_a_running_ray_says_how_to_start_one(tmp_path: Path, mmlu_dir: Path, monkeypatch,
                                                         capsys) -> None:
    """``auto`` finds no Ray instance on this machine (Ray's own lookup, here answering none: other Ray
    instances of this machine must not count)."""
    from ray._private import services

    def no_gcs_processes() -> list[str]:
        return []

    no_gcs_processes.cache_clear = lambda: None  # type: ignore[attr-defined] - ray.init clears the cache
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", no_gcs_processes)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    line, took = _refusal(tmp_path, mmlu_dir, "auto", capsys)
    assert line.startswith(f"{PREFIX}cluster.address: 'auto' found no running Ray instance"), line
    assert "ray start --head" in line and "cluster=local" in line, line
    assert took < UNREACHABLE_BOUND_S


@pytest.mark.timeout(60)
def test_a_connect_that_times_out_is_a_config_error_within_the_bound(tmp_path: Path, mmlu_dir: Path,
                                                                     monkeypatch, capsys) -> None:
    """An address where nothing answers (packets dropped, as at 10.255.255.1): the connect gives up after
    the probe's timeout.  Simulated: the connect raises what a dropped SYN gives."""
    from orchestrator import ray_cluster

    calls = []

    def dropped(address: tuple[str, int], timeout: float) -> socket.socket:
        calls.append((address, timeout))
        raise TimeoutError("timed out")

    monkeypatch.setattr(ray_cluster.socket, "create_connection", dropped)
    address = f"127.0.0.2:{_free_port()}"  # loopback, but not one Ray swaps for this machine's address
    line, took = _refusal(tmp_path, mmlu_dir, address, capsys)
    assert calls == [(("127.0.0.2", int(address.split(":")[1])), ray_cluster.CONNECT_TIMEOUT_S)]
    assert ray_cluster.CONNECT_TIMEOUT_S * 2 < UNREACHABLE_BOUND_S - 10  # TCP and handshake, with room to start
    assert line.startswith(f"{PREFIX}cluster.address: cannot reach the Ray cluster at {address}"), line
    assert "timed out" in line and "ray start --head" in line, line


def test_a_connection_ray_itself_refuses_is_a_config_error(tmp_path: Path, mmlu_dir: Path, monkeypatch,
                                                           capsys) -> None:
    """The address answers the probe but ``ray.init`` cannot connect after all (another Ray version, a
    head going down): the field and Ray's reason, not a traceback."""
    import ray

    from orchestrator import ray_cluster

    def refuses(**kwargs: object) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")

    monkeypatch.setattr(ray_cluster, "_reach_cluster", lambda address, timeout_s=0.0: None)
    monkeypatch.setattr(ray, "init", refuses)
    line, _ = _refusal(tmp_path, mmlu_dir, "127.0.0.1:6379", capsys)
    assert line.startswith(f"{PREFIX}cluster.address: Ray could not connect to '127.0.0.1:6379': Failed to "
                           "connect to Ray cluster"), line


@pytest.fixture(scope="module")
def cpu_cluster():
    """A head with 2 CPUs and no GPU on 127.0.0.1."""
    with local_cluster(head_cpus=2) as (cluster, temp):
        yield cluster


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("overrides, field, says", [
    (["backend.device=cuda"], "backend.device", "no live node of the Ray cluster has a GPU"),
    (["backend=tensorrt_llm"], "backend.name", "no live node of the Ray cluster has a GPU"),
    (["cluster.gpus_per_task=1"], "cluster.gpus_per_task", "no live node of the Ray cluster has that much"),
])
def test_gpu_options_on_a_cluster_without_gpus_are_refused_before_any_cell(
        cpu_cluster, tmp_path: Path, mmlu_dir: Path, capsys, overrides: list[str], field: str, says: str) -> None:
    """Before, ``backend.device=cuda`` started the sweep: the model cell failed ("this task sees no CUDA
    device"), the rest were skipped, exit 3."""
    import ray

    args = [a for a in sweep_args(cpu_cluster, str(tmp_path / "store"), tmp_path, [f"eval.mmlu_dir={mmlu_dir}"])
            if "hydra." not in a and not a.startswith(("cluster.accelerator_type", "cluster.gpus_per_task"))]
    started = time.monotonic()
    try:
        code = run(compose_config(args + overrides))
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{PREFIX}{field}: ") and says in line and "127.0.0.1" in line, line
    runs = tmp_path / "store" / "runs"
    assert not runs.exists() or not list(runs.iterdir()), "a row was written"
    print(f"exit 2 after {time.monotonic() - started:.1f} s: {line}")


def test_cuda_with_no_gpu_per_task_is_refused_on_a_gpu_cluster() -> None:
    """``cluster.gpus_per_task=0`` gives GPU cells no GPU even where the cluster has some."""
    from orchestrator.plan import Node
    from orchestrator.ray_cluster import check_cluster_can_run

    gpu_node = {"NodeID": "g" * 8, "NodeManagerAddress": "10.0.0.2", "Alive": True,
                "Resources": {"CPU": 4, "GPU": 1}}
    cell = Node("profile-1", "profile", {}, (), True)
    cluster = {"gpus_per_task": 0, "cpus_per_task": 1, "max_retries": 0}
    with pytest.raises(ConfigError, match=r"^backend.device: cuda, but cluster.gpus_per_task=0"):
        check_cluster_can_run([cell], cluster, [gpu_node], backend={"name": "torch", "device": "cuda"})
    check_cluster_can_run([cell], cluster, [gpu_node], backend={"name": "torch", "device": "auto"})


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_broken_mmlu_file_is_found_by_the_nodes_that_evaluate(cpu_cluster, tmp_path: Path, mmlu_dir: Path,
                                                                capsys) -> None:
    """On a running cluster the driver leaves the MMLU folder to the nodes (it may not mount it): the check
    task on each node that evaluates reads the chosen subjects' CSVs as the evaluate cells will, and a
    broken row is exit 2 naming the file, the line and the node, before any cell."""
    import ray

    from tests.test_mmlu_data import break_row, mmlu_copy

    folder = mmlu_copy(mmlu_dir, tmp_path / "mmlu")
    path = folder / "test" / "econometrics_test.csv"
    line = break_row(path, 20, "unterminated quote")
    args = [a for a in sweep_args(cpu_cluster, str(tmp_path / "store"), tmp_path, [
        f"eval.mmlu_dir={folder}", "sweep.subjects=[anatomy,econometrics]", "sweep.stages=[evaluate]",
        "sweep.num_shards=1"]) if "hydra." not in a and not a.startswith(("cluster.accelerator_type",
                                                                             "cluster.gpus_per_task"))]
    try:
        code = run(compose_config(args))
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{PREFIX}eval.mmlu_dir: {path}, line {line} (row 20): the CSV does not parse"), last
    assert "(node 127.0.0.1" in last, last  # found by the node's check task, not by the driver
    runs = tmp_path / "store" / "runs"
    assert not runs.exists() or not list(runs.iterdir()), "a row was written"
