"""W8A8 (int8 weights and activations): per-token quant, int8 linear, fused MoE, checkpoint converters.

Expected values are float64 computations written here, independently of
w8a8.py: the quantization rule (half away from zero, absmax / 127), exact
integer dot products, float64 scaling. The Triton kernel's int8 must be
bit-identical to the torch reference's; both are checked against the rule
at exact ties. Every float buffer an op allocates is poisoned with NaN (int8
with -128, a value the quantizer never produces) so an unwritten element
fails.
"""

from __future__ import annotations

import pytest
import torch

from maca_infer.common import ops
from maca_infer.common.ops import w8a8
from tests.ops.conftest import TOLERANCE, assert_close, relative_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled floats and -128-filled int8 while an op runs."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype == torch.int8:
            t.fill_(-128)
        return t

    monkeypatch.setattr(torch, "empty", empty)


# --------------------------------------------------------------------------
# float64 math of the rule (independent of w8a8.py)
# --------------------------------------------------------------------------

def quantize64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``x`` -> (q int64, scale float64 [..., 1], v = x * 127 / absmax float64), half away from zero."""
    xd = x.to(torch.float64)
    absmax = xd.abs().amax(dim=-1, keepdim=True).clamp_min(1e-10)
    v = xd * 127.0 / absmax
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127).to(torch.int64)
    return q, absmax / 127.0, v


def dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of integer matrices (int64)."""
    return a.to(torch.int64) @ b.to(torch.int64).t()


# --------------------------------------------------------------------------
# per_token_quant_int8
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 300), (2, 5000)])
def test_per_token_quant_int8(any_branch, dtype, shape, poisoned_empty):
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=generator) * torch.rand(shape[:-1] + (1,), generator=generator) * 4).to(dtype)
    if shape[0] > 1:
        x[1] = 0  # a zero row: q = 0, finite scale
    q, scale = ops.per_token_quant_int8(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*x.shape[:-1], 1)
    q64, scale64, v64 = quantize64(x)
    assert torch.isfinite(scale).all()
    assert relative_error(scale, scale64) < 2e-7  # absmax / 127, one float32 rounding
    diff = (q.to(torch.int64) - q64).abs()
    assert int(diff.max()) <= 1
    # float32 and float64 may disagree only right at a .5 tie
    near_tie = ((v64.abs() - v64.abs().floor()) - 0.5).abs() < 1e-4
    assert not bool((diff > 0)[~near_tie].any())
    assert not bool((q == -128).any())
    if shape[0] > 1:
        assert not bool(q[1].any())
        assert float(scale[1].flatten()[0]) == pytest.approx(1e-10 / 127)
    # the kernel and the reference give the same bits
    ref_q, ref_scale = w8a8._per_token_quant_reference(x.reshape(-1, shape[-1]))
    assert torch.equal(q.reshape(-1, shape[-1]), ref_q)
    assert torch.equal(scale.reshape(-1, 1), ref_scale)


def test_per_token_quant_rounds_half_away_from_zero(any_branch):
    below_half = float(torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)))  # float32's neighbour of 0.5
    rows = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, below_half, -below_half, 126.5, -127.0],
                         [-127.0, 3.5, -3.5, 0.25, 0.75, 63.5, -63.5, 0.0, 1.0, 64.5]], dtype=torch.float32)
    q, scale = ops.per_token_quant_int8(rows)
    assert q.tolist() == [[127, 1, 2, 3, -1, -3, 0, 0, 127, -127],
                          [-127, 4, -4, 0, 1, 64, -64, 0, 1, 65]]
    assert scale.flatten().tolist() == [1.0, 1.0]


def test_per_token_quant_strided_rows(any_branch):
    wide = torch.randn(6, 80, generator=torch.Generator().manual_seed(3))
    x = wide[:, 8:72]
    q, scale = ops.per_token_quant_int8(x)
    q_c, scale_c = ops.per_token_quant_int8(x.contiguous())
    assert torch.equal(q, q_c) and torch.equal(scale, scale_c)


def test_per_token_quant_rejects_bad_input():
    with pytest.raises(ValueError, match="x has dtype int8"):
        ops.per_token_quant_int8(torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[\.\.\., K\] with K >= 1"):
        ops.per_token_quant_int8(torch.zeros(2, 0))


# --------------------------------------------------------------------------
# rms_norm / add_rms_norm fused with the quantization
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,with_residual,gemma", [
    ((1, 1), False, False), ((3, 7), True, False), ((2, 5, 300), True, True), ((2, 3000), False, True),
    ((3, 2500), True, False),  # wider than the interpreter's 1024-wide tile: three passes
])
def test_rms_norm_quant_int8(any_branch, dtype, shape, with_residual, gemma, poisoned_empty):
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator).to(dtype)
    weight = (torch.rand(shape[-1], generator=generator) + 0.5).to(dtype)
    residual = torch.randn(shape, generator=generator).to(dtype) if with_residual else None
    eps = 1e-5
    if with_residual:
        before = residual.clone()
        q, scale, returned = ops.add_rms_norm_quant_int8(x, residual, weight, eps, gemma=gemma)
        assert returned is residual
        summed = (x.double() + before.double()).to(dtype)
        if dtype == torch.bfloat16 and any_branch != "reference":
            # the interpreter truncates float32 -> bfloat16 (the card rounds to nearest): one ulp at most
            assert torch.allclose(residual.double(), summed.double(), rtol=2**-7, atol=0)
            summed = residual.clone()
        else:
            assert torch.equal(residual, summed)
    else:
        q, scale = ops.rms_norm_quant_int8(x, weight, eps, gemma=gemma)
        summed = x
    assert q.shape == x.shape and q.dtype == torch.int8 and scale.shape == (*shape[:-1], 1)
    s64 = summed.double()
    w64 = weight.double() + (1.0 if gemma else 0.0)
    y64 = s64 / torch.sqrt((s64 * s64).mean(-1, keepdim=True) + eps) * w64
    # q * scale is y64 rounded to x.dtype, then to one of 255 levels of the row's absmax
    row_max = y64.abs().amax(-1, keepdim=True)
    err = (q.double() * scale.double() - y64).abs() / row_max
    assert float(err.max()) <= 0.5 / 127 + 2 * TOLERANCE[dtype], float(err.max())
    assert not bool((q == -128).any())
    # the same as the two unfused ops on the same tier (bit for bit on the reference)
    residual_again = before.clone() if with_residual else None
    normed = ops.add_rms_norm(x, residual_again, weight, eps, gemma=gemma)[0] if with_residual else \
        ops.rms_norm(x, weight, eps, gemma=gemma)
    q2, scale2 = ops.per_token_quant_int8(normed)
    if any_branch == "reference":
        assert torch.equal(q, q2) and torch.equal(scale, scale2)
    else:  # the unfused rms_norm kernel may sum the squares in another order
        assert int((q.to(torch.int32) - q2.to(torch.int32)).abs().max()) <= 1
        assert float((q != q2).double().mean()) < 0.01
        assert relative_error(scale, scale2) < 1e-2


def test_rms_norm_quant_int8_rejects_bad_input():
    x = torch.randn(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"weight has length .* 32, expected 64"):
        ops.rms_norm_quant_int8(x, torch.ones(32))
    with pytest.raises(ValueError, match="residual has dtype float32"):
        ops.add_rms_norm_quant_int8(x, torch.zeros(2, 64), torch.ones(64))
    with pytest.raises(ValueError, match="residual must be contiguous"):
        ops.add_rms_norm_quant_int8(x, torch.zeros(64, 2, dtype=torch.float16).t(), torch.ones(64))


# --------------------------------------------------------------------------
# w8a8_int8_linear
# --------------------------------------------------------------------------

LINEAR_CASES = [  # (lead, n, k, bias, scale [N, 1])
    ((1,), 1, 1, False, False),
    ((3,), 40, 31, True, True),  # K < 32: the int8 tile is zero-padded to 32
    ((2, 5), 130, 70, True, False),
    ((17,), 33, 256, False, True),
]


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_w8a8_int8_linear(any_branch, out_dtype, case, poisoned_empty):
    lead, n, k, with_bias, column_scale = case
    generator = torch.Generator().manual_seed(n + k)
    q_x = torch.randint(-127, 128, (*lead, k), generator=generator).to(torch.int8)
    q_w = torch.randint(-128, 128, (n, k), generator=generator).to(torch.int8)
    x_scale = torch.rand((*lead, 1), generator=generator) * 0.05 + 1e-3
    w_scale = torch.rand(n, generator=generator) * 0.02 + 1e-3
    bias = torch.randn(n, generator=generator).to(out_dtype) if with_bias else None
    y = ops.w8a8_int8_linear(q_x, x_scale, q_w, w_scale.view(n, 1) if column_scale else w_scale, bias,
                             out_dtype=out_dtype)
    assert y.shape == (*lead, n) and y.dtype == out_dtype
    expected = (dot64(q_x.reshape(-1, k), q_w).to(torch.float64) * x_scale.reshape(-1, 1).double()
                * w_scale.double()[None, :])
    if bias is not None:
        expected += bias.double()
    assert_close(y.reshape(-1, n), expected, out_dtype)


def test_int8_dot_accumulates_exactly_in_int32(any_branch):
    """Partial sums pass 2**26 before cancelling: a float32 accumulator would be off, int32 is exact."""
    k, n = 4096, 8
    generator = torch.Generator().manual_seed(0)
    half = torch.randint(101, 128, (n, k // 2), generator=generator)
    q_w = torch.cat([half, -half], dim=1)
    q_w[:, -1] += torch.arange(n) * 3 + 1  # a small, odd residual per row
    q_w = q_w.to(torch.int8)
    q_x = torch.full((2, k), 127, dtype=torch.int8)
    q_x[1, ::2] = -127
    ones = torch.ones(2, 1)
    y = ops.w8a8_int8_linear(q_x, ones, q_w, torch.ones(n), out_dtype=torch.float32)
    exact = dot64(q_x, q_w)
    assert exact.abs().max() < 2**24  # the result itself is a float32 integer
    assert torch.equal(y, exact.to(torch.float32))


def test_w8a8_int8_linear_rejects_bad_input():
    q_x = torch.zeros(3, 64, dtype=torch.int8)
    xs = torch.ones(3, 1)
    q_w = torch.zeros(16, 64, dtype=torch.int8)
    ws = torch.ones(16)
    cases = [
        (lambda: ops.w8a8_int8_linear(q_x, xs, q_w.float(), ws), "q_w has dtype float32"),
        (lambda: ops.w8a8_int8_linear(q_x.float(), xs, q_w, ws), "q_x has dtype float32"),
        (lambda: ops.w8a8_int8_linear(q_x, xs, q_w, torch.ones(16, 2)), r"w_scale has shape \(16, 2\).*\[N\]"),
        (lambda: ops.w8a8_int8_linear(q_x, xs, q_w, ws.half()), "w_scale has dtype float16"),
        (lambda: ops.w8a8_int8_linear(q_x, torch.ones(3), q_w, ws), r"x_scale has shape \(3,\).*\[\.\.\., 1\]"),
        (lambda: ops.w8a8_int8_linear(q_x, xs.double(), q_w, ws), "x_scale has dtype float64"),
        (lambda: ops.w8a8_int8_linear(q_x[:, :32], xs, q_w, ws), "K=64"),
        (lambda: ops.w8a8_int8_linear(q_x, xs, q_w, ws, torch.zeros(15)), "bias has shape"),
        (lambda: ops.w8a8_int8_linear(q_x, xs, q_w, ws, out_dtype=torch.int32), "out_dtype"),
        (lambda: ops.w8a8_int8_linear(torch.zeros(1, 131073, dtype=torch.int8), torch.ones(1, 1),
                                      torch.zeros(1, 131073, dtype=torch.int8), torch.ones(1)), "overflow"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# --------------------------------------------------------------------------
# fused_moe_w8a8
# --------------------------------------------------------------------------

def silu64(g):
    return g / (1.0 + torch.exp(-g))


def moe_w8a8_float64(x, w13, w2, s13, s2, topk_weights, topk_ids):
    """The documented W8A8 MoE math, token by token, in float64 (quantization steps included)."""
    q_x, sx, _ = quantize64(x)
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate_up = dot64(q_x[t:t + 1], w13[e]).double() * sx[t] * s13[e].double()
            h = silu64(gate_up[:, :inter]) * gate_up[:, inter:]
            q_h, sh, _ = quantize64(h)
            y = dot64(q_h, w2[e]).double() * sh * s2[e].double()
            out[t] += float(topk_weights[t, j]) * y[0]
    return out


def moe_inputs(num_tokens, hidden, inter, num_experts, top_k, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    w13 = torch.randint(-128, 128, (num_experts, 2 * inter, hidden), generator=generator).to(torch.int8)
    w2 = torch.randint(-128, 128, (num_experts, hidden, inter), generator=generator).to(torch.int8)
    s13 = torch.rand(num_experts, 2 * inter, 1, generator=generator) * 0.002 + 1e-4
    s2 = torch.rand(num_experts, hidden, generator=generator) * 0.002 + 1e-4
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    topk_weights, topk_ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return x, w13, w2, s13, s2, topk_weights, topk_ids.to(torch.int32)


# the intermediate is quantized to int8 from float32; float64 may round one element of it the
# other way right at a .5 tie (one int8 step of one element, ~1e-3 of the output at these sizes)
MOE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: TOLERANCE[torch.bfloat16]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k", [
    (1, 64, 32, 4, 1), (5, 96, 48, 8, 3), (33, 40, 24, 3, 2),
])
def test_fused_moe_w8a8(any_branch, dtype, num_tokens, hidden, inter, num_experts, top_k, poisoned_empty):
    x, w13, w2, s13, s2, topk_weights, topk_ids = moe_inputs(num_tokens, hidden, inter, num_experts, top_k, dtype,
                                                              seed=num_tokens + hidden)
    y = ops.fused_moe_w8a8(x, w13, w2, s13, s2, topk_weights, topk_ids)
    assert y.shape == x.shape and y.dtype == dtype
    expected = moe_w8a8_float64(x, w13, w2, s13.squeeze(-1), s2, topk_weights, topk_ids)
    err = relative_error(y, expected)
    assert err <= MOE_TOLERANCE[dtype], f"relative error {err:.3g} ({dtype})"


def test_fused_moe_w8a8_out_and_int64_ids(any_branch):
    x, w13, w2, s13, s2, topk_weights, topk_ids = moe_inputs(4, 64, 32, 4, 2, torch.float16, seed=7)
    out = torch.full_like(x, float("nan"))
    y = ops.fused_moe_w8a8(x, w13, w2, s13, s2, topk_weights, topk_ids.long(), out=out)
    assert y is out
    assert relative_error(out, moe_w8a8_float64(x, w13, w2, s13.squeeze(-1), s2, topk_weights, topk_ids)) < 2e-3


def test_fused_moe_w8a8_rejects_bad_input():
    x, w13, w2, s13, s2, topk_weights, topk_ids = moe_inputs(2, 64, 32, 4, 2, torch.float16, seed=1)
    cases = [
        (lambda: ops.fused_moe_w8a8(x, w13.float(), w2, s13, s2, topk_weights, topk_ids), "w13 has dtype float32"),
        (lambda: ops.fused_moe_w8a8(x, w13, w2.to(torch.uint8), s13, s2, topk_weights, topk_ids), "w2 has dtype uint8"),
        (lambda: ops.fused_moe_w8a8(x, w13, w2, s13[:, :32], s2, topk_weights, topk_ids),
         r"w13_scale has shape \(4, 32, 1\).*\[E, 2I\]"),
        (lambda: ops.fused_moe_w8a8(x, w13, w2, s13, s2.half(), topk_weights, topk_ids), "w2_scale has dtype float16"),
        (lambda: ops.fused_moe_w8a8(x, w13, w2[:, :, :16], s13, s2, topk_weights, topk_ids), "w2 has shape"),
        (lambda: ops.fused_moe_w8a8(x[:, :32], w13, w2, s13, s2, topk_weights, topk_ids), "w13 has shape"),
        (lambda: ops.fused_moe_w8a8(x, w13, w2, s13, s2, topk_weights, topk_ids, activation="relu"), "activation"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# --------------------------------------------------------------------------
# checkpoint converters and configs
# --------------------------------------------------------------------------

# What compressed-tensors writes for its INT8 (INT8_W8A8) preset, format int-quantized, as
# QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("INT8", ["Linear"])},
# format="int-quantized").model_dump(mode="json"); test_configs_match_compressed_tensors checks it
# against the installed package (slow: importing it takes seconds).
INT8_W8A8_CONFIG = {
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
                    "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                              "strategy": "token", "dynamic": True},
        "output_activations": None, "format": None}},
    "quant_method": "compressed-tensors", "kv_cache_scheme": None, "format": "int-quantized",
    "quantization_status": "initialized", "global_compression_ratio": None, "ignore": [], "moe_sparsity_config": None,
}


def _with_scheme(part: str, **changes) -> dict:
    """INT8_W8A8_CONFIG with group_0's ``part`` changed (None removes it)."""
    group = dict(INT8_W8A8_CONFIG["config_groups"]["group_0"])
    group[part] = None if changes.get("remove") else {**group[part], **changes}
    return {**INT8_W8A8_CONFIG, "config_groups": {"group_0": group}}


def test_quant_config_accepts_int8_w8a8_and_smooth_quant():
    assert ops.w8a8_check_quant_config(INT8_W8A8_CONFIG) == "compressed-tensors"
    assert ops.w8a8_check_quant_config({"quant_method": "smooth_quant", "quant_dtype": "int8"}) == "smooth_quant"
    assert ops.w8a8_check_quant_config({"quant_method": "smooth_quant"}) == "smooth_quant"


@pytest.mark.parametrize("config,message", [
    (_with_scheme("weights", type="float"), r"weights.type='float'.*FP8 card; the C500 has none"),
    (_with_scheme("input_activations", remove=True), "group_0.input_activations is missing"),
    (_with_scheme("weights", num_bits=4, strategy="group", group_size=128), "weights.num_bits=4"),
    (_with_scheme("weights", strategy="tensor"), "weights.strategy='tensor'"),
    (_with_scheme("input_activations", dynamic=False), "input_activations.dynamic=False"),
    (_with_scheme("weights", symmetric=False), "weights.symmetric=False"),
    ({**INT8_W8A8_CONFIG, "format": "float-quantized"}, "format='float-quantized'"),
    ({"quant_method": "smooth_quant", "quant_dtype": "float8_e4m3fn"}, "quant_dtype='float8_e4m3fn'.*no"),
    ({"quant_method": "awq", "bits": 4}, "quant_method='awq'"),
])
def test_quant_config_rejects_other_schemes(config, message):
    with pytest.raises(ValueError, match=message):
        ops.w8a8_check_quant_config(config)


@pytest.mark.slow
def test_configs_match_compressed_tensors():
    """The hand-written config is the installed compressed-tensors' own; its FP8 presets are refused."""
    qt = pytest.importorskip("compressed_tensors.quantization")

    def dump(preset: str, fmt: str) -> dict:
        scheme = qt.preset_name_to_scheme(preset, ["Linear"])
        return qt.QuantizationConfig(config_groups={"group_0": scheme}, format=fmt).model_dump(mode="json")

    assert dump("INT8", "int-quantized") == INT8_W8A8_CONFIG
    assert ops.w8a8_check_quant_config(dump("W8A8", "int-quantized")) == "compressed-tensors"
    for preset in ("FP8", "FP8_DYNAMIC"):
        with pytest.raises(ValueError, match="FP8"):
            ops.w8a8_check_quant_config(dump(preset, "float-quantized"))


@pytest.mark.parametrize("scale_dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("experts", (None, 3))
def test_converters_keep_values_and_make_fp32_per_channel_scales(scale_dtype, experts):
    generator = torch.Generator().manual_seed(5)
    lead = (experts,) if experts else ()
    weight = torch.randint(-128, 128, (*lead, 24, 40), generator=generator).to(torch.int8)
    scale = (torch.rand(*lead, 24, 1, generator=generator) * 0.01).to(scale_dtype)
    for q_w, w_scale in (ops.w8a8_from_compressed_tensors(weight, scale, torch.zeros(*lead, 24, 1, dtype=torch.int8)),
                         ops.w8a8_from_lmdeploy(weight, scale)):
        assert torch.equal(q_w, weight)
        assert w_scale.dtype == torch.float32 and w_scale.shape == (*lead, 24)
        # dequantized: W[n, k] = q[n, k] * scale[n], as the checkpoint means it
        assert torch.equal(q_w.double() * w_scale.double().unsqueeze(-1), weight.double() * scale.double())
    # the converted weight feeds the linear op directly
    if experts is None:
        q_w, w_scale = ops.w8a8_from_compressed_tensors(weight, scale)
        x = torch.randn(3, 40, generator=generator)
        q_x, x_scale = ops.per_token_quant_int8(x)
        y = ops.w8a8_int8_linear(q_x, x_scale, q_w, w_scale, out_dtype=torch.float32)
        dense = x.double() @ (weight.double() * scale.double()).t()
        assert relative_error(y, dense) < 2e-2  # int8 activation rounding


def test_converters_reject_bad_checkpoints():
    weight = torch.zeros(24, 40, dtype=torch.int8)
    scale = torch.ones(24, 1)
    cases = [
        (lambda: ops.w8a8_from_compressed_tensors(weight.to(torch.float8_e4m3fn), scale),
         r"weight has dtype float8_e4m3fn; expected int8 \[\.\.\., N, K\].*no FP8"),
        (lambda: ops.w8a8_from_compressed_tensors(weight, torch.ones(24, 5)),
         r"weight_scale has shape \(24, 5\), expected \(24, 1\)"),
        (lambda: ops.w8a8_from_compressed_tensors(weight, torch.ones(1)), "weight_scale has shape"),
        (lambda: ops.w8a8_from_compressed_tensors(weight, scale, torch.ones(24, 1, dtype=torch.int8)), "asymmetric"),
        (lambda: ops.w8a8_from_lmdeploy(weight.float(), scale), "weight has dtype float32"),
        (lambda: ops.w8a8_from_lmdeploy(weight, torch.ones(40, 1)), r"scale has shape \(40, 1\), expected \(24, 1\)"),
        (lambda: ops.w8a8_from_lmdeploy(weight, scale.to(torch.int32)), "scale has dtype int32"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# --------------------------------------------------------------------------
# the device build (sm_80, no GPU): int8 mma, no spills
# --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ("default", "MXC500"))
def test_kernels_compile_for_gpu_without_spills(gpu_builds, family):
    """sm_80 builds with the stand-in's and MACA's launch tables: int8 tl.dot builds, no spills, MACA's limits."""
    from maca_infer.common.ops import _launch

    builds = gpu_builds("""
        import torch
        from maca_infer.common.ops import _launch
        from maca_infer.common.ops.w8a8 import (add_rms_norm_quant_int8, fused_moe_w8a8, per_token_quant_int8,
                                                 rms_norm_quant_int8, w8a8_int8_linear)
        with _launch.use_family(FAMILY):
            per_token_quant_int8(torch.randn(4, 7168, dtype=torch.bfloat16))
            per_token_quant_int8(torch.randn(2, 18432, dtype=torch.bfloat16))  # two passes
            rms_norm_quant_int8(torch.randn(4, 4096, dtype=torch.bfloat16), torch.ones(4096, dtype=torch.bfloat16))
            add_rms_norm_quant_int8(torch.randn(2, 9000, dtype=torch.bfloat16),
                                    torch.randn(2, 9000, dtype=torch.bfloat16),
                                    torch.ones(9000, dtype=torch.bfloat16))  # three passes
            for t in (1, 64):
                w8a8_int8_linear(torch.zeros(t, 4096, dtype=torch.int8), torch.ones(t, 1),
                                 torch.zeros(512, 4096, dtype=torch.int8), torch.ones(512), torch.zeros(512),
                                 out_dtype=torch.bfloat16)
            ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
            fused_moe_w8a8(torch.randn(2, 256, dtype=torch.bfloat16), torch.zeros(4, 256, 256, dtype=torch.int8),
                           torch.zeros(4, 256, 128, dtype=torch.int8), torch.ones(4, 256), torch.ones(4, 256),
                           torch.ones(2, 2), ids)
    """.replace("FAMILY", repr(family)))
    kernels = [b["kernel"] for b in builds]
    assert kernels[:6] == (["_per_token_quant_kernel_fn"] * 2 + ["_rms_norm_quant_kernel_fn"] * 2
                           + ["_w8a8_gemm_kernel_fn"] * 2)
    assert [b["constexprs"]["SINGLE_BLOCK"] for b in builds[:4]] == [True, False, True, False]
    assert "_moe_w8a8_gate_up_kernel_fn" in kernels and "_moe_w8a8_down_kernel_fn" in kernels
    for build in builds:
        assert build["usage"]["LOCAL"] == 0, build
        if family != "default":  # MACA: 64 KiB of shared memory and 512 threads (of 64-wide warps) a block
            assert build["shared"] <= _launch.MACA_SHARED_MEMORY, build
            assert build["num_warps"] * _launch.MACA_WARP_SIZE <= _launch.MACA_MAX_THREADS, build


def test_kernels_use_nothing_macas_triton_lacks():
    """MACA_TARGET.md rule 3: no tl.extra (libdevice, PTX helpers), inline asm or TMA descriptors."""
    import inspect
    import re

    from maca_infer.common.ops._jit import lazy_jit

    kernels = [v for v in vars(w8a8).values() if isinstance(v, lazy_jit)]  # the shared helpers they call too
    assert len([k for k in kernels if k.fn.__module__ == w8a8.__name__]) == 7
    for kernel in kernels:
        code = re.sub(r'"""[\s\S]*?"""|#.*', "", inspect.getsource(kernel.fn))
        for pattern in (r"\btl\.extra\b", r"inline_asm", r"libdevice", r"tensor_descriptor|TensorDescriptor"):
            assert not re.search(pattern, code), (kernel.fn.__name__, pattern)
