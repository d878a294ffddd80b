"""``quantsweep-report``: the study's figures, tables and a self-contained HTML page, from the store.

Every number on the page is computed from the store's rows (accuracy through :mod:`tasks.mmlu.stats`), and
every statement about the setup (hardware, engine, versions, dtype, shots, scoring, how numbers were
measured) is read from the rows too, so the report of a sweep can't drift from the sweep.  The store may be
partial (a sweep still running, resumed, or with failed cells): each section then says what is missing
instead of failing, and an empty store renders "no data yet".

The work flows one way, one module per step: :mod:`~orchestrator.report_load` (store -> rows, deduped and
labelled) -> :mod:`~orchestrator.report_tables` (rows -> every table) -> :mod:`~orchestrator.report_render`
(tables -> figures and HTML, with :mod:`~orchestrator.report_provenance`'s setup table and
:mod:`~orchestrator.report_figures`).  This module writes the files and is the command line.

Outputs in ``out_dir``: ``report.html`` (figures embedded as base64 PNG), one PNG and one SVG per figure
under ``figures/``, and one CSV per table under ``tables/``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from orchestrator.report_render import draw_figures, render_page
from orchestrator.report_tables import compute

log = logging.getLogger("quantsweep.report")


def build_report(store_uri: str, out_dir: Path, sweep_name: str | None = None) -> Path:
    """Write the report of the store at ``store_uri`` into ``out_dir``; returns the HTML file's path."""
    out_dir = Path(out_dir)
    fig_dir, tab_dir = out_dir / "figures", out_dir / "tables"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tab_dir.mkdir(parents=True, exist_ok=True)

    res = compute(store_uri, sweep_name)
    for name, df in res.tables().items():
        df.to_csv(tab_dir / f"{name}.csv", index=False)
    made = draw_figures(res, fig_dir)
    html_path = out_dir / "report.html"
    html_path.write_text(render_page(res, store_uri, made), encoding="utf-8")
    log.info("report of %s written to %s", store_uri, html_path)
    return html_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantsweep-report", description=__doc__.splitlines()[0])
    parser.add_argument("store_uri", help="the store: a local folder or a pyarrow filesystem URI (s3://...)")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.html, figures/ and tables/")
    parser.add_argument("--sweep", default=None, help="only this sweep_name (default: every sweep in the store)")
    args = parser.parse_args(argv)
    if "://" not in args.store_uri and not Path(args.store_uri).is_dir():
        print(f"quantsweep-report: no store at {args.store_uri}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = build_report(args.store_uri, args.out, args.sweep)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
