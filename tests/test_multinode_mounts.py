"""Shared folders on a real multi-process Ray cluster, with a node (or the driver) in a mount namespace of
its own, so that one path names *different* folders on different machines, as on a real multi-host cluster:

* a worker node that sees another folder at ``store.uri`` / ``store.artifacts_dir`` than the rest: the sweep
  stops with exit 2 naming the field, before any cell runs;
* a driver that does not mount the artifacts folder (the nodes do): a rerun reuses every stored node
  instead of redoing them.

``unshare -m --propagation private sh -c 'mount -t tmpfs none DIR && exec CMD'`` gives CMD (and all it
starts: a raylet and its workers, or the CLI) a private empty DIR while the rest of the machine keeps the
real one.  That needs root (CAP_SYS_ADMIN); elsewhere these tests skip.  Every namespaced process is ours:
at the end, whatever still lives in that namespace is killed by pid, and the namespace goes with it.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from orchestrator.store import ResultStore
from tests.cluster_helpers import GPU_NODE, REPO, cli, local_cluster, sweep_args

pytestmark = pytest.mark.slow

#: the CLI's environment (as ``cluster_helpers.cli``), for a driver started inside a namespace
DRIVER_ENV = {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _unshare(hidden: list[Path], command: list[str]) -> list[str]:
    """``command`` in a new mount namespace where each of ``hidden`` is an empty tmpfs of its own."""
    mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(str(p))}" for p in hidden)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {shlex.join(command)}"]


def _require_mount_namespaces(tmp_path: Path) -> None:
    probe = tmp_path / "unshare-probe"
    probe.mkdir()
    try:
        done = subprocess.run(_unshare([probe], ["true"]), capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("unshare(1) is not installed")
    if done.returncode != 0:
        pytest.skip(f"cannot mount in a private mount namespace here (needs root): {done.stderr.strip()}")


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _stop_namespace(proc: subprocess.Popen, namespace: str | None, grace_s: float = 20) -> None:
    """SIGTERM ``proc``; then SIGKILL, one pid at a time, whatever is still in its mount namespace (the
    raylet's workers and agents, all started by it): nothing else lives there."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if namespace is None or namespace == _mount_ns(os.getpid()):
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [int(p) for p in os.listdir("/proc") if p.isdigit() and _mount_ns(int(p)) == namespace]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


#: A worker node started the way ``ray.cluster_utils.Cluster.add_node`` starts one (Ray's own ``Node``), in a
#: process of its own so that it can live in another mount namespace; it runs until SIGTERM, which makes Ray
#: kill the node's processes.  (``ray start --address=...`` refuses the loopback-only mode that
#: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` gives, and without it swaps 127.0.0.1 for an outward IP.)
NODE_MAIN = """
import sys, time
import ray._private.node, ray._private.parameter
params = ray._private.parameter.RayParams(
    gcs_address=sys.argv[1], num_cpus=1, num_gpus=1, resources={"accelerator_type:L40": 1},
    node_ip_address="127.0.0.1", object_store_memory=150 * 2**20, min_worker_port=0, max_worker_port=0,
    include_log_monitor=False, node_manager_port=0)
params.dashboard_agent_listen_port = None  # a free port: the head's agent has the default one
ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("node started", flush=True)
while True:
    time.sleep(1)
"""


@contextmanager
def namespaced_gpu_node(cluster, hidden: list[Path]) -> Iterator[int]:
    """An L40 worker node (GPU_NODE's resources) in its own mount namespace, where each of ``hidden`` is
    another, empty folder; yields the pid whose ``/proc/<pid>/root`` shows that node's view."""
    assert GPU_NODE == {"num_cpus": 1, "num_gpus": 1, "resources": {"accelerator_type:L40": 1},
                        "node_ip_address": "127.0.0.1"}, "NODE_MAIN starts a GPU_NODE"
    command = [sys.executable, "-c", NODE_MAIN, cluster.gcs_address]
    known = {n["NodeID"] for n in cluster.global_state.node_table()}
    log = open(Path(cluster.head_node.get_session_dir_path()) / "namespaced-node.log", "w")  # noqa: SIM115
    # local_cluster's RAY_TMPDIR, loopback and health-check settings are in os.environ: the node gets them
    proc = subprocess.Popen(_unshare(hidden, command), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    namespace = None
    try:
        deadline = time.monotonic() + 90
        while True:
            namespace = namespace or (_mount_ns(proc.pid) if _mount_ns(proc.pid) != _mount_ns(os.getpid())
                                      else None)
            new = [n for n in cluster.global_state.node_table()
                   if n["NodeID"] not in known and n["Alive"] and n["Resources"].get("GPU")]
            if new:
                break
            if proc.poll() is not None:
                log.flush()
                pytest.fail(f"the namespaced node exited ({proc.returncode}): "
                            f"{Path(log.name).read_text()[-3000:]}")
            assert time.monotonic() < deadline, "the namespaced node did not join the cluster"
            time.sleep(0.5)
        yield proc.pid
    finally:
        _stop_namespace(proc, namespace)
        log.close()


def _run_cli(args: list[str], timeout: float) -> tuple[int, str, str]:
    """``quantsweep ARGS`` as the driver, killed if it outlives ``timeout``."""
    driver = cli(args)
    try:
        out, err = driver.communicate(timeout=timeout)
    finally:
        if driver.poll() is None:
            driver.kill()
    return driver.returncode, out, err


@contextmanager
def _gpu_node(cluster) -> Iterator[None]:
    """An ordinary (not namespaced) L40 GPU node for the length of a test."""
    node = cluster.add_node(**GPU_NODE)
    try:
        cluster.wait_for_nodes()
        yield
    finally:
        cluster.remove_node(node, allow_graceful=False)


def _namespaced_driver(hidden: Path, args: list[str], timeout: float) -> tuple[int, str, str]:
    """``quantsweep ARGS`` as a driver whose ``hidden`` folder is an empty tmpfs: exit 97 if it still saw
    the folder's contents (checked inside the namespace before the CLI starts)."""
    check = f"test -z \"$(ls -A {shlex.quote(str(hidden))})\" || exit 97"
    command = _unshare([hidden], ["sh", "-c", f"{check} && exec \"$0\" \"$@\"", sys.executable, "-m",
                                  "orchestrator.cli", *args])
    driver = subprocess.Popen(command, cwd=REPO, env={**os.environ, **DRIVER_ENV}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        out, err = driver.communicate(timeout=timeout)
    finally:
        if driver.poll() is None:
            _stop_namespace(driver, _mount_ns(driver.pid))
    assert driver.returncode != 97, f"the namespaced driver could see {hidden}"
    return driver.returncode, out, err


def _runs(store: Path):
    return ResultStore(str(store)).read("runs").to_pandas()


@pytest.fixture(scope="module")
def cluster():
    """A head with 2 CPUs and no GPU; each test adds (and removes) its own GPU node."""
    with local_cluster(head_cpus=2) as (c, temp):
        yield c


@pytest.mark.timeout(180)
@pytest.mark.parametrize("hide, field", [("store", "store.uri"), ("artifacts", "store.artifacts_dir")])
def test_node_seeing_another_folder_is_a_config_error_before_any_cell(cluster, tmp_path: Path, hide: str,
                                                                       field: str) -> None:
    """The GPU node mounts an empty folder of its own at the store (or artifacts) path: every other node
    and the driver see the real one.  Exit 2 naming the field, no cell run anywhere."""
    _require_mount_namespaces(tmp_path)
    store, artifacts = tmp_path / "store", tmp_path / "artifacts"
    store.mkdir()
    artifacts.mkdir()
    args = sweep_args(cluster, str(store), tmp_path, [f"store.artifacts_dir={artifacts}", "cluster.cpus_per_task=1"])
    with namespaced_gpu_node(cluster, [tmp_path / hide]) as pid:
        node_view = Path(f"/proc/{pid}/root")
        assert not any((node_view / str(tmp_path / hide).lstrip("/")).iterdir()), "the node sees its own folder"
        started = time.monotonic()
        driver_code, out, err = _run_cli(args, timeout=120)
        took = time.monotonic() - started
        assert driver_code == 2, err[-3000:]
        assert f"invalid configuration: {field}: " in err, err[-3000:]
        assert "is not the same folder on every node" in err and "127.0.0.1" in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        # nothing ran: no rows, no artifacts, on the driver's side nor on the namespaced node's
        for view in (Path("/"), node_view):
            assert not (view / str(store / "runs").lstrip("/")).exists()
            assert not [p for p in (view / str(artifacts).lstrip("/")).rglob("*")], "an artifact was written"
    print(f"exit 2 after {took:.1f} s: {err.strip().splitlines()[-1]}")


@pytest.mark.timeout(240)
def test_driver_without_the_artifacts_mount_reuses_what_the_nodes_see(cluster, tmp_path: Path) -> None:
    """First sweep as usual; then the same command from a driver whose artifacts folder is an empty tmpfs
    (the nodes see the real one): every node is reused, nothing runs, no row is duplicated."""
    _require_mount_namespaces(tmp_path)
    store, artifacts = tmp_path / "store", tmp_path / "artifacts"
    artifacts.mkdir()
    args = sweep_args(cluster, str(store), tmp_path, [f"store.artifacts_dir={artifacts}", "sweep.methods=[fp16,rtn]",
                                                  "sweep.batch_sizes=[1]"])
    with _gpu_node(cluster):
        first_code, out, err = _run_cli(args, timeout=200)
        assert first_code == 0, err[-3000:]
        before, measured = _runs(store), len(ResultStore(str(store)).read("throughput"))
        nodes = before[before.kind != "sweep"].set_index("node_key")
        assert set(nodes.status) == {"ok"} and nodes.index.is_unique
        stored_artifacts = nodes.artifact_uri.dropna()
        assert len(stored_artifacts) >= 2 and all(str(artifacts) in u for u in stored_artifacts)

        # the driver's view: an empty artifacts folder
        started = time.monotonic()
        code, out, err = _namespaced_driver(artifacts, args, timeout=150)
        took = time.monotonic() - started
        assert code == 0, err[-3000:]
        assert f"all {len(nodes)} nodes already in the store" in out + err, (out + err)[-3000:]
        after = _runs(store)
        rerun = after[after.kind != "sweep"].set_index("node_key")
        assert rerun.index.is_unique and len(rerun) == len(nodes), "rows were lost or duplicated"
        assert (rerun.loc[nodes.index, "started_at"] == nodes.started_at).all(), "a stored node ran again"
        assert (after.kind == "sweep").sum() == 1
        assert measured == 2 and len(ResultStore(str(store)).read("throughput")) == measured  # 1 per profile cell
    print(f"rerun from the namespaced driver: {took:.1f} s, {len(nodes)} nodes reused, 0 run")


@pytest.mark.timeout(240)
def test_driver_without_the_mmlu_folder_leaves_the_check_to_the_nodes_that_evaluate(cluster, tmp_path: Path,
                                                                                     mmlu_dir: Path) -> None:
    """The MMLU folder is needed where evaluate cells run, not on the driver: a driver that does not mount it
    (an empty tmpfs over it) still runs the sweep, the GPU node's check task having found it there."""
    import shutil

    _require_mount_namespaces(tmp_path)
    mmlu = tmp_path / "mmlu"
    for split in ("dev", "test"):
        (mmlu / split).mkdir(parents=True)
        shutil.copy(mmlu_dir / split / f"anatomy_{split}.csv", mmlu / split)
    store = tmp_path / "store"
    args = sweep_args(cluster, str(store), tmp_path, [f"store.artifacts_dir={tmp_path / 'artifacts'}",
                                                  f"eval.mmlu_dir={mmlu}", "sweep.stages=[evaluate]",
                                                  "sweep.subjects=[anatomy]", "eval.limit_per_subject=2",
                                                  "sweep.num_shards=1"])
    with _gpu_node(cluster):
        code, out, err = _namespaced_driver(mmlu, args, timeout=200)  # the driver sees an empty folder
        assert code == 0, err[-3000:]
        predictions = ResultStore(str(store)).read("mmlu_predictions").to_pandas()
        assert len(predictions) == 2 and set(predictions["subject"]) == {"anatomy"}


@pytest.mark.timeout(180)
def test_mmlu_folder_missing_on_the_nodes_that_evaluate_is_a_config_error(cluster, tmp_path: Path) -> None:
    """Deferred to the nodes does not mean unchecked: no node that evaluates has the folder -> exit 2."""
    store = tmp_path / "store"
    args = sweep_args(cluster, str(store), tmp_path, [f"store.artifacts_dir={tmp_path / 'artifacts'}",
                                                  f"eval.mmlu_dir={tmp_path / 'no-mmlu'}", "sweep.stages=[evaluate]",
                                                  "sweep.subjects=[anatomy]", "sweep.num_shards=1"])
    with _gpu_node(cluster):
        driver_code, out, err = _run_cli(args, timeout=120)
        assert driver_code == 2, err[-3000:]
        assert "invalid configuration: eval.mmlu_dir" in err and "no test/ folder on this node" in err, err[-3000:]
        assert not (store / "runs").exists()
