"""experts_implementation="maca": our fused MoE behind Transformers' ExpertsInterface.

Transformers (>= 5) stores the routed experts of Mixtral, Qwen2-MoE,
Qwen3-MoE, ... as 3D weights in one ``*Experts`` module whose forward is
looked up by ``config._experts_implementation`` (``use_experts_implementation``).
``register()`` adds "maca" there, backed by ``ops.fused_moe``; ``enable()``
switches MoE models to it and ``disable()`` switches them back.

Layouts match one to one: ``gate_up_proj`` [E, 2I, H] (rows [0, I) gate,
[I, 2I) up: Transformers' "concatenated" layout), ``down_proj`` [E, H, I].
Experts modules our kernel cannot take exactly (biases, transposed or
interleaved weights, a custom gate, expert parallelism, activations other
than SiLU/GELU, autograd) run the stock forward, with one log line.
"""

from __future__ import annotations

import logging

import torch

from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)

NAME = "maca"

# config.hidden_act -> fused_moe activation
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def _stock_forward(module):
    """The experts class's own forward (use_experts_implementation wraps it with functools.wraps)."""
    wrapped = getattr(type(module).forward, "__wrapped__", None)
    if wrapped is not None:
        return wrapped
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS["grouped_mm"]


def _unsupported_reason(module, hidden_states: torch.Tensor) -> str | None:
    from transformers.integrations.moe import _default_apply_gate

    if not getattr(module, "has_gate", False) or getattr(module, "has_bias", True):
        return "experts without a gate or with biases"
    if getattr(module, "is_transposed", True) or not getattr(module, "is_concatenated", False):
        return "transposed or interleaved expert weights"
    if getattr(module, "_is_expert_parallel", False):
        return "expert parallelism"
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return f"{type(module).__name__} has its own gating function"
    activation = getattr(module.config, "hidden_act", None)
    if activation not in _ACTIVATIONS:
        return f"activation {activation!r}"
    weights = (module.gate_up_proj, module.down_proj)
    if any(w.dtype != hidden_states.dtype or not w.is_contiguous() for w in weights):
        return "expert weights in another dtype than the activations, or not contiguous"
    if torch.is_grad_enabled() and (hidden_states.requires_grad or any(w.requires_grad for w in weights)):
        return "autograd (our fused MoE is inference-only)"
    return None


def maca_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Routed experts through ``ops.fused_moe``.

    hidden_states: [T, H]; top_k_index: [T, k] int (expert ids 0..E-1);
    top_k_weights: [T, k] router weights. Uses self.gate_up_proj [E, 2I, H]
    and self.down_proj [E, H, I]. Returns [T, H] in hidden_states.dtype:
        y_t = sum_j w_tj * down[e_tj] @ (act(gate[e_tj] @ x_t) * (up[e_tj] @ x_t)).
    """
    reason = _unsupported_reason(self, hidden_states)
    if reason is not None:
        log_once(logger, logging.INFO, "experts_implementation=maca: %s; the stock experts forward runs", reason)
        return _stock_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    from maca_infer.common.ops.moe import fused_moe

    return fused_moe(
        hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index,
        activation=_ACTIVATIONS[self.config.hidden_act],
    )


def register() -> None:
    """Make experts_implementation="maca" known to Transformers (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, maca_experts_forward)


def unregister() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface._global_mapping.pop(NAME, None)


def interface_available() -> bool:
    """Transformers >= 5 dispatches experts through ExpertsInterface; older releases have no such seam."""
    try:
        from transformers.integrations.moe import ExpertsInterface  # noqa: F401 - presence check
    except ImportError:
        return False
    return True


def has_experts(model: torch.nn.Module) -> bool:
    """Does the model route tokens through ExpertsInterface-dispatched experts modules?"""
    if not hasattr(model, "set_experts_implementation") or not interface_available():
        return False
    return any(hasattr(m, "gate_up_proj") and hasattr(m, "has_gate") for m in model.modules())
