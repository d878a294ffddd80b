"""What the user watches: a live per-kind table while the sweep runs, a one-screen summary at the end."""
from __future__ import annotations

import contextlib
import json
from collections import Counter
from typing import Any, Iterator

from rich.console import Console
from rich.live import Live
from rich.table import Table

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


def print_summary(outcome: Any, cfg: dict[str, Any]) -> None:
    """One screen: accuracy per method, throughput per method x batch, and every cell that did not succeed."""
    plan = outcome.plan
    results = outcome.results
    out = Console()
    out.print(f"[bold]{cfg.get('experiment') or cfg['sweep']['name']}[/bold]  store: {cfg['store']['uri']}  "
              f"({len(outcome.ran)} nodes run, {len(outcome.reused)} reused, {outcome.wall_s:.1f} s)")
    accuracy = Table(title="MMLU accuracy (questions in this sweep)")
    for column in ("method", "questions", "correct", "accuracy"):
        accuracy.add_column(column)
    speed = Table(title="Throughput (output tokens/s, prefill included) and peak memory")
    for column in ("method", "batch", "output tok/s", "decode tok/s", "TTFT s", "peak memory MiB"):
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
            accuracy.add_row(method, str(totals["questions"]), str(totals["correct"]),
                             f"{totals['correct'] / totals['questions']:.3f}")
        for node in plan.by_kind("profile"):
            r = results.get(node.key)
            if node.labels["method"] == method and r and r["status"].endswith("ok"):
                s = json.loads(r.get("result_json") or "{}")
                peak = s.get("peak_memory_bytes")
                speed.add_row(method, str(node.labels["batch_size"]), f"{s['output_tokens_per_s']:.1f}",
                              f"{s['decode_tokens_per_s'] or 0:.1f}", f"{s['ttft_s']:.3f}",
                              f"{peak / 2**20:.0f}" if peak else "-")
    out.print(accuracy)
    out.print(speed)
    bad = [(plan.nodes[k], r) for k, r in results.items() if not r["status"].endswith("ok")]
    if bad:
        failures = Table(title="Cells that did not succeed (rows with their errors are in the store)")
        for column in ("node", "status", "error"):
            failures.add_column(column)
        for node, r in bad:
            failures.add_row(node.describe(), r["status"], (r.get("error") or "").splitlines()[0][:120])
        out.print(failures)
    out.print(f"Report: quantsweep-report {cfg['store']['uri']} --out outputs/report")
