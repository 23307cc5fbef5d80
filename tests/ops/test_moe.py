"""MoE ops: gating, moe_align_block_size, fused_moe (fp and W4A16).

Reference and Triton kernel (interpreter on CPU) are compared with
independent float64 / plain-Python computations written here: routing per
token, alignment by a Python loop over experts, expert MLPs token by token.
"""

from __future__ import annotations

import math

import pytest
import torch

from maca_infer.common.ops import _dispatch
from maca_infer.common.ops.moe import (
    fused_moe,
    fused_moe_w4a16,
    moe_align_block_size,
    moe_grouped_topk,
    moe_topk_softmax,
)
from maca_infer.common.ops.quant import pack_int4

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_routing(num_tokens: int, num_experts: int, top_k: int, seed: int):
    """Distinct experts per token (like a real router) and positive weights."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=generator) + 0.1
    return weights, ids.to(torch.int32)


# --------------------------------------------------------------------------
# gating
# --------------------------------------------------------------------------

def softmax_float64(row):
    peak = max(row)
    exps = [math.exp(v - peak) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 2), (19, 60, 4), (3, 5, 5), (40, 128, 8)])
@pytest.mark.parametrize("renormalize", (False, True))
def test_moe_topk_softmax(ops_impl, dtype, num_tokens, num_experts, top_k, renormalize):
    generator = torch.Generator().manual_seed(num_tokens * num_experts)
    logits = (torch.randn(num_tokens, num_experts, generator=generator) * 2).to(dtype)
    weights, ids = moe_topk_softmax(logits, top_k, renormalize)
    assert _dispatch.last_impl("moe_topk_softmax") == ops_impl
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (num_tokens, top_k)
    for t, row in enumerate(logits.double().tolist()):
        probs = softmax_float64(row)
        chosen = ids[t].tolist()
        assert len(set(chosen)) == top_k and all(0 <= e < num_experts for e in chosen)
        # robust to ties (bf16 logits repeat): the chosen probabilities are the k largest, descending
        assert [probs[e] for e in chosen] == pytest.approx(sorted(probs, reverse=True)[:top_k], rel=1e-6)
        expected = [probs[e] for e in chosen]
        if renormalize:
            expected = [p / sum(expected) for p in expected]
        assert weights[t].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_moe_topk_softmax_large_router_logits(ops_impl, dtype):
    """Router logits of +-80 and beyond: exp without the row max overflows float32 above 88.7
    (e^100 is inf) and underflows to 0 below -103 (then 0 / 0)."""
    logits = torch.tensor([[80.0, -80.0, 79.0, 0.0, 78.5, -3.0],
                           [-80.0, -79.5, -81.0, -78.0, -80.5, -82.0],
                           [100.0, -100.0, 99.0, 0.0, 98.5, 60.0],
                           [-120.0, -119.5, -121.0, -118.0, -120.5, -122.0]]).to(dtype)
    weights, ids = moe_topk_softmax(logits, 3, False)
    assert torch.isfinite(weights).all()
    for t, row in enumerate(logits.double().tolist()):
        probs = softmax_float64(row)
        assert weights[t].tolist() == pytest.approx([probs[e] for e in ids[t].tolist()], rel=1e-5, abs=1e-7)
        assert sorted(ids[t].tolist()) == sorted(sorted(range(6), key=lambda e: -probs[e])[:3])


def grouped_topk_float64(logits, top_k, num_groups, topk_group, renormalize, scoring, bias, scaling):
    """DeepSeek routing, token by token, in Python floats."""
    weights, ids = [], []
    for row in logits.double().tolist():
        scores = softmax_float64(row) if scoring == "softmax" else [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + b for s, b in zip(scores, bias)] if bias is not None else scores
        size = len(row) // num_groups
        groups = [choice[g * size:(g + 1) * size] for g in range(num_groups)]
        group_score = [sum(sorted(g, reverse=True)[:2]) if bias is not None else max(g) for g in groups]
        kept = sorted(range(num_groups), key=lambda g: -group_score[g])[:topk_group]
        candidates = [e for g in kept for e in range(g * size, (g + 1) * size)]
        chosen = sorted(candidates, key=lambda e: -choice[e])[:top_k]
        w = [scores[e] for e in chosen]
        if renormalize:
            w = [v / (sum(w) + 1e-20) for v in w]
        weights.append([v * scaling for v in w])
        ids.append(chosen)
    return weights, ids


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("case", [
    # DeepSeek-V3 style: sigmoid, correction bias, renormalize, scaling
    dict(num_experts=16, top_k=4, num_expert_group=4, topk_group=2, renormalize=True, scoring="sigmoid",
         with_bias=True, routed_scaling_factor=2.5),
    # DeepSeek-V3 proportions (256 experts / 8 groups, keep 4, top 8), scaled down
    dict(num_experts=64, top_k=8, num_expert_group=8, topk_group=4, renormalize=True, scoring="sigmoid",
         with_bias=True, routed_scaling_factor=2.5),
    # DeepSeek-V2 style: softmax, no bias, group max
    dict(num_experts=12, top_k=3, num_expert_group=3, topk_group=2, renormalize=False, scoring="softmax",
         with_bias=False, routed_scaling_factor=1.0),
])
def test_moe_grouped_topk(ops_impl, dtype, case):
    generator = torch.Generator().manual_seed(case["num_experts"])
    num_tokens = 9
    logits = (torch.randn(num_tokens, case["num_experts"], generator=generator) * 2).to(dtype)
    bias = torch.randn(case["num_experts"], generator=generator) if case["with_bias"] else None
    weights, ids = moe_grouped_topk(
        logits, case["top_k"], num_expert_group=case["num_expert_group"], topk_group=case["topk_group"],
        renormalize=case["renormalize"], scoring=case["scoring"], correction_bias=bias,
        routed_scaling_factor=case["routed_scaling_factor"])
    assert _dispatch.last_impl("moe_grouped_topk") == ops_impl
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    exp_w, exp_ids = grouped_topk_float64(logits, case["top_k"], case["num_expert_group"], case["topk_group"],
                                          case["renormalize"], case["scoring"],
                                          None if bias is None else bias.tolist(), case["routed_scaling_factor"])
    for t in range(num_tokens):
        order = sorted(range(case["top_k"]), key=lambda j: ids[t, j].item())
        exp_order = sorted(range(case["top_k"]), key=lambda j: exp_ids[t][j])
        assert [ids[t, j].item() for j in order] == [exp_ids[t][j] for j in exp_order]
        assert [weights[t, j].item() for j in order] == pytest.approx([exp_w[t][j] for j in exp_order], rel=1e-5)


def test_grouped_topk_bias_changes_selection_not_weights(ops_impl):
    logits = torch.zeros(1, 8)
    logits[0, :4] = 1.0  # experts 0-3 score higher without bias
    bias = torch.zeros(8)
    bias[4:] = 10.0  # the bias pulls the choice to experts 4-7
    weights, ids = moe_grouped_topk(logits, 2, num_expert_group=2, topk_group=1, renormalize=False,
                                    scoring="sigmoid", correction_bias=bias)
    assert set(ids[0].tolist()) <= {4, 5, 6, 7}
    assert weights[0].tolist() == pytest.approx([0.5, 0.5])  # sigmoid(0): the unbiased score


def test_gating_rejects_bad_input():
    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match="top_k=9"):
        moe_topk_softmax(logits, 9)
    with pytest.raises(ValueError, match=r"router_logits must be \[T, E\]"):
        moe_topk_softmax(logits[0], 2)
    with pytest.raises(ValueError, match="dtype int64"):
        moe_topk_softmax(logits.long(), 2)
    with pytest.raises(ValueError, match="num_expert_group=3"):
        moe_grouped_topk(logits, 2, num_expert_group=3, topk_group=1, renormalize=True)
    with pytest.raises(ValueError, match="scoring='relu'"):
        moe_grouped_topk(logits, 2, num_expert_group=2, topk_group=1, renormalize=True, scoring="relu")
    with pytest.raises(ValueError, match="top_k=5 exceeds"):
        moe_grouped_topk(logits, 5, num_expert_group=2, topk_group=1, renormalize=True)
    with pytest.raises(ValueError, match="correction_bias has shape"):
        moe_grouped_topk(logits, 2, num_expert_group=2, topk_group=1, renormalize=True,
                         correction_bias=torch.zeros(7))


# --------------------------------------------------------------------------
# moe_align_block_size
# --------------------------------------------------------------------------

def align_python(topk_ids, block_size, num_experts):
    flat = topk_ids.reshape(-1).tolist()
    numel = len(flat)
    sorted_ids, expert_ids = [], []
    for expert in range(num_experts):
        run = [a for a, e in enumerate(flat) if e == expert]
        padded = -(-len(run) // block_size) * block_size
        sorted_ids += run + [numel] * (padded - len(run))
        expert_ids += [expert] * (padded // block_size)
    return sorted_ids, expert_ids, len(sorted_ids)


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_size", [
    (1, 1, 4, 16),     # fewer assignments than experts
    (5, 2, 6, 16),
    (33, 3, 7, 8),     # runs longer than a block
    (40, 8, 64, 16),   # many experts, some empty
    (300, 4, 8, 64),   # several scan chunks in the kernel
])
@pytest.mark.parametrize("id_dtype", (torch.int32, torch.int64))
def test_moe_align_block_size(ops_impl, num_tokens, top_k, num_experts, block_size, id_dtype):
    _, ids = random_routing(num_tokens, num_experts, top_k, seed=num_tokens + num_experts)
    ids = ids.to(id_dtype)
    sorted_ids, expert_ids, num_post_pad = moe_align_block_size(ids, block_size, num_experts)
    assert _dispatch.last_impl("moe_align_block_size") == ops_impl
    exp_sorted, exp_experts, exp_total = align_python(ids, block_size, num_experts)
    numel = ids.numel()
    max_padded = min(numel + num_experts * (block_size - 1), numel * block_size)
    assert sorted_ids.dtype == expert_ids.dtype == num_post_pad.dtype == torch.int32
    assert sorted_ids.shape == (max_padded,) and expert_ids.shape == (max_padded // block_size,)
    assert num_post_pad.tolist() == [exp_total]
    assert sorted_ids.tolist() == exp_sorted + [numel] * (max_padded - exp_total)
    tail = max_padded // block_size - len(exp_experts)
    assert expert_ids.tolist() == exp_experts + [-1] * tail


def test_moe_align_rejects_bad_input():
    ids = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_size=12"):
        moe_align_block_size(ids, 12, 4)
    with pytest.raises(ValueError, match="dtype float32"):
        moe_align_block_size(ids.float(), 16, 4)
    with pytest.raises(ValueError, match="num_experts=0"):
        moe_align_block_size(ids, 16, 0)


# --------------------------------------------------------------------------
# fused MoE
# --------------------------------------------------------------------------

def activation_float64(name, g):
    if name == "silu":
        return g / (1 + math.exp(-g))
    if name == "gelu":
        return 0.5 * g * (1 + math.erf(g / math.sqrt(2)))
    return 0.5 * g * (1 + math.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))


def moe_float64(x, w13, w2, topk_weights, topk_ids, activation="silu"):
    """Token by token: y[t] = sum_j w_j * w2[e] @ (act(gate) * up), dense float64 matmuls per token."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate_up = w13[e] @ x[t]
            h = torch.tensor([activation_float64(activation, g) for g in gate_up[:inter].tolist()],
                             dtype=torch.float64) * gate_up[inter:]
            out[t] += float(topk_weights[t, j]) * (w2[e] @ h)
    return out


FUSED_CASES = [
    # (T, H, I, E, k)
    (1, 40, 24, 4, 2),    # one decode token, ragged H and I
    (9, 72, 40, 6, 3),    # experts with several tokens and idle experts
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k", FUSED_CASES)
def test_fused_moe(ops_impl, dtype, num_tokens, hidden, inter, num_experts, top_k, close, nan_tensor):
    generator = torch.Generator().manual_seed(hidden + num_tokens)
    x = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=generator) / math.sqrt(hidden)).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=generator) / math.sqrt(inter)).to(dtype)
    weights, ids = random_routing(num_tokens, num_experts, top_k, seed=num_tokens)
    out = nan_tensor((num_tokens, hidden), dtype)
    y = fused_moe(x, w13, w2, weights, ids, out=out)
    assert y is out
    assert _dispatch.last_impl("fused_moe") == ops_impl
    close(y, moe_float64(x, w13, w2, weights, ids), dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_fused_moe_device_branch(device_branch, dtype, close, nan_tensor):
    """The card's branch (64-wide tiles, fp16/bf16 tl.dot inputs) in the interpreter; see conftest.device_branch."""
    test_fused_moe(device_branch, dtype, 9, 136, 72, 6, 3, close, nan_tensor)  # two K tiles in both GEMMs


@pytest.mark.parametrize("activation", ("gelu", "gelu_tanh"))
def test_fused_moe_activations(ops_impl, activation, close):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4, 24, generator=generator)
    w13 = torch.randn(3, 32, 24, generator=generator) / 5
    w2 = torch.randn(3, 24, 16, generator=generator) / 4
    weights, ids = random_routing(4, 3, 2, seed=3)
    y = fused_moe(x, w13, w2, weights, ids.long(), activation=activation)
    close(y, moe_float64(x, w13, w2, weights, ids, activation), torch.float32)


def test_fused_moe_reference_many_tokens_matches_float64(monkeypatch, close):
    """Emulated serving size: the expert-loop reference on a prefill-sized batch."""
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "auto")
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(64, 32, generator=generator)
    w13 = torch.randn(8, 48, 32, generator=generator) / 6
    w2 = torch.randn(8, 32, 24, generator=generator) / 5
    weights, ids = random_routing(64, 8, 2, seed=5)
    y = fused_moe(x, w13, w2, weights, ids)
    assert _dispatch.last_impl("fused_moe") == "reference"  # auto on CPU tensors
    close(y, moe_float64(x, w13, w2, weights, ids), torch.float32)


def test_fused_moe_rejects_bad_input():
    x = torch.randn(2, 16)
    w13 = torch.randn(3, 8, 16)
    w2 = torch.randn(3, 16, 4)
    weights, ids = random_routing(2, 3, 2, seed=0)
    with pytest.raises(ValueError, match="activation='relu'"):
        fused_moe(x, w13, w2, weights, ids, activation="relu")
    with pytest.raises(ValueError, match="w2 has shape"):
        fused_moe(x, w13, torch.randn(3, 16, 5), weights, ids)
    with pytest.raises(ValueError, match="dtypes must match"):
        fused_moe(x, w13.half(), w2, weights, ids)
    with pytest.raises(ValueError, match="topk_ids has dtype float32"):
        fused_moe(x, w13, w2, weights, ids.float())
    with pytest.raises(ValueError, match="must both be"):
        fused_moe(x, w13, w2, weights[:1], ids)
    with pytest.raises(ValueError, match="one device"):
        fused_moe(x, w13.to("meta"), w2, weights, ids)
    with pytest.raises(ValueError, match="w13 must be contiguous"):
        fused_moe(x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, weights, ids)
    with pytest.raises(ValueError, match="out has dtype"):
        fused_moe(x, w13, w2, weights, ids, out=torch.empty(2, 16, dtype=torch.float16))


def w4a16_experts(num_experts, rows, cols, group, with_zeros, scale_dtype, generator):
    q = torch.randint(0, 16, (num_experts, rows, cols), dtype=torch.uint8, generator=generator)
    scales = ((torch.rand(num_experts, rows, cols // group, generator=generator) * 0.5 + 0.2)
              / (4 * math.sqrt(cols))).to(scale_dtype)
    zeros = (torch.randint(0, 16, scales.shape, dtype=torch.uint8, generator=generator) if with_zeros else None)
    return q, scales, zeros


def dequant_experts_float64(q, scales, zeros, group):
    """w[e, n, k] = (q - z[e, n, k // g]) * s[e, n, k // g], by index arithmetic in float64."""
    col_group = torch.arange(q.shape[-1]) // group
    z = zeros.double() if zeros is not None else torch.full(scales.shape, 8.0, dtype=torch.float64)
    return (q.double() - z[..., col_group]) * scales.double()[..., col_group]


W4A16_CASES = [
    # (T, H, I, E, k, group_size, zeros)
    (6, 64, 32, 5, 2, 32, True),
    (3, 96, 48, 4, 1, -1, False),   # per-channel scales, ragged K tiles
    (2, 128, 64, 3, 2, 64, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k,group_size,with_zeros", W4A16_CASES)
def test_fused_moe_w4a16(ops_impl, dtype, num_tokens, hidden, inter, num_experts, top_k, group_size, with_zeros,
                         close, nan_tensor):
    generator = torch.Generator().manual_seed(hidden + inter)
    g13 = hidden if group_size == -1 else group_size
    g2 = inter if group_size == -1 else group_size
    q13, s13, z13 = w4a16_experts(num_experts, 2 * inter, hidden, g13, with_zeros, dtype, generator)
    q2, s2, z2 = w4a16_experts(num_experts, hidden, inter, g2, with_zeros, dtype, generator)
    x = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    weights, ids = random_routing(num_tokens, num_experts, top_k, seed=hidden)
    out = nan_tensor((num_tokens, hidden), dtype)
    y = fused_moe_w4a16(x, pack_int4(q13), pack_int4(q2), s13, s2, weights, ids, group_size=group_size,
                        w13_zeros=z13, w2_zeros=z2, out=out)
    assert y is out
    assert _dispatch.last_impl("fused_moe_w4a16") == ops_impl
    expected = moe_float64(x, dequant_experts_float64(q13, s13, z13, g13), dequant_experts_float64(q2, s2, z2, g2),
                           weights, ids)
    close(y, expected, dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_fused_moe_w4a16_device_branch(device_branch, dtype, close, nan_tensor):
    test_fused_moe_w4a16(device_branch, dtype, *W4A16_CASES[2], close, nan_tensor)


def test_fused_moe_w4a16_int32_packing_and_bf16_with_fp16_scales(ops_impl, close):
    """8-per-int32 packed experts are read directly; scales may be fp16 under a bf16 model."""
    generator = torch.Generator().manual_seed(21)
    q13, s13, z13 = w4a16_experts(3, 64, 64, 32, True, torch.float16, generator)
    q2, s2, z2 = w4a16_experts(3, 64, 32, 32, True, torch.float16, generator)
    x = torch.randn(4, 64, generator=generator).to(torch.bfloat16)
    weights, ids = random_routing(4, 3, 2, seed=2)
    words13 = pack_int4(q13).view(torch.int32)  # little-endian: channel 8j + i at nibble i of word j
    words2 = pack_int4(q2).view(torch.int32)
    y = fused_moe_w4a16(x, words13, words2, s13, s2, weights, ids, group_size=32, w13_zeros=z13, w2_zeros=z2)
    assert y.dtype == torch.bfloat16
    expected = moe_float64(x, dequant_experts_float64(q13, s13, z13, 32), dequant_experts_float64(q2, s2, z2, 32),
                           weights, ids)
    close(y, expected, torch.bfloat16)


def test_fused_moe_w4a16_rejects_bad_input():
    generator = torch.Generator().manual_seed(0)
    q13, s13, z13 = w4a16_experts(2, 64, 64, 32, True, torch.float16, generator)
    q2, s2, z2 = w4a16_experts(2, 64, 32, 32, True, torch.float16, generator)
    x = torch.randn(3, 64, dtype=torch.float16)
    weights, ids = random_routing(3, 2, 1, seed=0)
    args = (x, pack_int4(q13), pack_int4(q2), s13, s2, weights, ids)
    with pytest.raises(ValueError, match="group_size=48"):
        fused_moe_w4a16(*args, group_size=48)
    with pytest.raises(ValueError, match="w13_scales has shape"):
        fused_moe_w4a16(x, args[1], args[2], s2, s2, weights, ids, group_size=32)
    with pytest.raises(ValueError, match="K=32 is not a multiple of group_size=64"):
        fused_moe_w4a16(*args, group_size=64)
    with pytest.raises(ValueError, match="w2_zeros has shape"):
        fused_moe_w4a16(*args, group_size=32, w13_zeros=z13, w2_zeros=z13)
    with pytest.raises(ValueError, match="w13_qweight has dtype float16"):
        fused_moe_w4a16(x, q13.half(), *args[2:], group_size=32)
    with pytest.raises(ValueError, match="w2_qweight has shape"):
        fused_moe_w4a16(x, args[1], pack_int4(q13), *args[3:], group_size=32)
    with pytest.raises(ValueError, match="one device"):
        fused_moe_w4a16(*args, group_size=32, w13_zeros=z13.to("meta"))


# --------------------------------------------------------------------------
# the kernels also compile for a real GPU (the interpreter accepts code the compiler rejects)
# --------------------------------------------------------------------------

# Runs in a fresh interpreter: once TRITON_INTERPRET=1 has run a kernel, triton.language is
# patched for numpy in this process and cannot generate GPU code any more.
_COMPILE_SCRIPT = r"""
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from maca_infer.common.ops import moe

def compile_sm90(kernel, signature, constexprs):
    kernel = kernel.jitted(interpret=False)  # a lazy_jit kernel, with its shared helpers
    names = list(inspect.signature(kernel.fn).parameters)
    full = {name: signature.get(name, "i32") for name in names}
    full.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=kernel, signature=full,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]

def bf16_mma(ptx):
    return "mma.sync.aligned" in ptx and ".f32.bf16.bf16.f32" in ptx

result = {}
indices = dict(sorted_ids_ptr="*i32", expert_ids_ptr="*i32", num_post_pad_ptr="*i32")
for int4 in (False, True):
    weight = "*u8" if int4 else "*bf16"
    blocks = dict(INT4=int4, HAS_ZEROS=int4, DOT_FP32=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    result[f"gate_up_int4={int4}"] = bf16_mma(compile_sm90(
        moe._moe_gate_up_kernel, dict(x_ptr="*bf16", w_ptr=weight, scales_ptr="*bf16", zeros_ptr="*u8",
                                         inter_ptr="*bf16", **indices), dict(ACTIVATION=0, **blocks)))
    result[f"down_int4={int4}"] = bf16_mma(compile_sm90(
        moe._moe_down_kernel, dict(inter_ptr="*bf16", w_ptr=weight, scales_ptr="*bf16", zeros_ptr="*u8",
                                      topk_weights_ptr="*fp32", out_ptr="*fp32", **indices), blocks))
compile_sm90(moe._moe_topk_softmax_kernel, dict(logits_ptr="*bf16", weights_ptr="*fp32", ids_ptr="*i32"),
             dict(TOP_K=8, RENORMALIZE=True, BLOCK_T=16, BLOCK_E=64, BLOCK_K=8))
compile_sm90(moe._moe_grouped_topk_kernel,
             dict(logits_ptr="*fp32", bias_ptr="*fp32", weights_ptr="*fp32", ids_ptr="*i32", routed_scaling_factor="fp32"),
             dict(TOP_K=4, NUM_GROUPS=4, TOPK_GROUP=2, SIGMOID=True, HAS_BIAS=True, RENORMALIZE=True,
                  BLOCK_T=16, BLOCK_E=32, BLOCK_G=4, BLOCK_K=4))
compile_sm90(moe._moe_align_count_kernel,
             dict(topk_ids_ptr="*i32", expert_starts_ptr="*i32", expert_ids_ptr="*i32", num_post_pad_ptr="*i32"),
             dict(NUM_BINS=64, CHUNK=1024, BLOCK_CHUNK=64))
compile_sm90(moe._moe_align_scatter_kernel,
             dict(topk_ids_ptr="*i64", expert_starts_ptr="*i32", sorted_ids_ptr="*i32"), dict(CHUNK=1024))
result["routing_and_align"] = True
print(json.dumps(result))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_tensor_core_mma(compile_script):
    """Ahead-of-time compile (no GPU needed); the bf16 grouped GEMMs (plain and int4) must use mma."""
    result = compile_script(_COMPILE_SCRIPT)
    assert result == {"gate_up_int4=False": True, "down_int4=False": True, "gate_up_int4=True": True,
                      "down_int4=True": True, "routing_and_align": True}
