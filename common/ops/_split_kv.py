"""Split-KV decode, shared by paged decode attention (``attention.py``) and MLA decode (``mla.py``).

A decode kernel may cut each sequence's keys into ``num_kv_splits`` slices
run by separate programs; each writes a normalized partial output and its
log-sum-exp, and ``merge_kv_splits`` combines them::

    lse = log sum_r exp(lse_r),   out = sum_r exp(lse_r - lse) out_r

``auto_num_kv_splits`` is the one rule that picks the split count. The
helpers at the end serve both ops' per-batch plans (``DecodePlan``,
``MLADecodePlan``): made once per forward batch, used by every layer.
"""

from __future__ import annotations

import functools

import torch

from maca_infer.common.ops import _dispatch, _launch
from maca_infer.common.ops._jit import lazy_jit, next_power_of_2, tl
from maca_infer.common.ops._triton_helpers import merge_lse_partials

# The auto rule never makes a split shorter than this many keys (below it the
# merge pass costs more than the parallelism buys), nor more splits than this.
MIN_KEYS_PER_SPLIT = 256
MAX_KV_SPLITS = 64


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def auto_num_kv_splits(programs_per_split: int, kv_capacity: int, device: torch.device) -> int:
    """Splits per sequence for a decode launch, chosen without a host sync.

    ``programs_per_split``: programs the kernel runs for one split (e.g.
    sequences x KV heads, or sequences x head tiles). ``kv_capacity``: the
    most keys a sequence can have (block-table width x block size, clipped
    to a sliding window); the rule reads shapes only, so it is fixed under
    graph capture. Long contexts get more splits, never shorter than
    ``MIN_KEYS_PER_SPLIT`` keys; on a device the count stops growing once the
    grid fills about two waves of the multiprocessors, since more splits
    then only add merge work. Under the interpreter (CPU tensors) each
    program runs in turn, so at most 4.
    """
    by_length = -(-kv_capacity // MIN_KEYS_PER_SPLIT)
    if device.type == "cuda":
        processors = _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())
        by_occupancy = -(-2 * processors // max(1, programs_per_split))
    else:
        by_occupancy = 4
    return max(1, min(by_length, by_occupancy, MAX_KV_SPLITS))


def _merge_kernel_fn(
    partial_out_ptr, partial_lse_ptr, out_ptr, lse_ptr,
    stride_po_seq, stride_po_token, stride_po_head, stride_po_split,
    stride_pl_seq, stride_pl_token, stride_pl_head,
    stride_out_seq, stride_out_token, stride_out_head,
    stride_lse_seq, stride_lse_token, stride_lse_head,
    num_kv_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    # One program per (sequence, query token, head): merge that row's splits.
    # A split that saw no key has lse = -inf; its output row is not read
    # (a kernel may leave it unwritten).
    seq = tl.program_id(0).to(tl.int64)
    token = tl.program_id(1)
    head = tl.program_id(2)
    splits = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_parts = tl.load(partial_lse_ptr + seq * stride_pl_seq + token * stride_pl_token + head * stride_pl_head
                        + splits, mask=splits < num_kv_splits, other=float("-inf"))
    has_keys = lse_parts > float("-inf")
    out_parts = tl.load(partial_out_ptr + seq * stride_po_seq + token * stride_po_token + head * stride_po_head
                        + splits[:, None] * stride_po_split + offs_dv[None, :],
                        mask=has_keys[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
    out, lse = merge_lse_partials(lse_parts, out_parts)
    tl.store(out_ptr + seq * stride_out_seq + token * stride_out_token + head * stride_out_head + offs_dv,
             out.to(out_ptr.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    if WRITE_LSE:
        tl.store(lse_ptr + seq * stride_lse_seq + token * stride_lse_token + head * stride_lse_head, lse)


_merge_kernel = lazy_jit(_merge_kernel_fn)


def merge_kv_splits(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor | None) -> None:
    """Launch the merge of split-KV partials into ``out`` (and ``lse``).

    ``partial_out`` [batch, tokens, heads, splits, D] float32 and
    ``partial_lse`` [batch, tokens, heads, splits] float32 (splits
    contiguous); ``out`` [batch, tokens, heads, D] (any dtype, last dim
    contiguous); ``lse`` [batch, tokens, heads] float32 or None.
    """
    batch, tokens, heads, num_kv_splits, head_dim_v = partial_out.shape
    if partial_lse.stride(3) != 1:
        raise ValueError("merge_kv_splits: partial_lse's split dimension must be contiguous")
    lse_target = lse if lse is not None else partial_lse  # unread when WRITE_LSE is off
    lse_strides = (lse.stride(0), lse.stride(1), lse.stride(2)) if lse is not None else (0, 0, 0)
    _merge_kernel[(batch, tokens, heads)](
        partial_out, partial_lse, out, lse_target,
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2), partial_out.stride(3),
        partial_lse.stride(0), partial_lse.stride(1), partial_lse.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *lse_strides,
        num_kv_splits,
        HEAD_DIM_V=head_dim_v, BLOCK_DV=next_power_of_2(head_dim_v), BLOCK_S=next_power_of_2(num_kv_splits),
        WRITE_LSE=lse is not None, **_launch.options("merge_kv_splits"),
    )


# ==========================================================================
# Per-batch plans (attention.DecodePlan, mla.MLADecodePlan): shared helpers
# ==========================================================================
def planned_impl(op: str, plan, *tensors, vendor: bool) -> str:
    """The tier serving the plan's layers: ``_dispatch.select_impl``'s choice at the first layer."""
    impl = plan._memo.get("impl")
    if impl is None:
        impl = plan._memo["impl"] = _dispatch.select_impl(op, *tensors, vendor=vendor)
    return impl


def describe_plan(plan, *names: str) -> str:
    """``"batch=4, ..., dtype=float16, device=cuda:0"``: a plan's named fields, then its dtype and device."""
    fields = [f"{name}={getattr(plan, name)}" for name in names]
    return ", ".join(fields + [f"dtype={str(plan.dtype).replace('torch.', '')}", f"device={plan.device}"])


def plan_mismatch(op: str, plan, planner: str, name: str, found) -> ValueError:
    """The error for a layer input that does not fit its plan (``planner``: the function that makes one)."""
    return ValueError(f"{op}: {name} {found} does not match the plan ({plan.describe()}); "
                      f"make a new plan ({planner}) for this batch and these layers")


def check_plan_arguments(op: str, plan, plan_type: type, planner: str, **given) -> None:
    """A planned call: ``plan`` is a ``plan_type``, and each metadata argument passed along is the plan's own."""
    if not isinstance(plan, plan_type):
        raise ValueError(f"{op}: plan must be a {plan_type.__name__} (from {planner}), got {type(plan).__name__}")
    for name, value in given.items():
        if value is not None and value is not getattr(plan, name):
            raise ValueError(f"{op}: {name} was passed with a plan made for another one; pass None "
                             "(the plan's is used) or make a new plan")


def check_plan_geometry(op: str, dtype: torch.dtype, minimum: int = 1, **sizes) -> None:
    """A planner's sizes are ints >= ``minimum`` and its dtype a float dtype the ops take."""
    from maca_infer.common.ops import _checks

    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{op}: {name}={value!r} is not supported; allowed: an int >= {minimum}")
    if dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"{op}: dtype={dtype!r} is not supported; allowed: {_checks._names(_checks.FLOAT_DTYPES)}")
