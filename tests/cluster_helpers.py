"""A real multi-process Ray cluster on this machine for the multi-node tests, and the CLI run against it.

``ray.cluster_utils.Cluster`` starts a head (GCS, raylet) and worker nodes (a raylet each) as separate
processes, all on 127.0.0.1, under a temp folder of the test's own (``RAY_TMPDIR``), so other Ray
instances on this machine neither see nor are seen by it; ``shutdown`` kills only its processes.  Node
health checks are tightened so a killed node is declared dead within seconds, as on a real cluster after
its (longer) timeout.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.sweep_helpers import TINY

REPO = Path(__file__).resolve().parent.parent

#: GCS settings (RayConfig, read from RAY_<name> by every Ray process this test starts)
#: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray's own node-IP lookup answer 127.0.0.1 (it otherwise swaps
#: 127.0.0.1 in any address for this machine's outward IP), so every process talks over loopback only.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "1000",
                      "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
GPU_NODE = {"num_cpus": 1, "num_gpus": 1, "resources": {"accelerator_type:L40": 1}, "node_ip_address": "127.0.0.1"}


@contextmanager
def local_cluster(head_cpus: int = 2) -> Iterator[tuple]:
    """A head node (CPUs only) on its own temp dir; yields ``(cluster, temp_dir)``."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="qs-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    saved = {k: os.environ.get(k) for k in ["RAY_TMPDIR", "RAY_AUTH_MODE", *LOOPBACK, *FAST_HEALTH_CHECKS]}
    os.environ.update({"RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled", **LOOPBACK, **FAST_HEALTH_CHECKS})
    from ray._private import ray_constants

    loopback_before, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False  # read at import
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "num_gpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
        yield cluster, temp
    finally:
        import ray

        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = loopback_before
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)


def sweep_args(cluster, store: str, out: Path, extra: list[str]) -> list[str]:
    """The command line of a small GPU-profile sweep on ``cluster`` (tiny random model)."""
    return TINY + [f"store.uri={store}", f"cluster.address={cluster.address}", "cluster.accelerator_type=L40",
                   "cluster.gpus_per_task=1", "sweep.methods=[fp16]", "sweep.stages=[profile]",
                   f"hydra.run.dir={out / 'hydra'}", *extra]


def cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.Popen:
    """Start ``quantsweep ARGS`` as its own process (the driver), from the repository root."""
    full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
