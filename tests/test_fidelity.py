"""The fidelity stage: KL divergence, top-1 agreement and perplexity of each method against the baseline.

Peers: the KL against ``torch.nn.functional.kl_div``, the perplexity against lm-eval's
``loglikelihood_rolling``; end to end through real Ray cells, the baseline against itself, and a damaged
(2-bit) method against an 8-bit one.
"""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tasks.backends.torch.hf_engine import HFEngine
from tasks.calibration import heldout_texts
from tasks.fidelity import prepare_text, sequence_row, token_kl, token_windows
from tasks.fidelity_stats import answer_flips, summarize
from tasks.models import prepare_model
from tests.sweep_helpers import TINY, cli_in_process, compose_config

TINY_MODEL = {"source": "random", "dtype": "float32",
              "random": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                         "seed": 0}}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    prepare_model(TINY_MODEL, out)
    return out


def test_kl_equals_torch_kl_div_on_a_tiny_model(tiny_checkpoint: Path) -> None:
    """Our exact KL per position equals torch's kl_div(log q, log p) on two different models' logits."""
    base = HFEngine(tiny_checkpoint, "cpu", "float32")
    other = HFEngine(tiny_checkpoint, "cpu", "float32")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.004 * torch.randn_like(p))
    text = prepare_text(base.tokenizer, "pydoc_topics_heldout", seq_len=48, num_sequences=3)
    for window in text.windows:
        lp, lq = base.prompt_logits([window])[0], other.prompt_logits([window])[0]
        ours = token_kl(lp, lq)
        theirs = F.kl_div(F.log_softmax(lq.double(), -1), F.log_softmax(lp.double(), -1), log_target=True,
                          reduction="none").sum(-1)
        assert ours.shape == (48,) and (ours > 0).all()
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
        row = sequence_row(window, lp, lq)
        assert row["tokens"] == 47 and len(row["kl_tokens"]) == 47
        assert row["kl_mean"] == pytest.approx(float(theirs[:-1].mean()), rel=1e-9)
        assert row["kl_max"] == pytest.approx(float(theirs[:-1].max()), rel=1e-9)
        agree = (lp[:-1].argmax(-1) == lq[:-1].argmax(-1)).double().mean()
        assert row["top1_agreement"] == pytest.approx(float(agree)) and 0 < row["top1_agreement"] < 1
        same = sequence_row(window, lp, lp.clone())
        assert same["kl_mean"] == 0.0 and same["kl_max"] == 0.0 and same["top1_agreement"] == 1.0


def test_perplexity_equals_lm_eval_loglikelihood_rolling(tiny_checkpoint: Path) -> None:
    """Peer check: our nll_sum of a window is lm-eval's rolling log-likelihood of the same text (1e-4 rel)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    engine = HFEngine(tiny_checkpoint, "cpu", "float32")
    text = heldout_texts()[3][:600]
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    # one window holding exactly the whole text: [prefix] + every token of it
    window = token_windows(engine.tokenizer, [text], seq_len=len(ids) + 1, num_sequences=1)[0]
    assert window[1:] == ids
    logits = engine.prompt_logits([window])[0]
    ours = sequence_row(window, logits, logits)["nll_sum"]
    # add_bos_token=False: the text's own tokens only (by default this tokenizer prepends <s>, which lm-eval
    # would then score too, conditioned on its <s> prefix: one token more than the text has)
    lm = HFLM(pretrained=engine.model, tokenizer=engine.tokenizer, batch_size=1, max_length=4096,
              add_bos_token=False)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    theirs = -lm.loglikelihood_rolling([request], disable_tqdm=True)[0]
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert math.exp(ours / len(ids)) > 1.0


def test_windows_are_seeded_disjoint_and_prefixed(tiny_checkpoint: Path) -> None:
    engine = HFEngine(tiny_checkpoint, "cpu", "float32")
    a = prepare_text(engine.tokenizer, "pydoc_topics_heldout", 32, 5, seed=0)
    b = prepare_text(engine.tokenizer, "pydoc_topics_heldout", 32, 5, seed=0)
    c = prepare_text(engine.tokenizer, "pydoc_topics_heldout", 32, 5, seed=1)
    assert a.windows == b.windows and a.fingerprint == b.fingerprint != c.fingerprint
    assert all(len(w) == 32 and w[0] == engine.tokenizer.bos_token_id for w in a.windows)
    bodies = {tuple(w[1:]) for w in a.windows}
    assert len(bodies) == 5
    with pytest.raises(ValueError, match="calibration split"):
        prepare_text(engine.tokenizer, "pydoc_topics", 32, 5)
    with pytest.raises(ValueError, match="too many"):
        prepare_text(engine.tokenizer, "pydoc_topics_heldout", 2048, 10_000)


def test_summary_aggregates_from_rows() -> None:
    rows = pd.DataFrame([
        {"method": m, "baseline": "fp16", "tokens": 4, "nll_sum": nll, "kl_mean": kl, "kl_p99": kl,
         "kl_max": kl, "top1_agreement": agree, "kl_tokens": [kl] * 4}
        for m, nll, kl, agree in [("fp16", 4.0, 0.0, 1.0), ("fp16", 8.0, 0.0, 1.0),
                                  ("rtn", 6.0, 0.1, 0.75), ("rtn", 10.0, 0.3, 0.5)]])
    s = summarize(rows).set_index("method")
    assert s.loc["fp16", "perplexity"] == pytest.approx(math.exp(12 / 8))
    assert s.loc["rtn", "perplexity"] == pytest.approx(math.exp(16 / 8))
    assert s.loc["rtn", "ppl_ratio"] == pytest.approx(math.exp(2.0 - 1.5))
    assert s.loc["rtn", "kl_mean"] == pytest.approx(0.2) and s.loc["rtn", "top1_agreement"] == pytest.approx(0.625)
    half = 12.706204736 * 0.1414213562 / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(n); the lower end clipped at 0
    assert (s.loc["rtn", "kl_ci_low"], s.loc["rtn", "kl_ci_high"]) == pytest.approx((0.0, 0.2 + half))
    assert s.loc["rtn", "kl_max"] == pytest.approx(0.3) and s.loc["fp16", "kl_mean"] == 0.0


def test_answer_flips_pair_questions_with_the_baseline() -> None:
    def row(method, q, pred, gold="A"):
        return {"method": method, "subject": "anatomy", "question_index": q, "predicted": pred, "gold": gold,
                "correct": pred == gold}
    preds = pd.DataFrame([row("fp16", 0, "A"), row("fp16", 1, "B"), row("fp16", 2, "C"), row("fp16", 3, "A"),
                          row("awq", 0, "B"), row("awq", 1, "A"), row("awq", 2, "D"), row("awq", 3, "A")])
    flips = answer_flips(preds, "fp16").set_index("method")
    assert flips.loc["awq"].to_dict() == {"baseline": "fp16", "questions": 4, "right_to_wrong": 1,
                                          "wrong_to_right": 1, "answer_changed": 3}


def _cli(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The CLI's ``main()`` in this process: each case ends before Ray starts."""
    return cli_in_process([*TINY, f"store.uri={tmp_path}/store", f"hydra.run.dir={tmp_path}/hydra", *overrides],
                          tmp_path)


@pytest.mark.parametrize("overrides, field", [
    (["sweep.baseline=awq", "sweep.methods=[fp16,rtn]"], "sweep.baseline"),
    (["fidelity.seq_len=5000"], "fidelity.seq_len"),
    (["fidelity.text=/nonexistent/text.txt"], "fidelity.text"),
])
def test_bad_fidelity_config_exits_2_naming_the_field(tmp_path: Path, overrides: list[str], field: str) -> None:
    done = _cli("sweep.stages=[fidelity]", *overrides, tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"quantsweep: invalid configuration: {field}:" in done.stderr
    assert not (tmp_path / "store" / "runs").exists()  # nothing ran


@pytest.mark.slow
def test_fidelity_cells_through_ray(tmp_path: Path) -> None:
    """Real cells on a local Ray: the baseline against itself reads exactly 0 / 100%, and 2-bit RTN
    damages the model more than 8-bit RTN, which damages it more than nothing."""
    from orchestrator.plan import plan_sweep
    from orchestrator.schedule import run_sweep
    from orchestrator.store import ResultStore
    from orchestrator.validate import validate

    import ray

    overrides = TINY + [f"store.uri={tmp_path}", "sweep.stages=[fidelity]", "backend.device=cpu",
                        "+method@methods.rtn2=rtn", "methods.rtn2.name=rtn2", "methods.rtn2.bits=2",
                        "+method@methods.rtn8=rtn", "methods.rtn8.name=rtn8", "methods.rtn8.bits=8",
                        "methods.rtn2.group_size=32", "methods.rtn8.group_size=32",
                        "sweep.methods=[fp16,rtn8,rtn2]", "fidelity.seq_len=64", "fidelity.num_sequences=6"]
    try:
        cfg = validate(compose_config(overrides))
        plan = plan_sweep(cfg)
        outcome = run_sweep(plan, cfg)
    finally:
        ray.shutdown()
    assert outcome.all_ok, {k: r["error"] for k, r in outcome.results.items() if r["status"] != "ok"}
    cells = plan.by_kind("fidelity")
    builds = {n.labels["method"]: n.key for n in plan.by_kind("build")}
    assert {c.upstream for c in cells} == {(builds[m], builds["fp16"]) for m in ("fp16", "rtn8", "rtn2")}
    rows = ResultStore(str(tmp_path)).read("fidelity").to_pandas()
    assert len(rows) == 3 * 6 and set(rows["baseline"]) == {"fp16"}
    assert (rows["tokens"] == 63).all() and rows["text_fingerprint"].nunique() == 1
    assert rows["weight_format"].str.contains("de-quantized").sum() == 12  # rtn8, rtn2 on the CPU reference
    assert rows["engine"].str.endswith("logits: one forward pass over the whole window").all()
    by = rows.groupby("method")
    base = rows[rows["method"] == "fp16"]
    assert (base["kl_mean"] == 0.0).all() and (base["kl_max"] == 0.0).all() and (base["top1_agreement"] == 1.0).all()
    assert by["kl_mean"].mean()["rtn2"] > 10 * by["kl_mean"].mean()["rtn8"] > 0
    assert by["top1_agreement"].mean()["rtn2"] < by["top1_agreement"].mean()["rtn8"] <= 1.0
    summary = summarize(rows).set_index("method")
    # (random weights: 2-bit noise may move perplexity either way; the KL above is what must grow)
    assert summary.loc["fp16", "ppl_ratio"] == 1.0 and summary.loc["rtn2", "ppl_ratio"] != 1.0


def test_cli_summary_prints_fidelity_and_answer_flips_from_the_stored_rows(
        tmp_path: Path, mmlu_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    from types import SimpleNamespace

    from orchestrator.plan import plan_sweep
    from orchestrator.progress import print_summary
    from orchestrator.store import ResultStore
    from orchestrator.validate import validate

    cfg = validate(compose_config(TINY + [f"store.uri={tmp_path}", f"eval.mmlu_dir={mmlu_dir}",
                                          "sweep.methods=[fp16,rtn]", "sweep.subjects=[anatomy]",
                                          "sweep.num_shards=1", "sweep.stages=[evaluate,fidelity]"]))
    plan = plan_sweep(cfg)
    store = ResultStore(str(tmp_path))
    results = {}
    for node in plan.by_kind("fidelity"):
        method = node.labels["method"]
        kl = 0.0 if method == "fp16" else 0.02
        store.write("fidelity", node.key, [
            {"schema_version": 1, "node_key": node.key, "method": method, "baseline": "fp16", "sequence_index": i,
             "tokens": 10, "nll_sum": 10 * (2.0 if method == "fp16" else 2.1), "kl_mean": kl * (1 + i),
             "kl_p99": kl, "kl_max": kl, "top1_agreement": 1.0 if method == "fp16" else 0.9,
             "kl_tokens": [kl * (1 + i)] * 10, "text_source": "pydoc_topics_heldout"} for i in range(3)])
        results[node.key] = {"status": "ok", "result_json": "{}"}
    for node in plan.by_kind("evaluate"):
        method = node.labels["method"]
        correct = [True, True, False, False] if method == "fp16" else [True, False, True, False]
        store.write("mmlu_predictions", node.key, [
            {"schema_version": 1, "node_key": node.key, "method": method, "subject": "anatomy",
             "question_index": q, "predicted": "A" if c else "B", "gold": "A", "correct": c}
            for q, c in enumerate(correct)])
        results[node.key] = {"status": "ok", "result_json": json.dumps({"questions": 4, "correct": 2})}
    outcome = SimpleNamespace(plan=plan, results=results, ran=list(results), reused=[], wall_s=1.0, all_ok=True)
    monkeypatch.setenv("COLUMNS", "220")  # one line per table row
    print_summary(outcome, cfg)
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    assert "Fidelity against fp16" in out
    # perplexity, ratio, mean KL [95% CI], p99, agreement; rtn's KL per window 0.02, 0.04, 0.06
    rtn_fidelity = next(r for r in rows if r[0] == "rtn" and r[1] == "3 x 10")
    assert rtn_fidelity[2:4] == [f"{math.exp(2.1):.3f}", f"{math.exp(0.1):.4f}"]
    half = 4.302652730 * 0.02 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), the lower end clipped at 0
    assert rtn_fidelity[4].startswith("0.04000 [0.00000,") and f"{0.04 + half:.5f}]" in out
    assert rtn_fidelity[-1] == "90.00%"
    fp16_fidelity = next(r for r in rows if r[0] == "fp16" and r[1] == "3 x 10")
    assert fp16_fidelity[4].startswith("0.00000 [0.00000,") and fp16_fidelity[-1] == "100.00%"
    rtn_accuracy = next(r for r in rows if r[0] == "rtn" and r[1] == "4")
    assert rtn_accuracy[-1] == "1 / 1"  # q1 right->wrong, q2 wrong->right


def test_an_engine_without_logits_gives_a_skipped_row_saying_why(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A fidelity cell whose engine cannot return logits (TensorRT-LLM built without context logits) is a
    ``skipped`` row with the engine's reason, not a failure, and writes no fidelity rows."""
    from orchestrator import execute
    from orchestrator.plan import plan_sweep
    from orchestrator.store import ResultStore
    from orchestrator.validate import validate
    from tasks.backends.base import Unsupported

    cfg = validate(compose_config(TINY + [f"store.uri={tmp_path}", "sweep.stages=[fidelity]",
                                          "sweep.methods=[fp16,rtn]"]))
    cell = next(n for n in plan_sweep(cfg).by_kind("fidelity") if n.labels["method"] == "rtn")

    def no_logits(*_args):
        raise Unsupported("this TensorRT-LLM engine was built without context logits")

    monkeypatch.setitem(execute.RUNNERS, "fidelity", no_logits)
    upstream = [{"status": "ok", "kind": "build", "node_key": k, "artifact_uri": None} for k in cell.upstream]
    result = execute.execute_node(cell, upstream, cfg)
    assert result["status"] == "skipped" and "without context logits" in result["error"]
    store = ResultStore(str(tmp_path))
    assert store.read("runs").to_pylist()[0]["status"] == "skipped" and store.read("fidelity").num_rows == 0


def test_paired_kl_separates_methods_whose_own_intervals_overlap() -> None:
    """Hard windows are hard for both methods: their KL intervals overlap, the paired difference does not."""
    from tasks.fidelity_stats import paired_kl

    hardness = [0.05, 0.30, 0.10, 0.50, 0.20, 0.40]
    extra = [0.020, 0.022, 0.019, 0.021, 0.020, 0.018]  # gptq: a steady 0.02 more on every window
    rows = pd.DataFrame([{"method": m, "baseline": "fp16", "text_fingerprint": "t", "sequence_index": i,
                          "tokens": 10, "nll_sum": 1.0, "kl_mean": h + (e if m == "gptq" else 0.0), "kl_p99": h,
                          "kl_max": h, "top1_agreement": 0.9, "kl_tokens": [h] * 10}
                         for m in ("awq", "gptq") for i, (h, e) in enumerate(zip(hardness, extra))])
    own = summarize(rows).set_index("method")
    assert own.loc["gptq", "kl_ci_low"] < own.loc["awq", "kl_ci_high"]  # overlapping on their own
    pair = paired_kl(rows).iloc[0]
    diffs = [-e for e in extra]
    assert (pair.series_a, pair.series_b, pair.windows) == ("awq", "gptq", 6)
    assert pair["diff"] == pytest.approx(sum(diffs) / 6) and pair.ci_high < 0 and pair.p_value < 1e-4
