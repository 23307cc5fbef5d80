"""maca-infer's implementation of the ``dlinfer.ops`` interface for vendor "maca".

LMDeploy's PyTorch engine, with ``device_type="maca"``, calls these functions
through ``lmdeploy/pytorch/kernels/dlinfer/*.py`` with *positional* arguments.
The signatures below follow LMDeploy 0.18's call sites exactly (argument
order, CPU length tensors, in-place outputs); every op delegates its math to
``maca_infer.common.ops`` (Triton kernels on a device, torch references on
the emulated device).

Conventions LMDeploy uses (and the interface tests check):

- token-major activations: ``query`` [T, Hq, D], ``key``/``value`` [T, Hk, D];
  decode queries are [B, Hq, D] (one new token per sequence) or
  [B * q_len, Hq, D] for multi-token decoding;
- KV caches [num_blocks, block_size, Hk, D] (``MacaOpsBackend`` block shape);
- ``kv_indices``: flat slot ids ``block * block_size + offset``, one per new
  token ([T] or [T, 1]);
- query lengths arrive as *cumulative ends* ``cu_seqlens_q[1:]`` (LMDeploy
  calls them ``actual_q_seqlens_cpu``), kv lengths as ``kv_seqlens_cpu``; both
  may live on the CPU;
- ``attn_output`` may alias ``query[..., :Dv]``: results are computed first and
  then copied, so aliasing is safe.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from maca_infer.common import envs
from maca_infer.common import ops as mops

# what upstream dlinfer's maca vendor lacks: added to an installed upstream
# dlinfer's registry (registration.py) as well as served by ours
GAP_OPS: tuple[str, ...] = (
    "weight_quant_matmul",
    "fused_moe_w4a16",
    "w4a16_linear",
    "fill_mla_cache",
    "mla_decode",
    "mla_prefill",
    # INT8 W8A8 (LMDeploy's smooth-quant modules): upstream's maca vendor has none of them
    "dynamic_quant",
    "linear_w8a8",
    "rms_norm_w8a8",
    "add_rms_norm_w8a8",
    "fused_moe_w8a8",
)

__all__ = [
    "add_rms_norm",
    "rms_norm",
    "apply_rotary_pos_emb",
    "silu_and_mul",
    "fill_kv_cache",
    "prefill_attention",
    "paged_prefill_attention",
    "paged_decode_attention",
    "moe_gating_topk_softmax",
    "fused_moe",
    "linear",
    *GAP_OPS,
]


def _check_no_kv_quant(op: str, quant_bits: Optional[int]) -> None:
    if quant_bits not in (None, 0):
        raise ValueError(
            f"{op}: quant_bits={quant_bits!r} (quantized KV cache) is not supported on maca yet; "
            "allowed: 0 (run LMDeploy with quant_policy=0)"
        )


def _as_device_int32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.int32)


def _cu_from_ends(ends: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B] cumulative ends -> [B+1] int32 cu_seqlens starting at 0."""
    ends = _as_device_int32(ends.reshape(-1), device)
    return torch.cat([ends.new_zeros(1), ends])


def _cu_from_lengths(lengths: torch.Tensor, device: torch.device) -> torch.Tensor:
    lengths = _as_device_int32(lengths.reshape(-1), device)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0, dtype=torch.int32)])


def _write_out(result: torch.Tensor, attn_output: Optional[torch.Tensor]) -> torch.Tensor:
    if attn_output is None:
        return result
    attn_output.copy_(result.view(attn_output.shape))
    return attn_output


# --------------------------------------------------------------------------- per-step attention plans

# LMDeploy builds its attention metadata once per engine step (maca_update_step_context,
# or the graph runner's fill_buffers_maca) and passes the same block table and length
# tensors to every layer. The first layer's paged_decode_attention / mla_decode makes the
# ops' plan (validation, int32 device copies of the tables, split count, scratch) and the
# other layers reuse it; new_step() (called where the step's metadata is built) drops them.
# A plan is found by the identity of its source tensors, which the entry keeps alive, and
# by their version counters where they have one.
_step_plans: dict = {}
_MAX_STEP_PLANS = 16  # a caller that never calls new_step() cannot grow the table past this


def new_step() -> None:
    """An engine step's metadata was (re)built: the previous step's attention plans are stale."""
    _step_plans.clear()


def _step_plan(key: tuple, sources: tuple, make):
    full_key = key + tuple((id(t), _tensor_version(t)) for t in sources)
    entry = _step_plans.get(full_key)
    if entry is not None and all(a is b for a, b in zip(entry[0], sources)):
        return entry[1]
    if len(_step_plans) >= _MAX_STEP_PLANS:
        _step_plans.clear()
    plan = make()
    _step_plans[full_key] = (sources, plan)
    return plan


def mops_attention():
    from maca_infer.common.ops import attention

    return attention


def mops_mla():
    from maca_infer.common.ops import mla

    return mla


# --------------------------------------------------------------------------- norms


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """RMSNorm.

    Args:
        hidden_states: [..., H] fp16/bf16/fp32.
        weight: [H].
        epsilon: added to mean(x^2).

    Returns:
        [..., H] in ``hidden_states.dtype``: ``x / sqrt(mean(x^2) + eps) * w`` (fp32 math).
    """
    return mops.rms_norm(hidden_states, weight, float(epsilon))


def add_rms_norm(
    hidden_states: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm.

    Args:
        hidden_states: [..., H].
        residual: [..., H]; updated IN PLACE to ``hidden_states + residual``.
        weight: [H].

    Returns:
        (normed [..., H], residual) where ``normed = rms_norm(residual)``.
    """
    return mops.add_rms_norm(hidden_states, residual, weight, float(epsilon))


# --------------------------------------------------------------------------- rotary / activation


def apply_rotary_pos_emb(
    query: torch.Tensor,
    key: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    *unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style rotary embedding with LMDeploy's full-width cos/sin tables.

    Args:
        query: [T, Hq, D] (any leading shape that flattens to T tokens: [1, T, Hq, D] too).
        key: [T, Hk, D].
        cos, sin: [..., T, R] with the two halves equal (``cat(freqs, freqs)``), as
            LMDeploy's dlinfer rotary embedding builds them; R <= D (dims >= R pass through).

    Returns:
        (q_embed, k_embed) new tensors shaped like ``query``/``key``:
        ``x1' = x1 cos - x2 sin``, ``x2' = x2 cos + x1 sin`` on the halves of the first R dims.
    """
    if cos is None or sin is None:
        raise ValueError("apply_rotary_pos_emb: cos and sin are required (got None)")
    head_dim = query.shape[-1]
    rot = cos.shape[-1]
    if rot % 2 or rot > head_dim:
        raise ValueError(
            f"apply_rotary_pos_emb: rotary width {rot} must be even and <= head_dim {head_dim}"
        )
    q = query.reshape(-1, query.shape[-2], head_dim)
    k = key.reshape(-1, key.shape[-2], key.shape[-1])
    num_tokens = q.shape[0]
    cos_half = cos.reshape(-1, rot)[:, : rot // 2]
    sin_half = sin.reshape(-1, rot)[:, : rot // 2]
    if cos_half.shape[0] != num_tokens:
        raise ValueError(
            f"apply_rotary_pos_emb: cos/sin hold {cos_half.shape[0]} positions for {num_tokens} tokens"
        )
    q_out, k_out = mops.apply_rotary(q, k, cos_half, sin_half, style="neox")
    return q_out.view(query.shape), k_out.view(key.shape)


def silu_and_mul(input_tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """SwiGLU: ``silu(x[..., :d]) * x[..., d:]`` for x [..., 2d] -> [..., d]."""
    if dim not in (-1, input_tensor.dim() - 1):
        raise ValueError(f"silu_and_mul: dim={dim!r} is not supported; allowed: -1 (the last dim)")
    return mops.silu_and_mul(input_tensor)


# --------------------------------------------------------------------------- KV cache and attention


def fill_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_indices: torch.Tensor,
    k_scales_zeros: Sequence[Optional[torch.Tensor]] = (),
    v_scales_zeros: Sequence[Optional[torch.Tensor]] = (),
    quant_bits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write new tokens' K/V into the paged cache.

    Args:
        key: [T, Hk, D]; value: [T, Hk, Dv].
        key_cache: [NB, BS, Hk, D]; value_cache: [NB, BS, Hk, Dv] (written in place).
        kv_indices: [T] or [T, 1] flat slots ``block * BS + offset`` (int32/int64); -1 skips.

    Returns:
        (key_cache, value_cache).
    """
    _check_no_kv_quant("fill_kv_cache", quant_bits)
    slots = kv_indices.reshape(-1)
    if slots.numel() != key.shape[0]:
        raise ValueError(
            f"fill_kv_cache: {slots.numel()} kv_indices for {key.shape[0]} tokens; need one slot per token"
        )
    mops.fill_kv_cache(key, value, key_cache, value_cache, slots)
    return key_cache, value_cache


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: Optional[torch.Tensor],
    value_cache: Optional[torch.Tensor],
    q_seq_len: torch.Tensor,
    kv_seq_len: torch.Tensor,
    max_q_seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    attn_mask: Sequence[Optional[torch.Tensor]] = (),
    softmax_scale: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    attn_output: Optional[torch.Tensor] = None,
    actual_seq_lengths_cpu: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal varlen attention over the new tokens only (no cached prefix).

    Args:
        query: [T, Hq, D]; key: [T, Hk, D]; value: [T, Hk, Dv].
        key_cache, value_cache: unused (the prompt has no cached prefix).
        q_seq_len: [B] query lengths; kv_seq_len: [B] equal to q_seq_len here.
        max_q_seq_len: longest query.
        actual_seq_lengths_cpu: [B] cumulative ends (``cu_seqlens_q[1:]``); preferred when given.
        attn_output: [T, Hq, Dv] written in place when given.

    Math per sequence b and head h (GQA: kv head h // (Hq/Hk)):
        ``o_i = softmax_j<=i(scale * q_i . k_j) v_j``, scale default 1/sqrt(D).
    """
    if attn_mask:
        raise ValueError("prefill_attention: explicit attn_mask tensors are not supported; allowed: an empty list")
    device = query.device
    if actual_seq_lengths_cpu is not None:
        cu = _cu_from_ends(actual_seq_lengths_cpu, device)
    else:
        cu = _cu_from_lengths(q_seq_len, device)
    q = query.reshape(-1, num_q_heads, query.shape[-1])
    k = key.reshape(-1, num_kv_heads, key.shape[-1])
    v = value.reshape(-1, num_kv_heads, value.shape[-1])
    result = mops.varlen_attention(
        q, k, v, cu, cu,
        max_seqlen_q=int(max_q_seq_len) if max_q_seq_len is not None else None,
        max_seqlen_k=int(max_q_seq_len) if max_q_seq_len is not None else None,
        scale=softmax_scale, causal=True, alibi_slopes=alibi_slopes,
    )
    return _write_out(result, attn_output)


def paged_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    q_seq_ends: torch.Tensor,
    kv_seq_len: torch.Tensor,
    max_q_seq_len: int,
    max_kv_seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    attn_mask: Sequence[Optional[torch.Tensor]] = (),
    head_size_v: int = 0,
    softmax_scale: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    attn_output: Optional[torch.Tensor] = None,
    kv_scales: Optional[torch.Tensor] = None,
    kv_zeros: Optional[torch.Tensor] = None,
    quant_bits: int = 0,
) -> torch.Tensor:
    """Prefill with a cached prefix (prefix caching, chunked prefill).

    Args:
        query: [T, Hq, D] new tokens; key/value: unused (already in the cache).
        key_cache: [NB, BS, Hk, D]; value_cache: [NB, BS, Hk, Dv].
        block_table: [B, max_blocks] int32.
        block_size: BS (checked against the cache).
        q_seq_ends: [B] cumulative query ends ``cu_seqlens_q[1:]`` (LMDeploy: actual_q_seqlens_cpu).
        kv_seq_len: [B] cached prefix + new tokens.
        attn_output: [T, Hq, Dv] written in place when given.

    Query i of sequence b sits at position ``kv_len_b - q_len_b + i`` (bottom-right causal).
    """
    _check_no_kv_quant("paged_prefill_attention", quant_bits)
    if attn_mask:
        raise ValueError("paged_prefill_attention: explicit attn_mask tensors are not supported; allowed: an empty list")
    if key_cache.shape[1] != block_size:
        raise ValueError(
            f"paged_prefill_attention: block_size={block_size} but key_cache {tuple(key_cache.shape)} "
            "has that many slots per block in dim 1; expected [num_blocks, block_size, kv_heads, head_dim]"
        )
    device = query.device
    cu = _cu_from_ends(q_seq_ends, device)
    q = query.reshape(-1, num_q_heads, query.shape[-1])
    result = mops.paged_prefill_attention(
        q, key_cache, value_cache, _as_device_int32(block_table, device), cu,
        _as_device_int32(kv_seq_len.reshape(-1), device),
        max_seqlen_q=int(max_q_seq_len) if max_q_seq_len is not None and max_q_seq_len > 0 else None,
        max_kv_seqlen=int(max_kv_seq_len) if max_kv_seq_len is not None and max_kv_seq_len > 0 else None,
        scale=softmax_scale, causal=True, alibi_slopes=alibi_slopes,
    )
    return _write_out(result, attn_output)


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    q_seq_ends: torch.Tensor,
    kv_seq_len: torch.Tensor,
    max_kv_seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_size_v: int = 0,
    softmax_scale: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    attn_output: Optional[torch.Tensor] = None,
    kv_scales: Optional[torch.Tensor] = None,
    kv_zeros: Optional[torch.Tensor] = None,
    quant_bits: int = 0,
) -> torch.Tensor:
    """Decode attention over the paged cache.

    Args:
        query: [B, Hq, D] (one token per sequence) or [B * q_len, Hq, D] (multi-token
            decoding, every sequence the same q_len <= 8).
        key_cache: [NB, BS, Hk, D]; value_cache: [NB, BS, Hk, Dv] (new tokens already filled).
        block_table: [B, max_blocks] int32.
        q_seq_ends: [B] cumulative query ends (decides B).
        kv_seq_len: [B] tokens in the cache per sequence, new ones included.
        attn_output: [..., Hq, Dv] written in place when given.

    ``o = softmax(scale * q . K^T) V`` over each sequence's cached keys (causal inside q_len).
    """
    _check_no_kv_quant("paged_decode_attention", quant_bits)
    if key_cache.shape[1] != block_size:
        raise ValueError(
            f"paged_decode_attention: block_size={block_size} but key_cache {tuple(key_cache.shape)} "
            "has that many slots per block in dim 1; expected [num_blocks, block_size, kv_heads, head_dim]"
        )
    device = query.device
    batch = kv_seq_len.numel()
    q = query.reshape(-1, num_q_heads, query.shape[-1])
    num_tokens = q.shape[0]
    # an empty batch (0 sequences, 0 tokens) is valid: one token each, of none
    if (num_tokens % batch) if batch else num_tokens:
        raise ValueError(
            f"paged_decode_attention: {num_tokens} query tokens for {batch} sequences; "
            "every sequence must decode the same number of tokens"
        )
    q_len = num_tokens // batch if batch else 1
    if q_len > 1:
        q = q.view(batch, q_len, num_q_heads, q.shape[-1])
    # every layer of a step passes the same block table and lengths: one plan (and one
    # int32 device copy of each) serves them all
    plan = _step_plan(
        ("decode", q_len, num_q_heads, key_cache.shape[2], q.shape[-1], value_cache.shape[-1], block_size, q.dtype,
         device), (block_table, kv_seq_len),
        lambda: mops_attention().plan_paged_decode(
            _as_device_int32(block_table, device), _as_device_int32(kv_seq_len.reshape(-1), device),
            num_q_heads=num_q_heads, num_kv_heads=key_cache.shape[2], head_dim=q.shape[-1],
            head_dim_v=value_cache.shape[-1], block_size=block_size, dtype=q.dtype, query_len=q_len))
    result = mops.paged_decode_attention(q, key_cache, value_cache, scale=softmax_scale, alibi_slopes=alibi_slopes,
                                         plan=plan)
    # explicit head_dim_v: reshape(0, Hq, -1) cannot infer -1 for an empty batch
    return _write_out(result.reshape(num_tokens, num_q_heads, result.shape[-1]), attn_output)


# --------------------------------------------------------------------------- MoE


def moe_gating_topk_softmax(
    router_logits: torch.Tensor, topk: int, moe_metadata: Any = None, *, renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: softmax over experts, keep the top-k.

    Args:
        router_logits: [T, E].
        topk: experts per token.
        moe_metadata: dlinfer's MoeMetadata (expert-parallel info) or None; only
            single-rank routing is implemented, so only its ``router_n_groups`` <= 1 is accepted.

    Returns:
        (topk_weights fp32 [T, k], topk_ids int32 [T, k]); weights are the *softmax*
        probabilities, not renormalized (LMDeploy renormalizes in ``fused_moe``).
    """
    n_groups = getattr(moe_metadata, "router_n_groups", -1) if moe_metadata is not None else -1
    if n_groups is not None and n_groups > 1:
        raise ValueError(
            f"moe_gating_topk_softmax: router_n_groups={n_groups} (grouped routing) is not supported here; "
            "allowed: -1 or 1"
        )
    return mops.moe_topk_softmax(router_logits, int(topk), renormalize)


def fused_moe(
    hidden_states: torch.Tensor,
    gate_up_weights: torch.Tensor,
    down_weights: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    topk: int,
    renormalize: bool,
    moe_metadata: Any = None,
    chunked_moe_layout: Any = None,
) -> torch.Tensor:
    """Mixture of experts with SwiGLU experts.

    Args:
        hidden_states: [T, H].
        gate_up_weights: [E, 2I, H], rows [0, I) gate, [I, 2I) up (LMDeploy's layout).
        down_weights: [E, H, I].
        topk_weights: [T, k] or [T*k] router probabilities; topk_ids: same shape, expert ids.
        renormalize: divide each token's k weights by their sum first.

    Returns:
        [T, H]: ``sum_k w_k * down[e_k] @ (silu(gate[e_k] x) * up[e_k] x)``.
    """
    if chunked_moe_layout is not None:
        raise ValueError("fused_moe: chunked_moe_layout is an Ascend storage layout; allowed on maca: None")
    num_tokens = hidden_states.shape[0]
    weights = topk_weights.reshape(num_tokens, topk).float()
    ids = topk_ids.reshape(num_tokens, topk).to(torch.int32)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return mops.fused_moe(hidden_states, gate_up_weights, down_weights, weights, ids)


def fused_moe_w4a16(
    hidden_states: torch.Tensor,
    w13_qweight: torch.Tensor,
    w2_qweight: torch.Tensor,
    w13_scales: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    topk: int,
    renormalize: bool,
    *,
    group_size: int,
    w13_zeros: Optional[torch.Tensor] = None,
    w2_zeros: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``fused_moe`` with int4 group-quantized experts (see common.ops.fused_moe_w4a16 for layouts)."""
    num_tokens = hidden_states.shape[0]
    weights = topk_weights.reshape(num_tokens, topk).float()
    ids = topk_ids.reshape(num_tokens, topk).to(torch.int32)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return mops.fused_moe_w4a16(
        hidden_states, w13_qweight, w2_qweight, w13_scales, w2_scales, weights, ids,
        group_size=group_size, w13_zeros=w13_zeros, w2_zeros=w2_zeros,
    )


def fused_moe_w8a8(
    hidden_states: torch.Tensor,
    gate_up_weights: torch.Tensor,
    gate_up_scales: torch.Tensor,
    down_weights: torch.Tensor,
    down_scales: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    topk: int,
    renormalize: bool,
    moe_metadata: Any = None,
) -> torch.Tensor:
    """``fused_moe`` with INT8 experts and dynamic per-token INT8 activations (LMDeploy's ``FusedMoEW8A8``).

    Args:
        hidden_states: [T, H] fp16/bf16/fp32 (quantized per token inside).
        gate_up_weights: [E, 2I, H] int8, rows [0, I) gate, [I, 2I) up.
        gate_up_scales: [E, 2I, 1] per-channel scales (LMDeploy keeps them float32, or
            bfloat16 for a bf16 model); read as float32.
        down_weights: [E, H, I] int8; down_scales: [E, H, 1].
        topk_weights, topk_ids: [T, k] (or [T*k]) router probabilities and expert ids.
        renormalize: divide each token's k weights by their sum first.
        moe_metadata: single-rank only (``ep_size`` <= 1).

    Returns:
        [T, H] in ``hidden_states.dtype``; see ``common.ops.fused_moe_w8a8`` for the math.
    """
    ep_size = getattr(moe_metadata, "ep_size", 1) if moe_metadata is not None else 1
    if ep_size not in (None, 1):
        raise ValueError(f"fused_moe_w8a8: moe_metadata.ep_size={ep_size} (expert parallelism) is not supported "
                         "on maca; allowed: 1")
    num_tokens = hidden_states.shape[0]
    weights = topk_weights.reshape(num_tokens, topk).float()
    ids = topk_ids.reshape(num_tokens, topk).to(torch.int32)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return mops.fused_moe_w8a8(hidden_states, gate_up_weights, down_weights, _float32_scale(gate_up_scales),
                               _float32_scale(down_scales), weights, ids)


# --------------------------------------------------------------------------- linear layers


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    all_reduce: bool = False,
    group: Any = "",
) -> torch.Tensor:
    """``y = x @ W^T + b`` (W [N, K]; [K, N] when DLINFER_LINEAR_USE_NN_LAYOUT=1), optional all-reduce."""
    if envs.dlinfer_linear_nn_layout():
        out = torch.matmul(x, weight)
        if bias is not None:
            out = out + bias
    else:
        out = torch.nn.functional.linear(x, weight, bias)
    if all_reduce:
        dist.all_reduce(out, group=group if isinstance(group, dist.ProcessGroup) else None)
    return out


# AWQ checkpoints keep int32-packed weights; converting them to our uint8
# layout on every call would dominate decode time, so each weight tensor is
# converted once and remembered until it is freed. A weight rewritten in place
# (LMDeploy's update_params) is noticed through its version counter where the
# tensor has one (inference-mode tensors do not: LMDeploy then rebuilds them).
_awq_converted: dict[int, tuple[weakref.ref, Optional[int], int, tuple]] = {}


def _tensor_version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _awq_to_ours(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int):
    key = id(qweight)
    version = _tensor_version(qweight)
    hit = _awq_converted.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == version and hit[2] == qweight.data_ptr():
        return hit[3]
    converted = mops.awq_to_w4a16(qweight, qzeros, scales, group_size)
    _awq_converted[key] = (weakref.ref(qweight, lambda _r, k=key: _awq_converted.pop(k, None)),
                           version, qweight.data_ptr(), converted)
    return converted


def weight_quant_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    scale: torch.Tensor,
    offset: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    all_reduce: bool = False,
    group_size: int = 0,
) -> torch.Tensor:
    """W4A16 matmul (LMDeploy's AWQ linear on dlinfer).

    Args:
        x1: [..., K] fp16/bf16 activations.
        x2: the int4 weight, either AWQ's GEMM packing int32 [K, N//8] (what LMDeploy
            loads from an AWQ checkpoint) or maca-infer's uint8 [N, K//2] (low nibble first).
        scale: [K//g, N] (AWQ) or [N, K//g] (ours).
        offset: zero points: AWQ int32 [K//g, N//8], or ours uint8 [N, K//g], or None (symmetric, z=8).
        bias: [N] or None.
        group_size: g (> 0); ``0``/``-1`` mean one group over all of K.

    Returns:
        [..., N]: ``x @ ((q - z) * s)^T + b``.
    """
    if x2.dtype == torch.int32:
        if offset is None:
            raise ValueError("weight_quant_matmul: AWQ int32 weights need their int32 qzeros (offset); got None")
        k = x2.shape[0]
        g = k if group_size in (0, -1, None) else int(group_size)
        qweight, scales, zeros = _awq_to_ours(x2, offset, scale, g)
    elif x2.dtype == torch.uint8:
        qweight, scales, zeros = x2, scale, offset
        g = qweight.shape[1] * 2 if group_size in (0, -1, None) else int(group_size)
    else:
        raise ValueError(
            f"weight_quant_matmul: weight dtype {x2.dtype} is not supported; allowed: "
            "torch.int32 (AWQ GEMM packing) or torch.uint8 (2 int4 per byte, low nibble first)"
        )
    out = mops.w4a16_linear(x1, qweight, scales, zeros, g, bias)
    if all_reduce:
        dist.all_reduce(out)
    return out


def w4a16_linear(x, qweight, scales, zeros=None, group_size: int = 128, bias=None):
    """maca-infer's W4A16 linear in our layout (see common.ops.w4a16_linear)."""
    return mops.w4a16_linear(x, qweight, scales, zeros, group_size, bias)


# --------------------------------------------------------------------------- INT8 W8A8 (smooth-quant)
#
# dlinfer's contract: the per-token activation scale has shape ``x.shape[:-1]``
# (ours, ``common.ops``, keeps a trailing 1: ``[..., 1]``); ``linear_w8a8``
# accepts either.


def _check_int8(op: str, quant_dtype: Any) -> None:
    if quant_dtype != torch.int8:
        raise ValueError(f"{op}: quant_dtype={quant_dtype!r} is not supported on maca; allowed: torch.int8 "
                         "(FP8 W8A8 needs an FP8 card; MetaX C500 has none)")


def _float32_scale(scale: torch.Tensor) -> torch.Tensor:
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise ValueError(f"W8A8 scales must be float tensors (one per output channel), got "
                         f"{getattr(scale, 'dtype', type(scale).__name__)}")
    return scale.float()


def dynamic_quant(x: torch.Tensor, quant_dtype: torch.dtype,
                  quant_granularity: Optional[str] = "PER_TOKEN") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-token INT8 quantization.

    Args:
        x: [..., K] fp16/bf16/fp32.
        quant_dtype: torch.int8.
        quant_granularity: "PER_TOKEN" (None means the same).

    Returns:
        (q int8 [..., K], scale float32 [...]): ``scale = max|x_row| / 127``,
        ``q = round_half_away_from_zero(x / scale)``, so ``x ~= q * scale``.
    """
    _check_int8("dynamic_quant", quant_dtype)
    if quant_granularity not in (None, "PER_TOKEN"):
        raise ValueError(f"dynamic_quant: quant_granularity={quant_granularity!r} is not supported on maca; "
                         "allowed: 'PER_TOKEN'")
    q, scale = mops.per_token_quant_int8(x)
    return q, scale.squeeze(-1)


def linear_w8a8(
    a: torch.Tensor,
    b: torch.Tensor,
    rms_scale: torch.Tensor,
    linear_scale: torch.Tensor,
    out_dtype: torch.dtype,
    quant_dtype: torch.dtype = torch.int8,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """INT8 x INT8 linear with per-token and per-channel scales (LMDeploy's ``W8A8Linear``).

    Args:
        a: [..., K] int8 activations (from ``dynamic_quant`` / ``rms_norm_w8a8``).
        b: [N, K] int8 weight (torch Linear layout, as LMDeploy loads it).
        rms_scale: [...] or [..., 1] float32, one scale per token of ``a``.
        linear_scale: [N, 1] or [N] float per-channel weight scale.
        out_dtype: fp16/bf16/fp32; bias: [N] or None.

    Returns:
        [..., N]: ``(sum_k a[m, k] b[n, k]) * rms_scale[m] * linear_scale[n] + bias[n]``
        (exact int32 accumulation, float32 scaling).
    """
    _check_int8("linear_w8a8", quant_dtype)
    if isinstance(rms_scale, torch.Tensor) and tuple(rms_scale.shape) == tuple(a.shape[:-1]):
        rms_scale = rms_scale.unsqueeze(-1)
    return mops.w8a8_int8_linear(a, rms_scale, b, _float32_scale(linear_scale), bias, out_dtype)


def rms_norm_w8a8(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float,
                  quant_dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm fused with ``dynamic_quant``: (q int8 [..., H], scale float32 [...]).

    The normed row is rounded to ``hidden_states.dtype`` before it is quantized
    (what the unfused ``rms_norm`` then ``dynamic_quant`` compute).
    """
    _check_int8("rms_norm_w8a8", quant_dtype)
    q, scale = mops.rms_norm_quant_int8(hidden_states, weight, float(epsilon))
    return q, scale.squeeze(-1)


def add_rms_norm_w8a8(hidden_states: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float,
                      quant_dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual add, RMSNorm and ``dynamic_quant``: (q int8 [..., H], scale float32 [...], residual).

    ``residual`` is updated IN PLACE to ``hidden_states + residual`` (``add_rms_norm``'s contract).
    """
    _check_int8("add_rms_norm_w8a8", quant_dtype)
    q, scale, residual = mops.add_rms_norm_quant_int8(hidden_states, residual, weight, float(epsilon))
    return q, scale.squeeze(-1), residual


# --------------------------------------------------------------------------- MLA (DeepSeek-V2/V3 latent attention)


def fill_mla_cache(kv_c, k_pe, latent_cache, slot_mapping):
    """Write compressed latents [T, kv_lora_rank] and rope keys [T, rope] into latent_cache [NB, BS, rank + rope]."""
    mops.fill_mla_cache(kv_c, k_pe, latent_cache, slot_mapping.reshape(-1))
    return latent_cache


def mla_decode(q_nope, q_rope, latent_cache, block_table, kv_seqlens, scale: float, *, attn_output=None):
    """Absorbed MLA decode -> [B, H, kv_lora_rank] (see common.ops.mla_decode); one plan per step."""
    device, cache_shape = q_nope.device, latent_cache.shape
    plan = _step_plan(
        ("mla", q_nope.shape[1:], q_rope.shape[-1], cache_shape[1], q_nope.dtype, device), (block_table, kv_seqlens),
        lambda: mops_mla().plan_mla_decode(
            _as_device_int32(block_table, device), _as_device_int32(kv_seqlens.reshape(-1), device),
            num_heads=q_nope.shape[1], kv_lora_rank=q_nope.shape[-1], rope_dim=q_rope.shape[-1],
            block_size=cache_shape[1], dtype=q_nope.dtype))
    result = mops.mla_decode(q_nope, q_rope, latent_cache, scale=float(scale), plan=plan)
    return _write_out(result, attn_output)


def mla_prefill(q, latent_cache, block_table, cu_seqlens_q, kv_seqlens, kv_b_proj_weight, *,
                qk_nope_head_dim: int, v_head_dim: int, scale: float, attn_output=None):
    """Non-absorbed MLA prefill over a paged latent cache -> [T, H, v_head_dim]."""
    device = q.device
    result = mops.mla_prefill(q, latent_cache, _as_device_int32(block_table, device),
                              _as_device_int32(cu_seqlens_q, device), _as_device_int32(kv_seqlens.reshape(-1), device),
                              kv_b_proj_weight, qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim,
                              scale=float(scale))
    return _write_out(result, attn_output)
