"""The evaluate task: request checks, and MMLU end to end through lm-eval offline on a tiny model."""
from __future__ import annotations

import time

import pytest

from tasks.evaluate import ROW_KEYS, first_letter, metric_key, run_mmlu, validate_request
from tasks.mmlu.categories import category, subcategory
from tasks.mmlu.data import read_subject

SUBJECTS = ["abstract_algebra", "anatomy"]


def test_validate_request_names_the_settings():
    assert validate_request(SUBJECTS, "generate") == SUBJECTS
    with pytest.raises(ValueError, match=r"sweep\.subjects.*astrology.*allowed: abstract_algebra, anatomy"):
        validate_request(["anatomy", "astrology"], "loglikelihood")
    with pytest.raises(ValueError, match=r"eval\.scoring='logprob'.*allowed: loglikelihood, generate"):
        validate_request(SUBJECTS, "logprob")
    with pytest.raises(ValueError, match="empty"):
        validate_request([], "generate")
    with pytest.raises(ValueError, match="twice"):
        validate_request(["anatomy", "anatomy"], "generate")


def test_hub_mode_offline_fails_before_any_work(tmp_path, monkeypatch):
    from tasks.mmlu.data import MMLUDataError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(MMLUDataError, match=r"eval\.mmlu_dir=/path/to/mmlu"):
        run_mmlu(None, SUBJECTS, mmlu_dir=None, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"eval\.scoring"):  # checked before the data
        run_mmlu(None, SUBJECTS, mmlu_dir=None, cache_dir=tmp_path, scoring="mc")
    assert not any(tmp_path.iterdir())


def test_first_letter_is_the_trtllm_rule():
    """TensorRT-LLM's examples/mmlu.py: correct iff pred.strip().startswith(label)."""
    for text, letter in [(" B", "B"), ("C.", "C"), ("\n D", "D"), ("A", "A"), (" The", ""), (" b", ""),
                         ("", ""), ("  ", ""), (" E", ""), ("(A", "")]:
        assert first_letter(text) == letter, text
        for gold in "ABCD":
            assert (first_letter(text) == gold) == text.strip().startswith(gold)


def _tiny_lm(mmlu_dir):
    """A random 2-layer Llama + a byte-level BPE tokenizer trained here on MMLU dev prompts (no download).

    The lm_head rows of the answer-letter tokens are scaled up so that greedy generation mostly emits a
    letter and the predictions vary between questions; the model still knows nothing about MMLU.
    """
    import torch
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [f"{r['question']}\n" + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", r["choices"]))
              + f"Answer: {r['answer']}\n\n" for s in SUBJECTS for r in read_subject(mmlu_dir, s, "dev")]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
        initializer_range=0.3)).eval()  # large random weights: the answer depends on the question
    letter_ids = {i for l in "ABCD" for i in tok(" " + l, add_special_tokens=False)["input_ids"][-1:]}
    with torch.no_grad():
        model.lm_head.weight[sorted(letter_ids)] *= 30.0
    return HFLM(pretrained=model, tokenizer=tok, batch_size=16, device="cpu", max_length=2048)


@pytest.fixture(scope="module")
def tiny_lm(mmlu_dir):
    return _tiny_lm(mmlu_dir)


def _check_rows(rows, res, mmlu_dir, scoring, limit):
    by_subject = {s: [r for r in rows if r["subject"] == s] for s in SUBJECTS}
    assert sum(map(len, by_subject.values())) == len(rows)
    for s, srows in by_subject.items():
        csv_rows = read_subject(mmlu_dir, s, "test")
        expected_n = len(csv_rows) if limit is None else min(limit, len(csv_rows))
        assert len(srows) == expected_n
        assert [r["question_index"] for r in srows] == list(range(expected_n))
        assert [r["gold"] for r in srows] == [c["answer"] for c in csv_rows[:expected_n]]
        for r in srows:
            assert tuple(r) == ROW_KEYS
            assert (r["subcategory"], r["category"]) == (subcategory(s), category(s))
            assert r["correct"] == (r["predicted"] == r["gold"])
            assert r["scoring"] == scoring and r["num_fewshot"] == 5
            if scoring == "loglikelihood":
                scores = r["choice_scores"]
                assert len(scores) == 4 and r["generation"] is None
                assert r["predicted"] == "ABCD"[max(range(4), key=scores.__getitem__)]
            else:
                assert r["choice_scores"] is None and isinstance(r["generation"], str)
                assert r["predicted"] == first_letter(r["generation"])
        # our accuracy == lm-eval's own per-subject number
        ours = sum(r["correct"] for r in srows) / len(srows)
        assert ours == pytest.approx(res["results"][f"mmlu_{s}"][metric_key(scoring)], abs=1e-12)
        # and lm-eval's own filtered answer (generate) is our prediction
        if scoring == "generate":
            samples = sorted(res["samples"][f"mmlu_{s}"], key=lambda x: x["doc_id"])
            assert [x["filtered_resps"][0] for x in samples] == [r["predicted"] for r in srows]
    return by_subject


@pytest.mark.slow
@pytest.mark.parametrize("scoring", ["loglikelihood", "generate"])
def test_two_subjects_end_to_end_offline(tiny_lm, mmlu_dir, tmp_path, scoring, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    rows, res = run_mmlu(tiny_lm, SUBJECTS, mmlu_dir=mmlu_dir, cache_dir=tmp_path, num_fewshot=5,
                         scoring=scoring, limit_per_subject=8)
    print(f"{scoring}: 2 subjects x 8 questions, 5-shot: {time.perf_counter() - t0:.2f} s")
    _check_rows(rows, res, mmlu_dir, scoring, limit=8)
    assert res["n-shot"][f"mmlu_{SUBJECTS[0]}"] == 5
    # lm-eval read the converted local copy, not the hub
    assert res["configs"]["mmlu_anatomy"]["dataset_path"].startswith(str(tmp_path.resolve()))
    # the prompt is lm-eval's stock MMLU prompt with the 5 dev questions answered
    prompt = res["samples"]["mmlu_anatomy"][0]["arguments"][0][0]
    dev = read_subject(mmlu_dir, "anatomy", "dev")
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert prompt.count("\nAnswer:") == 6 and f"Answer: {dev[4]['answer']}\n\n" in prompt
    assert prompt.endswith(read_subject(mmlu_dir, "anatomy", "test")[0]["choices"][3] + "\nAnswer:")
    predicted = {r["predicted"] for r in rows}
    assert len(predicted - {""}) >= 2, f"degenerate predictions {predicted}: the check above would be weak"
    if scoring == "generate":
        gen = res["configs"]["mmlu_anatomy"]["generation_kwargs"]
        assert gen["max_gen_toks"] == 2 and gen["do_sample"] is False


@pytest.mark.slow
def test_whole_subject_without_limit(tiny_lm, mmlu_dir, tmp_path):
    rows, res = run_mmlu(tiny_lm, ["abstract_algebra"], mmlu_dir=mmlu_dir, cache_dir=tmp_path,
                         scoring="loglikelihood")
    assert len(rows) == len(read_subject(mmlu_dir, "abstract_algebra", "test")) == 100
    assert sum(r["correct"] for r in rows) / 100 == pytest.approx(res["results"]["mmlu_abstract_algebra"]["acc,none"])
