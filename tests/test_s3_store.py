"""The store on a real S3 API server (moto's server mode on 127.0.0.1) and a real multi-process Ray
cluster: connection settings set only on the driver reach every task, secrets never reach the store or
Hydra's output, and the printed report command survives the shell."""
from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.cluster_helpers import GPU_NODE, cli, local_cluster, sweep_args

pytestmark = pytest.mark.slow

SECRET = "qs-secret-9f2c7d41e0b3a8"  # the S3 secret key, only in the driver's environment
TOKEN = "qs-token-5e8a1b6c3d2f70"  # a runtime_env variable given on the command line


@pytest.fixture(scope="module")
def s3_endpoint():
    """``moto_server`` on a free 127.0.0.1 port, one bucket; yields ``host:port``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                          access_key="ak", secret_key=SECRET, allow_bucket_creation=True).create_dir("sweeps")
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(head_cpus=2) as (c, _):
        c.add_node(**GPU_NODE)
        c.wait_for_nodes()
        yield c


def _s3(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", access_key="ak",
                             secret_key=SECRET)


def _all_bytes(fs: pafs.FileSystem, root: str) -> bytes:
    files = [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
    assert files
    return b"".join(fs.open_input_stream(f.path).read() for f in files)


@pytest.mark.timeout(600)
def test_s3_settings_from_the_driver_reach_every_task_and_no_secret_is_stored(cluster, s3_endpoint, tmp_path: Path):
    """Credentials and endpoint only in the driver's environment (the cluster's processes never had them),
    a token in cluster.runtime_env: every cell writes to S3, and neither value is in the bucket, in
    Hydra's output or in the sweep rows; a second run adds no second sweep row."""
    env = {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{s3_endpoint}"}
    args = sweep_args(cluster, "s3://sweeps/env-form", tmp_path, [
        f"store.artifacts_dir={tmp_path / 'artifacts'}", "sweep.batch_sizes=[1,2]",
        f"+cluster.runtime_env={{env_vars:{{HF_TOKEN:{TOKEN}}}}}"])
    for _ in range(2):
        driver = cli(args, env)
        out, err = driver.communicate(timeout=280)
        assert driver.returncode == 0, err[-3000:]
    fs = _s3(s3_endpoint)
    stored = _all_bytes(fs, "sweeps/env-form")
    import pyarrow.dataset as ds

    runs = ds.dataset("sweeps/env-form/runs", filesystem=fs, format="parquet").to_table().to_pandas()
    assert set(runs.status) == {"ok"} and set(runs[runs.kind != "sweep"].node_ip) == {"127.0.0.1"}
    assert (runs.kind == "sweep").sum() == 1
    assert "HF_TOKEN" in runs[runs.kind == "sweep"].config_json.iloc[0]  # which variable: yes; its value: no
    hydra_files = [p for p in (tmp_path / "hydra").rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in hydra_files)
    for secret in (SECRET, TOKEN):
        assert secret.encode() not in stored
        for path in hydra_files:
            assert secret not in path.read_text(errors="replace"), path
        assert secret not in out and secret not in err


@pytest.mark.timeout(400)
def test_endpoint_in_the_uri_and_a_report_command_the_shell_can_run(cluster, s3_endpoint, tmp_path: Path):
    uri = f"s3://sweeps/uri-form?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    env = {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": SECRET}
    # quoted for Hydra's override grammar, as a user quotes it for the shell
    args = sweep_args(cluster, f"'{uri}'", tmp_path, [f"store.artifacts_dir={tmp_path / 'artifacts'}",
                                                      "sweep.batch_sizes=[1]"])
    driver = cli(args, env)
    out, err = driver.communicate(timeout=280)
    assert driver.returncode == 0, err[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("Report: "))
    assert shlex.split(line[len("Report: "):]) == ["quantsweep-report", uri, "--out", "outputs/report"]
    assert len(_all_bytes(_s3(s3_endpoint), "sweeps/uri-form/throughput")) > 0
