"""The PyTorch backend: no separate engine format, so ``build`` records what ``load`` will run.

``options.engine`` picks the engine of the profile and fidelity cells: ``auto`` (the default) the fast
engine (static KV cache, CUDA graphs, int4/FP8 kernels, :mod:`tasks.backends.torch.cuda`) on CUDA devices
and the transformers reference engine (:mod:`tasks.backends.torch.hf_engine`) on CPUs; ``fast`` the fast
engine on either (on a CPU: its model code with the kernels' references, to check it against
transformers); ``hf`` the reference everywhere.  MMLU evaluation always runs through transformers.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tasks.backends.base import Backend, Engine, EngineShape

MANIFEST = "quantsweep_engine.json"


def runs_fast_engine(engine: str, device: str) -> bool:
    """Whether profile and fidelity cells on ``device`` ("cuda[:i]" or "cpu") load the fast engine under
    ``options.engine`` (auto | fast | hf): the one rule that :meth:`TorchBackend.load` and the pre-flight
    apply."""
    return engine == "fast" or (engine == "auto" and device.startswith("cuda"))


class TorchBackend(Backend):
    name = "torch"

    def build(self, checkpoint_dir: Path, engine_dir: Path, shape: EngineShape | None,
              method: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """``shape`` is None from the planner: this engine sizes its KV cache per cell, so one build serves
        every batch size and length (a shape, if given, pre-sizes the cache of engines loaded without one)."""
        shape_dict = asdict(shape) if shape is not None else None
        manifest = {"backend": self.name, "checkpoint_dir": str(checkpoint_dir), "shape": shape_dict,
                    "method": method, "options": options}
        engine_dir.mkdir(parents=True, exist_ok=True)
        (engine_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return {"checkpoint_dir": str(checkpoint_dir), "shape": shape_dict}

    def load(self, engine_dir: Path, device: str, options: dict[str, Any]) -> Engine:
        manifest = json.loads((engine_dir / MANIFEST).read_text())
        checkpoint_dir = Path(manifest["checkpoint_dir"])
        options = {**manifest["options"], **options, "shape": manifest["shape"], "method": manifest["method"]}
        # Accuracy runs go through transformers (lm-eval's HFLM) anyway: loading the fast engine too would
        # only cost a second copy of the weights, a KV cache and a compilation.
        if runs_fast_engine(options.get("engine", "auto"), device) and options.get("purpose") != "evaluate":
            from tasks.backends.torch.cuda.engine import load_fast_engine

            if options.get("purpose") == "fidelity":
                # scoring replays the decode step's graph over the same kernels; torch.compile would only fuse
                # the element-wise ops between them, at the cost of a compilation per engine (two per cell)
                options.setdefault("compile", False)

            return load_fast_engine(checkpoint_dir, device, options)
        from tasks.backends.torch.hf_engine import HFEngine

        # bf16/fp16 matmuls are slow on CPUs without AMX; the CPU reference computes in float32 by default.
        dtype = options.get("cpu_dtype", "float32") if device == "cpu" else manifest["method"]["dtype"]
        return HFEngine(checkpoint_dir, device, dtype)
