"""The reference engine: a Hugging Face ``transformers`` model, any device, eager mode.

This is what CPU runs (tests, CI, the demo) use, and the numerical reference for the fast CUDA engine.
Int4 checkpoints (compressed-tensors) are decompressed to dense weights by transformers at load, so this
engine measures accuracy of the quantized weights exactly but shows no int4 speed or memory gain: its
rows say so in ``weight_format``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.backends.base import Engine, GenerationTiming
from tasks.models import DTYPES, stored_dtype
from tasks.roofline import decode_reads



def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def checkpoint_weight_format(checkpoint_dir: Path) -> str:
    """Describe the stored weights from config.json's quantization_config (if any)."""
    config = json.loads((checkpoint_dir / "config.json").read_text())
    quant = config.get("quantization_config")
    if not quant:
        return str(config.get("torch_dtype") or config.get("dtype") or "float")
    group = next(iter(quant.get("config_groups", {}).values()), {}).get("weights", {})
    if group.get("type") == "float" and group.get("num_bits") == 8:
        return (f"fp8-e4m3 W8A8 (weights per-{group.get('strategy')}, activations per-token dynamic; "
                f"{quant.get('format', quant.get('quant_method'))})")
    return (f"int{group.get('num_bits', '?')}-g{group.get('group_size', '?')}-"
            f"{'sym' if group.get('symmetric') else 'asym'} ({quant.get('format', quant.get('quant_method'))})")


class HFEngine(Engine):
    def __init__(self, checkpoint_dir: Path, device: str, dtype: str):
        self.device, self.dtype = device, dtype
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=DTYPES[dtype]).to(device).eval()
        stored = checkpoint_weight_format(checkpoint_dir)
        self.stored_dtype = stored_dtype(checkpoint_dir)
        dense = (f"dense {dtype}" if self.stored_dtype in (None, dtype)
                 else f"dense {dtype} (stored {self.stored_dtype}, cast at load)")
        self.weight_format = (f"{stored}, de-quantized to dense {dtype} by transformers"
                              if stored.startswith(("int", "fp8")) else dense)
        if stored.startswith("fp8"):  # compressed-tensors quantize-dequantizes each token's activations
            self.weight_format += ", activations fake-quantized to fp8 per token"
        self.kv_cache_policy = "dynamic (grows with the sequence: batch x tokens so far), transformers DynamicCache"
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        element = torch.finfo(DTYPES[dtype]).bits // 8
        embedding, head = self.model.get_input_embeddings().weight, self.model.get_output_embeddings()
        self.details: dict[str, Any] = {
            "vocab_size": cfg.vocab_size,
            "weights_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
            "kv_bytes_per_token": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * element,
            "decode_reads": decode_reads(self.model, embedding, head.weight if head is not None else None),
            "engine": "transformers eager",
        }
        if stored.startswith(("int", "fp8")):  # profile rows must not read as the format's own speed
            self.details["speed_note"] = (f"de-quantized: {stored.split(' ')[0]} weights run as dense {dtype} "
                                          "matmuls here, so speed and memory are not the format's")

    def lm_eval_model(self, batch_size: int) -> Any:
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=batch_size,
                    max_length=getattr(self.model.config, "max_position_embeddings", 2048))

    @torch.inference_mode()
    def prompt_logits(self, batch: list[list[int]]) -> list[torch.Tensor]:
        """One eager forward per token list (no padding, so no attention mask can change a logit)."""
        return [self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
                for ids in batch]

    @torch.inference_mode()
    def timed_generate(self, input_ids: torch.Tensor, output_len: int) -> GenerationTiming:
        from transformers import DynamicCache

        ids = input_ids.to(self.device)
        batch, length = ids.shape
        cache = DynamicCache()
        tokens = []
        _sync(self.device)
        start = time.perf_counter()
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(next_token)
        _sync(self.device)
        first = time.perf_counter() - start
        steps = []
        for i in range(output_len - 1):
            t0 = time.perf_counter()
            position = torch.full((batch, 1), length + i, device=self.device)
            out = self.model(input_ids=next_token, past_key_values=cache, use_cache=True, position_ids=position)
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(next_token)
            _sync(self.device)
            steps.append(time.perf_counter() - t0)
        total = time.perf_counter() - start
        return GenerationTiming(batch, length, output_len, first, steps, total, torch.cat(tokens, 1).cpu())

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
