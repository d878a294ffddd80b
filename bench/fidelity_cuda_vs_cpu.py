"""Fidelity under the CUDA kernels beside the CPU de-quantized reference, same checkpoints and text.

Runs two sweeps through the product's CLI (Ray, the store, the real cells) into one store: first on the GPU
(quantize, then the fidelity cells with the CUDA engine's decode kernels), then with ``backend.device=cpu``,
which reuses the model and quantize nodes (their keys do not depend on the device) and scores the same
checkpoints with the transformers reference, de-quantized to fp32.  Prints and writes a table per method:
mean KL, p99, top-1 agreement and perplexity on each device, and the differences.

    python bench/fidelity_cuda_vs_cpu.py --out results/ [hydra overrides for both sweeps ...]

The default model is a random-weight Llama (no weights exist offline on GPU machines here): its KL values
measure the numerics of the two engines on the same quantized weights, not a trained model's damage.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.store import ResultStore  # noqa: E402
from tasks.fidelity_stats import summarize  # noqa: E402

RANDOM_MODEL = ["model=tiny_random", "model.name=random-llama-2048x8", "model.dtype=bfloat16",
                "model.random.vocab_size=32000", "model.random.hidden_size=2048",
                "model.random.intermediate_size=5632", "model.random.num_hidden_layers=8",
                "model.random.num_attention_heads=32", "model.random.num_key_value_heads=4"]
COMMON = ["sweep.name=fidelity_cuda_vs_cpu", "sweep.stages=[fidelity]", "sweep.methods=[fp16,rtn,awq,gptq]",
          "fidelity.num_sequences=16", "fidelity.seq_len=512", "cluster.cpus_per_task=4"]


def run_sweep(store: Path, overrides: list[str], log: Path) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "orchestrator.cli", f"store.uri={store}", f"hydra.run.dir={store}/hydra",
           *overrides]
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"sweep failed with exit code {code}; see {log}")
    return time.perf_counter() - start


def compare(store: Path) -> pd.DataFrame:
    rows = ResultStore(str(store)).read("fidelity").to_pandas()
    rows["device_kind"] = rows["device"].str.split(":").str[0]
    summary = summarize(rows, by=("method", "device_kind"))
    wide = summary.pivot(index="method", columns="device_kind",
                         values=["kl_mean", "kl_ci_low", "kl_ci_high", "kl_p99", "top1_agreement", "perplexity"])
    wide.columns = [f"{a}_{b}" for a, b in wide.columns]
    wide["kl_cuda_minus_cpu"] = wide["kl_mean_cuda"] - wide["kl_mean_cpu"]
    wide["kl_cuda_over_cpu"] = wide["kl_mean_cuda"] / wide["kl_mean_cpu"]
    formats = rows.groupby(["method", "device_kind"])["weight_format"].first().unstack()
    return wide.join(formats.add_prefix("weights_"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--store", type=Path, default=Path("/tmp/fidelity_store"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both sweeps (default: a random model)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = COMMON + (args.overrides or RANDOM_MODEL)
    log = args.out / "fidelity_sweeps.log"
    cuda_s = run_sweep(args.store, overrides, log)
    cpu_s = run_sweep(args.store, overrides + ["backend.device=cpu"], log)
    table = compare(args.store)
    pd.set_option("display.width", 200)
    text = (f"sweeps: GPU {cuda_s:.0f} s (model, quantize and fidelity cells), CPU reference {cpu_s:.0f} s "
            f"(fidelity cells only)\n\n{table.to_string(float_format=lambda v: f'{v:.6g}')}\n")
    print(text)
    (args.out / "fidelity_cuda_vs_cpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
