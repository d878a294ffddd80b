#!/usr/bin/env bash
# The GPU runs still owed by issues 18 (fidelity under the CUDA kernels), 19 (the fp8 product sweep) and 20
# (item 7: the random model cell), each sized for one device call of at most 10 minutes.  On the device
# machine, from the project root, after `../shared/tools/device-carry` here:
#   . .device-carry/setup.sh && bash bench/pending_gpu_runs.sh fidelity   # ~6 min: fidelity CUDA vs CPU + GPU tests
#   . .device-carry/setup.sh && bash bench/pending_gpu_runs.sh fp8        # speed_random_7b fp16/rtn/fp8 + report
#   . .device-carry/setup.sh && bash bench/pending_gpu_runs.sh gputests   # every test marked gpu
# The fp8 sweep's 28 cells take longer than one call: it stops itself after SWEEP_TIMEOUT seconds (default 500)
# and the same command resumes where it stopped.  Its rows live in $STORE (default .device-store, in the
# checkout: bring $OUT/store.tgz back, unpack it there and carry .device-store in the next call), its
# checkpoints in /tmp/artifacts (kept on a warm machine; a fresh one rebuilds the model and quantize cells
# and skips every profile cell already stored).  MODEL (default random_llama2_7b) and BATCHES pick the grid.
# Everything it reports lands under $OUT (at most 8 files come back: the report is one tarball).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"

case "${1:-}" in
fidelity)
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_engine.py -k decode_logits 2>&1 | tail -5 \
    | tee "$out/pytest_decode_logits.txt"
  timeout 480 python3 bench/fidelity_cuda_vs_cpu.py --out "$out" --store /tmp/fidelity_store
  tar czf "$out/fidelity_store.tgz" --exclude=artifacts -C /tmp fidelity_store
  ;;
fp8)
  start=$(date +%s)
  store=${STORE:-.device-store}
  timeout "${SWEEP_TIMEOUT:-500}" python3 -m orchestrator.cli experiment=speed_random_7b 'sweep.methods=[fp16,rtn,fp8]' \
    "model=${MODEL:-random_llama2_7b}" "sweep.batch_sizes=${BATCHES:-[1,2,4,8,16,32,64]}" \
    store.uri="$store" store.artifacts_dir=/tmp/artifacts hydra.run.dir=/tmp/hydra 2>&1 | grep -v "^(raylet)" | tee "$out/sweep.log" | tail -40
  echo "sweep wall: $(( $(date +%s) - start )) s" | tee -a "$out/sweep.log"
  tar czf "$out/store.tgz" "$store"
  timeout 60 python3 -m orchestrator.report "$store" --out /tmp/report
  python3 - "$out/sweep_tables.md" "$store" <<'PY'
import sys
import pandas as pd
runs = pd.read_parquet(f"{sys.argv[2]}/runs")
tp, mem = pd.read_parquet(f"{sys.argv[2]}/throughput"), pd.read_parquet(f"{sys.argv[2]}/memory")
with open(sys.argv[1], "w") as f:
    # issue 20 item 7: the model cell's seconds (222-287 s before random weights were built on the GPU)
    f.write(runs[runs.kind != "sweep"][["kind", "method", "batch_size", "status", "duration_s"]]
            .sort_values(["kind", "method", "batch_size"]).to_string(index=False) + "\n\n")
    t = tp.merge(mem[["method", "batch_size", "peak_device_memory_bytes"]], on=["method", "batch_size"])
    t["peak_gib"] = t.peak_device_memory_bytes / 2**30
    f.write(t[["method", "batch_size", "output_tokens_per_s", "decode_tokens_per_s", "roofline_pct", "ttft_s",
               "peak_gib"]]
            .sort_values(["method", "batch_size"]).to_string(index=False) + "\n")
    f.write(f"copy bandwidth (roofline): {tp.copy_bandwidth_bytes_per_s.median() / 1e12:.3f} TB/s\n")
PY
  cat "$out/sweep_tables.md"
  tar czf "$out/report.tgz" -C /tmp report
  ;;
gputests)  # GPU_TESTS narrows it (pytest arguments), e.g. "tests/test_families.py"
  timeout "${TEST_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider -m gpu ${GPU_TESTS:-tests} 2>&1 \
    | tee "$out/pytest_gpu.txt" | tail -15
  ;;
*)
  echo "usage: bash bench/pending_gpu_runs.sh fidelity|fp8|gputests" >&2
  exit 2
  ;;
esac
