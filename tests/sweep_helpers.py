"""Compose real Hydra configs in tests, exactly as the CLI does."""
from __future__ import annotations

from typing import Any

from hydra import compose, initialize_config_dir

from orchestrator.cli import CONF_DIR

# A tiny random Llama, fp32 on CPU: real code paths in seconds.
TINY = ["model=tiny_random", "sweep.name=test", "sweep.warmup=0", "sweep.repeats=1",
        "sweep.input_len=8", "sweep.output_len=4", "eval.num_fewshot=1", "eval.limit_per_subject=3",
        "cluster.num_cpus=2", "methods.rtn.group_size=32", "methods.awq.group_size=32",
        "methods.gptq.group_size=32", "methods.awq.calibration.num_samples=4", "methods.awq.calibration.seq_len=64",
        "methods.gptq.calibration.num_samples=4", "methods.gptq.calibration.seq_len=64"]


def compose_config(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_inline(plan: Any, cfg: Any) -> dict[str, dict]:
    """Run a sweep's plan in this process, node by node, through the same ``execute_node`` and store the Ray
    tasks use, reusing what the store holds as ``run_sweep`` does: for tests whose subject is what the cells
    compute, not how Ray schedules them (no worker start-up per cell; the tests that run sweeps through Ray
    cover the scheduling)."""
    from orchestrator.execute import execute_node
    from orchestrator.schedule import nodes_from_store, stored_nodes
    from orchestrator.store import ResultStore

    store = ResultStore.from_config(cfg["store"])
    to_run, results = nodes_from_store(plan, cfg, store, stored_nodes(store))
    for node in to_run:  # plan order is topological
        results[node.key] = execute_node(node, [results[k] for k in node.upstream], cfg)
    return results


def cli_in_process(args: list[str], cwd: Any) -> Any:
    """``quantsweep ARGS`` through the CLI's own ``main()`` in this process, as a ``CompletedProcess``.

    The same path a shell takes (the up-front override checks, Hydra, ``run``, the exit code) without an
    interpreter start and the imports every pre-flight test would pay again; for commands that end before
    Ray starts.  Hydra's output goes under ``cwd``, like the subprocess it stands for."""
    import contextlib
    import io
    import os
    import subprocess
    import sys

    from orchestrator.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    sys.argv = ["quantsweep", *args]
    code: Any = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = argv
        os.chdir(here)
    code = 0 if code is None else code if isinstance(code, int) else 1
    return subprocess.CompletedProcess(["quantsweep", *args], code, out.getvalue(), err.getvalue())
