"""Mixture-of-experts ops: router gating, block alignment, fused expert MLPs.

Terms used throughout:

- ``T`` tokens, ``H`` hidden size, ``E`` experts, ``I`` expert intermediate
  size, ``k`` (``top_k``) experts per token.
- An *assignment* is one (token, slot) pair; assignments are numbered by the
  flattened ``topk_ids`` index ``a = t * k + j`` (``0 <= a < T * k``).
- Expert MLP: ``w13[e]`` is ``[2I, H]`` with rows ``[0, I)`` = gate and
  ``[I, 2I)`` = up; ``w2[e]`` is ``[H, I]``;
  ``mlp_e(x) = w2[e] @ (act(w13[e][:I] @ x) * (w13[e][I:] @ x))``.
- ``fused_moe`` output: ``y[t] = sum_j topk_weights[t, j] * mlp_{topk_ids[t, j]}(x[t])``.

Kernels follow the vLLM / SGLang grouped-GEMM design: ``moe_align_block_size``
sorts the assignments by expert and pads each expert's run to a multiple of
``BLOCK_M``; then one program per (block of ``BLOCK_M`` sorted assignments,
``BLOCK_N`` output tile) multiplies those rows by its single expert's weight
tile. GEMM 1 computes gate and up tiles together and writes
``act(gate) * up``; GEMM 2 multiplies by the router weight and writes one fp32
row per assignment, which are summed over the ``k`` slots. The W4A16 variant
loads int4 weights (w4a16 layout, see ``quant.py``) and dequantizes them in
registers.

The torch references loop over the experts that received tokens (not over
tokens), gather their rows, and ``index_add`` the weighted results, so they
are fast enough to serve small models on the emulated (CPU) device.
"""

from __future__ import annotations

import torch

from maca_infer.common.ops import _checks, _dispatch, _launch, vendor
from maca_infer.common.ops._jit import interpreter_branch, lazy_jit, next_power_of_2, tl, triton
from maca_infer.common.ops._triton_helpers import (
    dequant_int4,
    load_group_scale_zero,
    load_int4_tile,
    moe_activation,
    moe_block_assignments,
    moe_k_tile,
    moe_weight_columns,
)
from maca_infer.common.ops.quant import _as_uint8_packing, _dequant_fp32, _resolve_group_size

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_ACTIVATION_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}
SCORING_FUNCS = ("softmax", "sigmoid")


# ==========================================================================
# gating
# ==========================================================================

def _moe_topk_softmax_kernel_fn(
    logits_ptr, weights_ptr, ids_ptr,
    num_tokens, num_experts, stride_lt,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per BLOCK_T tokens; all E logits of a token sit in registers."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    mask_t = offs_t < num_tokens
    mask_e = offs_e < num_experts
    logits = tl.load(logits_ptr + offs_t[:, None] * stride_lt + offs_e[None, :],
                     mask=mask_t[:, None] & mask_e[None, :], other=float("-inf")).to(tl.float32)
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(mask_t, row_max, 0.0)  # padded token rows are all -inf
    p = tl.exp(logits - row_max[:, None])
    p = tl.where(mask_e[None, :], p, 0.0)
    denom = tl.sum(p, axis=1)
    denom = tl.where(mask_t, denom, 1.0)
    p = p / denom[:, None]
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    remaining = tl.where(mask_e[None, :], p, -1.0)
    for j in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=1)
        # lowest expert index among ties, like a stable descending sort
        best_idx = tl.min(tl.where(remaining == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
        top_w = tl.where(slots[None, :] == j, best[:, None], top_w)
        top_i = tl.where(slots[None, :] == j, best_idx[:, None], top_i)
        remaining = tl.where(offs_e[None, :] == best_idx[:, None], -1.0, remaining)
    if RENORMALIZE:
        top_sum = tl.sum(top_w, axis=1)
        top_w = top_w / tl.where(mask_t, top_sum, 1.0)[:, None]
    out_mask = mask_t[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + offs_t[:, None] * TOP_K + slots[None, :], top_w, mask=out_mask)
    tl.store(ids_ptr + offs_t[:, None] * TOP_K + slots[None, :], top_i, mask=out_mask)


_moe_topk_softmax_kernel = lazy_jit(_moe_topk_softmax_kernel_fn)


def _moe_topk_softmax_triton(router_logits, top_k, renormalize):
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=router_logits.device)
    block_e = next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // block_e))
    grid = (triton.cdiv(num_tokens, block_t),)
    _moe_topk_softmax_kernel[grid](
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0),
        TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=next_power_of_2(top_k),
        **_launch.options("moe_topk"),
    )
    return weights, ids


def _moe_topk_softmax_reference(router_logits, top_k, renormalize):
    probs = torch.softmax(router_logits.to(torch.float32), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def _check_router_logits(op: str, router_logits: torch.Tensor, top_k: int) -> None:
    _checks.check_dtype(op, "router_logits", router_logits, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "router_logits", router_logits, 2, "[T, E]")
    num_experts = router_logits.shape[1]
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"{op}: top_k={top_k!r} is not supported; allowed: an integer in 1..E={num_experts}")
    if router_logits.stride(-1) != 1:
        raise ValueError(f"{op}: router_logits must have unit stride along experts (stride {router_logits.stride()}); call .contiguous()")


def moe_topk_softmax(router_logits: torch.Tensor, top_k: int,
                     renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router gating with top-k selection (Mixtral / Qwen-MoE).

    Parameters
    ----------
    router_logits : torch.Tensor
        ``[T, E]`` float16 / bfloat16 / float32.
    top_k : int
        Experts per token, ``1 <= top_k <= E``.
    renormalize : bool
        Rescale the selected probabilities to sum to one.

    Returns
    -------
    topk_weights : torch.Tensor
        ``[T, top_k]`` float32, descending per token.
    topk_ids : torch.Tensor
        ``[T, top_k]`` int32.

    Math (fp32): ``p = softmax(router_logits[t])``; ``ids = argtop_k(p)``
    (ties: lower expert id first); ``w = p[ids]``; if renormalize,
    ``w = w / sum(w)``.
    """
    op = "moe_topk_softmax"
    _check_router_logits(op, router_logits, top_k)
    empty = router_logits.shape[0] == 0
    routing = _dispatch.dispatch(op, _moe_topk_softmax_triton, _moe_topk_softmax_reference, (router_logits,),
                                 router_logits, top_k, bool(renormalize), vendor_fn=vendor.moe_topk_softmax,
                                 empty=empty)
    return _empty_routing(router_logits, top_k) if empty else routing


def _empty_routing(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of a batch of zero tokens: fp32 weights and int32 ids, both [0, top_k]."""
    device = router_logits.device
    return (torch.empty((0, top_k), dtype=torch.float32, device=device),
            torch.empty((0, top_k), dtype=torch.int32, device=device))


def _moe_grouped_topk_kernel_fn(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    num_tokens, num_experts, experts_per_group, stride_lt, routed_scaling_factor,
    TOP_K: tl.constexpr, NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per BLOCK_T tokens: scores, group scores, kept groups, top-k, all in registers."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    mask_t = offs_t < num_tokens
    mask_e = offs_e < num_experts
    logits = tl.load(logits_ptr + offs_t[:, None] * stride_lt + offs_e[None, :],
                     mask=mask_t[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        shifted = tl.where(mask_e[None, :], logits, float("-inf"))
        p = tl.exp(shifted - tl.max(shifted, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
    scores = tl.where(mask_e[None, :], scores, 0.0)
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    else:
        choice = scores
    neg_inf = float("-inf")
    choice = tl.where(mask_e[None, :], choice, neg_inf)
    group_of_expert = offs_e // experts_per_group
    group_slots = tl.arange(0, BLOCK_G)
    group_scores = tl.full((BLOCK_T, BLOCK_G), neg_inf, dtype=tl.float32)
    for g in tl.static_range(NUM_GROUPS):
        in_group = (group_of_expert == g)[None, :] & mask_e[None, :]
        member = tl.where(in_group, choice, neg_inf)
        best = tl.max(member, axis=1)
        if HAS_BIAS:  # sum of the two best biased scores (the first best removed once)
            best_idx = tl.min(tl.where(member == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
            second = tl.max(tl.where(offs_e[None, :] == best_idx[:, None], neg_inf, member), axis=1)
            best = best + second
        group_scores = tl.where(group_slots[None, :] == g, best[:, None], group_scores)
    kept_groups = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int32)
    for i in tl.static_range(TOPK_GROUP):
        top = tl.max(group_scores, axis=1)
        top_idx = tl.min(tl.where(group_scores == top[:, None], group_slots[None, :], BLOCK_G), axis=1)
        kept_groups = tl.where(group_slots[None, :] == top_idx[:, None], 1, kept_groups)
        group_scores = tl.where(group_slots[None, :] == top_idx[:, None], neg_inf, group_scores)
    kept_experts = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
    for g in tl.static_range(NUM_GROUPS):
        kept_g = tl.sum(tl.where(group_slots[None, :] == g, kept_groups, 0), axis=1)
        kept_experts = tl.where((group_of_expert == g)[None, :], kept_g[:, None], kept_experts)
    remaining = tl.where(kept_experts > 0, choice, neg_inf)
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=1)
        best_idx = tl.min(tl.where(remaining == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
        picked = offs_e[None, :] == best_idx[:, None]
        weight = tl.sum(tl.where(picked, scores, 0.0), axis=1)  # the unbiased score
        top_w = tl.where(slots[None, :] == j, weight[:, None], top_w)
        top_i = tl.where(slots[None, :] == j, best_idx[:, None], top_i)
        remaining = tl.where(picked, neg_inf, remaining)
    if RENORMALIZE:
        top_sum = tl.sum(top_w, axis=1) + 1e-20
        top_w = top_w / top_sum[:, None]
    top_w = top_w * routed_scaling_factor
    out_mask = mask_t[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + offs_t[:, None] * TOP_K + slots[None, :], top_w, mask=out_mask)
    tl.store(ids_ptr + offs_t[:, None] * TOP_K + slots[None, :], top_i, mask=out_mask)


_moe_grouped_topk_kernel = lazy_jit(_moe_grouped_topk_kernel_fn)


def _moe_grouped_topk_triton(router_logits, top_k, num_expert_group, topk_group, renormalize, scoring,
                             correction_bias, routed_scaling_factor):
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=router_logits.device)
    block_e = next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // block_e))
    grid = (triton.cdiv(num_tokens, block_t),)
    _moe_grouped_topk_kernel[grid](
        router_logits, correction_bias if correction_bias is not None else router_logits, weights, ids,
        num_tokens, num_experts, num_experts // num_expert_group, router_logits.stride(0), routed_scaling_factor,
        TOP_K=top_k, NUM_GROUPS=num_expert_group, TOPK_GROUP=topk_group, SIGMOID=scoring == "sigmoid",
        HAS_BIAS=correction_bias is not None, RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_G=next_power_of_2(num_expert_group), BLOCK_K=next_power_of_2(top_k),
        **_launch.options("moe_topk"),
    )
    return weights, ids


def _moe_grouped_topk_reference(router_logits, top_k, num_expert_group, topk_group, renormalize, scoring,
                                correction_bias, routed_scaling_factor):
    logits = router_logits.to(torch.float32)
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    num_tokens, num_experts = scores.shape
    if correction_bias is not None:
        # noaux_tc: the bias steers selection only; a group scores the sum of its two best biased experts
        choice = scores + correction_bias.to(torch.float32)
        group_scores = choice.view(num_tokens, num_expert_group, -1).topk(2, dim=-1).values.sum(dim=-1)
    else:
        choice = scores
        group_scores = choice.view(num_tokens, num_expert_group, -1).max(dim=-1).values
    top_groups = torch.topk(group_scores, topk_group, dim=-1).indices  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
    expert_mask = group_mask.repeat_interleave(num_experts // num_expert_group, dim=1)
    masked = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(masked, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


def moe_grouped_topk(router_logits: torch.Tensor, top_k: int, *, num_expert_group: int, topk_group: int,
                     renormalize: bool, scoring: str = "softmax", correction_bias: torch.Tensor | None = None,
                     routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k routing (DeepSeek-V2 ``group_limited_greedy``, DeepSeek-V3 ``noaux_tc``).

    Parameters
    ----------
    router_logits : torch.Tensor
        ``[T, E]`` float16 / bfloat16 / float32; ``E % num_expert_group == 0``.
    top_k : int
        Experts per token, ``1 <= top_k <= topk_group * E / num_expert_group``.
    num_expert_group : int
        ``G``: experts are split into ``G`` consecutive groups of ``E / G``.
    topk_group : int
        Groups kept per token, ``1 <= topk_group <= G``.
    renormalize : bool
        Rescale the selected weights to sum to one (``+ 1e-20``, as HF).
    scoring : str
        ``"softmax"`` or ``"sigmoid"`` over the logits.
    correction_bias : torch.Tensor or None
        ``[E]`` float (``e_score_correction_bias``); needs ``E / G >= 2``.
    routed_scaling_factor : float
        Multiplies the final weights (after renormalization), always, as HF
        DeepSeek-V3; pass 1.0 where a model skips it (DeepSeek-V2 with
        ``norm_topk_prob``).

    Returns
    -------
    topk_weights ``[T, top_k]`` float32, topk_ids ``[T, top_k]`` int32.

    Math (fp32): ``s = scoring(logits)``; ``c = s + bias`` (or ``s``);
    group score = sum of the two largest ``c`` in the group with a bias,
    else the largest ``s``; keep the ``topk_group`` best groups; ids =
    top_k of ``c`` over the kept groups; ``w = s[ids]`` (the unbiased score);
    optional renormalize; ``w *= routed_scaling_factor``.
    """
    op = "moe_grouped_topk"
    _check_router_logits(op, router_logits, top_k)
    num_experts = router_logits.shape[1]
    _checks.check_in(op, "scoring", scoring, SCORING_FUNCS)
    if not isinstance(num_expert_group, int) or num_expert_group < 1 or num_experts % num_expert_group:
        raise ValueError(f"{op}: num_expert_group={num_expert_group!r} is not supported; allowed: a divisor of E={num_experts}")
    if not isinstance(topk_group, int) or not 1 <= topk_group <= num_expert_group:
        raise ValueError(f"{op}: topk_group={topk_group!r} is not supported; allowed: 1..num_expert_group={num_expert_group}")
    experts_per_group = num_experts // num_expert_group
    if top_k > topk_group * experts_per_group:
        raise ValueError(f"{op}: top_k={top_k} exceeds the {topk_group * experts_per_group} experts in "
                         f"topk_group={topk_group} groups of {experts_per_group}")
    if correction_bias is not None:
        _checks.check_dtype(op, "correction_bias", correction_bias, _checks.FLOAT_DTYPES)
        if tuple(correction_bias.shape) != (num_experts,):
            raise ValueError(f"{op}: correction_bias has shape {tuple(correction_bias.shape)}, expected ({num_experts},)")
        if experts_per_group < 2:
            raise ValueError(f"{op}: correction_bias needs >= 2 experts per group (E / num_expert_group = {experts_per_group})")
        _checks.check_same_device(op, router_logits=router_logits, correction_bias=correction_bias)
    empty = router_logits.shape[0] == 0
    routing = _dispatch.dispatch(op, _moe_grouped_topk_triton, _moe_grouped_topk_reference, (router_logits,),
                                 router_logits, top_k, num_expert_group, topk_group, bool(renormalize), scoring,
                                 correction_bias, float(routed_scaling_factor), empty=empty)
    return _empty_routing(router_logits, top_k) if empty else routing


# ==========================================================================
# moe_align_block_size
# ==========================================================================

def _moe_align_count_kernel_fn(
    topk_ids_ptr, expert_starts_ptr, expert_ids_ptr, num_post_pad_ptr,
    num_assignments, num_experts, num_blocks, block_size,
    NUM_BINS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_CHUNK: tl.constexpr,
):
    """Single program: per-expert counts -> padded run starts, block owners, total."""
    counts = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for start in range(0, num_assignments, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        # out-of-range lanes land in bin E, which no expert owns
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_assignments, other=num_experts).to(tl.int32)
        counts += tl.histogram(ids, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    is_expert = bins < num_experts
    counts = tl.where(is_expert, counts, 0)
    padded = (counts + block_size - 1) // block_size * block_size
    ends = tl.cumsum(padded, 0)
    tl.store(expert_starts_ptr + bins, ends - padded, mask=is_expert)
    total = tl.sum(padded, 0)
    tl.store(num_post_pad_ptr, total)
    end_blocks = ends // block_size
    used_blocks = total // block_size
    for b0 in range(0, num_blocks, BLOCK_CHUNK):
        blocks = b0 + tl.arange(0, BLOCK_CHUNK)
        # ends are non-decreasing, so the owner of block b is the number of experts ending at or before b
        owner = tl.sum(((end_blocks[None, :] <= blocks[:, None]) & is_expert[None, :]).to(tl.int32), axis=1)
        owner = tl.where(blocks < used_blocks, owner, -1)
        tl.store(expert_ids_ptr + blocks, owner, mask=blocks < num_blocks)


_moe_align_count_kernel = lazy_jit(_moe_align_count_kernel_fn)


def _moe_align_scatter_kernel_fn(topk_ids_ptr, expert_starts_ptr, sorted_ids_ptr, num_assignments,
                              CHUNK: tl.constexpr):
    """One program per expert: write its assignments, in index order, from the run start."""
    expert = tl.program_id(0)
    base = tl.load(expert_starts_ptr + expert)
    written = 0
    for start in range(0, num_assignments, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_assignments, other=-1).to(tl.int32)
        hit = (ids == expert).to(tl.int32)
        rank = tl.cumsum(hit, 0) - 1
        tl.store(sorted_ids_ptr + base + written + rank, offs.to(tl.int32), mask=hit > 0)
        written += tl.sum(hit, 0)


_moe_align_scatter_kernel = lazy_jit(_moe_align_scatter_kernel_fn)


def _align_sizes(num_assignments: int, block_size: int, num_experts: int) -> tuple[int, int]:
    max_padded = num_assignments + num_experts * (block_size - 1)
    # with fewer assignments than experts at most num_assignments runs exist
    max_padded = min(max_padded, num_assignments * block_size)
    return max_padded, max_padded // block_size


def _moe_align_triton(topk_ids, block_size, num_experts):
    num_assignments = topk_ids.numel()
    max_padded, num_blocks = _align_sizes(num_assignments, block_size, num_experts)
    device = topk_ids.device
    sorted_ids = torch.full((max_padded,), num_assignments, dtype=torch.int32, device=device)
    expert_ids = torch.empty((num_blocks,), dtype=torch.int32, device=device)
    num_post_pad = torch.empty((1,), dtype=torch.int32, device=device)
    expert_starts = torch.empty((num_experts,), dtype=torch.int32, device=device)
    flat_ids = topk_ids.reshape(-1)
    num_bins = next_power_of_2(num_experts + 1)
    _moe_align_count_kernel[(1,)](
        flat_ids, expert_starts, expert_ids, num_post_pad, num_assignments, num_experts, num_blocks, block_size,
        NUM_BINS=num_bins, CHUNK=1024, BLOCK_CHUNK=max(16, min(256, 4096 // num_bins)),
        **_launch.options("moe_align_count"),
    )
    _moe_align_scatter_kernel[(num_experts,)](
        flat_ids, expert_starts, sorted_ids, num_assignments, CHUNK=1024, **_launch.options("moe_align_scatter"),
    )
    return sorted_ids, expert_ids, num_post_pad


def _moe_align_reference(topk_ids, block_size, num_experts):
    num_assignments = topk_ids.numel()
    max_padded, num_blocks = _align_sizes(num_assignments, block_size, num_experts)
    device = topk_ids.device
    flat_ids = topk_ids.reshape(-1).to(torch.int64)
    if num_assignments and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= num_experts):
        raise ValueError(f"moe_align_block_size: topk_ids hold values in [{int(flat_ids.min())}, {int(flat_ids.max())}]; "
                         f"allowed: 0..num_experts-1 = 0..{num_experts - 1}")
    counts = torch.bincount(flat_ids, minlength=num_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    run_starts = torch.cumsum(padded, 0) - padded
    count_starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert, index order inside
    experts_in_order = flat_ids[order]
    rank = torch.arange(num_assignments, device=device) - count_starts[experts_in_order]
    sorted_ids = torch.full((max_padded,), num_assignments, dtype=torch.int32, device=device)
    sorted_ids[run_starts[experts_in_order] + rank] = order.to(torch.int32)
    expert_ids = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
    owners = torch.repeat_interleave(torch.arange(num_experts, device=device), padded // block_size)
    expert_ids[: owners.numel()] = owners.to(torch.int32)
    num_post_pad = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, expert_ids, num_post_pad


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort assignments by expert and pad each expert's run to a multiple of ``block_size`` (vLLM semantics).

    Parameters
    ----------
    topk_ids : torch.Tensor
        ``[T, k]`` int32 / int64, values in ``0 .. num_experts - 1``.
    block_size : int
        Rows per GEMM block (``BLOCK_M``): a power of two >= 8.
    num_experts : int
        ``E``.

    Returns
    -------
    sorted_token_ids : torch.Tensor
        ``[max_padded]`` int32 with ``max_padded = min(T*k + E*(block_size-1), T*k*block_size)``.
        Assignment indices ``a = t*k + j`` grouped by expert (ascending
        expert, ascending ``a`` inside), each expert's run starting at a
        multiple of ``block_size``; padding slots (and the tail) hold ``T*k``.
    expert_ids : torch.Tensor
        ``[max_padded // block_size]`` int32: the expert of each block;
        ``-1`` for blocks at or past ``num_tokens_post_pad / block_size``.
    num_tokens_post_pad : torch.Tensor
        ``[1]`` int32: ``sum_e ceil(count_e / block_size) * block_size``.
    """
    op = "moe_align_block_size"
    _checks.check_dtype(op, "topk_ids", topk_ids, _checks.INDEX_DTYPES)
    _checks.check_dim(op, "topk_ids", topk_ids, 2, "[T, k]")
    _checks.check_block_size(op, block_size, minimum=8)
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{op}: num_experts={num_experts!r} is not supported; allowed: an integer >= 1")
    if not topk_ids.is_contiguous():
        topk_ids = topk_ids.contiguous()
    empty = topk_ids.numel() == 0
    aligned = _dispatch.dispatch(op, _moe_align_triton, _moe_align_reference, (topk_ids,),
                                 topk_ids, block_size, num_experts, empty=empty)
    if empty:  # no assignments: no blocks (max_padded = 0) and nothing padded
        device = topk_ids.device
        return (torch.empty((0,), dtype=torch.int32, device=device),
                torch.empty((0,), dtype=torch.int32, device=device),
                torch.zeros((1,), dtype=torch.int32, device=device))
    return aligned


# ==========================================================================
# fused MoE: grouped GEMM kernels (fp16/bf16/fp32 weights, or int4 W4A16)
# ==========================================================================

def _moe_gate_up_kernel_fn(
    x_ptr, w_ptr, scales_ptr, zeros_ptr, inter_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
    num_assignments, top_k, hidden, inter_size, group_size,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn, stride_ia,
    ACTIVATION: tl.constexpr, INT4: tl.constexpr, HAS_ZEROS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """GEMM 1: inter[a, n] = act(x[t] . w13[e, n]) * (x[t] . w13[e, I + n]) for the block's assignments.

    One program per (block of BLOCK_M sorted assignments, BLOCK_N columns of
    I); the gate and up tiles share the activation loads. For INT4, ``w_ptr``
    points at ``[E, 2I, H // 2]`` bytes (low nibble first) and the tile is
    dequantized in registers with the (single) group scale of the K tile.
    """
    if tl.program_id(0) * BLOCK_M >= tl.load(num_post_pad_ptr):
        return
    assignment, valid, expert = moe_block_assignments(sorted_ids_ptr, expert_ids_ptr, num_assignments, BLOCK_M)
    token = (assignment // top_k).to(tl.int64)
    offs_n, mask_n, gate_rows = moe_weight_columns(w_ptr, expert, stride_we, stride_wn, inter_size, BLOCK_N)
    up_rows = gate_rows + inter_size * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        a, offs_k, mask_k = moe_k_tile(x_ptr, token, stride_xt, valid, k0, hidden, BLOCK_K)
        w_mask = mask_k[:, None] & mask_n[None, :]
        if INT4:
            q_gate = load_int4_tile(gate_rows, offs_k, w_mask)
            q_up = load_int4_tile(up_rows, offs_k, w_mask)
            group = k0 // group_size
            s_base = scales_ptr + expert * stride_se + group
            z_base = zeros_ptr + expert * stride_ze + group
            s_gate, z_gate = load_group_scale_zero(s_base + offs_n * stride_sn, z_base + offs_n * stride_zn, mask_n,
                                                   HAS_ZEROS)
            s_up, z_up = load_group_scale_zero(s_base + (offs_n + inter_size) * stride_sn,
                                               z_base + (offs_n + inter_size) * stride_zn, mask_n, HAS_ZEROS)
            w_gate = dequant_int4(q_gate, s_gate, z_gate)
            w_up = dequant_int4(q_up, s_up, z_up)
        else:
            w_gate = tl.load(gate_rows + offs_k[:, None], mask=w_mask, other=0.0)
            w_up = tl.load(up_rows + offs_k[:, None], mask=w_mask, other=0.0)
        if DOT_FP32:
            a32 = a.to(tl.float32)
            acc_gate += tl.dot(a32, w_gate.to(tl.float32), input_precision="ieee")
            acc_up += tl.dot(a32, w_up.to(tl.float32), input_precision="ieee")
        else:
            acc_gate += tl.dot(a, w_gate.to(a.dtype))
            acc_up += tl.dot(a, w_up.to(a.dtype))
    h = moe_activation(acc_gate, ACTIVATION) * acc_up
    tl.store(inter_ptr + assignment[:, None].to(tl.int64) * stride_ia + offs_n[None, :],
             h.to(inter_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


_moe_gate_up_kernel = lazy_jit(_moe_gate_up_kernel_fn)


def _moe_down_kernel_fn(
    inter_ptr, w_ptr, scales_ptr, zeros_ptr, topk_weights_ptr, out_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
    num_assignments, hidden, inter_size, group_size,
    stride_ia, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn, stride_oa,
    INT4: tl.constexpr, HAS_ZEROS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """GEMM 2: out[a, n] = topk_weight[a] * (inter[a] . w2[e, n]), fp32, one row per assignment."""
    if tl.program_id(0) * BLOCK_M >= tl.load(num_post_pad_ptr):
        return
    assignment, valid, expert = moe_block_assignments(sorted_ids_ptr, expert_ids_ptr, num_assignments, BLOCK_M)
    rows = assignment.to(tl.int64)
    offs_n, mask_n, w_rows = moe_weight_columns(w_ptr, expert, stride_we, stride_wn, hidden, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        a, offs_k, mask_k = moe_k_tile(inter_ptr, rows, stride_ia, valid, k0, inter_size, BLOCK_K)
        w_mask = mask_k[:, None] & mask_n[None, :]
        if INT4:
            q = load_int4_tile(w_rows, offs_k, w_mask)
            group = k0 // group_size
            scale, zero = load_group_scale_zero(scales_ptr + expert * stride_se + offs_n * stride_sn + group,
                                                zeros_ptr + expert * stride_ze + offs_n * stride_zn + group,
                                                mask_n, HAS_ZEROS)
            w = dequant_int4(q, scale, zero)
        else:
            w = tl.load(w_rows + offs_k[:, None], mask=w_mask, other=0.0)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    routed = tl.load(topk_weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    acc = acc * routed[:, None]
    tl.store(out_ptr + rows[:, None] * stride_oa + offs_n[None, :], acc, mask=valid[:, None] & mask_n[None, :])


_moe_down_kernel = lazy_jit(_moe_down_kernel_fn)


def _moe_block_config(num_assignments: int, num_experts: int, interpret: bool,
                      fp32: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for the grouped GEMMs (N and K from _launch's "moe_gemm" entry)."""
    if interpret:  # each program instance runs in numpy: few, small programs
        return 16, 32, 32
    table = _launch.config("moe_gemm")
    block_n, block_k = table["BLOCK_N"], table["BLOCK_K_wide" if fp32 else "BLOCK_K"]
    rows_per_expert = num_assignments / max(1, num_experts)
    if rows_per_expert <= 16:
        return 16, block_n, block_k
    if rows_per_expert <= 64:
        return 32, block_n, block_k
    return 64, block_n, block_k


def _fused_moe_triton(x, w13, w2, topk_weights, topk_ids, activation, out, quant):
    """Launch align + GEMM 1 + GEMM 2. ``quant`` is None or (w13_scales, w2_scales, w13_zeros, w2_zeros, g1, g2)."""
    num_tokens, hidden = x.shape
    num_experts, two_inter = w13.shape[0], w13.shape[1]
    inter_size = two_inter // 2
    top_k = topk_ids.shape[1]
    num_assignments = num_tokens * top_k
    interpret = interpreter_branch(x.device)
    block_m, block_n, block_k = _moe_block_config(num_assignments, num_experts, interpret, x.dtype == torch.float32)
    block_k1 = block_k2 = block_k
    if quant is not None:
        w13_scales, w2_scales, w13_zeros, w2_zeros, group1, group2 = quant
        if group1 < hidden:  # a K tile must not straddle two groups
            block_k1 = min(block_k, group1)
        if group2 < inter_size:
            block_k2 = min(block_k, group2)
    else:
        w13_scales = w2_scales = w13_zeros = w2_zeros = None
        group1, group2 = hidden, inter_size
    sorted_ids, expert_ids, num_post_pad = _moe_align_triton(topk_ids, block_m, num_experts)
    dot_fp32 = interpret or x.dtype == torch.float32
    int4 = quant is not None
    inter = torch.empty((num_assignments, inter_size), dtype=x.dtype, device=x.device)

    def strides(t):  # (expert, row) strides of a per-expert tensor, 0 when absent
        return (t.stride(0), t.stride(1)) if t is not None else (0, 0)

    dummy = w13  # never read when the matching constexpr flag is off
    grid1 = (expert_ids.numel(), triton.cdiv(inter_size, block_n))
    _moe_gate_up_kernel[grid1](
        x, w13, w13_scales if int4 else dummy, w13_zeros if w13_zeros is not None else dummy, inter,
        sorted_ids, expert_ids, num_post_pad,
        num_assignments, top_k, hidden, inter_size, group1,
        x.stride(0), w13.stride(0), w13.stride(1), *strides(w13_scales), *strides(w13_zeros), inter.stride(0),
        ACTIVATION=_ACTIVATION_CODE[activation], INT4=int4, HAS_ZEROS=w13_zeros is not None, DOT_FP32=dot_fp32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k1, **_launch.options("moe_gemm"),
    )
    per_assignment = torch.empty((num_assignments, hidden), dtype=torch.float32, device=x.device)
    grid2 = (expert_ids.numel(), triton.cdiv(hidden, block_n))
    _moe_down_kernel[grid2](
        inter, w2, w2_scales if int4 else dummy, w2_zeros if w2_zeros is not None else dummy,
        topk_weights, per_assignment,
        sorted_ids, expert_ids, num_post_pad,
        num_assignments, hidden, inter_size, group2,
        inter.stride(0), w2.stride(0), w2.stride(1), *strides(w2_scales), *strides(w2_zeros),
        per_assignment.stride(0),
        INT4=int4, HAS_ZEROS=w2_zeros is not None, DOT_FP32=dot_fp32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k2, **_launch.options("moe_gemm"),
    )
    summed = per_assignment.view(num_tokens, top_k, hidden).sum(dim=1)
    if out is None:
        return summed.to(x.dtype)
    out.copy_(summed)
    return out


def _activation_fp32(name: str, gate: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return torch.nn.functional.silu(gate)
    if name == "gelu":
        return torch.nn.functional.gelu(gate)
    return torch.nn.functional.gelu(gate, approximate="tanh")


def _moe_reference(x, topk_weights, topk_ids, num_experts, expert_weights_fp32, activation, out):
    """Loop over experts that received assignments; ``expert_weights_fp32(e) -> (w13 [2I, H], w2 [H, I])``."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).to(torch.int64)
    if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= num_experts):
        raise ValueError(f"fused_moe: topk_ids hold values in [{int(flat_ids.min())}, {int(flat_ids.max())}]; "
                         f"allowed: 0..E-1 = 0..{num_experts - 1}")
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    flat_weights = topk_weights.reshape(-1).to(torch.float32)
    acc = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        assignments = order[start:start + count]
        start += count
        tokens = assignments // top_k
        w13, w2 = expert_weights_fp32(expert)
        inter_size = w13.shape[0] // 2
        gate_up = x[tokens].to(torch.float32) @ w13.t()
        hidden_act = _activation_fp32(activation, gate_up[:, :inter_size]) * gate_up[:, inter_size:]
        expert_out = (hidden_act @ w2.t()) * flat_weights[assignments].unsqueeze(1)
        acc.index_add_(0, tokens, expert_out)
    if out is None:
        return acc.to(x.dtype)
    out.copy_(acc)
    return out


def _fused_moe_reference(x, w13, w2, topk_weights, topk_ids, activation, out, quant):
    del quant
    return _moe_reference(x, topk_weights, topk_ids, w13.shape[0],
                          lambda e: (w13[e].to(torch.float32), w2[e].to(torch.float32)), activation, out)


def _fused_moe_w4a16_reference(x, w13, w2, topk_weights, topk_ids, activation, out, quant):
    w13_scales, w2_scales, w13_zeros, w2_zeros, group1, group2 = quant

    def expert_weights(e):
        return (_dequant_fp32(w13[e], w13_scales[e], None if w13_zeros is None else w13_zeros[e], group1),
                _dequant_fp32(w2[e], w2_scales[e], None if w2_zeros is None else w2_zeros[e], group2))

    return _moe_reference(x, topk_weights, topk_ids, w13.shape[0], expert_weights, activation, out)


def _check_routing(op: str, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   activation: str, out: torch.Tensor | None) -> None:
    _checks.check_dtype(op, "x", x, _checks.FLOAT_DTYPES)
    _checks.check_dim(op, "x", x, 2, "[T, H]")
    _checks.check_dtype(op, "topk_ids", topk_ids, _checks.INDEX_DTYPES)
    _checks.check_dim(op, "topk_ids", topk_ids, 2, "[T, k]")
    _checks.check_dtype(op, "topk_weights", topk_weights, _checks.FLOAT_DTYPES)
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} "
                         f"must both be [T, k] with T={x.shape[0]} (x is {tuple(x.shape)})")
    _checks.check_in(op, "activation", activation, ACTIVATIONS)
    if out is not None:
        _checks.check_dtype(op, "out", out, (x.dtype,))
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(f"{op}: out has shape {tuple(out.shape)}, expected {tuple(x.shape)} (like x)")


def _run_fused_moe(op, triton_fn, reference_fn, x, w13, w2, topk_weights, topk_ids, activation, out, quant):
    if not x.is_contiguous():
        x = x.contiguous()
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    empty = x.shape[0] == 0
    result = _dispatch.dispatch(op, triton_fn, reference_fn, (x, w13, w2, topk_ids),
                                x, w13, w2, topk_weights, topk_ids, activation, out, quant, empty=empty)
    if empty:
        return out if out is not None else torch.empty_like(x)
    return result


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, activation: str = "silu", out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused mixture-of-experts MLP (gate/up GEMM, activation, down GEMM, weighted sum).

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` float16 / bfloat16 / float32.
    w13 : torch.Tensor
        ``[E, 2I, H]``, ``x.dtype``, contiguous: rows ``[0, I)`` gate, ``[I, 2I)`` up.
    w2 : torch.Tensor
        ``[E, H, I]``, ``x.dtype``, contiguous.
    topk_weights : torch.Tensor
        ``[T, k]`` float (router weights, applied in the down projection).
    topk_ids : torch.Tensor
        ``[T, k]`` int32 / int64 in ``0 .. E-1``.
    activation : str
        ``"silu"`` (default), ``"gelu"`` (erf) or ``"gelu_tanh"``.
    out : torch.Tensor or None
        ``[T, H]`` in ``x.dtype`` to write into.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``x.dtype``. For each token t and slot j, with
        ``e = topk_ids[t, j]``:
        ``g = w13[e, :I] @ x[t]``, ``u = w13[e, I:] @ x[t]`` (fp32 accumulate),
        ``h = act(g) * u``, ``y[t] += topk_weights[t, j] * (w2[e] @ h)``.
        The Triton path rounds ``h`` to ``x.dtype`` between the GEMMs (as
        vLLM/SGLang); the reference keeps it in fp32.
    """
    op = "fused_moe"
    _check_routing(op, x, topk_weights, topk_ids, activation, out)
    _checks.check_dim(op, "w13", w13, 3, "[E, 2I, H]")
    _checks.check_dim(op, "w2", w2, 3, "[E, H, I]")
    _checks.check_same_dtype(op, x=x, w13=w13, w2=w2)
    num_experts, two_inter, hidden = w13.shape
    if hidden != x.shape[1] or two_inter % 2:
        raise ValueError(f"{op}: w13 has shape {tuple(w13.shape)}, expected [E, 2I, H] with H={x.shape[1]} and an even 2I")
    if tuple(w2.shape) != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"{op}: w2 has shape {tuple(w2.shape)}, expected [E, H, I] = {(num_experts, hidden, two_inter // 2)}")
    _checks.check_contiguous(op, "w13", w13)
    _checks.check_contiguous(op, "w2", w2)
    _checks.check_same_device(op, x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids, out=out)
    return _run_fused_moe(op, _fused_moe_triton, _fused_moe_reference,
                          x, w13, w2, topk_weights, topk_ids, activation, out, None)


def fused_moe_w4a16(x: torch.Tensor, w13_qweight: torch.Tensor, w2_qweight: torch.Tensor, w13_scales: torch.Tensor,
                    w2_scales: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, group_size: int,
                    w13_zeros: torch.Tensor | None = None, w2_zeros: torch.Tensor | None = None,
                    activation: str = "silu", out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused MoE with int4 expert weights (W4A16), dequantized in registers.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` float16 / bfloat16 / float32.
    w13_qweight : torch.Tensor
        ``[E, 2I, H // 2]`` uint8, low nibble first (w4a16 layout per expert);
        ``[E, 2I, H // 8]`` int32 (8 nibbles per word) is accepted too.
    w2_qweight : torch.Tensor
        ``[E, H, I // 2]`` uint8 (or ``[E, H, I // 8]`` int32).
    w13_scales, w2_scales : torch.Tensor
        ``[E, 2I, H // g]`` and ``[E, H, I // g]`` float (any float dtype).
    topk_weights, topk_ids : torch.Tensor
        ``[T, k]`` float and ``[T, k]`` int32 / int64.
    group_size : int
        32, 64, 128 (a power of two >= 16 dividing H and I) or -1 (one group
        per row: ``g = H`` for w13, ``I`` for w2).
    w13_zeros, w2_zeros : torch.Tensor or None
        uint8 zero points shaped like the scales; None = 8 (symmetric).
    activation, out
        As :func:`fused_moe`.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``x.dtype``: :func:`fused_moe` with
        ``w13[e, n, k] = (q - z[e, n, k // g]) * s[e, n, k // g]`` (and the same for ``w2``).
    """
    op = "fused_moe_w4a16"
    _check_routing(op, x, topk_weights, topk_ids, activation, out)
    w13_qweight = _as_uint8_packing(op, w13_qweight, "w13_qweight")
    w2_qweight = _as_uint8_packing(op, w2_qweight, "w2_qweight")
    _checks.check_dim(op, "w13_qweight", w13_qweight, 3, "[E, 2I, H // 2] uint8")
    _checks.check_dim(op, "w2_qweight", w2_qweight, 3, "[E, H, I // 2] uint8")
    num_experts, two_inter, half_hidden = w13_qweight.shape
    hidden = x.shape[1]
    if half_hidden * 2 != hidden or two_inter % 4:
        raise ValueError(f"{op}: w13_qweight has shape {tuple(w13_qweight.shape)}, expected [E, 2I, H // 2] with "
                         f"H={hidden} and I even")
    inter_size = two_inter // 2
    if tuple(w2_qweight.shape) != (num_experts, hidden, inter_size // 2):
        raise ValueError(f"{op}: w2_qweight has shape {tuple(w2_qweight.shape)}, expected [E, H, I // 2] = "
                         f"{(num_experts, hidden, inter_size // 2)}")
    group1 = _resolve_group_size(op, group_size, hidden)
    group2 = _resolve_group_size(op, group_size, inter_size)
    for name, t, rows, k_dim, group in (("w13", w13_scales, two_inter, hidden, group1),
                                        ("w2", w2_scales, hidden, inter_size, group2)):
        _checks.check_dtype(op, f"{name}_scales", t, _checks.FLOAT_DTYPES)
        expected = (num_experts, rows, k_dim // group)
        if tuple(t.shape) != expected:
            raise ValueError(f"{op}: {name}_scales has shape {tuple(t.shape)}, expected {expected} for group_size={group_size}")
    for name, zeros, scales in (("w13_zeros", w13_zeros, w13_scales), ("w2_zeros", w2_zeros, w2_scales)):
        if zeros is not None:
            _checks.check_dtype(op, name, zeros, (torch.uint8,))
            if zeros.shape != scales.shape:
                raise ValueError(f"{op}: {name} has shape {tuple(zeros.shape)}, expected {tuple(scales.shape)} (like the scales)")
    for name, t in (("w13_qweight", w13_qweight), ("w2_qweight", w2_qweight), ("w13_scales", w13_scales),
                    ("w2_scales", w2_scales), ("w13_zeros", w13_zeros), ("w2_zeros", w2_zeros)):
        if t is not None:
            _checks.check_contiguous(op, name, t)
    _checks.check_same_device(op, x=x, w13_qweight=w13_qweight, w2_qweight=w2_qweight, w13_scales=w13_scales,
                              w2_scales=w2_scales, w13_zeros=w13_zeros, w2_zeros=w2_zeros,
                              topk_weights=topk_weights, topk_ids=topk_ids, out=out)
    quant = (w13_scales, w2_scales, w13_zeros, w2_zeros, group1, group2)
    return _run_fused_moe(op, _fused_moe_triton, _fused_moe_w4a16_reference,
                          x, w13_qweight, w2_qweight, topk_weights, topk_ids, activation, out, quant)
