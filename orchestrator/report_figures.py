"""The report's figures: one function per figure, each from a report table to a PNG and an SVG file.

Matplotlib's Agg backend is used so figures render on a headless worker.  A figure whose table is
empty is still written, as a placeholder that says "no data yet", so a partial store gives the same
set of files as a full one (figures of stages the sweep did not ask for are not drawn at all:
:mod:`orchestrator.report_render` decides).  SVGs are written without a date so reruns on the same store give the same
files.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tasks.mmlu.categories import CATEGORIES, SUBCATEGORIES  # noqa: E402

_DPI = 110
_CHANCE = 0.25  # four choices
_GIB = 1024 ** 3


@dataclass(frozen=True)
class Figure:
    png: Path
    svg: Path


def _save(fig: plt.Figure, stem: Path) -> Figure:
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    fig.savefig(png, dpi=_DPI, bbox_inches="tight")
    fig.savefig(svg, bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return Figure(png=png, svg=svg)


def _placeholder(stem: Path, title: str, message: str = "no data yet") -> Figure:
    fig, ax = plt.subplots(figsize=(6, 2.2))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, color="#666", wrap=True)
    return _save(fig, stem)


def _colors(order: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {s: cmap(i % 10) for i, s in enumerate(order)}


def _present(order: list[str], df: pd.DataFrame) -> list[str]:
    have = set(df["series"])
    return [s for s in order if s in have] + sorted(have - set(order))


def accuracy_bars(acc: pd.DataFrame, order: list[str], stem: Path, title: str, wide: bool = False) -> Figure:
    """Grouped bars: one group per category (or subcategory), one bar per series, 95% CI whiskers."""
    if acc.empty:
        return _placeholder(stem, title)
    series = _present(order, acc)
    present = set(acc["group"])
    known = [g for g in (*CATEGORIES, *SUBCATEGORIES) if g in present]
    groups = known + sorted(present - set(known), key=str)
    colors = _colors(order)
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(7, 0.75 * len(groups) * max(1, len(series) / 2)) if wide else 8, 4.5))
    for i, s in enumerate(series):
        rows = acc[acc["series"] == s].set_index("group").reindex(groups)
        y = rows["accuracy"].to_numpy(dtype=float)
        err = np.vstack([y - rows["ci_low"].to_numpy(dtype=float), rows["ci_high"].to_numpy(dtype=float) - y])
        ax.bar(x + (i - (len(series) - 1) / 2) * width, y, width, yerr=err, capsize=2, label=s,
               color=colors.get(s), error_kw={"elinewidth": 0.8})
    ax.axhline(_CHANCE, color="#999", linestyle=":", linewidth=1, label="chance (0.25)")
    labels = groups if wide else [textwrap.fill(str(g), 16) for g in groups]
    ax.set_xticks(x, labels, rotation=40 if wide else 0, ha="right" if wide else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=min(4, len(series) + 1), loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, stem)


def _lines(ax: plt.Axes, df: pd.DataFrame, order: list[str], y: str, scale: float = 1.0) -> None:
    colors = _colors(order)
    for s in _present(order, df):
        rows = df[(df["series"] == s) & df[y].notna()].sort_values("batch_size")
        if rows.empty:
            continue
        ax.plot(rows["batch_size"], rows[y] / scale, marker="o", label=s, color=colors.get(s))
    ax.set_xscale("log", base=2)
    batch_sizes = sorted(df["batch_size"].dropna().unique())
    ax.set_xticks(batch_sizes, [str(int(b)) for b in batch_sizes])
    ax.set_xlabel("batch size")
    ax.grid(alpha=0.3)


def _value_axis(ax: plt.Axes, values: pd.Series, axis: str = "y") -> None:
    """Log scale only when values span more than 20×; plain numbers on the ticks either way."""
    v = values.dropna()
    v = v[v > 0]
    target = ax.yaxis if axis == "y" else ax.xaxis
    if len(v) and v.max() / v.min() > 20:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        target.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda t, _: f"{t:g}"))
        target.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        (ax.set_ylim if axis == "y" else ax.set_xlim)(0, float(v.max()) * 1.08 if len(v) else None)


def _main_shape(tput: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Rows of the most common (input_len, output_len): one line per series needs one shape."""
    sizes = tput.groupby(["input_len", "output_len"]).size()
    if sizes.empty:  # lengths not recorded: plot everything
        return tput, "input/output lengths not recorded"
    shape = sizes.idxmax()
    rows = tput[(tput["input_len"] == shape[0]) & (tput["output_len"] == shape[1])]
    note = f"input {int(shape[0])} / output {int(shape[1])} tokens"
    if len(sizes) > 1:
        note += f"; {len(sizes) - 1} other shape(s) in the table only"
    return rows, note


def throughput_lines(tput: pd.DataFrame, order: list[str], stem: Path, baseline: str | None) -> Figure:
    """Output tokens/s against batch size, speed-up over the baseline written next to each point."""
    title = "Output tokens/s vs batch size"
    if tput.empty or tput["output_tokens_per_s"].isna().all():
        return _placeholder(stem, title)
    rows, shape = _main_shape(tput)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _lines(ax, rows, order, "output_tokens_per_s")
    for r in rows.itertuples():
        if r.method != baseline and pd.notna(r.speedup_vs_baseline):
            ax.annotate(f"×{r.speedup_vs_baseline:.2f}", (r.batch_size, r.output_tokens_per_s),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    _value_axis(ax, rows["output_tokens_per_s"])
    ax.set_ylabel("output tokens/s (median, prefill included)")
    note = f"; ×: speed-up over {baseline}" if baseline else ""
    ax.set_title(f"{title} ({shape}{note})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, stem)


def roofline_lines(tput: pd.DataFrame, order: list[str], stem: Path) -> Figure:
    """Decode tokens/s as a % of the memory-bandwidth roofline against batch size: how far each method's
    kernels are from what the device's bandwidth allows (rows without a roofline are left out)."""
    title = "Decode % of the memory-bandwidth roofline vs batch size"
    if tput.empty or "roofline_pct" not in tput or tput["roofline_pct"].isna().all():
        return _placeholder(stem, title, "not computed (no rows, or engines that do not report the bytes "
                                         "a decode step reads)")
    rows, shape = _main_shape(tput)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _lines(ax, rows, order, "roofline_pct")
    ax.set_ylim(0, max(100.0, float(rows["roofline_pct"].max()) * 1.08))
    ax.axhline(100, color="#999", lw=0.8, ls="--")
    ax.set_ylabel("% of roofline (decode tokens/s)")
    ax.set_title(f"{title} ({shape})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, stem)


def memory_lines(mem: pd.DataFrame, order: list[str], stem: Path) -> Figure:
    """Peak memory (GiB) against batch size; the axis says whether it is device memory or process RSS."""
    title = "Peak memory vs batch size"
    if mem.empty or mem["peak_memory_bytes"].isna().all():
        return _placeholder(stem, title)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _lines(ax, mem, order, "peak_memory_bytes", scale=_GIB)
    measures = sorted(mem["memory_measure"].dropna().unique())
    ax.set_ylabel(f"peak {' / '.join(measures)} (GiB)")
    ax.set_ylim(0, float(mem["peak_memory_bytes"].max()) / _GIB * 1.12)
    ax.set_title(f"{title} ({' / '.join(measures)})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, stem)


def tradeoff_scatter(trade: pd.DataFrame, order: list[str], stem: Path) -> Figure:
    """Overall accuracy (95% CI) against output tokens/s, one point per series × batch size."""
    title = "Accuracy vs output tokens/s (labels: batch size)"
    if trade.empty or trade["output_tokens_per_s"].isna().all():
        return _placeholder(stem, title, "no data yet (needs both MMLU predictions and throughput rows)")
    colors = _colors(order)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for s in _present(order, trade):
        rows = trade[trade["series"] == s].sort_values("batch_size")
        y = rows["accuracy"].to_numpy(dtype=float)
        err = np.vstack([y - rows["ci_low"].to_numpy(dtype=float), rows["ci_high"].to_numpy(dtype=float) - y])
        ax.errorbar(rows["output_tokens_per_s"], y, yerr=err, marker="o", capsize=2, label=s,
                    color=colors.get(s), linewidth=0.8)
        for r in rows.itertuples():
            ax.annotate(f"b{int(r.batch_size)}", (r.output_tokens_per_s, r.accuracy), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    _value_axis(ax, trade["output_tokens_per_s"], axis="x")
    ax.set_xlabel("output tokens/s (median)")
    ax.set_ylabel("MMLU accuracy (overall)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, stem)


def energy_lines(tput: pd.DataFrame, order: list[str], stem: Path, devices: set[str]) -> Figure:
    """Energy per output token against batch size, or a note saying why it was not measured."""
    title = "Energy per output token vs batch size"
    if tput.empty:
        return _placeholder(stem, title)
    if tput["energy_j_per_token"].isna().all():
        why = "not measured on CPU" if devices and all(d == "cpu" for d in devices) else "not measured"
        return _placeholder(stem, title, why)
    rows, shape = _main_shape(tput)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _lines(ax, rows, order, "energy_j_per_token")
    ax.set_ylabel("J per output token (NVML energy)")
    _value_axis(ax, rows["energy_j_per_token"])
    ax.set_title(f"{title} ({shape})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, stem)


def fidelity_bars(fid: pd.DataFrame, order: list[str], stem: Path, baseline: str | None) -> Figure:
    """Mean KL against the baseline (95% CI over windows) and top-1 agreement, one bar per series."""
    title = f"Quantization damage against {baseline or 'the baseline'}"
    rows = fid[fid["method"] != fid["baseline"]] if len(fid) else fid
    if rows.empty:
        return _placeholder(stem, title, "no data yet (needs fidelity rows of a method other than the baseline)")
    series = _present(order, rows)
    rows = rows.set_index("series").loc[series]
    colors = [_colors(order).get(s) for s in series]
    fig, (kl_ax, top_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    kl = rows["kl_mean"].to_numpy(dtype=float)
    err = np.vstack([kl - rows["kl_ci_low"].to_numpy(dtype=float), rows["kl_ci_high"].to_numpy(dtype=float) - kl])
    bars = kl_ax.bar(series, kl, yerr=np.nan_to_num(err), capsize=3, color=colors)
    kl_ax.bar_label(bars, labels=[f"{v:.3g}" for v in kl], fontsize=8, label_type="center")
    kl_ax.set_ylabel("mean KL(baseline || method), nats/token")
    kl_ax.set_title("KL divergence (95% CI over windows)", fontsize=10)
    top = rows["top1_agreement"].to_numpy(dtype=float)
    bars = top_ax.bar(series, top, color=colors)
    top_ax.bar_label(bars, labels=[f"{v:.1%}" for v in top], fontsize=8)
    top_ax.set_ylim(0, 1.05)  # bars start at 0: a truncated axis would exaggerate the differences
    top_ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    top_ax.set_title("Top-1 next-token agreement", fontsize=10)
    for ax in (kl_ax, top_ax):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, stem)
