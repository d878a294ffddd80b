"""The report's last step: figures and the self-contained HTML page, from the computed tables.

Nothing here reads the store or computes a number: it draws :class:`~orchestrator.report_tables.Results`'
tables (:mod:`orchestrator.report_figures`), formats them and the setup pairs
(:mod:`orchestrator.report_provenance`) as HTML, and fills ``report_template.html``.  Each section says
what is missing instead of failing.
"""
from __future__ import annotations

import base64
import html
import re
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from string import Template

import pandas as pd

from orchestrator import report_figures as figs
from orchestrator.report_load import StoreData
from orchestrator.report_provenance import provenance
from orchestrator.report_tables import Results
from orchestrator.schema import STATUSES


#: The stages a figure's data comes from: a figure of a stage the sweep did not ask for is not drawn.
FIGURE_STAGES = {"accuracy_category": ("evaluate",), "accuracy_subcategory": ("evaluate",),
                 "throughput": ("profile",), "roofline": ("profile",), "memory": ("profile",),
                 "tradeoff": ("evaluate", "profile"), "energy": ("profile",), "fidelity": ("fidelity",)}


def draw_figures(res: Results, fig_dir: Path) -> dict[str, figs.Figure | None]:
    """Every figure of the page, as PNG and SVG files under ``fig_dir``, keyed by the page's name for it
    (None: its stages were not part of the sweep)."""
    draw = {
        "accuracy_category": lambda: figs.accuracy_bars(res.accuracy["category"], res.order,
                                                        fig_dir / "accuracy_category",
                                                        "MMLU accuracy by category (95% CI)"),
        "accuracy_subcategory": lambda: figs.accuracy_bars(res.accuracy["subcategory"], res.order,
                                                           fig_dir / "accuracy_subcategory",
                                                           "MMLU accuracy by subcategory (95% CI)", wide=True),
        "throughput": lambda: figs.throughput_lines(res.throughput, res.order, fig_dir / "throughput",
                                                    res.baseline),
        "roofline": lambda: figs.roofline_lines(res.throughput, res.order, fig_dir / "roofline"),
        "memory": lambda: figs.memory_lines(res.memory, res.order, fig_dir / "memory"),
        "tradeoff": lambda: figs.tradeoff_scatter(res.tradeoff, res.order, fig_dir / "tradeoff"),
        "energy": lambda: figs.energy_lines(res.throughput, res.order, fig_dir / "energy", res.devices),
        "fidelity": lambda: figs.fidelity_bars(res.fidelity, res.order, fig_dir / "fidelity", res.baseline),
    }
    return {name: make() if set(FIGURE_STAGES[name]) <= set(res.stages) else None for name, make in draw.items()}


def render_page(res: Results, store_uri: str, made: dict[str, figs.Figure | None]) -> str:
    """The HTML page: the template filled with one fragment per section, figures embedded; sections of
    stages the sweep did not ask for say so instead (see :func:`_asked_sections`)."""
    return _render(_sections(res, store_uri, made), res.stages)


def _missing_notes(res: Results) -> list[str]:
    """Series present in one kind of result but not another (e.g. evaluated but not yet profiled)."""
    def series(df: pd.DataFrame) -> set[str]:
        return set(df["series"]) if len(df) else set()

    preds = res.data.predictions
    acc = set(preds["series_base"]) if len(preds) else set()
    tp, mem = series(res.throughput), series(res.memory)
    notes = [f"{s}: accuracy rows but no throughput rows (missing)." for s in sorted(acc - tp)
             if "profile" in res.stages]
    notes += [f"{s}: throughput rows but no MMLU predictions (missing)." for s in sorted(tp - acc)
              if "evaluate" in res.stages]
    notes += [f"{s}: only one of throughput / memory rows present (missing the other)."
              for s in sorted(tp ^ mem)]
    if not len(res.data.runs):
        notes.append("The store has no runs rows yet: no node has finished.")
    return notes


def _summary(data: StoreData) -> str:
    cells = data.runs[data.runs["kind"] != "sweep"] if len(data.runs) else data.runs
    counts = cells["status"].value_counts().to_dict() if len(cells) else {}
    text = (f"{len(cells)} runs rows of cells ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items())) or 'none'}), "
            f"{len(data.predictions)} MMLU predictions, {len(data.throughput)} throughput rows, "
            f"{len(data.memory)} memory rows.")
    unknown = sorted(set(counts) - set(STATUSES))
    if unknown:
        text += f" Statuses outside {STATUSES}: {', '.join(unknown)}."
    return text


def _columns(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    return df[[c for c in cols if c in df]] if len(df) else df


def _sections(res: Results, store_uri: str, made: dict[str, figs.Figure | None]) -> dict[str, str]:
    """The template's fields: one HTML fragment per section, each saying what is missing."""
    tput, devices, baseline = res.throughput, res.devices, res.baseline
    energy_note = ""
    if len(tput) == 0 or tput["energy_j_per_token"].isna().all():
        energy_note = ("Energy per token: not measured on CPU (no NVML energy counter)."
                       if devices and all(d == "cpu" for d in devices)
                       else "Energy per token: not measured (no throughput rows or no NVML energy counter).")
    speed_note = (f"Speed-up is relative to <b>{html.escape(baseline)}</b> at the same batch size, engine and "
                  "input/output lengths; tokens/s is the median over the rows of a cell (each row itself a "
                  "median over repeats, as the rows' method note says)."
                  if baseline else "No unquantized baseline method found, so no speed-ups are shown.")
    speed_note += (" <i>roofline_pct</i> is decode tokens/s as a percentage of the memory-bandwidth limit: batch "
                   "× the copy bandwidth measured on the same device (setup table) ÷ the fewest bytes a decode "
                   "step moves (every weight once, the KV cache so far); on CPU rows of de-quantized methods it "
                   "is the limit of the dense weights that ran.")
    sweeps = ", ".join(res.data.sweep_names)
    wide = {lvl: _table_html(_accuracy_wide(df, res.order, lvl)) for lvl, df in res.accuracy.items()}
    return {
        "title": "quantsweep report" + (f": {html.escape(sweeps)}" if sweeps else ""),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "store_uri": html.escape(store_uri),
        "summary": html.escape(_summary(res.data)),
        "notes": _notes_html(res.data.notes),
        "provenance": "<table class=\"tbl kv\">" + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in provenance(res.data, res.configs, res.stages)) + "</table>",
        "accuracy_overall": wide["overall"],
        "fig_category": _figure_html(made["accuracy_category"], "Accuracy by MMLU category, one bar per method"),
        "table_category": wide["category"],
        "fig_subcategory": _figure_html(made["accuracy_subcategory"], "Accuracy by the 17 MMLU subcategories"),
        "table_subcategory": wide["subcategory"],
        "table_subject": wide["subject"],
        "fig_throughput": _figure_html(made["throughput"], "Output tokens/s against batch size"),
        "fig_roofline": _figure_html(made["roofline"], "Decode % of the memory-bandwidth roofline against batch size"),
        "speed_note": speed_note,
        "table_throughput": _table_html(_columns(tput, [
            "series", "batch_size", "input_len", "output_len", "output_tokens_per_s", "decode_tokens_per_s",
            "ttft_s", "itl_median_s", "speedup_vs_baseline", "roofline_pct", "device", "n_rows"])),
        "fig_memory": _figure_html(made["memory"], "Peak memory against batch size"),
        "table_memory": _table_html(_columns(res.memory, [
            "series", "batch_size", "device", "memory_measure", "peak_memory_gib", "weights_memory_bytes",
            "kv_cache_bytes", "peak_allocator_memory_bytes", "n_rows"])),
        "fig_tradeoff": _figure_html(made["tradeoff"], "Overall accuracy against output tokens/s, every batch size"),
        "table_tradeoff": _table_html(res.tradeoff),
        "fig_energy": _figure_html(made["energy"], "Energy per output token against batch size"),
        "energy_note": html.escape(energy_note),
        "table_significant": _table_html(_columns(res.significant, [
            "model", "series_a", "series_b", "level", "group", "n_pairs", "only_a", "only_b", "accuracy_a",
            "accuracy_b", "diff", "p_value"]),
            empty=("no significant differences" if len(res.mcnemar)
                   else "no data yet (needs two methods with predictions)")),
        "n_tests": str(len(res.mcnemar)),
        "table_failed": _table_html(res.failed, empty="no failed, OOM or skipped cells"),
        "missing_notes": _notes_html(_missing_notes(res)),
        "fidelity_note": _fidelity_note(res),
        "fig_fidelity": _figure_html(made["fidelity"], "Mean KL divergence from the baseline's next-token "
                                     "distribution (95% CI over windows) and top-1 agreement"),
        "table_fidelity": _table_html(_columns(res.fidelity, [
            "series", "baseline", "sequences", "tokens", "perplexity", "ppl_ratio", "kl_mean", "kl_ci_low",
            "kl_ci_high", "kl_p99", "kl_max", "top1_agreement", "device", "weight_format"])),
        "table_fidelity_pairs": _table_html(res.fidelity_pairs, empty="no data yet (needs two methods other "
                                            "than the baseline on the same windows)"),
        "table_flips": _table_html(res.flips, empty="no data yet (needs MMLU predictions of the baseline and "
                                   "another method)"),
        "table_missing": _table_html(res.missing, empty="nothing missing: every expected cell has rows",
                                     max_rows=200),
    }


def _fidelity_note(res: Results) -> str:
    """What the fidelity numbers compare, on which text, read from the rows."""
    fid = res.data.fidelity
    if fid.empty:
        return "No fidelity rows yet (sweep.stages without <code>fidelity</code>, or its cells have not run)."
    baselines = ", ".join(sorted(map(str, fid["baseline"].dropna().unique())))
    texts = ", ".join(sorted(map(str, fid["text_source"].dropna().unique())))
    windows = ", ".join(sorted({f"{n} tokens" for n in fid["seq_len"].dropna().astype(int)}))
    return (f"Each method's next-token distributions against <b>{html.escape(baselines)}</b>'s on the same "
            f"windows of <code>{html.escape(texts)}</code> ({html.escape(windows)} per window, the first a "
            "BOS/EOS prefix). KL(baseline || method) is exact over the full vocabulary, in nats per scored "
            "token; its interval is a 95% t-interval over windows; p99 and max are over all scored tokens; "
            "perplexity is exp(total NLL / tokens). The baseline against itself reads KL 0 and agreement 1. "
            "Engines: " + html.escape("; ".join(sorted(set(fid["weight_format"].dropna().astype(str))))) + ".")


def _accuracy_wide(acc: pd.DataFrame, order: list[str], level: str) -> pd.DataFrame:
    """One row per group, one column per series: "accuracy [95% CI] n=…", for reading side by side.

    Groups keep the stats table's order (the original MMLU order); the CSVs keep the long format.
    """
    if acc.empty:
        return acc
    cell = acc.assign(cell=[f"{a:.3f} [{lo:.3f}, {hi:.3f}] n={int(n)}" for a, lo, hi, n in
                            zip(acc["accuracy"], acc["ci_low"], acc["ci_high"], acc["n"])])
    groups = list(dict.fromkeys(acc["group"]))
    series = [s for s in order if s in set(acc["series"])] + sorted(set(acc["series"]) - set(order))
    wide = cell.pivot(index="group", columns="series", values="cell").reindex(index=groups, columns=series)
    wide.columns.name = None
    return wide.reset_index().rename(columns={"group": level})


# ---------------------------------------------------------------------------------------------- html
def _table_html(df: pd.DataFrame, empty: str = "no data yet", max_rows: int | None = None) -> str:
    if df is None or df.empty:
        return f'<p class="empty">{html.escape(empty)}</p>'
    shown = df if max_rows is None else df.head(max_rows)
    text = shown.to_html(index=False, border=0, classes="tbl", na_rep="—",
                         float_format=lambda x: f"{x:.4g}")
    if max_rows is not None and len(df) > max_rows:
        text += f'<p class="note">First {max_rows} of {len(df)} rows; all in the CSV.</p>'
    return text


def _figure_html(fig: figs.Figure | None, caption: str) -> str:
    if fig is None:
        return ""
    data = base64.b64encode(fig.png.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{html.escape(caption)} (<a href="figures/{fig.png.name}">PNG</a>, '
            f'<a href="figures/{fig.svg.name}">SVG</a>)</figcaption></figure>')


def _notes_html(notes: list[str]) -> str:
    return "".join(f'<p class="missing">{html.escape(n)}</p>' for n in notes)


def _render(context: dict[str, str], stages: tuple[str, ...]) -> str:
    template = resources.files("orchestrator").joinpath("report_template.html").read_text("utf-8")
    return Template(_asked_sections(template, stages)).substitute(context)


#: A section of the template that shows data of some stages: ``<section id="…" data-stages="evaluate profile">``.
_STAGED_SECTION = re.compile(r'<section id="(?P<id>[\w-]+)" data-stages="(?P<stages>[\w ]+)">\s*'
                             r'(?P<title><h2>.*?</h2>)(?P<body>.*?)</section>', re.S)


def _asked_sections(template: str, stages: tuple[str, ...]) -> str:
    """The template with each section whose ``data-stages`` were not all asked for cut to its title and
    "not part of this sweep", so no empty table or figure reads as data still to come."""
    said = html.escape(", ".join(stages)).replace("$", "$$")

    def keep_or_cut(m: re.Match) -> str:
        if set(m["stages"].split()) <= set(stages):
            return f'<section id="{m["id"]}">\n{m["title"]}{m["body"]}</section>'
        return (f'<section id="{m["id"]}">\n{m["title"]}\n<p class="empty">not part of this sweep '
                f'(sweep.stages: {said}).</p>\n</section>')

    return _STAGED_SECTION.sub(keep_or_cut, template)

