"""The decode-step fusions (RMSNorm, residual add, SiLU * up inside the batch <= 8 GEMV kernels): the gate/up
interleaving and the unfused fallbacks on CPU, the fused kernels against the unfused modules on a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tasks.backends.torch.cuda import dense, fused, int4, int4_mma
from tasks.backends.torch.cuda.generate import Generator
from tasks.backends.torch.cuda.int4 import Int4Linear
from tasks.backends.torch.cuda.loader import random_model
from tasks.backends.torch.cuda.model import ModelArgs, RMSNorm, dense_linear

gpu = pytest.mark.gpu
needs_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or not int4_mma.available(torch.device("cuda"))[0],
    reason="needs an sm_80+ NVIDIA GPU with NVRTC")

SMALL = ModelArgs(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=512, head_dim=64)


def _random_norms(model: torch.nn.Module, seed: int = 1) -> None:
    """random_model's norms are all ones; the prologue must apply real weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((1 + 0.2 * torch.randn(p.shape, generator=gen)).to(p.dtype))


def test_gate_up_permutation_interleaves_by_eight_and_deinterleave_inverts_it() -> None:
    perm = fused.gate_up_permutation(32)
    assert perm.tolist() == list(range(8)) + list(range(16, 24)) + list(range(8, 16)) + list(range(24, 32))
    y = torch.randn(3, 1, 64)
    assert torch.equal(fused.deinterleave(y[..., fused.gate_up_permutation(64)]), y)
    with pytest.raises(ValueError, match="multiple of 16"):
        fused.gate_up_permutation(24)


@pytest.mark.parametrize("fmt", ["bfloat16", "int4"])
def test_fused_decode_on_cpu_changes_nothing(fmt: str) -> None:
    """On CPU no fused kernel applies: interleaving w13 and the fused code path give the reference's logits
    exactly, for prefill and decode."""
    args = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96, head_dim=16)
    model = random_model(args, fmt, "cpu", group_size=32)
    _random_norms(model)
    tokens = torch.randint(0, args.vocab_size, (2, 5))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        model.setup_cache(2, 17)  # fresh cache
        model.setup_cache(2, 16)
        return model(tokens, torch.arange(5)), model(tokens[:, :1], torch.tensor([5]))

    before = run()
    with pytest.raises(ValueError, match="gemv_fusion must be one of off, norm, all"):
        model.fuse_decode("silu")
    model.fuse_decode("all")
    w13 = model.layers[0].feed_forward.w13
    assert w13.gate_up_interleaved and all(layer.fuse_gemv for layer in model.layers)
    after = run()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    x = torch.randn(1, args.dim)
    assert w13.fused_gemv(x.to(torch.bfloat16), None, 0.0, None, fused.EPI_SPLITS) is None  # CPU: unfused


def test_config_validation_allows_exactly_the_models_fusion_modes() -> None:
    """orchestrator/validate.py keeps its own copy of the modes (it must not import torch)."""
    from orchestrator.validate import TORCH_OPTION_VALUES
    from tasks.backends.torch.cuda.model import DEFAULT_GEMV_FUSION, GEMV_FUSION_MODES

    assert TORCH_OPTION_VALUES["gemv_fusion"] == GEMV_FUSION_MODES and DEFAULT_GEMV_FUSION in GEMV_FUSION_MODES


def test_int4_interleave_needs_the_triton_layout() -> None:
    layer = Int4Linear(64, 32, 64)
    assert layer.to_mma_layout()
    with pytest.raises(RuntimeError, match="before the weights move to the mma layout"):
        layer.interleave_gate_up()


# ------------------------------------------------------------------------------------------------- GPU


def _int4_layer(n: int, k: int, gs: int, interleave: bool) -> Int4Linear:
    gen = torch.Generator().manual_seed(n + k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(k // gs, n, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen).to(torch.bfloat16)
    layer = Int4Linear.from_quantized(q, scales, zeros).cuda()
    if interleave:
        layer.interleave_gate_up()
    assert layer.to_mma_layout()
    return layer


def _dense_layer(n: int, k: int, interleave: bool) -> torch.nn.Module:
    layer = dense_linear(torch.bfloat16, "cuda")(k, n)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
    if interleave:
        layer.interleave_gate_up()
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _weight64(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight [N, K] in fp64, rows in storage order."""
    if isinstance(layer, Int4Linear):
        return int4.dequantize(layer.qweight, layer.scales, layer.zeros, layer.in_features, torch.float64)
    return layer.weight.double()


def _check_fusions(layer: torch.nn.Module, m: int, k: int) -> None:
    """Each fused kernel (called directly: it must apply here) against fp64 arithmetic on the same weights,
    next to the same layer unfused: the fused result must be as close to fp64 as the unfused one (both
    round the activations and the products to bf16 a few times, in different places).  The residual add
    is bit-exact against the unfused layer (same kernel, same roundings)."""
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    x[:, ::97] *= 30  # outliers, as in LLM hidden states
    norm = RMSNorm(k, 1e-5, torch.bfloat16, "cuda")
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(k, device="cuda", generator=gen))
    n = layer.out_features
    resid = torch.randn(m, n, device="cuda", generator=gen).to(torch.bfloat16)
    x64 = x.double()
    normed64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    raw64 = normed64 @ _weight64(layer).t()  # storage order

    def close(fused_out: torch.Tensor, unfused_out: torch.Tensor, truth: torch.Tensor) -> bool:
        err, base = _rel(fused_out, truth), _rel(unfused_out, truth)
        return err < 1.5 * base + 1e-3 and err < 1.5e-2

    with torch.inference_mode():
        if layer.gate_up_interleaved:  # only the SiLU epilogue reads an interleaved product
            assert fused.fused_residual(layer, x, resid, True) is None
            gate64, up64 = fused.deinterleave(raw64).chunk(2, dim=-1)
            truth = F.silu(gate64) * up64
            gate, up = layer(norm(x)).chunk(2, dim=-1)
            act = layer.fused_gemv(x, norm.weight, norm.eps, None, fused.EPI_SILU)
            assert act is not None and act.shape == (m, n // 2) and close(act, F.silu(gate) * up, truth)
            plain = layer.fused_gemv(norm(x), None, 0.0, None, fused.EPI_SILU)  # SiLU without the prologue
            assert plain is not None and close(plain, F.silu(gate) * up, truth)
            return
        normed = layer.fused_gemv(x, norm.weight, norm.eps, None, fused.EPI_SPLITS)
        assert normed is not None and normed.shape == (m, n) and close(normed, layer(norm(x)), raw64)
        added = layer.fused_gemv(x, None, 0.0, resid, fused.EPI_RESIDUAL)
        assert added is not None and torch.equal(added, resid + layer(x))
        both = layer.fused_gemv(x, norm.weight, norm.eps, resid, fused.EPI_RESIDUAL)
        assert both is not None and close(both, resid + layer(norm(x)), resid.double() + raw64)


@gpu
@needs_kernels
@pytest.mark.parametrize("cfg", [(1, 8, 1, 3, 1, 3), (2, 4, 1, 3, 1, 3), (3, 4, 1, 3, 1, 3), (2, 2, 2, 4, 1, 3)])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("gs", [64, 128])
def test_int4_fused_gemv_matches_the_unfused_layer(monkeypatch, cfg: tuple, m: int, gs: int) -> None:
    """208 rows (13 tiles: TN 2 and 3 leave a partial block) x 1280 deep, gate/up interleaved or not."""
    n, k = 208, 1280
    if int4_mma.smem_bytes(m, cfg, gs // 64) > int4_mma.SMEM_LIMIT:
        pytest.skip("does not fit in shared memory")
    monkeypatch.setitem(int4_mma.TUNED, (int4_mma.m_bucket(m), n, k), cfg)
    for interleave in (False, True):
        layer = _int4_layer(n, k, gs, interleave)
        assert int4_mma.fused_config(m, n, k, torch.device("cuda"), gs) == cfg
        _check_fusions(layer, m, k)


@gpu
@needs_kernels
@pytest.mark.parametrize("cfg", [(1, 1, 8, 1), (1, 2, 4, 1), (2, 2, 2, 1), (1, 2, 1, 1), (3, 1, 4, 1)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_dense_fused_gemv_matches_the_unfused_layer(monkeypatch, cfg: tuple, m: int) -> None:
    n, k = 208, 1280
    monkeypatch.setitem(dense.TUNED, (int4_mma.m_bucket(m), n, k), cfg)
    for interleave in (False, True):
        _check_fusions(_dense_layer(n, k, interleave), m, k)


@gpu
@needs_kernels
def test_fusions_are_skipped_where_the_config_has_several_splits(monkeypatch) -> None:
    n, k = 208, 1280
    monkeypatch.setitem(int4_mma.TUNED, (1, n, k), (1, 4, 1, 3, 2, 3))
    layer = _int4_layer(n, k, 128, False)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    assert layer.fused_gemv(x, None, 0.0, None, fused.EPI_SPLITS) is None
    monkeypatch.setitem(dense.TUNED, (1, n, k), (1, 2, 4, 2))
    assert _dense_layer(n, k, False).fused_gemv(x, None, 0.0, None, fused.EPI_SPLITS) is None


def _tune_small_model(monkeypatch) -> None:
    """One-split GEMV configs for SMALL's four linears at every batch bucket up to 8."""
    a = SMALL
    shapes = [(a.dim, 3 * a.dim), (a.dim, a.dim), (a.dim, 2 * a.intermediate_size), (a.intermediate_size, a.dim)]
    for bucket in (1, 2, 4, 8):
        for k, n in shapes:
            monkeypatch.setitem(int4_mma.TUNED, (bucket, n, k), (1, 4, 1, 3, 1, 3))
            monkeypatch.setitem(dense.TUNED, (bucket, n, k), (1, 2, 4, 1))


@gpu
@needs_kernels
@pytest.mark.parametrize("fmt", ["bfloat16", "int4"])
@pytest.mark.parametrize("mode", ["norm", "all"])
def test_fused_decode_matches_the_unfused_engine(monkeypatch, fmt: str, mode: str) -> None:
    """The same random model with and without the fusions: decode logits agree to bf16 rounding, and the
    compiled, graph-captured fused engine generates what it does eagerly."""
    _tune_small_model(monkeypatch)
    models = {}
    for fuse in (True, False):
        model = random_model(SMALL, fmt, "cuda", group_size=128, gemv_fusion=mode if fuse else "off")
        _random_norms(model)
        models[fuse] = model
    assert models[True].layers[0].fuse_gemv and not models[False].layers[0].fuse_gemv
    assert models[True].layers[0].feed_forward.w13.gate_up_interleaved == (mode == "all")
    for batch in (1, 3):
        ids = torch.randint(0, SMALL.vocab_size, (batch, 16), device="cuda")
        logits = {}
        with torch.inference_mode():
            for fuse, model in models.items():
                model.setup_cache(batch, 24)
                model(ids, torch.arange(16, device="cuda"))
                x, mlp_out = model.decode_layers(ids[:, -1:], torch.tensor([16], device="cuda"))
                assert (mlp_out is None) == fuse  # w2's kernel added the residual itself
                logits[fuse] = model.decode_logits(x, mlp_out)
        assert _rel(logits[True], logits[False]) < 1e-2, batch
        # greedy tokens of random models drift apart once one near-tie rounds the other way, so the
        # compiled, graph-captured fused engine is compared with the same kernels run eagerly
        fast = Generator(models[True], compile=True, cuda_graph=True).generate(ids, 8)
        slow = Generator(models[True], compile=False, cuda_graph=False).generate(ids, 8)
        assert (fast.output_token_ids == slow.output_token_ids).float().mean() > 0.9, batch


def _stand_in_kernels(model: torch.nn.Module, calls: list) -> None:
    """Give every linear a fused_gemv that computes what the kernel would with the unfused modules (so the
    model's fused code path runs on CPU; at most 8 rows, like the kernels) and records (block, linear,
    epilogue, whether the norm ran in the kernel)."""
    for b, layer in enumerate(model.layers):
        for name, linear in [("wqkv", layer.attention.wqkv), ("wo", layer.attention.wo),
                             ("w13", layer.feed_forward.w13), ("w2", layer.feed_forward.w2)]:
            def fused_gemv(x, gamma, eps, resid, epilogue, linear=linear, tag=(b, name)):
                if x.shape[0] > 8:
                    return None
                calls.append((*tag, epilogue, gamma is not None))
                if gamma is not None:
                    norm = RMSNorm(x.shape[-1], eps, x.dtype)
                    norm.weight.data = gamma
                    x = norm(x)
                y = linear.raw_forward(x)
                if epilogue == fused.EPI_RESIDUAL:
                    return resid + y
                if epilogue == fused.EPI_SILU:
                    v = fused._tiles(y)
                    return (F.silu(v[..., 0, :]) * v[..., 1, :]).reshape(x.shape[0], -1)
                return y

            linear.fused_gemv = fused_gemv


@pytest.mark.parametrize("mode", ["norm", "all"])
def test_both_norms_run_inside_the_gemvs_in_either_mode(mode: str) -> None:
    """Every linear of a decode step goes through its fused kernel, both RMSNorms inside wqkv and w13 in
    "norm" as in "all" (a version of norm_silu_mul left w13 unfused in "norm"), and the stand-in kernels give
    the unfused model's logits."""
    args = ModelArgs(vocab_size=128, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=96, head_dim=16)
    model = random_model(args, "bfloat16", "cpu")
    _random_norms(model)
    tokens = torch.randint(0, args.vocab_size, (2, 5))
    model.setup_cache(2, 16)
    model(tokens, torch.arange(5))
    with torch.inference_mode():
        ref = model.decode_logits(*model.decode_layers(tokens[:, :1], torch.tensor([5])))
    model.fuse_decode(mode)
    calls: list = []
    _stand_in_kernels(model, calls)
    with torch.inference_mode():
        x, mlp_out = model.decode_layers(tokens[:, :1], torch.tensor([5]))
        out = model.decode_logits(x, mlp_out)
    assert mlp_out is None and _rel(out, ref) < 2e-2
    w13_epilogue = fused.EPI_SILU if mode == "all" else fused.EPI_SPLITS
    assert calls == [call for b in range(args.n_layers) for call in [
        (b, "wqkv", fused.EPI_SPLITS, True), (b, "wo", fused.EPI_RESIDUAL, False),
        (b, "w13", w13_epilogue, True), (b, "w2", fused.EPI_RESIDUAL, False)]]
    calls.clear()  # past 8 rows nothing fuses
    model.setup_cache(9, 16)
    with torch.inference_mode():
        model.decode_layers(torch.randint(0, args.vocab_size, (9, 1)), torch.tensor([5]))
    assert calls == []
