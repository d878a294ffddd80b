"""Ray ``worker_process_setup_hook``s for the multi-node tests: real scheduler, real cells, real rows,
with a profile cell that takes long enough to be running when a test kills its node, or whose worker
dies on its first attempt so Ray retries it.

Use as ``+cluster.runtime_env={worker_process_setup_hook:tests.multinode_fakes.slow_profile}``; the
folder for start markers comes from ``QUANTSWEEP_TEST_MARKERS`` (a runtime_env variable).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

SLOW_PROFILE_S = 6.0


def _marker(node_key: str, what: str) -> Path:
    folder = Path(os.environ["QUANTSWEEP_TEST_MARKERS"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{what}-{node_key}-{os.getpid()}"


def slow_profile() -> None:
    """Profile cells write a start marker, then sleep before profiling for real."""
    from orchestrator import execute

    real = execute.RUNNERS["profile"]

    def profile(node, upstream, cfg, device):
        _marker(node.key, "started").write_text("")
        time.sleep(SLOW_PROFILE_S)
        return real(node, upstream, cfg, device)

    execute.RUNNERS["profile"] = profile


def crash_first_profile() -> None:
    """The first attempt of each profile cell kills its own worker process (as a segfault would)."""
    from orchestrator import execute

    real = execute.RUNNERS["profile"]

    def profile(node, upstream, cfg, device):
        folder = Path(os.environ["QUANTSWEEP_TEST_MARKERS"])
        folder.mkdir(parents=True, exist_ok=True)
        first = folder / f"crashed-{node.key}"
        if not first.exists():
            first.write_text("")
            os._exit(1)
        return real(node, upstream, cfg, device)

    execute.RUNNERS["profile"] = profile
