"""A CPU sweep of every family through the real cells and the store, on both engines.

For each family's tiny checkpoint (tests/family_checkpoints.py, a local Hugging Face folder as a user's would
be): fp16, RTN int4 and AWQ or GPTQ int4 (each of the two on two families; FP8 on two), the fidelity and
profile stages, once with ``backend.options.engine=fast``
(the fast engine's model code on the CPU) and once with ``engine=hf`` (transformers), into one store.  Both
end ok, the rows say which engine ran, and each fidelity window's ``nll_sum`` agrees within 1e-3 relative:
the fast engine scores what transformers scores, for every family and weight format.

Mistral's fast-engine sweep (the smallest grid) runs through Ray; the other sweeps run the same plan's cells
in this process (``run_inline``: the same ``execute_node`` and store), which keeps every assertion and spares
the suite a fresh worker per cell: what these tests check is what the cells compute, which Ray does not
change.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.plan import plan_sweep
from orchestrator.schedule import run_sweep
from orchestrator.store import ResultStore
from orchestrator.validate import validate
from tests.family_checkpoints import hf_model, save
from tests.sweep_helpers import TINY, compose_config, run_inline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_ray_instance():
    """One local Ray instance for all the sweeps of this module (run_sweep reuses a running one)."""
    yield
    import ray

    ray.shutdown()


@pytest.mark.parametrize("name, methods, through_ray", [("llama3.1", ("fp16", "rtn", "gptq", "fp8"), False),
                                                       ("mistral", ("fp16", "rtn", "awq"), True),
                                                       ("qwen2", ("fp16", "rtn", "awq", "fp8"), False),
                                                       ("qwen3", ("fp16", "rtn", "gptq"), False)])
def test_both_engines_sweep_every_family_and_agree(name: str, methods: tuple[str, ...], through_ray: bool,
                                                  tmp_path: Path, mmlu_dir: Path) -> None:
    checkpoint = save(hf_model(name, seed=7), tmp_path / name, tokenizer=True)
    store_dir = tmp_path / "store"
    base = TINY + [f"store.uri={store_dir}", f"eval.mmlu_dir={mmlu_dir}", "model.source=hf",
                   f"model.path={checkpoint}", f"model.name={name}", "model.dtype=float32", "backend.device=cpu",
                   f"sweep.methods=[{','.join(methods)}]", "sweep.stages=[fidelity,profile]",
                   "sweep.batch_sizes=[2]", "fidelity.num_sequences=3", "fidelity.seq_len=72"]
    for engine in ("fast", "hf"):
        cfg = validate(compose_config(base + [f"+backend.options.engine={engine}"]))
        plan = plan_sweep(cfg)
        results = run_sweep(plan, cfg).results if through_ray and engine == "fast" else run_inline(plan, cfg)
        assert all(r["status"] == "ok" for r in results.values()), {
            k: r["error"] for k, r in results.items() if r["status"] != "ok"}

    store = ResultStore(str(store_dir))
    fidelity = store.read("fidelity").to_pandas()
    fidelity["which"] = fidelity["engine"].map(lambda e: "fast" if e.startswith("quantsweep fast engine") else "hf")
    assert fidelity.groupby("which").size().to_dict() == {"fast": 3 * len(methods), "hf": 3 * len(methods)}
    assert fidelity.loc[fidelity.which == "fast", "engine"].str.contains("on the CPU").all()
    wide = fidelity.pivot_table(index=["method", "sequence_index"], columns="which", values="nll_sum")
    relative = ((wide["fast"] - wide["hf"]).abs() / wide["hf"].abs())
    assert relative.max() < 1e-3, relative.sort_values().tail()
    # the quantized methods changed the model (the comparison is not of two fp16 runs)
    kl = fidelity.groupby(["method", "which"])["kl_mean"].mean()
    assert kl["fp16"].max() == 0 and all(kl[m].min() > 0 for m in methods if m != "fp16")

    throughput = store.read("throughput").to_pandas()
    engines = throughput["engine"].map(lambda e: "fast" if e.startswith("quantsweep fast engine") else "hf")
    assert sorted(zip(throughput["method"], engines)) == sorted((m, e) for m in methods for e in ("fast", "hf"))
    assert (throughput["output_tokens_per_s"] > 0).all()
    fast = throughput[engines == "fast"].set_index("method")["weight_format"]
    assert all(fast[m].startswith("int4-g32") for m in methods if m in ("rtn", "awq", "gptq"))  # int4 linears
    assert "fp8" not in methods or fast["fp8"].startswith("fp8-e4m3 W8A8")  # and the FP8 ones ran
