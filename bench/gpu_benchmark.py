"""The GPU benchmark's former single entry point: ``--mode X`` runs the tool that now does X, with the options
it took before (an option the mode's tool does not use is accepted and ignored, as it was).

- ``check``: ``check_numerics.py`` (int4 linears and decode attention vs fp32 references);
- ``kernels``, ``mma``, ``dense``, ``attention``: ``tune_kernels.py int4|mma|dense|attention`` (the sweeps
  that write the engine's config JSONs under ``tasks/backends/torch/cuda/``);
- ``e2e``, ``method``, ``smoke``: ``e2e.py --mode e2e|method|smoke`` (the end-to-end table);
- ``all`` (the default): ``check_numerics.py``, then ``e2e.py``.

Each tool's ``--help`` lists its options.  Usage: python bench/gpu_benchmark.py --mode all --out results/
"""
from __future__ import annotations

import argparse

import check_numerics
import e2e
import tune_kernels

#: --mode -> the tools it runs, each with the words that pick its job
MODES = {"check": [(check_numerics, [])], "kernels": [(tune_kernels, ["int4"])],
         "mma": [(tune_kernels, ["mma"])], "dense": [(tune_kernels, ["dense"])],
         "attention": [(tune_kernels, ["attention"])], "e2e": [(e2e, ["--mode", "e2e"])],
         "method": [(e2e, ["--mode", "method"])], "smoke": [(e2e, ["--mode", "smoke"])],
         "all": [(check_numerics, []), (e2e, ["--mode", "e2e"])]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=list(MODES), default="all")
    args, rest = p.parse_known_args(argv)
    parsed = {tool: tool.parser().parse_known_args([*words, *rest]) for tool, words in MODES[args.mode]}
    unknown = set(rest)
    for tool in (check_numerics, tune_kernels, e2e):  # the old script took every option in every mode
        words = ["int4"] if tool is tune_kernels else []
        unknown &= set(tool.parser().parse_known_args([*words, *rest])[1])
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(a for a in rest if a in unknown)}")
    for tool, (tool_args, _) in parsed.items():
        tool.run(tool_args)


if __name__ == "__main__":
    main()
