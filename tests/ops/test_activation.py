"""silu_and_mul / gelu_and_mul: reference and Triton kernel vs float64 math."""

from __future__ import annotations

import math

import pytest
import torch

from maca_infer.common.ops import _dispatch
from maca_infer.common.ops.activation import gelu_and_mul, silu_and_mul

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# 1: one column; 5/96: ragged; 1500: wider than one program's 1024 columns
WIDTHS = (1, 5, 96, 1500)


def gated_float64(x: torch.Tensor, activation: str) -> torch.Tensor:
    """Element by element from the textbook formulas (math module, float64)."""
    d = x.shape[-1] // 2
    flat = x.double().reshape(-1, 2 * d).tolist()
    out = []
    for row in flat:
        gate, up = row[:d], row[d:]
        if activation == "silu":
            act = [g / (1.0 + math.exp(-g)) for g in gate]
        elif activation == "gelu":
            act = [0.5 * g * (1.0 + math.erf(g / math.sqrt(2.0))) for g in gate]
        else:
            act = [0.5 * g * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3))) for g in gate]
        out.append([a * u for a, u in zip(act, up)])
    return torch.tensor(out, dtype=torch.float64).reshape(*x.shape[:-1], d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("activation", ("silu", "gelu", "gelu_tanh"))
def test_gated_activation(ops_impl, dtype, d, activation, close):
    torch.manual_seed(d)
    x = torch.randn(2, 3, 2 * d, dtype=dtype) * 3
    if activation == "silu":
        y, op = silu_and_mul(x), "silu_and_mul"
    else:
        y, op = gelu_and_mul(x, "none" if activation == "gelu" else "tanh"), "gelu_and_mul"
    assert _dispatch.last_impl(op) == ops_impl
    assert y.shape == (2, 3, d) and y.dtype == dtype
    close(y, gated_float64(x, activation), dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_strided_rows_and_out(ops_impl, dtype, close, nan_tensor):
    torch.manual_seed(1)
    d = 37
    wide = torch.randn(6, 2 * d + 10, dtype=dtype)
    x = wide[:, 10:]  # rows strided by 2d + 10
    out = nan_tensor((6, d), dtype)
    assert silu_and_mul(x, out=out) is out
    close(out, gated_float64(x, "silu"), dtype)


def test_large_gate_values_do_not_overflow(ops_impl):
    # exp(-g) overflows float32 for g < -88: silu must still give -0, not NaN
    x = torch.tensor([[-200.0, -50.0, 0.0, 50.0, 1.0, 2.0, 3.0, 4.0]])
    y = silu_and_mul(x)
    expected = gated_float64(x, "silu")
    assert torch.isfinite(y).all()
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: silu_and_mul(torch.randn(3, 7)), "last dimension must be even"),
        (lambda: silu_and_mul(torch.randn(3, 8).long()), "x has dtype int64"),
        (lambda: silu_and_mul(torch.randn(8, 3).t()), "last dimension must be contiguous"),
        (lambda: silu_and_mul(torch.randn(3, 8), out=torch.empty(3, 8)), r"expected \(3, 4\)"),
        (lambda: gelu_and_mul(torch.randn(3, 8), "erf"), "approximate='erf' is not supported"),
        (lambda: silu_and_mul(torch.randn(3, 8), out=torch.empty(3, 4, device="meta")), "one device"),
    ],
)
def test_bad_input_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_kernels_compile_for_gpu_without_spills(gpu_builds):
    builds = gpu_builds("""
        import torch
        from maca_infer.common.ops.activation import gelu_and_mul, silu_and_mul
        x = torch.randn(3, 2 * 1408, dtype=torch.bfloat16)
        silu_and_mul(x)
        gelu_and_mul(x, "none")
        gelu_and_mul(x, "tanh")
    """)
    assert [b["constexprs"]["ACTIVATION"] for b in builds] == ["silu", "gelu", "gelu_tanh"]
    for build in builds:
        assert build["usage"]["LOCAL"] == 0, build
