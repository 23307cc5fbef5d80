"""Our RMSNorm, fused gated MLP and rotary kernels inside Transformers models.

``enable_model(model)`` swaps, on that model instance only:
- every RMSNorm module of the architecture -> ``ops.rms_norm`` (Gemma's
  ``* (1 + w)`` variant with ``gemma=True``);
- every gated MLP (gate_proj, up_proj, down_proj) -> one matmul into a
  fused gate|up weight, then ``ops.silu_and_mul`` / ``ops.gelu_and_mul``. The
  fused weight is built once; gate_proj/up_proj keep their Parameters, now
  views into it, so no memory is duplicated and the state dict is unchanged;
- the architecture's ``apply_rotary_pos_emb`` -> ``ops.apply_rotary`` (neox
  style), inside this model's attention modules only (ledgered: _patches.ROTARY);
- attention -> attn_implementation="maca" (``transformers_attention``), or on
  Transformers without AttentionInterface (< 4.48) the attention-class seam
  (``transformers_attention_classes``);
- routed MoE experts -> experts_implementation="maca" (``ops.fused_moe``,
  ``transformers_experts``) where the model has ExpertsInterface experts.
``disable_model(model)`` undoes all of it; the model then computes exactly
what it computed before enable.

Architectures: ARCHITECTURES below (model_type -> modeling module and class
names; a module matches a class name when its class or a base class has it,
so 4.46's LlamaSdpaAttention counts as LlamaAttention). Anything else is a
ValueError naming the supported model types.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import threading
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from maca_infer.adapters.hf import _compat
from maca_infer.adapters.hf._patches import ROTARY
from maca_infer.common.patching import LEDGER
from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)


@dataclass(frozen=True)
class Architecture:
    module: str  # transformers.models.<module>.modeling_<module>
    rms_norm_classes: tuple[str, ...]
    mlp_classes: tuple[str, ...]
    attention_classes: tuple[str, ...]
    gemma_norm: bool = False  # y = x_hat * (1 + w), math in fp32, as Gemma does
    activation_attrs: tuple[str, ...] = ("hidden_act",)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", ("LlamaRMSNorm",), ("LlamaMLP",), ("LlamaAttention",)),
    "mistral": Architecture("mistral", ("MistralRMSNorm",), ("MistralMLP",), ("MistralAttention",)),
    "qwen2": Architecture("qwen2", ("Qwen2RMSNorm",), ("Qwen2MLP",), ("Qwen2Attention",)),
    "qwen3": Architecture("qwen3", ("Qwen3RMSNorm",), ("Qwen3MLP",), ("Qwen3Attention",)),
    "gemma": Architecture("gemma", ("GemmaRMSNorm",), ("GemmaMLP",), ("GemmaAttention",), gemma_norm=True),
    "gemma2": Architecture(
        "gemma2", ("Gemma2RMSNorm",), ("Gemma2MLP",), ("Gemma2Attention",), gemma_norm=True,
        activation_attrs=("hidden_activation", "hidden_act"),
    ),
    # mixture-of-experts models: norms, rotary, attention, the dense/shared-expert MLPs and
    # (through ExpertsInterface) the routed experts
    "qwen2_moe": Architecture("qwen2_moe", ("Qwen2MoeRMSNorm",), ("Qwen2MoeMLP",), ("Qwen2MoeAttention",)),
    "qwen3_moe": Architecture("qwen3_moe", ("Qwen3MoeRMSNorm",), ("Qwen3MoeMLP",), ("Qwen3MoeAttention",)),
    "mixtral": Architecture("mixtral", ("MixtralRMSNorm",), (), ("MixtralAttention",)),
}

# config activation name -> (op name, keyword arguments)
_GATED_ACTIVATIONS = {
    "silu": ("silu_and_mul", {}),
    "swish": ("silu_and_mul", {}),
    "gelu": ("gelu_and_mul", {"approximate": "none"}),
    "gelu_pytorch_tanh": ("gelu_and_mul", {"approximate": "tanh"}),
}

_STATE_ATTR = "_maca_infer_state"


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def _is_one_of(module: torch.nn.Module, class_names: tuple[str, ...]) -> bool:
    return any(cls.__name__ in class_names for cls in type(module).__mro__)


def architecture_of(model: torch.nn.Module) -> tuple[str, Architecture]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"maca_infer.adapters.hf.enable: model_type={model_type!r} ({type(model).__name__}) is not supported; "
            f"supported: {', '.join(supported_model_types())}"
        )
    return model_type, ARCHITECTURES[model_type]


def _autograd_needed(*tensors: torch.Tensor) -> bool:
    """Our kernels are inference-only: with autograd recording, the stock module runs (said once)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        log_once(logger, logging.INFO, "autograd is recording: stock Transformers modules run; wrap inference "
                 "in torch.no_grad() / torch.inference_mode() to use the maca kernels")
        return True
    return False


# ---------------------------------------------------------------- RMSNorm


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """hidden_states [..., H] -> rms_norm(hidden_states, weight [H]) in hidden_states.dtype."""
    from maca_infer.common.ops.norm import rms_norm

    if _autograd_needed(self.weight, hidden_states):
        return type(self).forward(self, hidden_states)
    if self.weight.dtype != hidden_states.dtype and not self._maca_gemma_norm:
        # Llama-style norms return weight * x in the promoted dtype: keep the stock path for mixed dtypes
        return type(self).forward(self, hidden_states)
    eps = getattr(self, "variance_epsilon", None)
    if eps is None:
        eps = self.eps
    return rms_norm(hidden_states, self.weight, eps, gemma=self._maca_gemma_norm)


# ---------------------------------------------------------------- gated MLP


def _fused_gate_up(mlp: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused [2I, H] gate|up weight (and bias) of ``mlp``, rebuilt if .to() replaced the views."""
    gate, up = mlp.gate_proj, mlp.up_proj
    fused = mlp.__dict__.get("_maca_gate_up")
    size = gate.weight.shape[0]
    if (
        fused is not None
        and fused[0].device == gate.weight.device
        and fused[0].dtype == gate.weight.dtype
        and gate.weight.data_ptr() == fused[0].data_ptr()
        and up.weight.data_ptr() == fused[0][size:].data_ptr()
    ):
        return fused
    with torch.no_grad():
        weight = torch.cat([gate.weight.detach(), up.weight.detach()], dim=0)
        gate.weight.data = weight[:size]
        up.weight.data = weight[size:]
        bias = None
        if gate.bias is not None:
            bias = torch.cat([gate.bias.detach(), up.bias.detach()], dim=0)
            gate.bias.data = bias[:size]
            up.bias.data = bias[size:]
    mlp.__dict__["_maca_gate_up"] = (weight, bias)
    return weight, bias


def _unfuse_gate_up(mlp: torch.nn.Module) -> None:
    """Give gate_proj/up_proj their own storage again (values unchanged)."""
    if mlp.__dict__.pop("_maca_gate_up", None) is None:
        return
    with torch.no_grad():
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight.data = proj.weight.data.clone()
            if proj.bias is not None:
                proj.bias.data = proj.bias.data.clone()


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """x [..., H] -> down_proj(act(x W_gate^T) * (x W_up^T)) with one gate|up matmul and a fused act-and-mul."""
    from maca_infer.common.ops import activation

    if _autograd_needed(self.gate_proj.weight, self.up_proj.weight, x):
        return type(self).forward(self, x)  # gradients must reach gate_proj/up_proj themselves
    weight, bias = _fused_gate_up(self)
    gate_up = F.linear(x, weight, bias)
    op_name, op_kwargs = self._maca_act
    return self.down_proj(getattr(activation, op_name)(gate_up, **op_kwargs))


def _can_fuse(mlp: torch.nn.Module) -> str | None:
    for name in ("gate_proj", "up_proj", "down_proj"):
        if type(getattr(mlp, name, None)) is not torch.nn.Linear:
            return f"{name} is not a plain nn.Linear"
    gate, up = mlp.gate_proj, mlp.up_proj
    if gate.weight.shape != up.weight.shape or gate.weight.dtype != up.weight.dtype:
        return "gate_proj and up_proj differ in shape or dtype"
    if gate.weight.device != up.weight.device or gate.weight.device.type == "meta":
        return "gate_proj and up_proj are not on one real device"
    if (gate.bias is None) != (up.bias is None):
        return "only one of gate_proj/up_proj has a bias"
    return None


# ---------------------------------------------------------------- rotary

_rotary_scope = threading.local()
_rotary_users: dict[str, int] = {}  # modeling module -> number of enabled models using its patch
_rotary_lock = threading.Lock()


def _in_rotary_scope() -> bool:
    return getattr(_rotary_scope, "depth", 0) > 0


def _enter_rotary_scope(module, args, kwargs=None):
    _rotary_scope.depth = getattr(_rotary_scope, "depth", 0) + 1


def _leave_rotary_scope(module, args, output):
    _rotary_scope.depth = getattr(_rotary_scope, "depth", 1) - 1


def _make_rotary(stock):
    """Our replacement for a modeling module's ``apply_rotary_pos_emb``.

    q: [B, Hq, S, D], k: [B, Hk, S, D]; cos/sin: [B | 1, S, D] with both halves
    equal (neox layout, cat(freqs, freqs)), or a [S_max, D] table with
    ``position_ids`` [B, S] (Mixtral on Transformers 4.46 gathers
    cos[position_ids]; a 3D cos/sin is already per position and
    ``position_ids`` is not used, as the stock functions do). Runs ops.apply_rotary on
    [B*S, H, D] token views with cos/sin [B*S, D/2]:
        out[..., :D/2] = x1 cos - x2 sin, out[..., D/2:] = x2 cos + x1 sin.
    Outside an enabled model's attention, or for layouts it does not
    recognise, the stock function runs.
    """

    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    # the stock function's parameters after (q, k, cos, sin): (unsqueeze_dim) or, on 4.46, (position_ids, unsqueeze_dim)
    after_sin = [p.name for p in inspect.signature(stock).parameters.values() if p.kind in positional][4:]

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not _in_rotary_scope() or len(args) > len(after_sin):
            return stock(q, k, cos, sin, *args, **kwargs)
        extra = {**dict(zip(after_sin, args)), **kwargs}
        position_ids = extra.pop("position_ids", None)
        if extra.pop("unsqueeze_dim", 1) != 1 or extra:
            return stock(q, k, cos, sin, *args, **kwargs)
        table = position_ids is not None and cos.dim() == 2
        cos_at, sin_at = (cos[position_ids], sin[position_ids]) if table else (cos, sin)
        reason = _rotary_unsupported(q, k, cos_at, sin_at)
        if reason is None and _autograd_needed(q, k):
            return stock(q, k, cos, sin, *args, **kwargs)
        if reason is not None:
            log_once(logger, logging.INFO, "rotary: %s; the stock apply_rotary_pos_emb runs", reason)
            return stock(q, k, cos, sin, *args, **kwargs)
        cos, sin = cos_at, sin_at
        from maca_infer.common.ops.rotary import apply_rotary

        batch, q_heads, seq, head_dim = q.shape
        k_heads = k.shape[1]
        half = head_dim // 2
        cos_half = cos[..., :half].expand(batch, seq, half).reshape(batch * seq, half)
        sin_half = sin[..., :half].expand(batch, seq, half).reshape(batch * seq, half)
        q_tokens = q.transpose(1, 2).reshape(batch * seq, q_heads, head_dim)
        k_tokens = k.transpose(1, 2).reshape(batch * seq, k_heads, head_dim)
        q_out, k_out = apply_rotary(q_tokens, k_tokens, cos_half, sin_half, style="neox")
        return (
            q_out.view(batch, seq, q_heads, head_dim).transpose(1, 2),
            k_out.view(batch, seq, k_heads, head_dim).transpose(1, 2),
        )

    apply_rotary_pos_emb.__maca_stock__ = stock
    return apply_rotary_pos_emb


def _rotary_unsupported(q, k, cos, sin) -> str | None:
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return f"layout q{tuple(q.shape)} cos{tuple(cos.shape)}"
    head_dim = q.shape[-1]
    if cos.shape[-1] != head_dim or head_dim % 2 or cos.shape[1] != q.shape[2] or cos.shape[0] not in (1, q.shape[0]):
        return f"cos/sin {tuple(cos.shape)} for q {tuple(q.shape)}"
    half = head_dim // 2
    if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
        return "cos/sin halves differ (not neox-style rotary)"
    return None


def _acquire_rotary(module_name: str) -> None:
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    with _rotary_lock:
        if _rotary_users.get(module_name, 0) == 0:
            part = LEDGER.part(ROTARY, f"{modeling.__name__}.apply_rotary_pos_emb")
            LEDGER.set_attr(part, modeling, "apply_rotary_pos_emb", _make_rotary(modeling.apply_rotary_pos_emb))
        _rotary_users[module_name] = _rotary_users.get(module_name, 0) + 1


def _release_rotary(module_name: str) -> None:
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    with _rotary_lock:
        _rotary_users[module_name] = _rotary_users.get(module_name, 1) - 1
        if _rotary_users[module_name] <= 0:
            _rotary_users.pop(module_name, None)
            LEDGER.undo(f"{modeling.__name__}.apply_rotary_pos_emb")


# ---------------------------------------------------------------- enable / disable


@dataclass
class ModelState:
    model_type: str
    previous_attention: str | None = None
    patched_forwards: list[torch.nn.Module] = field(default_factory=list)
    fused_mlps: list[torch.nn.Module] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    rotary_module: str | None = None
    previous_experts: str | None = None
    attention_classes: object | None = None  # transformers_attention_classes.ClassSwap (< 4.48)
    skipped: list[str] = field(default_factory=list)


def is_enabled(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def enable_model(
    model: torch.nn.Module,
    *,
    attention: bool = True,
    rms_norm: bool = True,
    mlp: bool = True,
    rotary: bool = True,
    experts: bool = True,
) -> ModelState:
    """Swap our kernels into one Transformers model (see the module docstring)."""
    if is_enabled(model):
        raise RuntimeError(f"maca_infer.adapters.hf.enable: {type(model).__name__} is already enabled; disable() it first")
    model_type, arch = architecture_of(model)
    state = ModelState(model_type)
    config = model.config
    try:
        for module in model.modules():
            name = type(module).__name__
            if rms_norm and _is_one_of(module, arch.rms_norm_classes):
                module._maca_gemma_norm = arch.gemma_norm
                module.forward = types.MethodType(_rms_norm_forward, module)
                state.patched_forwards.append(module)
            elif mlp and _is_one_of(module, arch.mlp_classes):
                activation = next((getattr(config, a) for a in arch.activation_attrs if getattr(config, a, None)), None)
                reason = _can_fuse(module)
                if activation not in _GATED_ACTIVATIONS:
                    reason = f"activation {activation!r} has no fused act-and-mul op"
                if reason is not None:
                    state.skipped.append(f"{name}: {reason}")
                    continue
                module._maca_act = _GATED_ACTIVATIONS[activation]
                _fused_gate_up(module)
                state.fused_mlps.append(module)
                module.forward = types.MethodType(_gated_mlp_forward, module)
                state.patched_forwards.append(module)
            elif rotary and _is_one_of(module, arch.attention_classes):
                state.hooks.append(module.register_forward_pre_hook(_enter_rotary_scope))
                state.hooks.append(module.register_forward_hook(_leave_rotary_scope, always_call=True))
        if rotary and state.hooks:
            _acquire_rotary(arch.module)
            state.rotary_module = arch.module
        if attention:
            _set_maca_attention(model, state)
        if experts:
            _set_maca_experts(model, state)
    except Exception:
        _undo(model, state)
        raise
    setattr(model, _STATE_ATTR, state)
    for line in state.skipped:
        log_once(logger, logging.INFO, "enable(%s): kept stock %s", model_type, line)
    return state


def _set_maca_attention(model: torch.nn.Module, state: ModelState) -> None:
    from maca_infer.adapters.hf import transformers_attention, transformers_attention_classes

    if not _compat.has_attention_interface():
        state.attention_classes = transformers_attention_classes.enable(model)
        return
    transformers_attention.register()
    state.previous_attention = model.config._attn_implementation
    model.set_attn_implementation(transformers_attention.NAME)


def _set_maca_experts(model: torch.nn.Module, state: ModelState) -> None:
    from maca_infer.adapters.hf import transformers_experts

    if not transformers_experts.has_experts(model):
        return
    transformers_experts.register()
    state.previous_experts = model.config._experts_implementation
    model.set_experts_implementation(transformers_experts.NAME)


def can_use_maca_attention(model: torch.nn.Module) -> bool:
    """Does this model pick its attention through AttentionInterface (so "maca" can be set), or on
    Transformers < 4.48 through attention-class tables?"""
    if not _compat.has_attention_interface():
        from maca_infer.adapters.hf import transformers_attention_classes

        return transformers_attention_classes.has_attention_classes(model)
    can_set = getattr(model, "_can_set_attn_implementation", None)
    return bool(can_set and can_set())


def enable_attention_only(model: torch.nn.Module) -> ModelState:
    """Our attention for any model type that dispatches through AttentionInterface (or attention classes)."""
    if is_enabled(model):
        raise RuntimeError(f"maca_infer.adapters.hf.enable: {type(model).__name__} is already enabled; disable() it first")
    state = ModelState(getattr(model.config, "model_type", type(model).__name__))
    _set_maca_attention(model, state)
    setattr(model, _STATE_ATTR, state)
    return state


def _undo(model: torch.nn.Module, state: ModelState) -> None:
    for module in state.patched_forwards:
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_maca_gemma_norm", None)
        module.__dict__.pop("_maca_act", None)
    for module in state.fused_mlps:
        _unfuse_gate_up(module)
    for handle in state.hooks:
        handle.remove()
    if state.rotary_module is not None:
        _release_rotary(state.rotary_module)
    if state.previous_attention is not None:
        model.set_attn_implementation(state.previous_attention)
    if state.attention_classes is not None:
        from maca_infer.adapters.hf import transformers_attention_classes

        transformers_attention_classes.undo(state.attention_classes)
    if state.previous_experts is not None:
        model.set_experts_implementation(state.previous_experts)


def disable_model(model: torch.nn.Module) -> None:
    """Undo ``enable_model``: stock modules, stock rotary, the previous attention implementation."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"maca_infer.adapters.hf.disable: {type(model).__name__} was not enabled")
    _undo(model, state)
    delattr(model, _STATE_ATTR)
