"""A gpt-fast-style Llama: fused projections, a static KV cache written at ``input_pos``, no framework.

Shapes: B batch, L tokens in this call, S cache length (input + output), D model dim, H heads, Hkv KV heads,
hd head dim, I MLP width, V vocab.  Every linear layer is either an ``nn.Linear`` (bf16:
:class:`~tasks.backends.torch.cuda.dense.DenseLinear`, which uses a GEMV kernel at small batch where it
measured faster than cuBLAS) or :class:`~tasks.backends.torch.cuda.int4.Int4Linear`; the model code does
not know which.

Prefill (L > 1) always starts at position 0 and attends causally over its own keys (flash attention);
decode (L == 1) runs each block as two (compiled) halves around
:func:`~tasks.backends.torch.cuda.attention.decode_attention`, which ropes q/k, writes the new key/value at
the device-side position and reads only the positions written so far, so the step's shapes never change and
it can be captured in a CUDA graph.  At batch <= 8 the norms, residual adds (and optionally SiLU) of a
decode block run inside the linears' GEMV kernels (:meth:`Transformer.fuse_decode`, :mod:`.fused`).
Rotary embedding follows Hugging Face's Llama (``rotate_half``, in
:mod:`~tasks.backends.torch.cuda.rope`), so HF checkpoints load without permuting q/k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from tasks.backends.torch.cuda import fused
from tasks.backends.torch.cuda.attention import decode_attention
from tasks.backends.torch.cuda.dense import DenseLinear
from tasks.backends.torch.cuda.rope import Rope, apply_rope, rope_tables
from tasks.roofline import DecodeReads, decode_reads, unique_bytes


@dataclass(frozen=True)
class ModelArgs:
    """The shape and the features of one model (:func:`.families.model_args` reads them from config.json)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: Rope = Rope()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: a bias on the q/k/v projections (kept dense beside int4/fp8 weights)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before rotary
    sliding_window: int | None = None  # Mistral v0.1: longer sequences are refused (setup_cache)
    family: str = "Llama"


def llama2_7b_args() -> ModelArgs:
    """Llama-2-7B's shape (the benchmark's model; weights are random there)."""
    return ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     intermediate_size=11008, head_dim=128)


GEMV_FUSION_MODES = ("off", "norm", "all")  # Transformer.fuse_decode
DEFAULT_GEMV_FUSION = "norm"  # engine option gemv_fusion; why not "all": Transformer.fuse_decode
LinearFactory = Callable[[int, int], nn.Module]  # (in_features, out_features) -> module


def dense_linear(dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> LinearFactory:
    return lambda k, n: DenseLinear(k, n, bias=False, dtype=dtype, device=device)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: Any = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # as HF: normalise in fp32, cast, then scale
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, linear: LinearFactory, dtype: torch.dtype = torch.bfloat16,
                 device: Any = None):
        super().__init__()
        self.args = args
        self.q_size, self.kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wqkv = linear(args.dim, self.q_size + 2 * self.kv_size)  # [q | k | v] along the output dim
        self.wo = linear(self.q_size, args.dim)
        self.wqkv_bias = nn.Parameter(torch.zeros(self.q_size + 2 * self.kv_size, dtype=dtype, device=device)) \
            if args.qkv_bias else None
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, dtype, device) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, dtype, device) if args.qk_norm else None

    def finish_projection(self, qkv: torch.Tensor) -> torch.Tensor:
        """The q/k/v projection [..., (H + 2 Hkv) hd] -> plus the bias (Qwen2), q and k normalised per head
        (Qwen3); not roped.  Both run in the model's dtype, as transformers does."""
        if self.wqkv_bias is not None:
            qkv = qkv + self.wqkv_bias
        if self.q_norm is None:
            return qkv
        hd = self.args.head_dim
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.unflatten(-1, (-1, hd))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (-1, hd))).flatten(-2)
        return torch.cat([q, k, v], dim=-1)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, D] -> roped q [B, L, H, hd], roped k and v [B, L, Hkv, hd]."""
        a = self.args
        b, length, _ = x.shape
        qkv = self.finish_projection(self.wqkv(x))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(b, length, a.n_heads, a.head_dim), cos, sin)
        k = apply_rope(k.view(b, length, a.n_kv_heads, a.head_dim), cos, sin)
        return q, k, v.view(b, length, a.n_kv_heads, a.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Prefill from position 0: causal over its own keys (decode goes through :meth:`Block.decode_pre`)."""
        b, length, _ = x.shape  # x [B, L, D]
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x, cos, sin))  # [B, heads, L, hd]
        k_cache.index_copy_(2, input_pos, k)  # caches [B, Hkv, S, hd]
        v_cache.index_copy_(2, input_pos, v)
        gqa = self.args.n_kv_heads != self.args.n_heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(b, length, self.q_size))  # [B, L, D]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, linear: LinearFactory):
        super().__init__()
        self.w13 = linear(args.dim, 2 * args.intermediate_size)  # [gate | up]
        self.w2 = linear(args.intermediate_size, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(fused.silu_mul(self.w13, x))  # w13 may store gate/up interleaved (see fused)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, linear: LinearFactory, dtype: torch.dtype, device: Any):
        super().__init__()
        self.attention = Attention(args, linear, dtype, device)
        self.feed_forward = FeedForward(args, linear)
        self.attention_norm = RMSNorm(args.dim, args.rms_norm_eps, dtype, device)
        self.ffn_norm = RMSNorm(args.dim, args.rms_norm_eps, dtype, device)
        self.fuse_gemv = False  # decode through the fused GEMV kernels where they apply (Transformer.fuse_decode)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, k_cache, v_cache)
        return h + self.feed_forward(self.ffn_norm(h))

    # A decode step is decode_pre -> decode_attention -> decode_post per block, so that torch.compile fuses
    # everything between two attention kernels (norms, residual adds, SiLU, the int4 kernels' split-K sums)
    # and the attention kernel stays eager.  Where the fused GEMV kernels apply (fuse_gemv, see fused.py)
    # the norms, adds and SiLU run inside the linears' kernels instead.  Otherwise a block's last residual
    # add is left to the next block's decode_pre (or the final norm), where it fuses into the RMSNorm
    # kernel that reads the sum anyway: one launch less per block.

    def decode_pre(self, x: torch.Tensor, mlp_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 1, D] and the previous block's MLP output (None before the first block, or when that block
        added it itself) -> the residual stream x + mlp_out [B, 1, D] and this block's q/k/v projection
        [B, (H + 2 Hkv) hd], not yet roped."""
        if mlp_out is not None:
            x = x + mlp_out
        qkv = fused.norm_linear(self.attention.wqkv, self.attention_norm, x, self.fuse_gemv)[:, 0]
        return x, self.attention.finish_projection(qkv)

    def decode_post(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, 1, D], attention output y [B, H, hd] -> (the block's output, None) where w2's kernel adds the
        residual, else (the residual stream after attention h [B, 1, D], the MLP output [B, 1, D]), whose
        sum is the block's output (added by the next decode_pre)."""
        ff = self.feed_forward
        h = fused.linear_residual(self.attention.wo, y.reshape(x.shape[0], 1, -1), x, self.fuse_gemv)
        act = fused.norm_silu_mul(ff.w13, self.ffn_norm, h, self.fuse_gemv)
        out = fused.fused_residual(ff.w2, act, h, self.fuse_gemv)
        return (out, None) if out is not None else (h, ff.w2(act))


class Transformer(nn.Module):
    """The model plus its static KV cache (allocated by :meth:`setup_cache`)."""

    def __init__(self, args: ModelArgs, linear: LinearFactory, dtype: torch.dtype = torch.bfloat16,
                 device: Any = None):
        super().__init__()
        self.args, self.dtype = args, dtype
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(args, linear, dtype, device) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.rms_norm_eps, dtype, device)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False, dtype=dtype, device=device)  # kept dense
        self.tie_weights()
        # (decode_pre, decode_post) per layer and the greedy head: the methods themselves, or compiled wrappers
        self.decode_halves: list[tuple[Callable[..., Any], Callable[..., Any]]] = [
            (layer.decode_pre, layer.decode_post) for layer in self.layers]
        self.decode_head: Callable[..., torch.Tensor] = self.greedy_head
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cache_shape: tuple[int, int] | None = None
        self.int4_kernels = "reference"  # which int4 kernels the loader selected (int4.select_kernels)
        self.gemv_fusion = "off"  # see fuse_decode

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def setup_cache(self, batch: int, max_seq: int) -> None:
        """Static KV cache [B, Hkv, S, hd] per layer and rope tables for S positions."""
        if self.cache_shape == (batch, max_seq):
            return
        window = self.args.sliding_window
        if window is not None and max_seq > window:
            raise ValueError(f"{self.args.family}: a sequence of {max_seq} tokens is longer than the model's "
                             f"sliding_window of {window}; the fast engine implements full attention only, which "
                             "equals sliding-window attention up to the window (backend.options.engine=hf runs "
                             "longer sequences on the transformers reference)")
        self.caches = []  # free the old cache before allocating the new one
        device = self.tok_embeddings.weight.device
        a = self.args
        shape = (batch, a.n_kv_heads, max_seq, a.head_dim)
        self.caches = [(torch.zeros(shape, dtype=self.dtype, device=device),
                        torch.zeros(shape, dtype=self.dtype, device=device)) for _ in range(a.n_layers)]
        self.cos, self.sin = rope_tables(a.head_dim, a.rope, max_seq, device)
        self.cache_shape = (batch, max_seq)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, L] at positions input_pos [L] -> logits [B, V] of the last position ([B, L, V] if asked).

        L > 1 must be a prefill from position 0; L == 1 is a decode step.
        """
        if tokens.shape[1] == 1:
            logits = self.decode_logits(*self.decode_layers(tokens, input_pos))  # [B, 1, V]
            return (logits if all_logits else logits[:, -1]).float()
        x = self.tok_embeddings(tokens)  # [B, L, D]
        cos, sin = self.cos[input_pos], self.sin[input_pos]  # [L, hd]
        for layer, (k_cache, v_cache) in zip(self.layers, self.caches):
            x = layer(x, cos, sin, input_pos, k_cache, v_cache)
        if not all_logits:
            x = x[:, -1]  # [B, D]: prefill needs only the last position's logits
        return self.output(self.norm(x)).float()

    def fuse_decode(self, mode: str = DEFAULT_GEMV_FUSION) -> None:
        """Decode through the fused GEMV kernels (:mod:`.fused`) where they apply; call before compiling.

        ``mode``: "off"; "norm" (RMSNorm prologues and residual-add epilogues); "all" (also SiLU * up in
        w13's epilogue, which interleaves every block's gate/up rows, once; forward's results are
        unchanged).  "all" is not the default: past batch 8, where no fused kernel runs, the compiled
        SiLU over the interleaved product measured 7.6 us per layer against 2.9 (H200, batch 64), which
        costs more than the fused epilogue saves at batch 1 (1.2 us per layer)."""
        if mode not in GEMV_FUSION_MODES:
            raise ValueError(f"gemv_fusion must be one of {', '.join(GEMV_FUSION_MODES)}; got {mode!r}")
        for layer in self.layers:
            w13 = layer.feed_forward.w13
            if mode == "all" and hasattr(w13, "interleave_gate_up"):
                w13.interleave_gate_up()
            layer.fuse_gemv = mode != "off"
        self.gemv_fusion = mode

    def decode_layers(self, tokens: torch.Tensor, input_pos: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [B, 1] at input_pos [1] -> the last block's residual stream and MLP output (see decode_pre)."""
        x, mlp_out = self.tok_embeddings(tokens), None  # [B, 1, D]
        for (pre, post), (k_cache, v_cache) in zip(self.decode_halves, self.caches):
            x, qkv = pre(x, mlp_out)
            x, mlp_out = post(x, decode_attention(qkv, self.cos, self.sin, k_cache, v_cache, input_pos))
        return x, mlp_out

    def decode_logits(self, x: torch.Tensor, mlp_out: torch.Tensor | None) -> torch.Tensor:
        """The last block's add (unless done), the final norm and lm_head -> logits [B, 1, V] in the model's
        dtype."""
        return self.output(self.norm(x if mlp_out is None else x + mlp_out))

    def greedy_head(self, x: torch.Tensor, mlp_out: torch.Tensor | None) -> torch.Tensor:
        """decode_logits, then argmax -> next tokens [B, 1] (the argmax of bf16 logits is that of their fp32
        copy)."""
        return self.decode_logits(x, mlp_out).argmax(dim=-1)

    def next_tokens(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """One greedy decode step: tokens [B, 1] at input_pos [1] -> the next tokens [B, 1]."""
        return self.decode_head(*self.decode_layers(tokens, input_pos))

    def compile_decode(self, **compile_kwargs: Any) -> None:
        """Compile the two halves of the decode block once (every layer reuses the compiled code) and the head.

        With dynamo's default ``inline_inbuilt_nn_modules`` the layers' weights are graph inputs, so the 32
        layers share one compilation (per batch size, with static shapes; the first block's decode_pre,
        which has no MLP output to add, is a second one) instead of compiling 32 times.
        """
        self.decode_halves = [(torch.compile(layer.decode_pre, **compile_kwargs),
                               torch.compile(layer.decode_post, **compile_kwargs)) for layer in self.layers]
        self.decode_head = torch.compile(self.greedy_head, **compile_kwargs)

    def weight_bytes(self) -> int:
        """Bytes of all parameters and buffers the model reads (tied weights counted once)."""
        return unique_bytes(self)

    def decode_reads(self) -> DecodeReads:
        """The weight bytes a decode step reads (the embedding table only as ``batch`` rows, unless tied)."""
        return decode_reads(self, self.tok_embeddings.weight, self.output.weight)


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype = torch.bfloat16) -> int:
    """K and V of one token over all layers."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * torch.finfo(dtype).bits // 8


def num_linear_params(args: ModelArgs) -> int:
    """Parameters in the quantizable linears (all but embeddings, norms and lm_head)."""
    per_layer = args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim \
        + args.n_heads * args.head_dim * args.dim + 3 * args.dim * args.intermediate_size
    return per_layer * args.n_layers
