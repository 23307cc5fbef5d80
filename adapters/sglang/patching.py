"""The runtime fixes of SGLang, declared in the one patch helper's ledger.

Each fix is a record of ``maca_infer.common.patching.LEDGER`` (target, why,
how, versions, remove-when), declared when this module is imported (no
SGLang import, so ``maca-infer patches list --runtime`` lists them anywhere)
and applied by :func:`register_all`, which ``plugin.register()`` runs in
every SGLang process once the maca platform is active (an ordinary SGLang
launch is untouched).

Two ways a fix reaches SGLang, both undoable through the helper
(``LEDGER.undo(target)``, :func:`undo_all`):

- callables go through SGLang's documented seam for general plugins,
  ``sglang.srt.plugins.hook_registry.HookRegistry`` (applied by
  ``load_plugins()``), never by editing SGLang's files. SGLang's registry
  has no removal, so the hook registered there is a switch: applied, it runs
  the fix; undone, it calls SGLang's own function. It is registered once per
  process; applying the fix again turns the switch back on.
- module-level *values* (flags SGLang computes once at import) are set with
  the original kept (``LEDGER.set_attr``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from maca_infer.adapters.sglang.compat import fix_applies, fix_versions
from maca_infer.common.log import get_logger
from maca_infer.common.patching import LEDGER, RuntimePatch

logger = get_logger(__name__)

OWNER = "sglang"
VERSIONS = fix_versions("")  # the whole supported range (a fix of no FIX_SINCE name)
HOOK_TYPES = ("around", "before", "after", "replace")


def _declare(target: str, *, why: str, how: str, remove_when: str) -> RuntimePatch:
    return LEDGER.declare(target, owner=OWNER, why=why, how=how, versions=fix_versions(target),
                          remove_when=remove_when)


# ---------------------------------------------------------------------------
# applying: hooks through SGLang's HookRegistry, values by setattr


@dataclass
class _Switch:
    """The hook registered with SGLang for one target: runs ``fn`` while ``on``."""

    hook_type: str
    fn: Callable
    on: bool = False

    def __call__(self, *args, **kwargs):
        kind = self.hook_type
        if kind in ("around", "replace"):
            original, args = args[0], args[1:]
            if not self.on:
                return original(*args, **kwargs)
            return self.fn(original, *args, **kwargs) if kind == "around" else self.fn(*args, **kwargs)
        if not self.on:
            return None  # SGLang reads None as "no change" for before and after hooks
        return self.fn(*args, **kwargs)


_switches: dict[str, _Switch] = {}  # target -> the hook SGLang holds for it (this process)


def hook(record: RuntimePatch, fn: Callable, *, hook_type: str = "around") -> None:
    """Apply ``record`` by running ``fn`` on its target through SGLang's HookRegistry.

    ``hook_type`` as in SGLang: "around" ``fn(original, *args)``, "replace"
    ``fn(*args)``, "before" / "after" as SGLang defines them. Raises
    RuntimeError when the target is already patched.
    """
    if hook_type not in HOOK_TYPES:
        raise ValueError(f"hook_type={hook_type!r} is not supported; allowed: {', '.join(HOOK_TYPES)}")

    def do():
        switch = _switches.get(record.target)
        if switch is None:
            from sglang.srt.plugins.hook_registry import HookRegistry, HookType

            # around and replace both wrap the original, so the switch can hand calls back to it
            kind = HookType.AROUND if hook_type in ("around", "replace") else HookType(hook_type)
            switch = _Switch(hook_type, fn)
            HookRegistry.register(record.target, switch, kind)
            _switches[record.target] = switch
        elif switch.hook_type != hook_type or switch.fn is not fn:
            raise RuntimeError(f"maca-infer: {record.target} already has another hook registered with SGLang")
        switch.on = True

        def undo():
            switch.on = False

        return undo

    LEDGER.apply(record, do)
    logger.debug("SGLang runtime hook on %s: %s", record.target, record.why)


def hook_of(target: str) -> Callable | None:
    """The callable registered with SGLang's HookRegistry for ``target`` (None if none)."""
    return _switches.get(target)


def set_module_value(record: RuntimePatch, value) -> None:
    """``module.attr = value`` for the record's target (a flag read at call time), the original kept."""
    module_name, _, attr = record.target.rpartition(".")
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise RuntimeError(f"maca-infer: {record.target} does not exist in this SGLang; the patch needs review")
    LEDGER.set_attr(record, module, attr, value)


def applied() -> list[RuntimePatch]:
    return LEDGER.applied(OWNER)


def undo_all() -> int:
    """Undo every SGLang fix in effect (tests); returns how many."""
    return LEDGER.undo_all(OWNER)


# ---------------------------------------------------------------------------
# the fixes


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


def _shared_expert_gate(hidden_states, gate_weight):
    """sigmoid(hidden_states @ gate_weight) per token, fp32: [T, H] x [H] -> [T, 1]."""
    import torch

    return torch.sigmoid(hidden_states.float() @ gate_weight.float().view(-1, 1))


def gate_sigmoid_mul_torch(hidden_states, gate_weight, shared_output):
    """Torch twin of SGLang's Triton fused_gate_sigmoid_mul: gate(h) * shared_output."""
    return (_shared_expert_gate(hidden_states, gate_weight) * shared_output.float()).to(shared_output.dtype)


def gate_sigmoid_mul_add_torch(hidden_states, gate_weight, shared_output, final_hidden_states):
    """Torch twin of fused_gate_sigmoid_mul_add: final_hidden_states += gate(h) * shared_output (in place)."""
    gated = _shared_expert_gate(hidden_states, gate_weight) * shared_output.float()
    final_hidden_states.copy_((final_hidden_states.float() + gated).to(final_hidden_states.dtype))


ROPE_WRAPPER = _declare(
    "sglang.srt.models.deepseek_v2.get_rope_wrapper",
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
    remove_when="SGLang routes rope construction through the platform (or get_rope_cpu handles no scaling)",
)
FORWARD_BATCH_IS_CPU = _declare(
    "sglang.srt.model_executor.forward_batch_info._is_cpu",
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
    remove_when="SGLang asks is_pin_memory_available(device) there as it does elsewhere",
)
DP_MEMCPY = _declare(
    "sglang.srt.layers.dp_attention.memcpy_func",
    why=(
        "DP attention gathers rows with a Triton kernel unless SGLang's in-tree CPU engine is "
        "on (memcpy_func chosen once at import); the emulated maca device declares "
        "supports_triton=False and Triton has no CPU driver ('0 active drivers')"
    ),
    how="memcpy_func is SGLang's own torch copy (memcpy_cpu) on the emulated device",
    remove_when="dp_attention consults current_platform.capabilities.supports_triton",
)
PARALLEL_STATE_IS_CPU = _declare(
    "sglang.srt.distributed.parallel_state._is_cpu",
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
    remove_when="parallel_state registers CPU kernels for its collective custom ops or asks the platform",
)
MOE_WNA16_CAPABILITY = _declare(
    "sglang.srt.layers.quantization.moe_wna16.get_device_capability",
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
    remove_when="SGLang asks the platform (verify_quantization / capabilities) instead of CUDA capability",
)
QWEN2_MOE_GATES = tuple(
    (_declare(
        f"sglang.srt.models.qwen2_moe.{name}",
        why=(
            "SGLang's Qwen2-MoE gates its shared expert with a Triton kernel on every device "
            "(no device check); the emulated maca device has no Triton driver ('0 active drivers')"
        ),
        how=f"replace-hook on the name qwen2_moe.py calls: the same math in torch (fp32 gate) ({fn.__name__})",
        remove_when="qwen2_moe.py falls back to torch when current_platform.capabilities.supports_triton is False",
    ), fn)
    for name, fn in (("fused_gate_sigmoid_mul", gate_sigmoid_mul_torch),
                     ("fused_gate_sigmoid_mul_add", gate_sigmoid_mul_add_torch))
)


BATCH_INVARIANT_MODE = _declare(
    "sglang.srt.batch_invariant_ops.enable_batch_invariant_mode",
    why=(
        "--enable-deterministic-inference (what makes SGLang honour a request's sampling_seed / "
        "OpenAI seed) switches on SGLang's batch-invariant mode, which registers Triton matmul / "
        "log_softmax / mean kernels for the CUDA, XPU or NPU dispatch key; on the emulated maca "
        "device (CPU tensors) get_dispatch_device_backend() raised 'No supported accelerator "
        "(CUDA/XPU) available' and the server died at start"
    ),
    how=(
        "replace-hook on the name model_runner.py imports at call time, only on the emulated "
        "device: logs that the CPU aten ops keep running (seeded sampling stays reproducible "
        "for a repeated request; bitwise batch invariance is not promised there) and enables "
        "nothing; on a MACA device SGLang's own mode runs (CUDA dispatch key, Triton)"
    ),
    remove_when="SGLang's batch-invariant mode supports the CPU dispatch key or asks the platform",
)


SEEDED_HASH = _declare(
    "sglang.srt.layers.sampler.murmur_hash32",
    why=(
        "a seeded request (sampling_seed / OpenAI seed, under --enable-deterministic-inference) "
        "samples with multinomial_with_seed, whose murmur_hash32 runs a Triton kernel on a device "
        "and sgl_kernel's CPU op for CPU tensors; on the emulated maca device (CPU tensors, no "
        "sgl_kernel) every seeded step raised ModuleNotFoundError: No module named 'sgl_kernel'"
    ),
    how=(
        "replace-hook on the name sampler.py calls, only on the emulated device: "
        "maca_infer.common.ops.sampling.murmur_hash32, the same hash in torch integer ops "
        "(bit-identical to SGLang's Triton kernel, so a seed draws the same tokens as on a GPU)"
    ),
    remove_when="SGLang's murmur_hash32 has a torch fallback for CPU tensors without sgl_kernel",
)


FLASHINFER_MLA_FLAG = _declare(
    "sglang.srt.server_args.ServerArgs.add_cli_args",
    why=(
        "MetaX's guide launches DeepSeek-R1-Distill with `--enable-flashinfer-mla` (SGLang 0.4.x); "
        "SGLang 0.5.x removed the flag (`--attention-backend flashinfer` replaced it), so the "
        "guide's command line stopped at argument parsing ('unrecognized arguments')"
    ),
    how=(
        "around-hook on the argument table: the flag is added back and means "
        "`--attention-backend flashinfer` unless an attention backend was given before it; "
        "on the maca platform flashinfer then maps to the 'maca' backend (MLA included) when "
        "MetaX's flashinfer cannot serve this SGLang (platform.map_flashinfer_to_maca)"
    ),
    remove_when="MetaX's guide drops --enable-flashinfer-mla (or SGLang brings the flag back)",
)


def _with_flashinfer_mla_flag(original, parser, *args, **kwargs):
    """ServerArgs.add_cli_args, then the guide's ``--enable-flashinfer-mla`` (SGLang 0.4.x) on top."""
    import argparse

    result = original(parser, *args, **kwargs)

    class _FlashInferMLA(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            if getattr(namespace, "attention_backend", None) is None:
                namespace.attention_backend = "flashinfer"
            logger.info("--enable-flashinfer-mla (SGLang 0.4.x, as MetaX's guide types it) read as "
                        "--attention-backend %s", namespace.attention_backend)

    if "--enable-flashinfer-mla" not in parser._option_string_actions:
        parser.add_argument("--enable-flashinfer-mla", nargs=0, action=_FlashInferMLA, dest="_maca_flashinfer_mla",
                            default=argparse.SUPPRESS,
                            help="SGLang 0.4.x flag (MetaX's guide): same as --attention-backend flashinfer "
                                 "(on the maca device: the 'maca' backend, MLA included)")
    return result


def _murmur_hash32_torch(seed, positions, col_indices):
    from maca_infer.common.ops.sampling import murmur_hash32

    return murmur_hash32(seed, positions, col_indices)


def _batch_invariant_mode_emulated(*args, **kwargs) -> None:
    """enable_batch_invariant_mode on the emulated device: nothing to register for CPU tensors."""
    logger.warning(
        "deterministic inference on the EMULATED maca device: SGLang's batch-invariant Triton "
        "kernels need a device; CPU aten ops run instead (a seeded request repeats exactly, "
        "bitwise batch invariance is not promised)"
    )


def _apply_hook(record: RuntimePatch, fn: Callable, hook_type: str = "around") -> None:
    if fix_applies(record.target) and not LEDGER.is_applied(record.target):
        hook(record, fn, hook_type=hook_type)


def _apply_value(record: RuntimePatch, value_of: Callable) -> None:
    if fix_applies(record.target) and not LEDGER.is_applied(record.target):
        set_module_value(record, value_of())


def register_device_fixes() -> None:
    """Apply the fixes every maca device needs (those not in effect yet): ``MacaSRTPlatform``'s set."""
    _apply_hook(ROPE_WRAPPER, _rope_on_maca)
    _apply_hook(FLASHINFER_MLA_FLAG, _with_flashinfer_mla_flag)


def register_emulated_device_fixes() -> None:
    """Apply the fixes only the emulated device needs: ``MacaEmulatedSRTPlatform`` adds these.

    SGLang on CPU tensors outside its own CPU engine: three module flags SGLang
    computes for CUDA (pinning, DP gather kernel, collective custom ops), and
    hooks on the Triton / sgl_kernel / compute-capability paths it takes on
    every device.
    """
    _apply_value(FORWARD_BATCH_IS_CPU, lambda: True)
    _apply_value(DP_MEMCPY, lambda: importlib.import_module("sglang.srt.layers.dp_attention").memcpy_cpu)
    _apply_value(PARALLEL_STATE_IS_CPU, lambda: True)
    _apply_hook(MOE_WNA16_CAPABILITY, _awq_capability_for_moe_wna16)
    for record, fn in QWEN2_MOE_GATES:
        _apply_hook(record, fn, hook_type="replace")
    _apply_hook(BATCH_INVARIANT_MODE, _batch_invariant_mode_emulated, hook_type="replace")
    _apply_hook(SEEDED_HASH, _murmur_hash32_torch, hook_type="replace")


def register_all(*, emulated: bool) -> None:
    """Apply the fixes of the device (``emulated``: the emulated device's set too); tests and tools.

    In a server the platform applies its own set (``register_runtime_fixes``).
    """
    register_device_fixes()
    if emulated:
        register_emulated_device_fixes()
