"""Every ``dlinfer.ops`` function LMDeploy 0.18 calls, called the way LMDeploy calls it.

Each test goes through LMDeploy's own wrapper in
``lmdeploy.pytorch.kernels.dlinfer`` (positional arguments, int32 lengths on
the host, flat slot indices, caches [num_blocks, block_size, kv_heads,
head_dim]) into maca-infer's implementation, and compares with a float64
computation written here (or with Hugging Face's rotary function).
"""

from __future__ import annotations

import math
import types

import pytest
import torch

# Largest error relative to the largest magnitude of the float64 answer (as in
# tests/ops): one fp16/bf16 rounding of the output plus the interpreter's
# truncation to bf16. Tight enough that a 2% scale error (attention scale,
# norm weight, routing weight) fails in every dtype (issue #18).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def _close(actual, expected, dtype):
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "non-finite output"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:.3g} ({dtype})"


@pytest.fixture(scope="module")
def kernels(dlinfer_ours):
    import lmdeploy.pytorch.kernels.dlinfer as kernels

    return kernels


# --------------------------------------------------------------------------- norms, activation, rotary


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_and_add_rms_norm(kernels, dtype):
    torch.manual_seed(0)
    x = torch.randn(7, 96, dtype=dtype)
    residual = torch.randn(7, 96, dtype=dtype)
    weight = torch.randn(96, dtype=dtype)
    eps = 1e-5

    def ref(t):
        t = t.double()
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight.double()

    out = kernels.rms_norm(x, weight, eps)
    assert out.dtype == dtype and out.shape == x.shape
    _close(out, ref(x), dtype)

    expected_residual = x.double() + residual.double()
    residual_in = residual.clone()
    normed, residual_out = kernels.rms_norm(x, weight, eps, residual=residual_in)
    assert residual_out.data_ptr() == residual_in.data_ptr(), "LMDeploy relies on the in-place residual update"
    _close(residual_out, expected_residual, dtype)
    _close(normed, ref(residual_out), dtype)


def test_silu_and_mul(kernels):
    from lmdeploy.pytorch.kernels.dlinfer.activation import silu_and_mul

    x = torch.randn(5, 2 * 48, dtype=torch.float16)

    out = silu_and_mul(x)
    x64 = x.double()
    _close(out, torch.nn.functional.silu(x64[:, :48]) * x64[:, 48:], torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_rotary_pos_emb_matches_hf(kernels, dtype):
    """LMDeploy's dlinfer rotary tables + our op == Hugging Face's llama rotary."""
    from lmdeploy.pytorch.backends.dlinfer.rotary_embedding import DlinferRotaryEmbeddingImpl
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary

    torch.manual_seed(1)
    num_tokens, hq, hk, head_dim = 11, 4, 2, 32
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 17, 40]])
    q = torch.randn(num_tokens, hq, head_dim, dtype=dtype)
    k = torch.randn(num_tokens, hk, head_dim, dtype=dtype)
    rope = DlinferRotaryEmbeddingImpl(head_dim, base=10000)
    cos, sin = rope(q, positions)  # [1, T, D] in dtype

    q_embed, k_embed = kernels.apply_rotary_pos_emb(q, k, cos, sin, None, None)
    assert q_embed.shape == q.shape and k_embed.shape == k.shape and q_embed.dtype == dtype

    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions[0].double()[:, None] * inv_freq[None]
    cos64 = torch.cat([angles.cos(), angles.cos()], -1)[None]  # [1, T, D]
    sin64 = torch.cat([angles.sin(), angles.sin()], -1)[None]
    # HF: [B, H, T, D] with unsqueeze_dim=1
    q_ref, k_ref = hf_apply_rotary(q.double().transpose(0, 1)[None], k.double().transpose(0, 1)[None], cos64, sin64)
    _close(q_embed, q_ref[0].transpose(0, 1), dtype)
    _close(k_embed, k_ref[0].transpose(0, 1), dtype)


# --------------------------------------------------------------------------- KV cache + attention through LMDeploy's attention impl


def _reference_attention(q, keys, values, q_positions, scale):
    """float64 causal attention for one sequence: q [t, Hq, D] at absolute positions
    q_positions, keys/values [kv, Hk, D] at positions 0..kv-1."""
    hq, hk = q.shape[1], keys.shape[1]
    group = hq // hk
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,khd->htk", q.double(), k) * scale
    key_pos = torch.arange(keys.shape[0])
    mask = key_pos[None, :] > q_positions[:, None]
    scores = scores.masked_fill(mask[None], float("-inf"))
    return torch.einsum("htk,khd->thd", scores.softmax(-1), v)


def _step(is_decoding, q_lens, kv_lens, block_offsets, caches):
    """A stand-in for LMDeploy's StepContext with the fields update_step_context reads."""
    q = torch.tensor(q_lens)
    return types.SimpleNamespace(
        is_decoding=is_decoding,
        q_seqlens=q,
        kv_seqlens=torch.tensor(kv_lens),
        q_start_loc=torch.cumsum(q, 0) - q,
        block_offsets=block_offsets,
        kv_caches=caches,
        max_q_seqlen=None,
        max_kv_seqlen=None,
        sum_kv_seqlen=sum(kv_lens),
        kv_quant_policy=0,
        attn_metadata=None,
    )


@pytest.fixture(scope="module")
def maca_backend(dlinfer_ours):
    # importing LMDeploy's maca op backend runs the adapter's fix (import hook)
    from lmdeploy.pytorch.backends.dlinfer.maca import MacaOpsBackend

    from maca_infer.adapters.lmdeploy.patching import is_patched

    assert is_patched(MacaOpsBackend, "update_step_context")
    return MacaOpsBackend


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_prefill_prefix_and_decode(maca_backend, block_size, dtype):
    """Three engine steps through DlinferAttentionImpl: a fresh prefill, a prefill on a
    cached prefix (prefix caching / chunking), then a decode step; every step's output
    against float64 attention over everything written to the paged cache."""
    from lmdeploy.pytorch.backends.dlinfer.attention import DlinferAttentionImpl

    torch.manual_seed(2)
    hq, hk, head_dim = 4, 2, 32
    scale = 1.0 / math.sqrt(head_dim)
    num_blocks = 12
    key_cache = torch.zeros(num_blocks, block_size, hk, head_dim, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    caches = [(key_cache, value_cache)]
    # out-of-order physical blocks; sequence 1 spans several blocks
    blocks_needed = [1, (2 * block_size + 5 + block_size - 1) // block_size + 1]
    table = torch.zeros(2, max(blocks_needed), dtype=torch.int64)
    table[0, :1] = torch.tensor([7])
    table[1, :blocks_needed[1]] = torch.tensor([3, 9, 0, 5][:blocks_needed[1]])
    impl = DlinferAttentionImpl(num_heads=hq, head_size=head_dim, scale=scale, num_kv_heads=hk, v_head_size=head_dim)

    history_k = [torch.empty(0, hk, head_dim, dtype=dtype) for _ in range(2)]
    history_v = [torch.empty(0, hk, head_dim, dtype=dtype) for _ in range(2)]

    def run(is_decoding, q_lens):
        kv_lens = [len(history_k[b]) + q_lens[b] for b in range(2)]
        ctx = maca_backend.update_step_context(_step(is_decoding, q_lens, kv_lens, table, caches))
        meta = ctx.attn_metadata
        assert meta.cu_seqlens_q.dtype == torch.int32 and meta.q_start_loc.dtype == torch.int32
        total = sum(q_lens)
        q = torch.randn(total, hq, head_dim, dtype=dtype)
        k = torch.randn(total, hk, head_dim, dtype=dtype)
        v = torch.randn(total, hk, head_dim, dtype=dtype)
        out = impl.forward(q.clone(), k, v, key_cache, value_cache, meta, inplace=False)
        assert out.shape == (total, hq, head_dim) and out.dtype == dtype
        start = 0
        for b in range(2):
            t = q_lens[b]
            history_k[b] = torch.cat([history_k[b], k[start:start + t]])
            history_v[b] = torch.cat([history_v[b], v[start:start + t]])
            positions = torch.arange(kv_lens[b] - t, kv_lens[b])
            expected = _reference_attention(q[start:start + t], history_k[b], history_v[b], positions, scale)
            _close(out[start:start + t], expected, dtype)
            start += t
        return meta

    meta = run(False, [3, block_size + 2])
    assert meta.is_prefill_no_cache
    meta = run(False, [2, block_size + 1])  # new tokens on top of a cached prefix
    assert not meta.is_prefill_no_cache
    run(True, [1, 1])
    # the cache holds exactly what was written, at the flat slots LMDeploy's layout implies
    for b in range(2):
        for pos in range(len(history_k[b])):
            block, offset = int(table[b, pos // block_size]), pos % block_size
            torch.testing.assert_close(key_cache[block, offset], history_k[b][pos])
            torch.testing.assert_close(value_cache[block, offset], history_v[b][pos])


def test_paged_decode_with_alibi(dlinfer_ours):
    """dlinfer.ops.paged_decode_attention with ALiBi slopes (BLOOM / Baichuan-13B on LMDeploy): the
    bias ``slope_h * (j - p)`` reaches the kernel."""
    torch.manual_seed(3)
    dtype, block_size, hq, hk, head_dim = torch.float16, 16, 4, 2, 32
    kv_lens = [5, 37]
    key_cache = torch.randn(8, block_size, hk, head_dim, dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    table = torch.tensor([[6, 0, 0], [2, 7, 4]], dtype=torch.int32)
    q = torch.randn(2, hq, head_dim, dtype=dtype)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    scale = head_dim ** -0.5
    out = dlinfer_ours.paged_decode_attention(
        q, key_cache, value_cache, table, block_size, torch.tensor([1, 2], dtype=torch.int32),
        torch.tensor(kv_lens, dtype=torch.int32), max(kv_lens), hq, hk, 0, scale, slopes)
    for b, kv in enumerate(kv_lens):
        slots = [(int(table[b, pos // block_size]), pos % block_size) for pos in range(kv)]
        k = torch.stack([key_cache[blk, off] for blk, off in slots]).double().repeat_interleave(hq // hk, dim=1)
        v = torch.stack([value_cache[blk, off] for blk, off in slots]).double().repeat_interleave(hq // hk, dim=1)
        scores = torch.einsum("hd,khd->hk", q[b].double(), k) * scale
        scores = scores + slopes.double()[:, None] * (torch.arange(kv) - (kv - 1)).double()[None, :]
        _close(out.reshape(2, hq, head_dim)[b], torch.einsum("hk,khd->hd", scores.softmax(-1), v), dtype)


def test_fill_kv_cache_flat_slots(kernels):
    """fill_kv_cache with LMDeploy's [T, 1] int64 slot column and a [T] int32 one."""
    torch.manual_seed(3)
    key_cache = torch.zeros(4, 16, 2, 32, dtype=torch.float16)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.tensor([[5], [16 * 3 + 2], [16 + 15]])
    k = torch.randn(3, 2, 32, dtype=torch.float16)
    v = torch.randn(3, 2, 32, dtype=torch.float16)
    kernels.fill_kv_cache(k, v, key_cache, value_cache, slots, [], [], quant_bits=0)
    for i, slot in enumerate(slots.view(-1).tolist()):
        torch.testing.assert_close(key_cache[slot // 16, slot % 16], k[i])
        torch.testing.assert_close(value_cache[slot // 16, slot % 16], v[i])
    assert key_cache.abs().sum(dim=(-1, -2)).count_nonzero() == 3, "only the three slots are written"
    k2 = torch.randn(1, 2, 32, dtype=torch.float16)
    kernels.fill_kv_cache(k2, k2, key_cache, value_cache, torch.tensor([63], dtype=torch.int32), [], [], quant_bits=0)
    torch.testing.assert_close(key_cache[3, 15], k2[0])
    with pytest.raises(ValueError, match="quant_bits"):
        kernels.fill_kv_cache(k, v, key_cache, value_cache, slots, [], [], quant_bits=8)


def test_prefill_attention_via_flash_attention_wrapper(kernels):
    """ext_ops.prefill_attention as LMDeploy's flash_attention_fwd calls it (no cache)."""
    torch.manual_seed(4)
    q_lens = torch.tensor([5, 9], dtype=torch.int32)
    q_start = torch.tensor([0, 5], dtype=torch.int32)
    q = torch.randn(14, 4, 32, dtype=torch.float16)
    k = torch.randn(14, 2, 32, dtype=torch.float16)
    v = torch.randn(14, 2, 32, dtype=torch.float16)
    out = torch.full_like(q, float("nan"))
    kernels.flash_attention_fwd(q, k, v, out, q_start, q_lens, q_start, q_lens, num_heads=4, num_kv_heads=2,
                                max_q_seqlen=9, sm_scale=0.2)
    for b, (s, t) in enumerate([(0, 5), (5, 9)]):
        expected = _reference_attention(q[s:s + t], k[s:s + t], v[s:s + t], torch.arange(t), 0.2)
        _close(out[s:s + t], expected, torch.float16)


# --------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_gating_and_fused_moe(kernels, renormalize):
    torch.manual_seed(5)
    tokens, hidden, inter, experts, top_k = 6, 64, 32, 4, 2
    dtype = torch.bfloat16
    logits = torch.randn(tokens, experts, dtype=dtype)
    weights, ids = kernels.moe_gating_topk_softmax(logits, top_k, None)
    probs = logits.double().softmax(-1)
    ref_w, ref_ids = probs.topk(top_k, dim=-1)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(ids.long().view(tokens, top_k).sort(-1).values, ref_ids.sort(-1).values)
    torch.testing.assert_close(weights.double().view(tokens, top_k).sort(-1).values, ref_w.sort(-1).values,
                               atol=1e-5, rtol=1e-5)

    x = torch.randn(tokens, hidden, dtype=dtype)
    gate_up = torch.randn(experts, 2 * inter, hidden, dtype=dtype) / 8
    down = torch.randn(experts, hidden, inter, dtype=dtype) / 8
    out = kernels.fused_moe(x, gate_up, down, weights, ids, top_k, renormalize, None)
    assert out.shape == x.shape and out.dtype == dtype
    w = weights.double().view(tokens, top_k)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for j in range(top_k):
            e = int(ids.view(tokens, top_k)[t, j])
            h = gate_up[e].double() @ x[t].double()
            act = torch.nn.functional.silu(h[:inter]) * h[inter:]
            expected[t] += w[t, j] * (down[e].double() @ act)
    _close(out, expected, dtype)


# --------------------------------------------------------------------------- linear layers


def test_linear(kernels):
    x = torch.randn(3, 5, 64, dtype=torch.float16)
    weight = torch.randn(48, 64, dtype=torch.float16) / 8
    bias = torch.randn(48, dtype=torch.float16)
    out = kernels.linear(x, weight, bias)
    _close(out, x.double() @ weight.double().T + bias.double(), torch.float16)


def _awq_pack(q: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15 -> int32 [R, C//8] in AWQ's GEMM order: logical column
    8j+i goes to nibble position ORDER.index(i) (AutoAWQ packs columns [0,2,4,6,1,3,5,7])."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = q.shape
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for slot, col in enumerate(order):
        packed |= q[:, col::8].long() << (4 * slot)
    return packed.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else packed.int()


@pytest.mark.parametrize("group_size", [32, 64])
def test_weight_quant_matmul_awq(kernels, group_size):
    """LMDeploy's awq_linear -> ext_ops.weight_quant_matmul on AWQ-packed int32 tensors."""
    torch.manual_seed(6)
    k, n = 128, 64
    q = torch.randint(0, 16, (k, n))
    z = torch.randint(0, 16, (k // group_size, n))
    scales = (torch.rand(k // group_size, n) * 0.05 + 0.01).half()
    qweight = _awq_pack(q)
    qzeros = _awq_pack(z)
    x = torch.randn(1, 5, k, dtype=torch.float16)
    out = kernels.awq_linear(x, qweight, scales, qzeros, None, False, group_size)
    w = (q.double() - z.double().repeat_interleave(group_size, 0)) * scales.double().repeat_interleave(group_size, 0)
    _close(out, x.double() @ w, torch.float16)
    # a second call reuses the converted weight and still gives the same result
    torch.testing.assert_close(kernels.awq_linear(x, qweight, scales, qzeros, None, False, group_size), out)


def test_paged_decode_plans_once_per_step(dlinfer_ours, monkeypatch):
    """Issue #12 (5): LMDeploy hands every layer of a step the same block table and length tensors;
    the first layer makes the ops' plan, the others reuse it (results as an unplanned call);
    a new step (new_step(), called where LMDeploy's step metadata is built), new tensors or an
    in-place update of the lengths make a new one."""
    from maca_infer.adapters.lmdeploy import dlinfer_ops
    from maca_infer.common.ops import attention

    made = []
    original = attention.plan_paged_decode
    monkeypatch.setattr(attention, "plan_paged_decode", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    torch.manual_seed(4)
    dtype, block_size, hq, hk, head_dim = torch.float32, 16, 4, 2, 32
    table = torch.tensor([[6, 0, 0], [2, 7, 4]], dtype=torch.int32)
    kv_lens = torch.tensor([5, 37], dtype=torch.int32)
    ends = torch.tensor([1, 2], dtype=torch.int32)
    layers = [(torch.randn(2, hq, head_dim, dtype=dtype), torch.randn(8, block_size, hk, head_dim, dtype=dtype),
               torch.randn(8, block_size, hk, head_dim, dtype=dtype)) for _ in range(3)]

    def step():
        return [dlinfer_ours.paged_decode_attention(q, k, v, table, block_size, ends, kv_lens, 37, hq, hk, 0, 0.2)
                for q, k, v in layers]

    dlinfer_ops.new_step()
    outs = step()
    assert len(made) == 1
    for (q, k, v), out in zip(layers, outs):
        want = attention.paged_decode_attention(q, k, v, table, kv_lens, scale=0.2)
        torch.testing.assert_close(out, want, atol=0, rtol=0)
    step()
    assert len(made) == 1  # same tensors, same step
    dlinfer_ops.new_step()
    step()
    assert len(made) == 2
    kv_lens[0] = 6  # in place: the version counter moves
    assert torch.equal(step()[0], attention.paged_decode_attention(*layers[0], table, kv_lens, scale=0.2))
    assert len(made) == 3
    kv_lens = kv_lens.clone()  # another tensor
    step()
    assert len(made) == 4
