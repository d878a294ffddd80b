"""What int4 buys on one GPU, end to end: a model with RANDOM weights of a real model's shape (``--shape``,
default Llama-2-7B), fp16 (bf16) vs int4 g128, the table users read.

No Ray, no checkpoint: the model is built on the GPU with random weights (its text is meaningless; speed
and memory do not depend on the values).  Modes:

- ``e2e`` (the default): method (fp16; int4 with the default kernels; int4-triton; fp8: W8A8 e4m3, see
  ``fp8_bench.py``; a suffix -nofuse or -silu runs fp16 or int4 with the engine option gemv_fusion=off or all
  instead of the default norm) x batch -> output tok/s (batch x output_len / end-to-end, prefill included),
  decode tok/s, TTFT, inter-token latency, peak memory, and % of the bandwidth roofline (bytes a decode step
  must read / the device-to-device copy bandwidth measured here).  Each method runs in its own process
  (``--mode method``), so one method's memory never shows in the other's peak.  ``--breakdown`` adds a
  torch.profiler table of where a decode step's device time goes.
- ``method``: one ``--method`` in this process; writes ``e2e_<method>.json`` (what ``e2e`` runs per method).
- ``smoke``: the orchestrator's path without Ray on small checkpoints (``--smoke-dir`` with ``fp`` and
  ``rtn``): TorchBackend build -> load (KV cache from the profile options) -> profile_engine -> lm-eval.

Shapes: ``llama2-7b`` is :func:`~tasks.backends.torch.cuda.model.llama2_7b_args`; the others are read from
the sweep's random-model configs (``conf/model/random_*.yaml``) through the engine's families table, as a
profile cell reads a model.

Usage: python bench/e2e.py --methods fp16,int4 --shape llama3.1-8b --out results/
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tasks.backends.torch.cuda.generate import Generator  # noqa: E402
from tasks.backends.torch.cuda.loader import random_model  # noqa: E402
from tasks.backends.torch.cuda.model import (DEFAULT_GEMV_FUSION, ModelArgs, kv_bytes_per_token,  # noqa: E402
                                             llama2_7b_args)
from tasks import roofline  # noqa: E402
from timing import GIB, _write, add_common_options, copy_bandwidth, ints, print_device, random_notice  # noqa: E402

#: --shape -> (the name the notices print, the conf/model file of a random model of that shape; None:
#: llama2_7b_args(), the engine's own Llama-2-7B shape, whose rms_norm_eps is Llama-2's 1e-5)
SHAPES = {"llama2-7b": ("Llama-2-7B", None), "llama3.1-8b": ("Llama-3.1-8B", "random_llama31_8b"),
          "qwen2.5-7b": ("Qwen2.5-7B", "random_qwen25_7b")}


def model_args_of(shape: str) -> ModelArgs:
    """The engine's ModelArgs for ``--shape``: the random-model config's config.json through the families
    table (:func:`tasks.backends.torch.cuda.families.model_args`), so the shapes live in ``conf/model`` only."""
    conf = SHAPES[shape][1]
    if conf is None:
        return llama2_7b_args()
    from omegaconf import OmegaConf

    from tasks.backends.torch.cuda.families import model_args
    from tasks.models import model_config_json

    model = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{conf}.yaml"), resolve=True)
    return model_args(model_config_json(model))


def decode_bytes_per_step(model, batch: int, input_len: int, output_len: int) -> float:
    """Fewest bytes a decode step must move, as the product's profile rows count them (:mod:`tasks.roofline`)."""
    return roofline.decode_bytes_per_step(model.decode_reads(), kv_bytes_per_token(model.args), batch, input_len, output_len)


def decode_breakdown(gen: Generator, input_len: int, steps: int = 20, top: int = 12) -> list[dict]:
    """Where a decode step's device time goes: torch.profiler over ``steps`` graph replays, kernels grouped
    by name, microseconds per step (the replays write positions input_len.. onwards, inside the cache)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        gen.pos.fill_(input_len)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            gen.graph.replay()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels.setdefault(e.name, []).append(e.device_time_total if hasattr(e, "device_time_total")
                                                  else e.cuda_time_total)
    rows = [{"kernel": name[:90], "us_per_step": sum(t) / steps, "launches_per_step": len(t) / steps}
            for name, t in kernels.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(f"  decode step breakdown: {total:.0f} us of kernels per step, "
          f"{sum(r['launches_per_step'] for r in rows):.0f} launches per step")
    for r in rows[:top]:
        print(f"    {r['us_per_step']:8.1f} us  x{r['launches_per_step']:5.0f}  {r['kernel']}")
    return rows[:top]


def run_method(method: str, batch_sizes: list[int], input_len: int, output_len: int, warmup: int,
               repeats: int, bandwidth: float, compile_blocks: bool, breakdown: bool = False,
               shape: str = "llama2-7b") -> list[dict]:
    from tasks.gpu_metrics import MemorySampler

    print(random_notice(SHAPES[shape][0]))
    args = model_args_of(shape)
    t0 = time.perf_counter()
    # suffixes for A/B runs: "-nofuse" (gemv_fusion off), "-silu" (gemv_fusion all); else the default
    base, _, suffix = method.partition("-")
    base = method if base == "int4" and suffix == "triton" else base
    fusion = {"nofuse": "off", "silu": "all"}.get(suffix, DEFAULT_GEMV_FUSION)
    weights = {"fp16": "bfloat16", "fp8": "fp8"}.get(base, "int4")
    model = random_model(args, weights, "cuda", group_size=128,
                         int4_kernels="triton" if base == "int4-triton" else "auto", gemv_fusion=fusion)
    gen = Generator(model, compile=compile_blocks, cuda_graph=True)
    print(f"[{method}] built in {time.perf_counter() - t0:.1f} s; weights {model.weight_bytes() / GIB:.2f} GiB")
    rows = []
    for batch in batch_sizes:
        gen.release()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, args.vocab_size, (batch, input_len), device="cuda")
        t0 = time.perf_counter()
        gen.setup(batch, input_len + output_len)  # allocate the cache, compile, capture the decode graph
        setup_s = time.perf_counter() - t0
        try:
            sampler = MemorySampler("cuda:0")
        except Exception as exc:  # NVML missing or the bus id lookup failing must not lose the timings
            print(f"  memory sampler unavailable: {type(exc).__name__}: {exc}")
            sampler = contextlib.nullcontext(types.SimpleNamespace(
                peaks=types.SimpleNamespace(device_used_bytes=None, process_bytes=None)))
        with sampler as sampler:
            for _ in range(warmup):
                gen.generate(ids, output_len)
            runs = [gen.generate(ids, output_len) for _ in range(repeats)]
        tokens = runs[-1].output_token_ids
        assert tokens.shape == (batch, output_len) and int(tokens.min()) >= 0 and int(tokens.max()) < args.vocab_size
        decode_s = [sum(r.decode_step_s) for r in runs]
        steps = [s for r in runs for s in r.decode_step_s]
        bytes_step = decode_bytes_per_step(model, batch, input_len, output_len)
        roofline = batch * bandwidth / bytes_step
        decode_tps = statistics.median(batch * (output_len - 1) / d for d in decode_s)
        row = {
            "method": method, "batch_size": batch,
            "output_tok_s": statistics.median(batch * output_len / r.total_s for r in runs),
            "decode_tok_s": decode_tps,
            "ttft_ms": 1e3 * statistics.median(r.first_token_s for r in runs),
            "itl_median_ms": 1e3 * statistics.median(steps),
            "itl_p90_ms": 1e3 * sorted(steps)[int(0.9 * (len(steps) - 1))],
            "e2e_s": statistics.median(r.total_s for r in runs),
            "peak_nvml_used_gib": (sampler.peaks.device_used_bytes or 0) / GIB,
            "peak_nvml_process_gib": (sampler.peaks.process_bytes or 0) / GIB,
            "torch_max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "torch_max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "decode_bytes_per_step_gb": bytes_step / 1e9,
            "roofline_decode_tok_s": roofline,
            "pct_roofline": 100 * decode_tps / roofline,
            "setup_s": setup_s, "repeats": repeats, "warmup": warmup,
            "weights_gib": model.weight_bytes() / GIB,
            "gpu": torch.cuda.get_device_name(),
            "shape": shape,
            "int4_kernels": model.int4_kernels if base not in ("fp16", "fp8") else "",
            "gemv_fusion": model.gemv_fusion,
        }
        if breakdown:
            try:
                row["breakdown"] = decode_breakdown(gen, input_len)
            except Exception as exc:  # the profiler must not cost the timings
                print(f"  breakdown failed: {type(exc).__name__}: {exc}")
        rows.append(row)
        print(f"[{method}] B={batch:3d}: {row['output_tok_s']:9.1f} out tok/s  {decode_tps:9.1f} decode tok/s  "
              f"TTFT {row['ttft_ms']:7.1f} ms  ITL {row['itl_median_ms']:6.2f} ms  "
              f"NVML {row['peak_nvml_used_gib']:5.1f} GiB  {row['pct_roofline']:5.1f}% roofline  "
              f"(setup {setup_s:.1f} s)", flush=True)
    gen.release()
    return rows


def e2e(args, out_dir: Path, bandwidth: float) -> list[dict]:
    """Each method in a child process (clean memory), then one table."""
    rows = []
    for method in args.methods.split(","):
        part = out_dir / f"e2e_{method}.json"
        cmd = [sys.executable, __file__, "--mode", "method", "--method", method, "--shape", args.shape,
               "--out", str(out_dir), "--batch-sizes", args.batch_sizes, "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--bandwidth", str(bandwidth)] + (["--no-compile"] if args.no_compile else []) \
            + (["--breakdown"] if args.breakdown else [])
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not part.exists():
            print(f"[{method}] FAILED (exit {proc.returncode})")
            continue
        rows += json.loads(part.read_text())
    fp16 = {r["batch_size"]: r for r in rows if r["method"] == "fp16"}
    for r in rows:
        base = fp16.get(r["batch_size"])
        r["speedup_vs_fp16"] = r["output_tok_s"] / base["output_tok_s"] if base else float("nan")
        r["decode_speedup_vs_fp16"] = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        r["nvml_vs_fp16"] = r["peak_nvml_used_gib"] / base["peak_nvml_used_gib"] if base else float("nan")
    _write(rows, out_dir / "e2e")
    print_table(rows, bandwidth, args.shape)
    return rows


def print_table(rows: list[dict], bandwidth: float, shape: str = "llama2-7b") -> None:
    print()
    print(random_notice(SHAPES[shape][0]))
    gpu = rows[0]["gpu"] if rows else "?"
    kernels = sorted({f"{r['method']}: {r['int4_kernels']}" for r in rows if r.get("int4_kernels")})
    print(f"GPU: {gpu}; measured copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); fp16 = bf16 weights; "
          f"int4 = W4A16 g128 asymmetric (kernels: {', '.join(kernels)}), lm_head/embeddings bf16; "
          "input 512, output 200, greedy, EOS ignored")
    cols = [("method", "{}"), ("batch_size", "{}"), ("output_tok_s", "{:.1f}"), ("decode_tok_s", "{:.1f}"),
            ("ttft_ms", "{:.1f}"), ("itl_median_ms", "{:.2f}"), ("peak_nvml_used_gib", "{:.2f}"),
            ("torch_max_reserved_gib", "{:.2f}"), ("roofline_decode_tok_s", "{:.0f}"), ("pct_roofline", "{:.1f}"),
            ("speedup_vs_fp16", "{:.2f}"), ("decode_speedup_vs_fp16", "{:.2f}"), ("nvml_vs_fp16", "{:.2f}")]
    print("| " + " | ".join(c for c, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f.format(r.get(c, "")) for c, f in cols) + " |")


def smoke(smoke_dir: Path, out_dir: Path) -> None:
    """The orchestrator's path without Ray on small real checkpoints: build -> load -> profile -> lm-eval.

    ``smoke_dir`` holds ``fp`` (a random-weight bf16 Llama with a tokenizer, from ``tasks.models``) and
    ``rtn`` (its int4 compressed-tensors version from ``tasks.quantize``).  Prints the profile rows, how
    close the engine's logits are to transformers' on the dense checkpoint, and lm-eval loglikelihoods.
    """
    from tasks.backends.base import EngineShape
    from tasks.backends.torch.backend import TorchBackend
    from tasks.profile import profile_engine

    kv = {"kv_cache_batch_size": 4, "kv_cache_input_len": 64, "kv_cache_output_len": 16}
    for name in ("fp", "rtn"):
        ckpt = (smoke_dir / name).resolve()
        engine_dir = out_dir / f"engine_{name}"
        method = {"name": name, "algorithm": "none" if name == "fp" else "rtn", "dtype": "bfloat16"}
        TorchBackend().build(ckpt, engine_dir, EngineShape(4, 64, 80), method, {})
        engine = TorchBackend().load(engine_dir, "cuda:0", dict(kv))
        print(f"[smoke {name}] {type(engine).__name__}: {engine.weight_format}; cache {engine.cache_shape}; "
              f"{engine.kv_cache_policy}")
        throughput, memory = profile_engine(engine, 4, 64, 16, 1, 2)
        print(f"[smoke {name}] throughput row: {json.dumps(throughput, default=str)}")
        print(f"[smoke {name}] memory row: {json.dumps(memory, default=str)}")
        if name == "fp":  # the dense checkpoint loads in transformers here: compare logits
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
            ids = torch.randint(100, engine.vocab_size(), (engine.cache_shape[0], 32), device="cuda")
            with torch.inference_mode():
                ours = engine.model(ids, torch.arange(32, device="cuda"), all_logits=True)
                theirs = hf(ids).logits.float()
            rel = ((ours - theirs).norm() / theirs.norm()).item()
            agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
            print(f"[smoke fp] engine vs transformers logits: rel diff {rel:.2e}, argmax agreement {agree:.3f}")
            del hf
        try:
            lm = engine.lm_eval_model(2)
            from lm_eval.api.instance import Instance

            reqs = [Instance("loglikelihood", {}, ("The capital of France is", " Paris"), 0),
                    Instance("loglikelihood", {}, ("2 + 2 =", " 4"), 1)]
            print(f"[smoke {name}] lm-eval loglikelihoods: {lm.loglikelihood(reqs)}")
        except ImportError as exc:
            print(f"[smoke {name}] lm-eval part SKIPPED: {exc} (not installed on this machine)")
        except Exception as exc:  # e.g. compressed-tensors missing for transformers' int4 load
            print(f"[smoke {name}] lm-eval part FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        engine.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["e2e", "method", "smoke"], default="e2e")
    add_common_options(p)
    p.add_argument("--shape", choices=list(SHAPES), default="llama2-7b", help="the model shape (random weights)")
    p.add_argument("--methods", default="fp16,int4")
    p.add_argument("--method", default="fp16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s; measured when 0")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--breakdown", action="store_true", help="e2e: profile the decode step's kernels per batch")
    p.add_argument("--smoke-dir", type=Path, default=Path(".smoke"), help="fp/ and rtn/ checkpoints (smoke)")
    return p


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "method":
        rows = run_method(args.method, ints(args.batch_sizes), args.input_len, args.output_len, args.warmup,
                          args.repeats, args.bandwidth, not args.no_compile, args.breakdown, args.shape)
        (args.out / f"e2e_{args.method}.json").write_text(json.dumps(rows))
        return
    if args.mode == "smoke":
        smoke(args.smoke_dir, args.out)
        return
    print_device(random_notice(SHAPES[args.shape][0]))
    bandwidth = args.bandwidth or copy_bandwidth()
    print(f"device-to-device copy bandwidth: {bandwidth / 1e12:.3f} TB/s (bytes read + written, median of 20)")
    e2e(args, args.out, bandwidth)


if __name__ == "__main__":
    run(parser().parse_args())
