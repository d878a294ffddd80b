"""``quantsweep``: compose the sweep with Hydra, validate it, run it on Ray, summarise.

Everything is a Hydra app, so ``--help``, ``--cfg job``, ``-m`` (multirun) and any ``key=value`` override
work as users expect.  Validation runs before Ray starts: a bad grid never costs a GPU minute.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

import hydra
from omegaconf import DictConfig, OmegaConf

from orchestrator.config import Config, register_configs

log = logging.getLogger("quantsweep")

register_configs()

#: conf/ sits at the repository root next to orchestrator/ (install with ``pip install -e .``).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def config_error_exit(err: Exception) -> int:
    """The one way a bad configuration ends: one stderr line naming the field, exit code 2."""
    print(f"quantsweep: invalid configuration: {err}", file=sys.stderr)
    return 2


def run(cfg: Config | DictConfig) -> int:
    """Validate, plan, schedule and summarise one sweep; returns a process exit code."""
    from orchestrator.plan import plan_sweep
    from orchestrator.progress import print_summary
    from orchestrator.schedule import run_sweep
    from orchestrator.validate import ConfigError, validate

    try:
        with sigterm_interrupts():
            resolved = validate(cfg)
            # run_sweep also raises ConfigError when the cluster cannot run the plan, before submitting anything
            outcome = run_sweep(plan_sweep(resolved), resolved)
    except ConfigError as err:
        return config_error_exit(err)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: running and queued cells were cancelled; every finished cell is in the store.
        print(f"quantsweep: interrupted; {RESUME}", file=sys.stderr)
        return 130
    print_summary(outcome, resolved)
    if not outcome.all_ok:
        bad = sum(not r["status"].endswith("ok") for r in outcome.results.values())
        print(f"quantsweep: {bad} cell(s) did not succeed (their rows say why); {RESUME}", file=sys.stderr)
    # 3: the sweep finished but some cells failed (their rows say why); 2: invalid configuration.
    return 0 if outcome.all_ok else 3


#: what a user reads whenever a sweep ends with work left: resuming is the same command
RESUME = "rerun the same command to resume (finished cells are kept, only the rest runs)"


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``timeout``, Slurm, Kubernetes, ``kill``) raises ``KeyboardInterrupt`` inside the block, so it
    takes Ctrl-C's path (cells cancelled, exit 130, the resume hint) instead of Ray's abort (exit 134).

    The handler is :func:`orchestrator.ray_cluster.interrupt_on_sigterm`'s, which the scheduler installs again
    right after ``ray.init`` (Ray's core worker sets a SIGTERM handler of its own).  The handler in place
    before the block is put back after it, so a caller of :func:`run` (a test, a notebook) keeps its own.
    Signals reach only the main thread: elsewhere this does nothing."""
    from orchestrator.ray_cluster import interrupt_on_sigterm

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    interrupt_on_sigterm()
    try:
        yield
    finally:
        # None: a handler not set from Python, which cannot be put back; the default is the nearest
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _scrub_hydra_output(cfg: DictConfig) -> None:
    """Hydra saved the config and the command line under ``.hydra/`` before this code ran: take the
    values of ``cluster.runtime_env`` and of the forwarded store settings out of them."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from orchestrator.secrets import scrub_hydra_output, secret_values

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    env = OmegaConf.to_container(cfg.cluster.runtime_env, resolve=False) if "cluster" in cfg else {}
    values = secret_values({"cluster": {"runtime_env": env}})
    multirun = Path(hydra_cfg.sweep.dir) / "multirun.yaml" if hydra_cfg.mode and hydra_cfg.mode.name == "MULTIRUN" else None
    scrub_hydra_output(hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task), values,
                       [multirun] if multirun else [])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> int:
    _scrub_hydra_output(cfg)
    code = run(cfg)
    if code:
        # Hydra ignores return values; a failing sweep must be visible to shells and CI.
        raise SystemExit(code)
    return code


def _override_sets(overrides: list[str]) -> list[list[str]]:
    """The override lists a (multi)run will compose: one per job, every combination of the discrete sweeps'
    values (``a=1,2 b=3,4``: four), in the order Hydra's basic sweeper runs them, so a value that is bad only
    beside another (``sweep.input_len`` + ``sweep.output_len`` beyond the model) is found before the first
    job runs.  Non-discrete sweeps (glob) are left to Hydra."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from orchestrator.validate import ConfigError

    parser, parsed = OverridesParser.create(), []
    for line in overrides:  # one at a time, so a malformed one is named
        try:
            parsed += parser.parse_overrides([line])
        except OverrideParseException as err:
            raise ConfigError(line.split("=", 1)[0].lstrip("+~"),
                              f"cannot parse {line!r}: {str(err).splitlines()[0]}") from err
    values = [[o.input_line] if not o.is_sweep_override() else
              [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_discrete_sweep() else []
              for o in parsed]
    return [list(job) for job in itertools.product(*[v for v in values if v])]


def check_overrides(argv: list[str]) -> None:
    """Compose the config every run of this command line will get, and raise ``ConfigError`` if Hydra or
    OmegaConf reject it, or, for a multirun, if any job's config is invalid: a bad job must stop the whole
    multirun before its first job runs, not after the jobs before it have.

    Hydra composes inside ``hydra.main`` and answers a type error (``sweep.batch_sizes=[a]``) or an unknown
    key with a traceback and exit code 1; composing first here lets those errors take the same path as
    every other bad value (exit 2, the field named).  Command lines Hydra's own parser rejects, or that
    pick another config, are left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser

    from orchestrator.validate import hydra_config_error, validate

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return
    if args.config_name or args.config_path or args.config_dir or args.help or args.hydra_help:
        return
    composed = []
    for overrides in _override_sets(args.overrides):  # every composition error first, then the values
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                composed.append(compose(config_name="config", overrides=overrides))
        except Exception as err:  # noqa: BLE001 - translated; anything unknown is re-raised by hydra_config_error
            raise hydra_config_error(err) from err
    for cfg in composed:
        if args.multirun:
            # the default name interpolates Hydra's runtime, which exists only inside a job; checks ignore it
            if OmegaConf.is_interpolation(cfg.sweep, "name"):
                cfg.sweep.name = "preflight"
            validate(cfg, touch_store=False)


def main() -> None:
    from orchestrator.validate import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # from the first line on, SIGTERM is Ctrl-C: the up-front checks and Hydra's start included
        with sigterm_interrupts():
            check_overrides(sys.argv[1:])
            _hydra_main()
    except ConfigError as err:
        sys.exit(config_error_exit(err))
    except KeyboardInterrupt:
        # outside a sweep (run() answers those itself): before the first job, or between multirun jobs
        print(f"quantsweep: interrupted; {RESUME}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
