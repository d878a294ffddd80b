"""Which engine the torch backend loads: the fast CUDA engine for profiling, transformers for accuracy."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks.backends import get_backend
from tasks.backends.base import EngineShape


@pytest.fixture
def built(tmp_path: Path) -> Path:
    engine_dir = tmp_path / "engine"
    get_backend("torch").build(tmp_path / "ckpt", engine_dir, EngineShape(4, 16, 24),
                               {"name": "fp16", "dtype": "float16"}, {})
    return engine_dir


@pytest.mark.parametrize("device, options, expected", [
    ("cuda:0", {"purpose": "profile"}, "fast"),
    ("cuda:0", {"purpose": "evaluate"}, "hf"),
    ("cuda:0", {"purpose": "profile", "engine": "hf"}, "hf"),
    ("cpu", {"purpose": "profile"}, "hf"),
    ("cpu", {"purpose": "profile", "engine": "auto"}, "hf"),
    ("cpu", {"purpose": "fidelity", "engine": "fast"}, "fast"),  # the fast engine's model code on the CPU
    ("cpu", {"purpose": "evaluate", "engine": "fast"}, "hf"),  # MMLU always through transformers
])
def test_engine_choice(built: Path, monkeypatch: pytest.MonkeyPatch, device: str, options: dict, expected: str) -> None:
    import tasks.backends.torch.cuda.engine as cuda_engine
    import tasks.backends.torch.hf_engine as hf_engine

    seen = {}
    monkeypatch.setattr(cuda_engine, "load_fast_engine",
                        lambda ckpt, dev, opts: seen.update(engine="fast", options=opts))
    monkeypatch.setattr(hf_engine, "HFEngine", lambda ckpt, dev, dtype: seen.update(engine="hf", dtype=dtype))
    get_backend("torch").load(built, device, options)
    assert seen["engine"] == expected
    if expected == "fast":  # the static KV cache is sized from the engine shape unless the cell says otherwise
        assert seen["options"]["shape"] == {"max_batch_size": 4, "max_input_len": 16, "max_seq_len": 24}
    else:
        assert seen["dtype"] == ("float32" if device == "cpu" else "float16")


def test_unknown_backend_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="allowed: torch, tensorrt_llm"):
        get_backend("vllm")
