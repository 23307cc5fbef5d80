"""Our attention in Diffusers models: an attention processor and a dispatcher backend.

Diffusers reaches attention two ways, and we plug into both:
1. ``Attention`` modules with the stock ``AttnProcessor2_0`` (UNet2D and
   UNet2DCondition blocks, DiT/PixArt ``Transformer2DModel``, the VAE's
   mid-block) call ``F.scaled_dot_product_attention`` themselves.
   ``MacaAttnProcessor`` does what AttnProcessor2_0 does, with the SDPA call
   replaced by ``attention.sdpa_equivalent`` (our ``varlen_attention``,
   non-causal, key-padding masks packed into cu_seqlens_k).
2. Newer transformers (Flux, Wan, QwenImage, ...) call
   ``dispatch_attention_fn``, which looks the backend up by
   ``AttentionBackendName``. ``register_backend()`` adds a "maca" member and
   its function, so ``model.set_attention_backend("maca")`` and
   ``with attention_backend("maca")`` work (ledgered: _patches.DIFFUSERS_BACKEND).

Anything our kernel cannot reproduce exactly (dropout, return_lse, context
parallelism, bias masks, autograd) runs the stock SDPA / native backend, with
one log line naming the reason.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

from maca_infer.adapters.hf import attention as packed
from maca_infer.adapters.hf._patches import DIFFUSERS_BACKEND
from maca_infer.common.log import get_logger, log_once
from maca_infer.common.patching import LEDGER

logger = get_logger(__name__)

BACKEND_NAME = "maca"
_STATE_ATTR = "_maca_infer_diffusers_state"


def _attend(query, key, value, attn_mask, *, is_causal: bool, scale: float | None) -> torch.Tensor:
    """query/key/value [B, H, S, D] -> [B, H, Sq, Dv] like F.scaled_dot_product_attention, on our kernel if exact."""
    try:
        return packed.sdpa_equivalent(query, key, value, attn_mask, is_causal=is_causal, scale=scale).transpose(1, 2)
    except packed.UnsupportedAttention as exc:
        log_once(logger, logging.INFO, "diffusers attention: %s; stock SDPA runs for these calls", exc)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale)


class MacaAttnProcessor:
    """AttnProcessor2_0's computation with our attention in place of SDPA.

    hidden_states: [B, N, C] tokens or [B, C, H, W] feature maps;
    encoder_hidden_states: [B, M, C_cross] or None (self-attention);
    attention_mask: [B, M] / [B, 1, M] key mask (additive or bool) or None.
    Returns hidden_states' shape. Like AttnProcessor2_0 it uses SDPA's
    default scale 1/sqrt(head_dim) (it does not read ``attn.scale``).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = _attend(query, key, value, attention_mask, is_causal=False, scale=None)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ---------------------------------------------------------------- dispatcher backend


def maca_dispatch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config=None,
) -> torch.Tensor:
    """Diffusers dispatcher backend "maca".

    query: [B, Sq, Hq, D]; key: [B, Sk, Hk, D]; value: [B, Sk, Hk, Dv]
    (the dispatcher's layout); attn_mask: None, [B, Sk] or 4D, bool/additive.
    Returns [B, Sq, Hq, Dv] = softmax(scale * q k^T + mask) v, causal
    top-left when ``is_causal`` (as the native backend).
    """
    reason = None
    if dropout_p:
        reason = f"dropout_p={dropout_p}"
    elif return_lse:
        reason = "return_lse=True"
    elif _parallel_config is not None:
        reason = "context parallelism"
    elif query.shape[2] != key.shape[2] and not enable_gqa:
        reason = "different query and key head counts without enable_gqa"
    if reason is None:
        try:
            return packed.sdpa_equivalent(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask,
                is_causal=is_causal, scale=scale,
            )
        except packed.UnsupportedAttention as exc:
            reason = str(exc)
    log_once(logger, logging.INFO, "diffusers backend maca: %s; the native backend runs for these calls", reason)
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]
    arguments = dict(
        query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
        scale=scale, enable_gqa=enable_gqa, return_lse=return_lse, _parallel_config=_parallel_config,
    )
    accepted = _AttentionBackendRegistry._supported_arg_names[AttentionBackendName.NATIVE]
    return native(**{k: v for k, v in arguments.items() if k in accepted})


def has_dispatcher() -> bool:
    """diffusers >= 0.35 routes newer models through attention_dispatch; older ones only have processors."""
    import importlib.util

    return importlib.util.find_spec("diffusers.models.attention_dispatch") is not None


def _backend_member():
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName._value2member_map_.get(BACKEND_NAME)


def register_backend():
    """Add the "maca" member to AttentionBackendName and register our function (idempotent).

    Returns the enum member, or None on a diffusers without the dispatcher.
    """
    if not has_dispatcher():
        return None
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, _check_device

    member = _backend_member()
    if member is None:
        LEDGER.apply(DIFFUSERS_BACKEND, lambda: _add_member(AttentionBackendName))
        member = _backend_member()
    if _AttentionBackendRegistry._backends.get(member) is not maca_dispatch_attention:
        _AttentionBackendRegistry._backends[member] = maca_dispatch_attention
        _AttentionBackendRegistry._constraints[member] = [_check_device]
        _AttentionBackendRegistry._supported_arg_names[member] = set(
            inspect.signature(maca_dispatch_attention).parameters
        )
    return member


def _add_member(enum_cls):
    """AttentionBackendName is a closed str Enum: build the "maca" member the way Enum does; returns its undo."""
    member = str.__new__(enum_cls, BACKEND_NAME)
    member._name_ = "MACA"
    member._value_ = BACKEND_NAME
    member.__objclass__ = enum_cls
    enum_cls._member_map_["MACA"] = member
    enum_cls._value2member_map_[BACKEND_NAME] = member
    enum_cls._member_names_.append("MACA")

    def undo():
        enum_cls._member_map_.pop("MACA", None)
        enum_cls._value2member_map_.pop(BACKEND_NAME, None)
        if "MACA" in enum_cls._member_names_:
            enum_cls._member_names_.remove("MACA")

    return undo


def unregister_backend() -> None:
    """Remove the "maca" member and its registry entries; the active backend falls back to native."""
    if not has_dispatcher():
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    member = _backend_member()
    if member is None:
        return
    if _AttentionBackendRegistry._active_backend == member:
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    for table in (_AttentionBackendRegistry._backends, _AttentionBackendRegistry._constraints,
                  _AttentionBackendRegistry._supported_arg_names):
        table.pop(member, None)
    if LEDGER.is_applied(DIFFUSERS_BACKEND.target):
        LEDGER.undo(DIFFUSERS_BACKEND.target)


# ---------------------------------------------------------------- enable / disable a model


def enable_model(model: torch.nn.Module) -> dict:
    """Route every attention of a Diffusers model to ours; returns what was changed.

    AttnProcessor2_0 processors become MacaAttnProcessor; processors that
    dispatch (have ``_attention_backend``) get the "maca" backend. Other
    processors stay stock (one log line lists them).
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    if getattr(model, _STATE_ATTR, None) is not None:
        raise RuntimeError(f"maca_infer.adapters.hf.enable: {type(model).__name__} is already enabled; disable() it first")
    member = register_backend()
    swapped: list[tuple[torch.nn.Module, object]] = []
    backends: list[tuple[object, object]] = []
    kept: set[str] = set()
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(module, "set_processor"):
            continue
        if type(processor) is AttnProcessor2_0:
            swapped.append((module, processor))
            module.processor = MacaAttnProcessor()  # set directly: set_processor logs and pops module state
        elif member is not None and hasattr(processor, "_attention_backend"):
            if getattr(processor, "_parallel_config", None) is not None:
                kept.add(f"{type(processor).__name__} (context parallel)")
                continue
            backends.append((processor, processor._attention_backend))
            processor._attention_backend = member
        else:
            kept.add(type(processor).__name__)
    if kept:
        log_once(logger, logging.INFO, "enable(%s): stock attention kept for processors %s",
                 type(model).__name__, ", ".join(sorted(kept)))
    state = {"processors": swapped, "backends": backends, "kept": sorted(kept)}
    setattr(model, _STATE_ATTR, state)
    return state


def disable_model(model: torch.nn.Module) -> None:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"maca_infer.adapters.hf.disable: {type(model).__name__} was not enabled")
    for module, processor in state["processors"]:
        module.processor = processor
    for processor, previous in state["backends"]:
        processor._attention_backend = previous
    delattr(model, _STATE_ATTR)


def is_enabled(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None
