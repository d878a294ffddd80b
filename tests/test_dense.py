"""The fp16 baseline's linear layer: nn.Linear on CPU, the bf16 GEMV kernel on tuned GPU shapes."""
from __future__ import annotations

import pytest
import torch

from tasks.backends.torch.cuda import dense, int4, int4_mma
from tasks.backends.torch.cuda.model import dense_linear

gpu = pytest.mark.gpu
needs_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or not int4_mma.available(torch.device("cuda"))[0],
    reason="needs an sm_80+ NVIDIA GPU with NVRTC")


def test_dense_linear_is_nn_linear_on_cpu() -> None:
    layer = dense_linear(torch.float32, "cpu")(64, 32)
    assert isinstance(layer, torch.nn.Linear) and list(layer.state_dict()) == ["weight"]
    x = torch.randn(3, 1, 64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))


def test_config_lookup_and_errors(monkeypatch) -> None:
    monkeypatch.setitem(dense.TUNED, (8, 4096, 4096), (1, 2, 4, 3))
    assert dense.config(5, 4096, 4096) == (1, 2, 4, 3)  # batches 5..8 share the M = 8 entry
    assert dense.config(9, 4096, 4096) is None  # past one 8-row tile: cuBLAS
    assert dense.config(1, 4096, 4000) is None  # K not whole 64-deep chunks
    with pytest.raises(ValueError, match="WK in 1, 2, 4, 8"):
        dense.check_config((1, 1, 3, 1))


@gpu
@needs_kernels
@pytest.mark.parametrize("cfg", [(1, 1, 1, 1), (1, 2, 4, 3), (2, 2, 2, 5), (4, 1, 8, 2), (3, 1, 4, 4), (1, 4, 2, 8)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gemv_matches_cublas_on_ragged_shapes(cfg: tuple, m: int) -> None:
    """13 tiles (partial last block for TN 2, 3, 4) x 19 chunks (ragged splits and batches)."""
    n, k = 208, 1216
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ w.double().t()
    parts = dense.gemv_split(x, w, cfg)
    assert parts.shape[0] == dense.output_splits(k, cfg)
    out = int4.reduce_splits(parts, torch.float32)
    # fp32 sums of exact products; one split comes back in bf16 (the layer's dtype), several in fp32
    tol = 5e-3 if parts.dtype == torch.bfloat16 else 1e-4
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol


@gpu
@needs_kernels
def test_dense_linear_uses_the_kernel_on_tuned_shapes_in_a_compiled_graph(monkeypatch) -> None:
    monkeypatch.setitem(dense.TUNED, (1, 512, 1024), (1, 2, 4, 3))
    layer = dense_linear(torch.bfloat16, "cuda")(1024, 512)
    x = torch.randn(1, 1, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ layer.weight.float().t()
    assert dense._config_for(x[0], layer.weight) == (1, 2, 4, 3)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.inference_mode():  # as the engine runs it: the op has no autograd formula
        for y in (layer(x), compiled(x)):
            assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-3
