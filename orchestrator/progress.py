"""What the user watches: a live per-kind table while the sweep runs, a one-screen summary at the end."""
from __future__ import annotations

import contextlib
import json
import shlex
from collections import Counter
from typing import Any, Iterator

from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator.describe import describe_setup
from orchestrator.plan import KINDS, SweepPlan

console = Console(stderr=True)


class SweepProgress:
    """Counts per node kind: reused from the store, done, running, queued, failed/oom/skipped."""

    def __init__(self, plan: SweepPlan, reused: dict[str, dict[str, Any]]):
        self.plan = plan
        self.status: dict[str, str] = {k: f"reused-{r['status']}" for k, r in reused.items()}
        self.running: set[str] = set()
        self._live: Live | None = None

    def finished(self, key: str, status: str) -> None:
        self.status[key] = status
        self.running.discard(key)
        node = self.plan.nodes[key]
        if not console.is_terminal:
            console.print(f"[{self._done()}/{len(self.plan.nodes)}] {node.describe()}: {status}")
        self._refresh()

    def set_running(self, keys: set[str]) -> None:
        self.running = {k for k in keys if k not in self.status}
        self._refresh()

    def _done(self) -> int:
        return len(self.status)

    def table(self) -> Table:
        table = Table(title=f"quantsweep: {self._done()}/{len(self.plan.nodes)} nodes finished")
        for column in ("kind", "total", "reused", "done", "running", "queued", "failed", "oom", "skipped"):
            table.add_column(column, justify="right" if column != "kind" else "left")
        for kind in KINDS:
            keys = [n.key for n in self.plan.by_kind(kind)]
            if not keys:
                continue
            counts = Counter(self.status.get(k, "running" if k in self.running else "queued") for k in keys)
            reused = sum(v for s, v in counts.items() if s.startswith("reused"))
            table.add_row(kind, str(len(keys)), str(reused), str(counts["ok"]), str(counts["running"]),
                          str(counts["queued"]), str(counts["failed"]), str(counts["oom"]), str(counts["skipped"]))
        return table

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.table())

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        if not console.is_terminal:
            yield
            return
        with Live(self.table(), console=console, refresh_per_second=4) as live:
            self._live = live
            try:
                yield
            finally:
                self._live = None


def _stored_rows(plan: SweepPlan, cfg: dict[str, Any], kind: str, table: str) -> Any:
    """This sweep's rows of one store table (its ``kind`` nodes only), as a DataFrame."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from orchestrator.store import ResultStore

    keys = pa.array([n.key for n in plan.by_kind(kind)], pa.string())  # typed: an empty list is not "null"
    return ResultStore.from_config(cfg["store"]).read(table, filter=ds.field("node_key").isin(keys)).to_pandas()


def answer_flips_by_method(plan: SweepPlan, cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """method -> (right->wrong, wrong->right) against the baseline, from the stored MMLU predictions."""
    from tasks.fidelity_stats import answer_flips

    flips = answer_flips(_stored_rows(plan, cfg, "evaluate", "mmlu_predictions"), cfg["sweep"]["baseline"])
    return {r.method: (r.right_to_wrong, r.wrong_to_right) for r in flips.itertuples()}


def fidelity_table(plan: SweepPlan, cfg: dict[str, Any]) -> Table | None:
    """Perplexity, KL (95% interval) and top-1 agreement against the baseline, from this sweep's stored
    fidelity rows (:mod:`tasks.fidelity_stats`, as the report computes them); None when none ran."""
    if not plan.by_kind("fidelity"):
        return None
    from tasks.fidelity_stats import summarize

    rows = _stored_rows(plan, cfg, "fidelity", "fidelity")
    summary = summarize(rows)
    baseline = cfg["sweep"]["baseline"]
    text = rows["text_source"].iloc[0] if len(rows) else cfg["fidelity"]["text"]
    table = Table(title=f"Fidelity against {baseline} ({text}; KL in nats per token, exact over the vocabulary)")
    for column in ("method", "windows x tokens", "perplexity", "ppl / baseline", "mean KL [95% CI]", "p99 KL",
                   "top-1 agreement"):
        table.add_column(column)
    order = {m: i for i, m in enumerate(cfg["sweep"]["methods"])}
    for r in sorted(summary.itertuples(), key=lambda r: order.get(r.method, len(order))):
        table.add_row(r.method, f"{r.sequences} x {r.tokens // max(r.sequences, 1)}", f"{r.perplexity:.3f}",
                      f"{r.ppl_ratio:.4f}", f"{r.kl_mean:.5f} [{r.kl_ci_low:.5f}, {r.kl_ci_high:.5f}]",
                      f"{r.kl_p99:.4f}", f"{r.top1_agreement:.2%}")
    return table


def print_summary(outcome: Any, cfg: dict[str, Any]) -> None:
    """One screen: accuracy per method, throughput per method x batch, and every cell that did not succeed."""
    plan = outcome.plan
    results = outcome.results
    out = Console()
    # built from the resolved config, not the experiment preset's text; one line, so it can be grepped
    out.print(describe_setup(cfg), style="bold", markup=False, highlight=False, soft_wrap=True)
    out.print(f"store: {cfg['store']['uri']}  ({len(outcome.ran)} nodes run, {len(outcome.reused)} reused, "
              f"{outcome.wall_s:.1f} s)", markup=False, highlight=False)
    accuracy = Table(title="MMLU accuracy (questions in this sweep)")
    baseline = cfg["sweep"]["baseline"]
    flips = answer_flips_by_method(plan, cfg) if "evaluate" in cfg["sweep"]["stages"] else {}
    for column in ("method", "questions", "correct", "accuracy", f"flips vs {baseline}: right->wrong / wrong->right"):
        accuracy.add_column(column)
    speed = Table(title="Throughput (output tokens/s, prefill included) and peak memory")
    for column in ("method", "batch", "output tok/s", "decode tok/s", "% of roofline", "TTFT s", "peak memory MiB"):
        speed.add_column(column)
    for method in cfg["sweep"]["methods"]:
        totals = Counter()
        for node in plan.by_kind("evaluate"):
            r = results.get(node.key)
            if node.labels["method"] == method and r and r["status"].endswith("ok"):
                summary = json.loads(r.get("result_json") or "{}")
                totals["questions"] += summary.get("questions", 0)
                totals["correct"] += summary.get("correct", 0)
        if totals["questions"]:
            flip = flips.get(method)
            accuracy.add_row(method, str(totals["questions"]), str(totals["correct"]),
                             f"{totals['correct'] / totals['questions']:.3f}",
                             f"{flip[0]} / {flip[1]}" if flip else "-")
        for node in plan.by_kind("profile"):
            r = results.get(node.key)
            if node.labels["method"] == method and r and r["status"].endswith("ok"):
                s = json.loads(r.get("result_json") or "{}")
                peak = s.get("peak_memory_bytes")
                speed.add_row(method, str(node.labels["batch_size"]), f"{s['output_tokens_per_s']:.1f}",
                              f"{s['decode_tokens_per_s'] or 0:.1f}",
                              f"{s['roofline_pct']:.1f}" if s.get("roofline_pct") is not None else "-",
                              f"{s['ttft_s']:.3f}",
                              f"{peak / 2**20:.0f}" if peak else "-")
    stages = cfg["sweep"]["stages"]
    if "evaluate" in stages:  # only the tables of stages that ran
        out.print(accuracy)
    fidelity = fidelity_table(plan, cfg)
    if fidelity is not None:
        out.print(fidelity)
    if "profile" in stages:
        out.print(speed)
    bad = [(plan.nodes[k], r) for k, r in results.items() if not r["status"].endswith("ok")]
    if bad:
        failures = Table(title="Cells that did not succeed (rows with their errors are in the store)")
        for column in ("node", "status", "error"):
            failures.add_column(column)
        for node, r in bad:
            failures.add_row(node.describe(), r["status"], (r.get("error") or "").splitlines()[0][:120])
        out.print(failures)
    # quoted for the shell (an S3 URI may carry ?a=b&c=d), printed unwrapped so it can be copied whole
    out.print(f"Report: quantsweep-report {shlex.quote(cfg['store']['uri'])} --out outputs/report",
              markup=False, highlight=False, soft_wrap=True)
