"""``quantsweep``: compose the sweep with Hydra, validate it, run it on Ray, summarise.

Everything is a Hydra app, so ``--help``, ``--cfg job``, ``-m`` (multirun) and any ``key=value`` override
work as users expect.  Validation runs before Ray starts: a bad grid never costs a GPU minute.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from orchestrator.config import Config, register_configs

log = logging.getLogger("quantsweep")

register_configs()

#: conf/ sits at the repository root next to orchestrator/ (install with ``pip install -e .``).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def run(cfg: Config | DictConfig) -> int:
    """Validate, plan, schedule and summarise one sweep; returns a process exit code."""
    from orchestrator.plan import plan_sweep
    from orchestrator.progress import print_summary
    from orchestrator.schedule import run_sweep
    from orchestrator.validate import ConfigError, validate

    try:
        resolved = validate(cfg)
        # run_sweep also raises ConfigError when the cluster cannot run the plan, before submitting anything
        outcome = run_sweep(plan_sweep(resolved), resolved)
    except ConfigError as err:
        print(f"quantsweep: invalid configuration: {err}", file=sys.stderr)
        return 2
    print_summary(outcome, resolved)
    # 3: the sweep finished but some cells failed (their rows say why); 2: invalid configuration.
    return 0 if outcome.all_ok else 3


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> int:
    code = run(cfg)
    if code:
        # Hydra ignores return values; a failing sweep must be visible to shells and CI.
        raise SystemExit(code)
    return code


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _hydra_main()


if __name__ == "__main__":
    main()
