"""The one place that changes SGLang's behaviour at run time, with its ledger.

Each runtime fix is registered through SGLang's own documented seam for
general plugins, ``sglang.srt.plugins.hook_registry.HookRegistry`` (applied by
``load_plugins()`` in every process), never by editing SGLang's files.
:func:`hook` records why the fix exists, the SGLang versions it was written
for and the condition for its removal (vLLM-metax / vllm-ascend style), and
refuses to register the same target twice.

Module-level *values* (flags SGLang computes once at import) cannot go
through the HookRegistry, which wraps callables; :func:`set_module_value`
swaps them with the original kept (``restore_values()`` puts them back) and the
same ledger entry.

``LEDGER`` is the list; ``ledger_markdown()`` renders it for the docs and the
doctor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from maca_infer.common.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class PatchEntry:
    target: str  # dotted path SGLang's HookRegistry resolves
    hook_type: str  # "around" | "before" | "after" | "replace"
    why: str
    how: str
    upstream_versions: str
    remove_when: str


LEDGER: dict[str, PatchEntry] = {}


def hook(target: str, fn: Callable, *, hook_type: str = "around", why: str, how: str,
         upstream_versions: str, remove_when: str) -> None:
    """Register ``fn`` on ``target`` through SGLang's HookRegistry and record it.

    Raises RuntimeError when ``target`` already has a maca-infer hook: two
    fixes on one target would hide each other.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if target in LEDGER:
        raise RuntimeError(f"maca-infer: {target} already has a runtime hook ({LEDGER[target].why})")
    try:
        kind = HookType(hook_type)
    except ValueError:
        allowed = ", ".join(t.value for t in HookType)
        raise ValueError(f"hook_type={hook_type!r} is not supported; allowed: {allowed}") from None
    HookRegistry.register(target, fn, kind)
    LEDGER[target] = PatchEntry(target, hook_type, why, how, upstream_versions, remove_when)
    logger.debug("SGLang runtime hook on %s: %s", target, why)


_ORIGINAL_VALUES: dict[str, tuple[object, str, object]] = {}


def set_module_value(module: str, attr: str, value, *, why: str, how: str, upstream_versions: str,
                     remove_when: str) -> None:
    """Set ``module.attr = value`` (a flag read at call time), keeping the original."""
    import importlib

    target = f"{module}.{attr}"
    if target in LEDGER:
        raise RuntimeError(f"maca-infer: {target} already has a runtime patch ({LEDGER[target].why})")
    mod = importlib.import_module(module)
    if not hasattr(mod, attr):
        raise RuntimeError(f"maca-infer: {target} does not exist in this SGLang; the patch needs review")
    _ORIGINAL_VALUES[target] = (mod, attr, getattr(mod, attr))
    setattr(mod, attr, value)
    LEDGER[target] = PatchEntry(target, "value", why, how, upstream_versions, remove_when)


def restore_values() -> None:
    """Put back every value set by :func:`set_module_value` (tests)."""
    for target, (mod, attr, original) in list(_ORIGINAL_VALUES.items()):
        setattr(mod, attr, original)
        del _ORIGINAL_VALUES[target]
        LEDGER.pop(target, None)


def ledger_markdown() -> str:
    lines = ["| target | why | how | written for | remove when |", "|---|---|---|---|---|"]
    for e in LEDGER.values():
        lines.append(f"| `{e.target}` ({e.hook_type}) | {e.why} | {e.how} | sglang {e.upstream_versions} | {e.remove_when} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The fixes (registered by plugin.register() only when the maca platform is
# active, so an ordinary SGLang launch is untouched).


def _rope_on_maca(original, *args, **kwargs):
    """get_rope_wrapper(..., device="cpu") -> the device-agnostic get_rope path."""
    if kwargs.get("device") == "cpu":
        kwargs["device"] = None
    return original(*args, **kwargs)


def _awq_capability_for_moe_wna16(original, *args, **kwargs):
    """moe_wna16's get_device_capability: the AWQ floor (7, 5) when the device reports none."""
    major, minor = original(*args, **kwargs)
    if major is None:
        # the emulated maca device runs our W4A16 kernels, which have no capability floor
        return 7, 5
    return major, minor


def _shared_expert_gate(hidden_states: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """sigmoid(hidden_states @ gate_weight) per token, fp32: [T, H] x [H] -> [T, 1]."""
    return torch.sigmoid(hidden_states.float() @ gate_weight.float().view(-1, 1))


def gate_sigmoid_mul_torch(hidden_states, gate_weight, shared_output):
    """Torch twin of SGLang's Triton fused_gate_sigmoid_mul: gate(h) * shared_output."""
    return (_shared_expert_gate(hidden_states, gate_weight) * shared_output.float()).to(shared_output.dtype)


def gate_sigmoid_mul_add_torch(hidden_states, gate_weight, shared_output, final_hidden_states):
    """Torch twin of fused_gate_sigmoid_mul_add: final_hidden_states += gate(h) * shared_output (in place)."""
    gated = _shared_expert_gate(hidden_states, gate_weight) * shared_output.float()
    final_hidden_states.copy_((final_hidden_states.float() + gated).to(final_hidden_states.dtype))


def register_all(*, emulated: bool) -> None:
    if LEDGER:
        return
    hook(
        "sglang.srt.models.deepseek_v2.get_rope_wrapper",
        _rope_on_maca,
        why=(
            "On the emulated maca device tensors live on 'cpu', and SGLang's get_rope_wrapper "
            "sends device 'cpu' to get_rope_cpu, which asserts rope_scaling is deepseek_yarn "
            "(AssertionError for DeepSeek-shaped models without YaRN, e.g. the project's tiny ones)"
        ),
        how=(
            "around-hook on the name deepseek_v2.py calls: device 'cpu' becomes None, so the "
            "generic get_rope path builds the same rotary classes (YaRN included); our "
            "RotaryEmbedding OOT forward then runs maca_infer.common.ops.rotary_embedding"
        ),
        upstream_versions=">=0.5.20,<0.6 (checked on 0.5.23)",
        remove_when="SGLang routes rope construction through the platform (or get_rope_cpu handles no scaling)",
    )
    if emulated:
        set_module_value(
            "sglang.srt.model_executor.forward_batch_info", "_is_cpu", True,
            why=(
                "DP attention: ForwardBatch.prepare_mlp_sync_batch pins a host tensor unless "
                "SGLang's in-tree CPU engine is on (pin_memory=not _is_cpu); pinning needs a CUDA "
                "driver, so on the emulated maca device (host tensors) every DP step raised "
                "'Found no NVIDIA driver'"
            ),
            how=(
                "the module's _is_cpu flag (read at call time, only in prepare_mlp_sync_batch and "
                "its padding) is True on the emulated device: no pinning, and padded rows take the "
                "backend's get_cpu_graph_seq_len_fill_value (the maca backend answers 1)"
            ),
            upstream_versions=">=0.5.20,<0.6 (checked on 0.5.23)",
            remove_when="SGLang asks is_pin_memory_available(device) there as it does elsewhere",
        )
        from sglang.srt.layers import dp_attention

        set_module_value(
            "sglang.srt.layers.dp_attention", "memcpy_func", dp_attention.memcpy_cpu,
            why=(
                "DP attention gathers rows with a Triton kernel unless SGLang's in-tree CPU engine is "
                "on (memcpy_func chosen once at import); the emulated maca device declares "
                "supports_triton=False and Triton has no CPU driver ('0 active drivers')"
            ),
            how="memcpy_func is SGLang's own torch copy (memcpy_cpu) on the emulated device",
            upstream_versions=">=0.5.20,<0.6 (checked on 0.5.23)",
            remove_when="dp_attention consults current_platform.capabilities.supports_triton",
        )
        set_module_value(
            "sglang.srt.distributed.parallel_state", "_is_cpu", True,
            why=(
                "tp/dp collectives on host tensors: unless SGLang's in-tree CPU engine is on, "
                "all_gather_into_tensor / reduce_scatter_tensor go through the custom ops "
                "sglang::reg_all_gather_into_tensor etc., which have no CPU kernel "
                "(NotImplementedError ... from the 'CPU' backend) on the emulated device"
            ),
            how=(
                "the module's _is_cpu flag (read at call time: all_gather_into_tensor, "
                "reduce_scatter_tensor, and skipping torch.cuda.empty_cache at teardown) is True "
                "on the emulated device, so they call torch.distributed (gloo) directly"
            ),
            upstream_versions=">=0.5.20,<0.6 (checked on 0.5.23)",
            remove_when="parallel_state registers CPU kernels for its collective custom ops or asks the platform",
        )
        hook(
            "sglang.srt.layers.quantization.moe_wna16.get_device_capability",
            _awq_capability_for_moe_wna16,
            why=(
                "--quantization moe_wna16 on an AWQ checkpoint needs CUDA compute capability >= 7.5 "
                "(SGLang's AWQ Triton kernels); the emulated maca device reports (None, None), so "
                "SGLang refused the checkpoint ('model config (awq) does not match ... (moe_wna16)') "
                "and MoeWNA16Config() raised TypeError on None * 10"
            ),
            how=(
                "around-hook on the name moe_wna16.py calls (only that module): (None, None) reads "
                "as AWQ's floor (7, 5); the maca platform runs our W4A16 kernels instead of SGLang's"
            ),
            upstream_versions=">=0.5.20,<0.6 (checked on 0.5.23)",
            remove_when="SGLang asks the platform (verify_quantization / capabilities) instead of CUDA capability",
        )
        for name, fn in (("fused_gate_sigmoid_mul", gate_sigmoid_mul_torch),
                         ("fused_gate_sigmoid_mul_add", gate_sigmoid_mul_add_torch)):
            hook(
                f"sglang.srt.models.qwen2_moe.{name}",
                fn,
                hook_type="replace",
                why=(
                    "SGLang's Qwen2-MoE gates its shared expert with a Triton kernel on every device "
                    "(no device check); the emulated maca device has no Triton driver "
                    "('0 active drivers')"
                ),
                how=f"replace-hook on the name qwen2_moe.py calls: the same math in torch (fp32 gate) ({fn.__name__})",
                upstream_versions=">=0.5.20,<0.6 (checked on 0.5.23)",
                remove_when="qwen2_moe.py falls back to torch when current_platform.capabilities.supports_triton is False",
            )
