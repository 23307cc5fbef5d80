"""Batched [B, H, S, D] attention with masks, run as our varlen attention.

Transformers and Diffusers hand attention a padded batch: query [B, Hq, Sq, D]
and key/value [B, Hk, Sk, D] with an optional mask. Our kernel
(``maca_infer.common.ops.varlen_attention``) takes packed tokens with
cu_seqlens and a causal flag (bottom-right aligned), a sliding window and a
softcap. This module turns the first into the second *only when that is
exact*, and says why not otherwise (``UnsupportedAttention``) so the caller
can run the framework's stock attention instead (one log line).

How a mask becomes packed sequences (``plan_from_mask``):
  mask [B, 1 | H, Sq, Sk]: bool (True = attend), or additive float (0 =
  attend, <= -1e4 = blocked; any other value is a bias we cannot express).
  Each query row sees a set of keys. One pattern must fit every batch entry b
  (tried in this order):
    full:   rows_b = queries that see any key; cols_b = keys they see;
            M_b = mask[b][rows_b][:, cols_b] must be all True.
    causal (optionally with window W):
            rows_b = queries that see a key set different from the previous
            query's (a causal query sees its own, new position); cols_b =
            keys they see; with n_q = |rows_b|, n_k = |cols_b|, query rank
            r and key rank t (0-based), M_b must be exactly
              M_b[r, t] = t <= n_k - n_q + r              (bottom-right)
                          and t > n_k - n_q + r - W      (window)
            Queries that see the same non-empty set as the query before
            them (right padding: a padding token's own position is masked)
            are computed separately, as full attention over that set.
  Queries that see no key get zeros, as torch SDPA gives for a fully masked
  boolean row. Left/right padding, decode after left padding, a cached
  prefix and static caches (empty future slots) all fit; the sub-mask check
  is exact, so every query is computed exactly as the stock attention does.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch

# additive masks: anything at or below this is a blocked position
# (diffusers uses -10000.0, transformers finfo(dtype).min, SDPA -inf)
BLOCKED_BIAS = -1.0e4

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class UnsupportedAttention(Exception):
    """This call cannot run exactly on our kernel; the message says why."""


@dataclass(frozen=True)
class PackedPlan:
    """How a padded batch maps onto packed varlen sequences.

    q_index / k_index: int64 [Tq] / [Tk], flat row ids into [B * Sq] / [B * Sk]
        (None: every row is kept, in order).
    cu_seqlens_q / cu_seqlens_k: int32 [n + 1] over the kept batch rows.
    causal: bottom-right causal; sliding_window: W or None.
    extra: a second, non-causal plan for queries that repeat the previous
        query's key set (right-padding tokens), or None.
    """

    q_index: torch.Tensor | None
    k_index: torch.Tensor | None
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    sliding_window: int | None
    extra: "PackedPlan | None" = None
    # the ops' VarlenPlan per head geometry and dtype, made by the first layer (_run_plan)
    ops_plans: dict = field(default_factory=dict, compare=False, repr=False)


@functools.lru_cache(maxsize=32)
def dense_plan(batch: int, q_len: int, k_len: int, *, causal: bool, device: torch.device) -> PackedPlan:
    """Every row of every batch entry kept: B sequences of q_len queries and k_len keys.

    Remembered per shape (its content depends on nothing else): the layers of a
    forward share one plan, and with it one ops plan (``_run_plan``)."""
    steps = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return PackedPlan(None, None, steps * q_len, steps * k_len, q_len, k_len, causal, None)


def _boolean_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1|H, Sq, Sk] bool or additive float -> [B, Sq, Sk] bool (True = attend)."""
    if mask.dim() != 4:
        raise UnsupportedAttention(f"mask of shape {tuple(mask.shape)} (only 4D [B, 1|H, Sq, Sk] masks are packed)")
    if mask.dtype == torch.bool:
        attend = mask
    elif mask.is_floating_point():
        attend = mask == 0
        blocked = mask <= BLOCKED_BIAS
        if not bool((attend | blocked).all()):
            raise UnsupportedAttention("an additive mask with bias values other than 0 and blocked (<= -1e4)")
        # a row whose keys are all blocked by a finite bias still averages them in softmax: not packable
        if bool((~attend.any(dim=-1) & ~torch.isinf(mask).all(dim=-1)).any()):
            raise UnsupportedAttention("an additive mask that blocks every key of some query with a finite bias")
    else:
        raise UnsupportedAttention(f"a mask of dtype {mask.dtype}")
    if attend.shape[1] != 1:
        if not bool((attend == attend[:, :1]).all()):
            raise UnsupportedAttention("a mask that differs between heads")
        attend = attend[:, :1]
    return attend[:, 0]


# one packed sequence of a batch entry: (query rows, key columns), ids local to the entry
_Sequence = tuple[torch.Tensor, torch.Tensor]


def _fit_pattern(
    mask_b: torch.Tensor, causal: bool, window: int | None
) -> tuple[list[_Sequence], list[_Sequence]] | None:
    """Sequences of one batch entry [Sq, Sk] under one pattern: (main, repeat), or None if it does not fit.

    main: at most one (rows, cols) for the pattern's kernel call; repeat:
    (rows, cols) groups of queries that repeat the previous query's key set
    (full attention over cols). Row/column ids are local to the entry.
    """
    sees_any = mask_b.any(dim=1)
    repeats: list[_Sequence] = []
    if not causal:
        rows = sees_any.nonzero().flatten()
    else:
        same_as_previous = torch.zeros_like(sees_any)
        same_as_previous[1:] = (mask_b[1:] == mask_b[:-1]).all(dim=1)
        repeated = sees_any & same_as_previous
        rows = (sees_any & ~repeated).nonzero().flatten()
        run_start = None
        for i in range(mask_b.shape[0] + 1):  # group consecutive repeating queries (they share one key set)
            inside = i < mask_b.shape[0] and bool(repeated[i])
            if inside and run_start is None:
                run_start = i
            elif not inside and run_start is not None:
                repeats.append((torch.arange(run_start, i), mask_b[run_start].nonzero().flatten()))
                run_start = None
    if rows.numel() == 0:
        return [], repeats
    kept_rows = mask_b.index_select(0, rows)
    cols = kept_rows.any(dim=0).nonzero().flatten()
    kept = kept_rows.index_select(1, cols)
    if not causal:
        return ([(rows, cols)], repeats) if bool(kept.all()) else None
    n_q, n_k = rows.numel(), cols.numel()
    # distance of key rank t from query rank r's diagonal (bottom-right aligned)
    offset = torch.arange(n_k)[None, :] - torch.arange(n_q)[:, None] - (n_k - n_q)
    expected = offset <= 0
    if window is not None:
        expected &= offset > -window
    return ([(rows, cols)], repeats) if torch.equal(kept, expected) else None


def _build_plan(
    sequences: list[tuple[int, _Sequence]], batch: int, q_len: int, k_len: int,
    causal: bool, window: int | None, device: torch.device,
) -> PackedPlan:
    """PackedPlan over (batch entry, (rows, cols)) sequences, in order."""
    sequences = [(b, rows, cols) for b, (rows, cols) in sequences if rows.numel()]
    if not sequences:  # nothing attends at all: an empty plan (the output is all zeros)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        return PackedPlan(empty, empty, zero, zero, 0, 0, causal, window)
    q_lens = [rows.numel() for _, rows, _ in sequences]
    k_lens = [cols.numel() for _, _, cols in sequences]
    every_entry = len(sequences) == batch and [b for b, _, _ in sequences] == list(range(batch))
    every_row = every_entry and all(n == q_len for n in q_lens)
    every_key = every_entry and all(n == k_len for n in k_lens)
    cu_q = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu_q[1:] = torch.tensor(q_lens).cumsum(0)
    cu_k = torch.zeros(len(k_lens) + 1, dtype=torch.int32)
    cu_k[1:] = torch.tensor(k_lens).cumsum(0)
    q_index = torch.cat([rows + b * q_len for b, rows, _ in sequences])
    k_index = torch.cat([cols + b * k_len for b, _, cols in sequences])
    return PackedPlan(
        None if every_row else q_index.to(device),
        None if every_key else k_index.to(device),
        cu_q.to(device),
        cu_k.to(device),
        max(q_lens),
        max(k_lens),
        causal,
        window,
    )


def plan_from_mask(
    mask: torch.Tensor, batch: int, q_len: int, k_len: int, *, sliding_window: int | None = None
) -> PackedPlan:
    """Packed plan for a mask (see the module docstring); UnsupportedAttention if none is exact."""
    attend = _boolean_mask(mask)
    if attend.shape[-2:] != (q_len, k_len) and attend.shape[-2] == 1 and attend.shape[-1] == k_len:
        attend = attend.expand(attend.shape[0], q_len, k_len)  # key-padding mask broadcast over queries
    if attend.shape[-2:] != (q_len, k_len) or attend.shape[0] not in (1, batch):
        raise UnsupportedAttention(
            f"mask of shape {tuple(mask.shape)} for a batch of {batch} x {q_len} queries x {k_len} keys"
        )
    # one host copy of the mask: planning is a few small loops over batch entries
    attend = attend.expand(batch, q_len, k_len).to("cpu")

    candidates: list[tuple[bool, int | None]] = [(False, None), (True, None)]
    if sliding_window is not None and sliding_window > 0:
        candidates.append((True, int(sliding_window)))
    for causal, window in candidates:
        main: list[tuple[int, _Sequence]] = []
        repeats: list[tuple[int, _Sequence]] = []
        for b in range(batch):
            fit = _fit_pattern(attend[b], causal, window)
            if fit is None:
                break
            main.extend((b, seq) for seq in fit[0])
            repeats.extend((b, seq) for seq in fit[1])
        else:
            plan = _build_plan(main, batch, q_len, k_len, causal, window, mask.device)
            if repeats:
                extra = _build_plan(repeats, batch, q_len, k_len, False, None, mask.device)
                plan = PackedPlan(**{**plan.__dict__, "extra": extra})
            return plan
    raise UnsupportedAttention("a mask that is not full, causal or sliding-window causal over padded sequences")


class _PlanCache:
    """One-entry cache: a model passes the same mask tensor to every layer.

    The entry is one tuple, replaced in one assignment, so threads never see half of it.
    """

    def __init__(self) -> None:
        self._entry: tuple | None = None  # (weakref to mask, key, PackedPlan | UnsupportedAttention)

    def get(self, mask: torch.Tensor, batch: int, q_len: int, k_len: int, sliding_window: int | None) -> PackedPlan:
        key = (mask._version, batch, q_len, k_len, sliding_window)
        entry = self._entry
        if entry is not None and entry[0]() is mask and entry[1] == key:
            result = entry[2]
        else:
            try:
                result = plan_from_mask(mask, batch, q_len, k_len, sliding_window=sliding_window)
            except UnsupportedAttention as exc:
                result = exc
            self._entry = (weakref.ref(mask), key, result)
        if isinstance(result, UnsupportedAttention):
            raise result
        return result


_plan_cache = _PlanCache()


def cached_plan(mask: torch.Tensor, batch: int, q_len: int, k_len: int, sliding_window: int | None) -> PackedPlan:
    return _plan_cache.get(mask, batch, q_len, k_len, sliding_window)


def check_supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Shapes and dtypes our kernel takes; UnsupportedAttention naming what is not."""
    head_dim, value_dim = query.shape[-1], value.shape[-1]
    for name, dim in (("head_dim", head_dim), ("value head_dim", value_dim)):
        if dim % 16 != 0 or not 16 <= dim <= 256:
            raise UnsupportedAttention(f"{name}={dim} (our kernel takes multiples of 16 from 16 to 256)")
    if query.shape[1] % key.shape[1] != 0:
        raise UnsupportedAttention(f"{query.shape[1]} query heads over {key.shape[1]} key/value heads")
    if query.dtype not in SUPPORTED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise UnsupportedAttention(f"dtypes q={query.dtype}, k={key.dtype}, v={value.dtype}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise UnsupportedAttention("autograd (our attention is inference-only)")


def _tokens(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """[B, H, S, D] -> packed [T, H, D] (rows kept by ``index``, all rows if None)."""
    batch, heads, seq, dim = x.shape
    flat = x.transpose(1, 2).reshape(batch * seq, heads, dim)
    # varlen_attention takes free token/head strides: no copy unless rows are dropped
    return flat if index is None else flat.index_select(0, index)


def _run_plan(query, key, value, plan: PackedPlan, scale, logit_softcap) -> torch.Tensor:
    from maca_infer.common.ops.attention import plan_varlen, varlen_attention

    # one ops plan per PackedPlan (per forward's mask) and head geometry: the layers reuse it
    geometry = (query.shape[1], key.shape[1], query.shape[-1], value.shape[-1], query.dtype)
    ops_plan = plan.ops_plans.get(geometry)
    if ops_plan is None:
        ops_plan = plan.ops_plans[geometry] = plan_varlen(
            plan.cu_seqlens_q, plan.cu_seqlens_k, num_q_heads=geometry[0], num_kv_heads=geometry[1],
            head_dim=geometry[2], head_dim_v=geometry[3], dtype=geometry[4], max_seqlen_q=plan.max_seqlen_q)
    return varlen_attention(
        _tokens(query, plan.q_index),
        _tokens(key, plan.k_index),
        _tokens(value, plan.k_index),
        max_seqlen_k=plan.max_seqlen_k,
        scale=scale,
        causal=plan.causal,
        sliding_window=plan.sliding_window,
        logit_softcap=logit_softcap,
        plan=ops_plan,
    )


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: PackedPlan,
    *,
    scale: float | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Attention of a padded batch through ``varlen_attention``.

    query: [B, Hq, Sq, D]; key: [B, Hk, Sk, D]; value: [B, Hk, Sk, Dv]
        (float16 / bfloat16 / float32, one dtype; Hq % Hk == 0).
    plan: which rows are kept and how they are masked (PackedPlan).
    Returns [B, Sq, Hq, Dv] in query.dtype; queries no plan covers are 0.

    For each packed sequence: s = scale * q k^T (scale default 1/sqrt(D)),
    s = softcap * tanh(s / softcap) if given, causal/window masking
    bottom-right aligned, o = softmax(s) v. The plan's ``extra`` sequences
    (non-causal) run in a second call and land in their own rows.
    """
    batch, q_heads, q_len, _ = query.shape
    value_dim = value.shape[-1]
    if plan.q_index is None:
        return _run_plan(query, key, value, plan, scale, logit_softcap).view(batch, q_len, q_heads, value_dim)
    out = query.new_zeros(batch * q_len, q_heads, value_dim)
    for part in (plan, plan.extra):
        if part is not None and part.cu_seqlens_q.numel() > 1:
            out.index_copy_(0, part.q_index, _run_plan(query, key, value, part, scale, logit_softcap))
    return out.view(batch, q_len, q_heads, value_dim)


def sdpa_equivalent(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """What ``torch.nn.functional.scaled_dot_product_attention`` computes, on our kernel.

    query: [B, Hq, Sq, D]; key: [B, Hk, Sk, D]; value: [B, Hk, Sk, Dv].
    mask: None or [B | 1, 1 | H, Sq | 1, Sk] bool / additive float.
    Returns [B, Sq, Hq, Dv] (note: sequence before heads, as the frameworks want it).

    SDPA's ``is_causal`` is top-left aligned: query i sees keys j <= i. With
    Sk >= Sq no key past Sq is ever seen, so keys are cropped to Sq and the
    bottom-right causal kernel (now square) computes the same thing. A mask
    is analysed by ``plan_from_mask`` (``sliding_window`` is the window it may
    match; HF convention j > i - W). Raises UnsupportedAttention when our
    kernel cannot reproduce SDPA exactly.
    """
    check_supported(query, key, value)
    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    if mask is None:
        if is_causal:
            if k_len < q_len:
                raise UnsupportedAttention(f"top-left causal attention with fewer keys ({k_len}) than queries ({q_len})")
            key, value, k_len = key[:, :, :q_len], value[:, :, :q_len], q_len
        plan = dense_plan(batch, q_len, k_len, causal=is_causal, device=query.device)
    else:
        if is_causal:
            raise UnsupportedAttention("both a mask and is_causal=True")
        if mask.dim() == 2:  # [B, Sk] key-padding mask (diffusers' dispatcher accepts it)
            mask = mask[:, None, None, :]
        plan = cached_plan(mask, batch, q_len, k_len, sliding_window)
    return packed_attention(query, key, value, plan, scale=scale, logit_softcap=logit_softcap)
