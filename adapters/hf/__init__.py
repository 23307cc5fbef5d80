"""maca_infer.adapters.hf: Hugging Face Transformers and Diffusers on the maca device.

    import maca_infer.adapters.hf as maca_hf

    model = AutoModelForCausalLM.from_pretrained(path, device_map=maca_hf.device_map())
    maca_hf.enable(model)          # our RMSNorm / gated MLP / rotary + attn_implementation="maca"
    ...
    maca_hf.disable(model)         # back to exactly the stock model

    pipe = DiffusionPipeline.from_pretrained(path).to(maca_hf.device())
    maca_hf.enable(pipe)           # our attention in every model of the pipeline

``device()`` is the maca device as a torch device ("cuda" on MACA, "cpu"
when emulated); "maca" / "maca:N" are accepted wherever these helpers take a
device. ``register_attention()`` makes attn_implementation="maca" (Transformers)
and the "maca" attention backend (Diffusers) known without touching a model.

Supported versions: common/versions.py (``transformers`` and ``diffusers``
entries), checked by ``enable()``. Runnable examples:
``python -m maca_infer.adapters.hf.generate`` and
``python -m maca_infer.adapters.hf.txt2img``.

The frameworks are imported lazily: this package imports neither until a
function needs it.
"""

from __future__ import annotations

from maca_infer.adapters.hf._device import activate, device, device_map, resolve_device
from maca_infer.common import versions
from maca_infer.common.log import get_logger

logger = get_logger(__name__)

__all__ = [
    "activate",
    "device",
    "device_map",
    "resolve_device",
    "enable",
    "disable",
    "is_enabled",
    "register_attention",
    "unregister_attention",
    "supported_model_types",
]


def _from_package(obj, package: str, base_name: str) -> bool:
    """Is ``obj`` an instance of ``package``'s ``base_name`` class (checked without importing the package)?"""
    return any(
        cls.__name__ == base_name and cls.__module__.split(".")[0] == package for cls in type(obj).__mro__
    )


def _kind(obj) -> str:
    if _from_package(obj, "transformers", "PreTrainedModel"):
        return "transformers"
    if _from_package(obj, "diffusers", "DiffusionPipeline"):
        return "pipeline"
    if _from_package(obj, "diffusers", "ModelMixin"):
        return "diffusers"
    raise ValueError(
        f"maca_infer.adapters.hf.enable: {type(obj).__name__} is not supported; pass a transformers "
        "PreTrainedModel, a diffusers ModelMixin (UNet, transformer, VAE) or a diffusers DiffusionPipeline"
    )


def supported_model_types() -> list[str]:
    """Transformers model types whose norms/MLP/rotary enable() swaps."""
    from maca_infer.adapters.hf.transformers_kernels import supported_model_types as _types

    return _types()


def register_attention() -> None:
    """Register attn_implementation="maca" (and experts_implementation="maca" where Transformers has
    ExpertsInterface) and the Diffusers "maca" attention backend, for the frameworks installed.

    RuntimeError on Transformers < 4.48 (no AttentionInterface), before anything is registered;
    ``enable(model)`` works there."""
    if versions.installed_version("transformers") is not None:
        versions.require("transformers")
        from maca_infer.adapters.hf import transformers_attention, transformers_experts

        transformers_attention.register()
        if transformers_experts.interface_available():
            transformers_experts.register()
    if versions.installed_version("diffusers") is not None:
        versions.require("diffusers")
        from maca_infer.adapters.hf import diffusers_attention

        diffusers_attention.register_backend()


def unregister_attention() -> None:
    if versions.installed_version("transformers") is not None:
        from maca_infer.adapters.hf import transformers_attention, transformers_experts

        transformers_attention.unregister()
        if transformers_experts.interface_available():
            transformers_experts.unregister()
    if versions.installed_version("diffusers") is not None:
        from maca_infer.adapters.hf import diffusers_attention

        diffusers_attention.unregister_backend()


def enable(
    model_or_pipe, *, attention: bool = True, rms_norm: bool = True, mlp: bool = True, rotary: bool = True,
    experts: bool = True,
):
    """Put our kernels into a Transformers model, a Diffusers model or every model of a pipeline.

    Transformers (model types: ``supported_model_types()``): RMSNorm ->
    ops.rms_norm, gated MLP -> fused gate|up matmul + ops.silu_and_mul /
    gelu_and_mul, rotary -> ops.apply_rotary, attention -> "maca"
    (ops.varlen_attention), routed MoE experts -> "maca" (ops.fused_moe);
    each can be turned off by its keyword.
    Diffusers: attention -> ops.varlen_attention (non-causal).
    Pipelines: every Diffusers model; Transformers components of a supported
    model type get all of the above, other Transformers components (text
    encoders) get the "maca" attention only (logged). All or nothing: if one
    component fails, the ones already enabled are disabled again.
    Returns ``model_or_pipe``. ValueError for unsupported objects or model
    types; RuntimeError for framework versions outside common/versions.py.
    """
    kind = _kind(model_or_pipe)
    activate()
    if kind == "transformers":
        versions.require("transformers")
        from maca_infer.adapters.hf import transformers_kernels

        transformers_kernels.enable_model(
            model_or_pipe, attention=attention, rms_norm=rms_norm, mlp=mlp, rotary=rotary, experts=experts
        )
    elif kind == "diffusers":
        versions.require("diffusers")
        from maca_infer.adapters.hf import diffusers_attention

        if attention:
            diffusers_attention.enable_model(model_or_pipe)
    else:
        versions.require("diffusers")
        enabled = []
        try:
            for name, component in _pipeline_models(model_or_pipe):
                if _enable_pipeline_part(name, component, attention=attention, rms_norm=rms_norm, mlp=mlp,
                                         rotary=rotary, experts=experts):
                    enabled.append(component)
        except Exception:
            for component in enabled:  # all or nothing
                disable(component)
            raise
    return model_or_pipe


def _enable_pipeline_part(name, component, **options) -> bool:
    """Enable one model of a pipeline; False when it is left stock (logged)."""
    if _kind(component) == "diffusers":
        if not options["attention"]:
            return False
        from maca_infer.adapters.hf import diffusers_attention

        diffusers_attention.enable_model(component)
        return True
    from maca_infer.adapters.hf import transformers_kernels

    versions.require("transformers")
    model_type = getattr(component.config, "model_type", None)
    if model_type in transformers_kernels.ARCHITECTURES:
        transformers_kernels.enable_model(component, **options)
        return True
    # text encoders (CLIP, T5, ...): no kernels of ours beyond attention
    if options["attention"] and transformers_kernels.can_use_maca_attention(component):
        transformers_kernels.enable_attention_only(component)
        logger.info("enable(pipeline): %s (%s): maca attention only (no RMSNorm/MLP/rotary kernels for it)",
                    name, model_type)
        return True
    logger.info("enable(pipeline): %s (%s) left stock: model type not supported", name, model_type)
    return False


def _pipeline_models(pipe):
    seen: set[int] = set()
    for name, component in pipe.components.items():
        if component is None or id(component) in seen:  # one model may sit under two names
            continue
        seen.add(id(component))
        try:
            _kind(component)
        except ValueError:  # schedulers, tokenizers, feature extractors
            continue
        yield name, component


def _enabled_part(obj) -> bool:
    from maca_infer.adapters.hf import diffusers_attention, transformers_kernels

    return transformers_kernels.is_enabled(obj) or diffusers_attention.is_enabled(obj)


def is_enabled(model_or_pipe) -> bool:
    if _kind(model_or_pipe) == "pipeline":
        return any(_enabled_part(c) for _, c in _pipeline_models(model_or_pipe))
    return _enabled_part(model_or_pipe)


def disable(model_or_pipe):
    """Undo ``enable``: the model (or every model of the pipeline) computes exactly what it did before."""
    kind = _kind(model_or_pipe)
    parts = _pipeline_models(model_or_pipe) if kind == "pipeline" else [("model", model_or_pipe)]
    found = False
    for _, part in parts:
        from maca_infer.adapters.hf import diffusers_attention, transformers_kernels

        if transformers_kernels.is_enabled(part):
            transformers_kernels.disable_model(part)
            found = True
        elif diffusers_attention.is_enabled(part):
            diffusers_attention.disable_model(part)
            found = True
    if not found:
        raise ValueError(f"maca_infer.adapters.hf.disable: {type(model_or_pipe).__name__} was not enabled")
    return model_or_pipe
