"""Our attention in Transformers releases without AttentionInterface (4.46, 4.47).

Those releases choose an attention *class* for every layer when the model is
built, from the modeling module's ``<ARCH>_ATTENTION_CLASSES`` table
({"eager": LlamaAttention, "sdpa": LlamaSdpaAttention, ...}); the SDPA
class calls ``torch.nn.functional.scaled_dot_product_attention`` with the
layer's query/key/value (key/value already repeated to the query heads) and
the model's 4D mask. ``enable(model, state)``:

1. turns every attention module of the model that has such a table into its
   table's SDPA class (same weights and attributes: the SDPA classes subclass
   the eager ones), remembering the class it had;
2. marks those modules with forward hooks, so that a call is known to come
   from inside one of them (a thread-local stack);
3. installs our ``scaled_dot_product_attention`` (ledgered:
   ``_patches.SDPA_CLASSES``, one installation shared by every enabled model):
   inside a marked module it runs ``attention.sdpa_equivalent`` (our
   ``varlen_attention``); everywhere else, and for what our kernel cannot do
   exactly, it calls torch's own function.

A module that was *eager* before (Gemma2 is eager by default on these
releases) keeps eager semantics: its attention-logit softcap is applied, and
the fallback for calls our kernel cannot take is the eager computation
(matmul, softcap, mask, fp32 softmax), not torch's SDPA. ``undo(state)``
gives every module its class back and removes the hooks; the patch is
removed with the last enabled model.
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from maca_infer.adapters.hf import attention as packed
from maca_infer.adapters.hf._patches import SDPA_CLASSES
from maca_infer.common.log import get_logger, log_once
from maca_infer.common.patching import LEDGER

logger = get_logger(__name__)

_scope = threading.local()  # .stack: attention modules being run; .busy: our kernel is running
_users = 0  # enabled models sharing the patch
_lock = threading.Lock()


@dataclass
class ClassSwap:
    """What ``enable`` changed on one model: (module, class it had) and the hook handles."""

    modules: list[tuple[torch.nn.Module, type]] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    patched: bool = False


def sdpa_class_of(module: torch.nn.Module) -> type | None:
    """The SDPA class of ``module``'s attention table, or None if its class is in no such table."""
    modeling = sys.modules.get(type(module).__module__)
    for name, table in vars(modeling or {}).items():
        if name.endswith("_ATTENTION_CLASSES") and isinstance(table, dict) and type(module) in table.values():
            return table.get("sdpa")
    return None


def has_attention_classes(model: torch.nn.Module) -> bool:
    return any(sdpa_class_of(m) is not None for m in model.modules())


def _push(module, args, kwargs=None):
    _scope.stack = getattr(_scope, "stack", []) + [module]


def _pop(module, args, output):
    _scope.stack = getattr(_scope, "stack", [module])[:-1]


def _eager(query, key, value, attn_mask, dropout_p, is_causal, scale, softcap):
    """The eager classes' attention: softmax(cap(scale q k^T) + mask) v, softmax in float32."""
    scores = torch.matmul(query, key.transpose(2, 3)) * (scale if scale is not None else query.shape[-1] ** -0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        scores = scores + attn_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, value)


_blocked_cache: tuple | None = None  # (weakref to mask, its _version, (mask with -inf rows, rows))


def _split_blocked_rows(mask, batch: int, q_len: int):
    """A float mask whose fully blocked rows are finite (4.46 fills them with finfo.min; torch's SDPA then
    averages every key) -> (the mask with those rows at -inf, which our kernel leaves at zero; their
    (batch, query) ids, or None). The stock function computes those rows again, alone."""
    global _blocked_cache
    if mask is None or not mask.is_floating_point() or mask.dim() != 4 or mask.shape[0] != batch \
            or mask.shape[2] != q_len:
        return mask, None
    entry = _blocked_cache
    if entry is not None and entry[0]() is mask and entry[1] == mask._version:
        return entry[2]
    blocked = ((mask <= packed.BLOCKED_BIAS).all(dim=-1) & ~torch.isinf(mask).all(dim=-1)).all(dim=1)  # [B, Sq]
    result = (mask, None)
    if bool(blocked.any()):
        filled = mask.masked_fill(blocked[:, None, :, None], float("-inf"))
        result = (filled, tuple(blocked.nonzero().unbind(1)))
    _blocked_cache = (weakref.ref(mask), mask._version, result)
    return result


def _make_sdpa(stock):
    """Our ``scaled_dot_product_attention``: q/k/v [B, H, S, D] -> [B, Hq, Sq, Dv], as torch's."""

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        stack = getattr(_scope, "stack", None)
        if not stack or getattr(_scope, "busy", False):
            return stock(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
        module = stack[-1]
        was_eager = module.__dict__.get("_maca_was_eager", False)
        config = getattr(module, "config", None)
        softcap = getattr(config, "attn_logit_softcapping", None) if was_eager else None

        def _stock(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
            """What the module computed before enable(): torch's SDPA, or the eager attention."""
            if was_eager:
                return _eager(query, key, value, attn_mask, dropout_p, is_causal, scale, softcap)
            return stock(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)

        reason = None
        if dropout_p:
            reason = f"dropout_p={dropout_p}"
        elif query.shape[1] != key.shape[1] and not enable_gqa:
            reason = "different query and key head counts without enable_gqa"
        if reason is None:
            window = getattr(module, "sliding_window", None) or getattr(config, "sliding_window", None)
            _scope.busy = True
            try:
                mask, rows = _split_blocked_rows(attn_mask, query.shape[0], query.shape[2])
                out = packed.sdpa_equivalent(query, key, value, mask, is_causal=is_causal, scale=scale,
                                             sliding_window=window, logit_softcap=softcap).transpose(1, 2)
                if rows is not None:  # queries that see no key through a finite bias: as the stock function does
                    b, i = rows  # [N] batch and query ids -> N single-query problems
                    alone = _stock(query[b, :, i].unsqueeze(2), key[b], value[b], attn_mask[b, :, i].unsqueeze(2),
                                   0.0, False, scale, enable_gqa)
                    out[b, :, i] = alone[:, :, 0].to(out.dtype)
                return out
            except packed.UnsupportedAttention as exc:
                reason = str(exc)
            finally:
                _scope.busy = False
        fallback = "the eager attention" if was_eager else "stock SDPA attention"
        log_once(logger, logging.INFO, "maca attention (attention classes): %s; %s runs for these calls",
                 reason, fallback)
        return _stock(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    scaled_dot_product_attention.__maca_stock__ = stock
    return scaled_dot_product_attention


def _acquire() -> None:
    global _users
    with _lock:
        if _users == 0:
            LEDGER.set_attr(SDPA_CLASSES, F, "scaled_dot_product_attention", _make_sdpa(F.scaled_dot_product_attention))
        _users += 1


def _release() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users <= 0:
            _users = 0
            LEDGER.undo(SDPA_CLASSES.target)


def users() -> int:
    return _users


def enable(model: torch.nn.Module) -> ClassSwap:
    """Route every attention module of ``model`` with an attention-class table to our kernel (see module doc)."""
    swap = ClassSwap()
    try:
        for module in model.modules():
            sdpa = sdpa_class_of(module)
            if sdpa is None:
                continue
            swap.modules.append((module, type(module)))
            was_eager = not issubclass(type(module), sdpa)
            module.__dict__["_maca_was_eager"] = was_eager
            if was_eager:
                module.__class__ = sdpa
            swap.hooks.append(module.register_forward_pre_hook(_push))
            swap.hooks.append(module.register_forward_hook(_pop, always_call=True))
        if swap.modules:
            _acquire()
            swap.patched = True
    except Exception:
        undo(swap)
        raise
    return swap


def undo(swap: ClassSwap) -> None:
    for handle in swap.hooks:
        handle.remove()
    for module, cls in swap.modules:
        module.__class__ = cls
        module.__dict__.pop("_maca_was_eager", None)
    if swap.patched:
        _release()
        swap.patched = False
