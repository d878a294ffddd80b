"""Keep secrets out of the store, the logs and Hydra's output, while still getting them to every task.

Two kinds of values reach Ray tasks through the job's ``runtime_env`` environment variables:

* ``cluster.runtime_env.env_vars``: whatever the user sets there (tokens, keys) - every *value* is treated
  as a secret, since quantsweep cannot tell a password from a flag;
* the store's connection settings from the driver's environment (:data:`STORE_ENV`: AWS credentials,
  endpoint and region, GCS/Azure equivalents), forwarded so that tasks on other machines reach the same
  store without the user repeating them in the config.

Neither may end up in a stored or logged config: :func:`redact_config` replaces the values (keeping the
names, so a reader sees *which* variables were set), :func:`scrub_hydra_output` rewrites the files Hydra
wrote before quantsweep's code ran (``.hydra/config.yaml``, ``overrides.yaml``, ``hydra.yaml``,
``multirun.yaml``), and node keys never see ``cluster.runtime_env`` at all.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

REDACTED = "<redacted>"

#: Environment variables that configure how a pyarrow filesystem connects (credentials, endpoint,
#: region).  Set on the driver, they are forwarded to every task; their values are never stored.
STORE_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE", "AWS_EC2_METADATA_DISABLED",
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
)


def store_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The store connection variables set in ``environ`` (default: this process), to forward to tasks."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in STORE_ENV if environ.get(name)}


def secret_values(cfg: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> set[str]:
    """Every value that must not be written anywhere: runtime_env variables and forwarded store settings."""
    env_vars = ((cfg.get("cluster") or {}).get("runtime_env") or {}).get("env_vars") or {}
    values = {str(v) for v in env_vars.values() if v is not None and str(v)}
    return values | set(store_env(environ).values())


def redact_runtime_env(runtime_env: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of a Ray ``runtime_env`` whose environment variable values are :data:`REDACTED`."""
    redacted = copy.deepcopy(dict(runtime_env or {}))
    if redacted.get("env_vars"):
        redacted["env_vars"] = {name: REDACTED for name in redacted["env_vars"]}
    return redacted


def redact_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a (resolved) config fit to store or log: ``cluster.runtime_env`` env values redacted."""
    out = copy.deepcopy(dict(cfg))
    if isinstance(out.get("cluster"), Mapping) and out["cluster"].get("runtime_env"):
        out["cluster"] = {**out["cluster"], "runtime_env": redact_runtime_env(out["cluster"]["runtime_env"])}
    return out


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of a secret value replaced (longest first, so no part survives)."""
    for value in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def _redact_overrides(overrides: list[str]) -> dict[str, str]:
    """Command-line overrides that set ``runtime_env`` -> the same override with its values redacted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict[str, str] = {}
    for line in overrides:
        key = line.split("=", 1)[0]
        if "runtime_env" not in key:
            continue
        try:
            override = OverridesParser.create().parse_override(line)
            value = override.value()
        except Exception:  # noqa: BLE001 - unparsable here: hide the whole value
            out[line] = f"{key}={REDACTED}"
            continue
        if isinstance(value, dict) and isinstance(value.get("env_vars"), dict):
            shown = ",".join(f"{name}:{REDACTED}" for name in value["env_vars"])
            rest = ",".join(f"{k}:{v}" for k, v in value.items() if k != "env_vars")
            out[line] = f"{key}={{env_vars:{{{shown}}}{',' + rest if rest else ''}}}"
        elif "env_vars" in key:
            out[line] = f"{key}={REDACTED}"
    return out


#: values at least this long are also replaced wherever they occur in Hydra's files
MIN_TEXT_SECRET = 6


def _redact_config_yaml(text: str) -> str:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(text)
    env_vars = OmegaConf.select(cfg, "cluster.runtime_env.env_vars")
    if not env_vars:
        return text
    for name in list(env_vars):
        env_vars[name] = REDACTED
    return OmegaConf.to_yaml(cfg)


def scrub_hydra_output(output_dir: str | Path, overrides: list[str], secrets: Iterable[str],
                       extra_files: Iterable[str | Path] = ()) -> None:
    """Rewrite the config files Hydra saved for this job so that no secret value remains in them.

    Hydra writes ``<output_dir>/.hydra/{config,overrides,hydra}.yaml`` (and ``multirun.yaml`` in a
    multirun's sweep folder) before calling the task; overrides that set ``runtime_env`` are replaced by
    redacted ones, then every remaining occurrence of a secret value is replaced by :data:`REDACTED`.
    """
    # short values ("1", "true") cannot be told apart from other text; they are redacted where they sit
    # in the config (config.yaml) and in the overrides, long ones everywhere
    secrets = {s for s in secrets if len(s) >= MIN_TEXT_SECRET}
    replacements = _redact_overrides(list(overrides))
    files = list(Path(output_dir).glob(".hydra/*.yaml")) + [Path(f) for f in extra_files]
    for path in files:
        if not path.is_file():
            continue
        text = original = path.read_text()
        if path.name == "config.yaml":
            text = _redact_config_yaml(text)
        for line, redacted in replacements.items():
            text = text.replace(line, redacted)
        text = redact_text(text, secrets)
        if text != original:
            path.write_text(text)
