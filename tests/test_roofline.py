"""The memory-bandwidth roofline of profile rows (issue 19: "% of roofline" in the product's own report).

The bytes a decode step must move are recomputed here from the models' configs, not from the code under
test, so a roofline that counted the embedding table, missed a tied head or ignored the int4 packing fails.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tasks.roofline import DecodeReads, copy_bandwidth, decode_bytes_per_step, decode_reads, roofline_columns
from tests.sweep_helpers import compose_config

LLAMA = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _hf_llama(tied: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=tied)).eval()


def _llama_param_count(tied: bool) -> int:
    """Parameters of ``LLAMA`` by hand: per layer q,k,v,o + gate,up,down + 2 norms; embedding, head, norm."""
    d, f, v, layers = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["vocab_size"], LLAMA["num_hidden_layers"]
    kv = d // LLAMA["num_attention_heads"] * LLAMA["num_key_value_heads"]
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * f + 2 * d
    return layers * per_layer + v * d + (0 if tied else v * d) + d


@pytest.mark.parametrize("tied", [False, True])
def test_decode_reads_count_every_weight_once_and_the_embedding_as_rows(tied: bool) -> None:
    model = _hf_llama(tied)
    reads = decode_reads(model, model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    table = LLAMA["vocab_size"] * LLAMA["hidden_size"] * 4
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary frequency tables
    # untied: the step gathers rows of the embedding table, never the table; tied: the head reads all of it
    assert reads.weight_bytes == _llama_param_count(tied) * 4 + buffers - (0 if tied else table)
    assert reads.embedding_row_bytes == LLAMA["hidden_size"] * 4


def test_int4_reads_the_packed_bytes_the_cuda_engine_holds() -> None:
    """The CUDA engine's int4 model (built here on CPU) reads a nibble per weight plus bf16 scales and zeros
    per group of 128: the roofline of int4 is computed on what int4 moves, not on bf16's bytes."""
    from tasks.backends.torch.cuda.loader import random_model
    from tasks.backends.torch.cuda.model import ModelArgs, num_linear_params

    args = ModelArgs(vocab_size=256, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=384,
                     head_dim=64)
    dense, quant = random_model(args, "bfloat16", "cpu"), random_model(args, "int4", "cpu", group_size=128)
    linear = num_linear_params(args)
    int4_linear_bytes = linear // 2 + 2 * (linear // 128) * 2  # packed nibbles + bf16 scale and zero per group
    assert dense.decode_reads().weight_bytes - quant.decode_reads().weight_bytes == 2 * linear - int4_linear_bytes
    assert dense.decode_reads().embedding_row_bytes == quant.decode_reads().embedding_row_bytes == 256 * 2


def test_decode_bytes_per_step_by_hand() -> None:
    reads = DecodeReads(weight_bytes=1000, embedding_row_bytes=8)
    # batch 2, 10 prompt tokens, 4 generated: average context 12 positions, + the one written each step
    assert decode_bytes_per_step(reads, kv_bytes_per_token=16, batch=2, input_len=10, output_len=4) == \
        1000 + 2 * 8 + 2 * 13 * 16


def test_copy_bandwidth_is_a_real_measurement_on_cpu() -> None:
    bandwidth = copy_bandwidth("cpu", nbytes=32 * 2**20, repeats=5)
    assert math.isfinite(bandwidth) and 1e8 < bandwidth < 1e13  # 0.1 GB/s .. 10 TB/s: a copy happened


def test_engine_without_reads_gets_null_roofline() -> None:
    columns = roofline_columns({"kv_bytes_per_token": 16}, 1e10, 1, 8, 4, 100.0)
    assert columns["copy_bandwidth_bytes_per_s"] == 1e10
    assert columns["roofline_pct"] is None and columns["decode_bytes_per_step"] is None


def test_profile_rows_carry_a_roofline_recomputable_from_the_config(tmp_path: Path) -> None:
    from orchestrator.schema import table_from_rows
    from tasks.backends.torch.hf_engine import HFEngine
    from tasks.models import prepare_model
    from tasks.profile import profile_engine

    model_cfg = OmegaConf.to_container(compose_config(["model=tiny_random"]).model)
    checkpoint = Path(prepare_model(model_cfg, tmp_path / "model")["checkpoint_dir"])
    engine = HFEngine(checkpoint, "cpu", "float32")
    batch, input_len, output_len = 2, 16, 6
    row, _ = profile_engine(engine, batch, input_len, output_len, warmup=0, repeats=2)
    table_from_rows("throughput", [row])

    hf = engine.model.config
    head_dim = hf.hidden_size // hf.num_attention_heads
    kv_per_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * head_dim * 4
    params = {id(p): p.numel() for p in engine.model.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in engine.model.buffers())
    tied = getattr(hf, "tie_word_embeddings", False)
    weights = 4 * (sum(params.values()) - (0 if tied else hf.vocab_size * hf.hidden_size)) + buffers
    expected_bytes = weights + batch * hf.hidden_size * 4 + batch * (input_len + output_len / 2 + 1) * kv_per_token
    assert row["decode_bytes_per_step"] == pytest.approx(expected_bytes)
    roofline = batch * row["copy_bandwidth_bytes_per_s"] / expected_bytes
    assert row["roofline_decode_tokens_per_s"] == pytest.approx(roofline)
    assert row["roofline_pct"] == pytest.approx(100 * row["decode_tokens_per_s"] / roofline)
    assert 0 < row["roofline_pct"] and "roofline_pct" in row["method_note"]
