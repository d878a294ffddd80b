"""Per-node fit, the watchdog's rules and the redaction of secrets, on plain data (no Ray)."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.ray_cluster import check_requests_fit, fits, task_request
from orchestrator.secrets import REDACTED, redact_config, scrub_hydra_output
from orchestrator.validate import ConfigError
from orchestrator.watchdog import Started, Watchdog

GPU = {"NodeID": "g" * 8, "NodeManagerAddress": "10.0.0.2", "NodeManagerHostname": "gpu", "Alive": True,
       "Resources": {"CPU": 4, "GPU": 1, "accelerator_type:L40": 1, "memory": 8 * 2**30}}
NVME = {"NodeID": "n" * 8, "NodeManagerAddress": "10.0.0.3", "Alive": True, "Resources": {"CPU": 4, "nvme": 1}}
GPU_TASK = {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "L40"}


def test_a_request_must_fit_one_node_not_the_sum_of_nodes() -> None:
    request = task_request({**GPU_TASK, "resources": {"nvme": 1}})
    assert not fits(GPU["Resources"], request) and not fits(NVME["Resources"], request)
    with pytest.raises(ConfigError, match="^cluster: .*no single live node has all of it.*10.0.0.3"):
        check_requests_fit({"GPU (profile)": {**GPU_TASK, "resources": {"nvme": 1}}}, [GPU, NVME], {})
    with pytest.raises(ConfigError, match=r"^cluster.cpus_per_task: .*largest: CPU 4"):
        check_requests_fit({"CPU (build)": {"num_cpus": 8}}, [GPU, NVME], {})
    check_requests_fit({"GPU (profile)": GPU_TASK}, [GPU, NVME], {})


def test_watchdog_gives_up_on_cells_no_live_node_can_run_naming_the_lost_node() -> None:
    dog = Watchdog(stall_timeout_s=60, grace_s=5)
    request = task_request(GPU_TASK)
    lost = {**GPU, "Alive": False, "Resources": {}}
    started = {"a": Started(1, GPU["NodeID"], "10.0.0.2", "gpu")}
    args = (["a", "b"], {"a", "b"}, {"a": request, "b": request}, started)
    assert dog.check(0.0, *args, [GPU, NVME], False, {}) == []  # a runs on a live node
    assert dog.check(1.0, *args, [lost, NVME], False, {}) == []  # within the grace
    verdicts = {v.key: v for v in dog.check(7.0, *args, [lost, NVME], False, {})}
    assert set(verdicts) == {"a", "b"} and all(v.status == "failed" for v in verdicts.values())
    assert "was running on node 10.0.0.2" in verdicts["a"].reason and GPU["NodeID"] in verdicts["b"].reason


def test_watchdog_stall_records_every_unfinished_cell() -> None:
    dog = Watchdog(stall_timeout_s=10)
    cpu = task_request({"num_cpus": 1})
    args = (["a", "b"], {"a"}, {"a": cpu, "b": cpu}, {})
    assert dog.check(0.0, *args, [NVME], False, {"b": ("a",)}) == []
    assert dog.check(9.0, *args, [NVME], False, {"b": ("a",)}) == []
    verdicts = {v.key: v.status for v in dog.check(11.0, *args, [NVME], False, {"b": ("a",)})}
    assert verdicts == {"a": "failed", "b": "skipped"}


def test_runtime_env_values_are_redacted_in_configs_and_hydra_files(tmp_path: Path) -> None:
    cfg = {"cluster": {"runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "X": "1"}}}}
    assert redact_config(cfg)["cluster"]["runtime_env"]["env_vars"] == {"AWS_SECRET_ACCESS_KEY": REDACTED,
                                                                        "X": REDACTED}
    assert cfg["cluster"]["runtime_env"]["env_vars"]["X"] == "1"  # the original is untouched
    override = "+cluster.runtime_env={env_vars:{AWS_SECRET_ACCESS_KEY:s3cr3t-value,X:1}}"
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text(f"- {override}\n")
    (hydra / "config.yaml").write_text("cluster:\n  runtime_env:\n    env_vars:\n      AWS_SECRET_ACCESS_KEY: "
                                       "s3cr3t-value\n      X: '1'\n")
    scrub_hydra_output(tmp_path, [override], {"s3cr3t-value", "1"})
    for path in hydra.iterdir():
        text = path.read_text()
        assert "s3cr3t-value" not in text and "AWS_SECRET_ACCESS_KEY" in text, text
    assert "X: '1'" not in (hydra / "config.yaml").read_text()


def test_gpu_cells_and_profile_cells_get_a_fresh_worker_other_cpu_cells_reuse_warm_ones(tmp_path: Path,
                                                                                         mmlu_dir: Path) -> None:
    """GPU memory and peak-memory readings stay the cell's own; CPU cells that measure no memory skip the
    5-7 s of imports a fresh worker pays."""
    from orchestrator.plan import plan_sweep
    from orchestrator.ray_cluster import fresh_process, task_options
    from orchestrator.validate import validate
    from tests.sweep_helpers import TINY, compose_config

    cfg = validate(compose_config(TINY + [f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}",
                                          "sweep.subjects=[anatomy]"]))
    nodes = list(plan_sweep(cfg).nodes.values())
    assert {n.kind for n in nodes} == {"model", "quantize", "build", "evaluate", "fidelity", "profile"}
    on_cpus = {n.kind for n in nodes if fresh_process(n, task_options(n, cfg["cluster"], cluster_gpus=0))}
    assert on_cpus == {"profile"}
    on_gpus = {n.kind for n in nodes if fresh_process(n, task_options(n, cfg["cluster"], cluster_gpus=1))}
    assert on_gpus == {"model", "quantize", "evaluate", "fidelity", "profile"}  # a random model is made on a GPU
