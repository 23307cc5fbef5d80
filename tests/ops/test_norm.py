"""rms_norm / add_rms_norm: reference and Triton kernel vs float64 math."""

from __future__ import annotations

import pytest
import torch

from maca_infer.common.ops import _dispatch
from maca_infer.common.ops.norm import add_rms_norm, rms_norm

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# 1 and 7: ragged tiny rows; 96/1000: non-power-of-two; 8200: wider than the
# kernel's single-block limit (chunked two-pass path)
HIDDEN_SIZES = (1, 7, 96, 1000, 8200)


def rms_norm_float64(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """Row by row, straight from the definition."""
    x = x.double().reshape(-1, x.shape[-1])
    w = weight.double() + (1.0 if gemma else 0.0)
    rows = []
    for row in x:
        mean_square = sum(v * v for v in row.tolist()) / row.numel()
        rows.append(row / (mean_square + eps) ** 0.5 * w)
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_rms_norm(ops_impl, dtype, hidden, close):
    torch.manual_seed(hidden)
    x = torch.randn(2, 3, hidden, dtype=dtype) * 3 + 0.5
    weight = torch.randn(hidden, dtype=dtype)
    x_before = x.clone()
    y = rms_norm(x, weight, 1e-5)
    assert _dispatch.last_impl("rms_norm") == ops_impl
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(x, x_before)
    close(y.reshape(-1, hidden), rms_norm_float64(x, weight, 1e-5, False), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_gemma_fp32_weight_strided_rows_and_out(ops_impl, dtype, close, nan_tensor):
    torch.manual_seed(0)
    hidden = 77
    # rows are a slice of a wider tensor (q-norm on a fused qkv output)
    wide = torch.randn(5, hidden + 40, dtype=dtype)
    x = wide[:, 13:13 + hidden]
    weight = torch.randn(hidden, dtype=torch.float32) * 0.1
    out = nan_tensor((5, hidden), dtype)
    y = rms_norm(x, weight, 1e-6, gemma=True, out=out)
    assert y is out
    close(y, rms_norm_float64(x, weight, 1e-6, True), dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_per_head_norm_many_narrow_rows(ops_impl, dtype, close):
    # Qwen3-style q-norm: every head of every token normalized over head_dim;
    # 5 tokens x 7 heads = 35 rows of 128, several rows per program, last program ragged
    torch.manual_seed(5)
    qkv = torch.randn(5, (7 + 2) * 128, dtype=dtype)
    q = qkv[:, : 7 * 128].view(5, 7, 128)
    weight = torch.randn(128, dtype=dtype)
    close(rms_norm(q, weight).reshape(-1, 128), rms_norm_float64(q, weight, 1e-6, False), dtype)


def test_rms_norm_column_strided_x(ops_impl, close):
    # x.t(): the hidden dim has stride 2, the rows stride 1
    x = torch.randn(24, 3).t()
    weight = torch.randn(24)
    close(rms_norm(x, weight), rms_norm_float64(x, weight, 1e-6, False), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", (7, 1000, 16384))  # 16384: Llama-405B, the chunked two-pass path
@pytest.mark.parametrize("gemma", (False, True))
def test_add_rms_norm(ops_impl, dtype, hidden, gemma, close):
    torch.manual_seed(hidden + gemma)
    x = torch.randn(4, hidden, dtype=dtype)
    residual = torch.randn(4, hidden, dtype=dtype) * 2
    residual_in = residual.clone()
    weight = torch.randn(hidden, dtype=dtype)
    normed, residual_out = add_rms_norm(x, residual, weight, 1e-6, gemma=gemma)
    assert _dispatch.last_impl("add_rms_norm") == ops_impl
    assert residual_out is residual  # updated in place
    expected_sum = x.double() + residual_in.double()
    # one rounding of the exact sum to the storage dtype (the interpreter truncates bf16)
    close(residual, expected_sum, dtype, "residual")
    # the norm sees the residual exactly as stored
    close(normed, rms_norm_float64(residual, weight, 1e-6, gemma), dtype, "normed")


def test_add_rms_norm_residual_exact_in_fp32(ops_impl):
    x = torch.randn(3, 33)
    residual = torch.randn(3, 33)
    expected = x + residual
    add_rms_norm(x, residual, torch.ones(33))
    assert torch.equal(residual, expected)


def test_empty_batch(ops_impl):
    y = rms_norm(torch.empty(0, 16), torch.ones(16))
    assert y.shape == (0, 16)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: rms_norm(torch.randn(2, 8).int(), torch.ones(8)), "x has dtype int32"),
        (lambda: rms_norm(torch.randn(2, 8), torch.ones(9)), "weight has length"),
        (lambda: rms_norm(torch.randn(2, 8), torch.ones(8), -1.0), "eps=-1.0"),
        (lambda: rms_norm(torch.randn(2, 8), torch.ones(8, device="meta")), "one device"),
        (lambda: rms_norm(torch.randn(2, 8), torch.ones(8), out=torch.empty(2, 8, dtype=torch.float16)),
         "out has dtype float16"),
        (lambda: add_rms_norm(torch.randn(2, 8), torch.randn(8, 2).t(), torch.ones(8)), "residual must be contiguous"),
        (lambda: add_rms_norm(torch.randn(2, 8), torch.randn(2, 8).half(), torch.ones(8)),
         "residual has dtype float16"),
        (lambda: add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8)), "residual has shape"),
    ],
)
def test_bad_input_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_package_attribute_rms_norm_is_the_function():
    # the module is named norm.py so that importing it never shadows the exported function
    from maca_infer.common import ops
    import maca_infer.common.ops.norm  # noqa: F401
    x = torch.randn(3, 10)
    assert torch.equal(ops.rms_norm(x, torch.ones(10)), rms_norm(x, torch.ones(10)))


def test_kernels_compile_for_gpu_without_spills(gpu_builds):
    builds = gpu_builds("""
        import torch
        from maca_infer.common.ops.norm import add_rms_norm, rms_norm
        x = torch.randn(2, 4096, dtype=torch.bfloat16)
        weight = torch.randn(4096, dtype=torch.bfloat16)
        rms_norm(x, weight)
        add_rms_norm(x, x.clone(), weight, gemma=True)
        wide = torch.randn(2, 10000, dtype=torch.float16)  # chunked two-pass variant
        add_rms_norm(wide, wide.clone(), torch.randn(10000, dtype=torch.float16))
        rms_norm(torch.randn(64, 128, dtype=torch.bfloat16), torch.randn(128, dtype=torch.bfloat16))  # 16 rows a program
    """)
    assert [(b["constexprs"]["SINGLE_BLOCK"], b["constexprs"]["BLOCK_ROWS"]) for b in builds] == [
        (True, 1), (True, 1), (False, 1), (True, 16)]
    for build in builds:
        assert build["usage"]["LOCAL"] == 0, build
