"""Time the model cell of a random-weight sweep (``experiment=speed_random_7b``): build + write the checkpoint.

    python bench/random_model_cell.py --device cuda --builder both     # on a GPU machine: before vs after
    python bench/random_model_cell.py --shape mid --device cpu          # a 168M-parameter shape, anywhere

``--builder transformers`` is the previous model cell (transformers' module-by-module init in bf16 on the
CPU, then the write); ``seeded`` is :func:`tasks.models.prepare_model` on ``--device`` (meta model, storage on
the device, seeded ``normal_``). Each prints build and write seconds; the checkpoint goes to a temporary folder
under ``--tmp`` and is deleted.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tasks.models import random_model, random_model_config, train_tokenizer

SHAPES = {
    "7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096, "seed": 0},
    "mid": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
            "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 4096, "seed": 0},
}


def _transformers_init(config: object, dtype: torch.dtype) -> torch.nn.Module:
    """The model cell before issue 20: transformers' own init, on the CPU."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_cell(builder: str, shape: dict, device: str, tmp: str | None) -> None:
    start = time.perf_counter()
    tokenizer = train_tokenizer(min(shape["vocab_size"], 4096))
    config = random_model_config(shape, tokenizer)
    on = "cpu" if builder == "transformers" else device
    model = (_transformers_init(config, torch.bfloat16) if builder == "transformers"
             else random_model(config, torch.bfloat16, on, shape["seed"]))
    _sync(on)
    built = time.perf_counter()
    out = Path(tempfile.mkdtemp(dir=tmp))
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        written = time.perf_counter()
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{builder:12s} on {on:6s}: build {built - start:7.1f} s, write {written - built:6.1f} s, "
          f"model cell {written - start:7.1f} s ({params / 1e9:.2f} B parameters, {size / 1e9:.1f} GB)", flush=True)
    del model
    if on.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--builder", choices=("seeded", "transformers", "both"), default="both")
    parser.add_argument("--tmp", default=None, help="folder for the temporary checkpoint (default: system temp)")
    args = parser.parse_args()
    builders = ("transformers", "seeded") if args.builder == "both" else (args.builder,)
    from transformers import LlamaForCausalLM  # noqa: F401 - imported before timing: both builders need it
    for builder in builders:
        time_cell(builder, SHAPES[args.shape], args.device, args.tmp)


if __name__ == "__main__":
    main()
