"""attn_implementation="maca": our prefill attention behind Transformers' AttentionInterface.

``register()`` adds "maca" to ``AttentionInterface`` (the attention function)
and to ``AttentionMaskInterface`` (masks built as for SDPA: None when plain
causal/full, else a boolean [B, 1, Sq, Sk] mask). After that,
``from_pretrained(..., attn_implementation="maca")`` or
``model.set_attn_implementation("maca")`` routes every attention layer here.

``maca_attention_forward`` mirrors ``sdpa_attention_forward``'s semantics
exactly (no mask: causal for Sq > 1, keys cropped to Sq when the cache is
longer, as SDPA's top-left causal does; one query: full attention), and runs
``varlen_attention`` on the packed batch. What our kernel cannot do exactly
(dropout in training, attention sinks, position bias, paged caches, autograd,
masks that are not full/causal/sliding-window over padded sequences, head dims
it does not take) runs the stock SDPA function instead, with one log line
naming the reason.
"""

from __future__ import annotations

import logging

import torch

from maca_infer.adapters.hf import attention as packed
from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)

NAME = "maca"


def _stock_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _unsupported_reason(module, query, key, value, dropout, kwargs) -> str | None:
    if dropout and dropout > 0.0 and getattr(module, "training", False):
        return f"dropout={dropout} in training"
    for name in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            return f"{name} (not supported by our kernel)"
    if kwargs.get("cache") is not None:
        return "a paged (continuous batching) cache"
    if kwargs.get("output_attentions"):
        return "output_attentions=True"
    return None


def maca_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers attention function backed by ``varlen_attention``.

    query: [B, Hq, Sq, D]; key: [B, Hk, Sk, D]; value: [B, Hk, Sk, Dv]
        (fp16/bf16/fp32; GQA when Hq > Hk).
    attention_mask: None, or [B, 1, Sq, Sk] bool (True = attend) / additive float.
    Returns (attn_output [B, Sq, Hq, Dv], None) like ``sdpa_attention_forward``.

    o = softmax(scaling * q k^T (softcapped if ``softcap``) + mask) v, with the
    mask reproduced exactly by packing (see ``attention.plan_from_mask``).
    """
    reason = _unsupported_reason(module, query, key, value, dropout, kwargs)
    if reason is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # as sdpa_attention_forward: causal only without a mask and with more than one query
        # (one query sees every key: the decode step)
        causal = bool(causal) and attention_mask is None and query.shape[2] > 1
        if sliding_window is None:
            sliding_window = getattr(module, "sliding_window", None)
        try:
            out = packed.sdpa_equivalent(
                query, key, value, attention_mask, is_causal=causal, scale=scaling,
                sliding_window=sliding_window, logit_softcap=softcap,
            )
            return out, None
        except packed.UnsupportedAttention as exc:
            reason = str(exc)
    log_once(logger, logging.INFO, "attn_implementation=maca: %s; stock SDPA attention runs for these calls", reason)
    return _stock_sdpa()(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def require_interface() -> None:
    """RuntimeError unless the installed Transformers has AttentionInterface (>= 4.48)."""
    from maca_infer.adapters.hf import _compat

    if not _compat.has_attention_interface():
        raise RuntimeError(
            f'maca-infer: attn_implementation="maca" needs transformers >= {_compat.ATTENTION_INTERFACE_SINCE} '
            f"(AttentionInterface); transformers {_compat.transformers_version()} is installed. "
            "maca_infer.adapters.hf.enable(model) works on it: it puts our attention in through the model's "
            "attention classes."
        )


def register() -> None:
    """Make attn_implementation="maca" known to Transformers (idempotent); RuntimeError before 4.48."""
    require_interface()
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, maca_attention_forward)
    # masks exactly as for SDPA: our function reads them the way SDPA does
    AttentionMaskInterface.register(NAME, sdpa_mask)


def unregister() -> None:
    """Remove "maca" from Transformers' interfaces (models still set to it will fail to look it up)."""
    from maca_infer.adapters.hf import _compat

    if not _compat.has_attention_interface():
        return
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface._global_mapping.pop(NAME, None)
    AttentionMaskInterface._global_mapping.pop(NAME, None)


def is_registered() -> bool:
    from maca_infer.adapters.hf import _compat

    if not _compat.has_attention_interface():
        return False
    from transformers.modeling_utils import AttentionInterface

    return AttentionInterface._global_mapping.get(NAME) is maca_attention_forward
