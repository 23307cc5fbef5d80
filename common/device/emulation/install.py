"""Install / uninstall: put the emulated device's pieces in place of torch's.

Every replacement goes through ``_patch.PATCHES`` (original kept, no double
patching); :func:`uninstall` restores stock torch. The tables below name
which ``torch.cuda`` / ``torch.accelerator`` / ``torch._C`` / ``torch`` /
``torch.Tensor`` attribute each piece replaces.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from maca_infer.common.device._patch import PATCHES
from maca_infer.common.device.detect import EMULATED_DEVICE_NAME
from maca_infer.common.device.emulation import devices
from maca_infer.common.device.emulation.devices import (
    _State,
    _accelerator_current_with_check,
    _configured_device_count,
    _exchange_device,
    _install_lock,
    _lazy_init,
    _noop,
    can_device_access_peer,
    current_device,
    device_count,
    get_device_capability,
    get_device_name,
    get_device_properties,
    is_available,
    is_bf16_supported,
    is_initialized,
    set_device,
    synchronize,
)
from maca_infer.common.device.emulation.graphs import (
    EmulatedCUDAGraph,
    EmulatedGraphContext,
    EmulatedMemPool,
    graph_pool_handle,
    is_current_stream_capturing,
    use_mem_pool,
)
from maca_infer.common.device.emulation.memory import (
    _DeviceMemory,
    default_memory_budget,
    max_memory_allocated,
    mem_get_info,
    memory_allocated,
    memory_stats,
    memory_summary,
    reset_peak_memory_stats,
    set_per_process_memory_fraction,
)
from maca_infer.common.device.emulation.placement import (
    _FACTORIES,
    _LIKE_FACTORIES,
    _NEW_METHODS,
    _autocast_init,
    _device_context_init,
    _make_load,
    _make_tensor_cpu,
    _make_tensor_cuda,
    _make_tensor_to,
    _make_tensor_tolist,
    _tensor_pin_memory,
    _tensor_record_stream,
    _wrap_conversion,
    _wrap_factory,
    _wrap_new_method,
)
from maca_infer.common.device.emulation.rng import (
    get_rng_state,
    get_rng_state_all,
    initial_seed,
    manual_seed,
    seed,
    set_rng_state,
    set_rng_state_all,
)
from maca_infer.common.device.emulation.streams import (
    EmulatedEvent,
    EmulatedStream,
    EmulatedStreamContext,
    current_stream,
    default_stream,
    set_stream,
    stream,
)
from maca_infer.common.log import get_logger

logger = get_logger(__package__)  # the package's one logger

def _alias(fn, name: str):
    """A distinct function object calling ``fn``.

    Dynamo keeps handlers keyed by function identity and refuses one object
    under two names (torch.cuda.current_stream and
    torch.accelerator.current_stream are distinct objects in stock torch).
    """

    @functools.wraps(fn)
    def alias(*args, **kwargs):
        return fn(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = name
    return alias


def _distinct(patches: dict[str, Any]) -> dict[str, Any]:
    """Give every function that appears under two names its own object."""
    seen: set[int] = set()
    out = {}
    for name, value in patches.items():
        if id(value) in seen and not isinstance(value, type):
            value = _alias(value, name)
        seen.add(id(value))
        out[name] = value
    return out


def _cuda_module_patches() -> dict[str, Any]:
    return _distinct({
        "is_available": is_available,
        "device_count": device_count,
        "current_device": current_device,
        "set_device": set_device,
        "_exchange_device": _exchange_device,
        "_maybe_exchange_device": _exchange_device,
        "get_device_name": get_device_name,
        "get_device_capability": get_device_capability,
        "get_device_properties": get_device_properties,
        "mem_get_info": mem_get_info,
        "memory_allocated": memory_allocated,
        "max_memory_allocated": max_memory_allocated,
        "memory_reserved": memory_allocated,  # no caching allocator: reserved == allocated
        "max_memory_reserved": max_memory_allocated,
        "reset_peak_memory_stats": reset_peak_memory_stats,
        "reset_max_memory_allocated": reset_peak_memory_stats,
        "reset_max_memory_cached": reset_peak_memory_stats,
        "reset_accumulated_memory_stats": _noop,
        "memory_stats": memory_stats,
        "memory_summary": memory_summary,
        "memory_snapshot": lambda *a, **k: [],
        "set_per_process_memory_fraction": set_per_process_memory_fraction,
        "synchronize": synchronize,
        "empty_cache": _noop,
        "ipc_collect": _noop,
        "init": _noop,
        "_lazy_init": _lazy_init,
        "is_initialized": is_initialized,
        "is_bf16_supported": is_bf16_supported,
        "can_device_access_peer": can_device_access_peer,
        "_sleep": _noop,
        "manual_seed": manual_seed,
        "manual_seed_all": manual_seed,
        "seed": seed,
        "seed_all": seed,
        "initial_seed": initial_seed,
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "get_rng_state_all": get_rng_state_all,
        "set_rng_state_all": set_rng_state_all,
        "Stream": EmulatedStream,
        "Event": EmulatedEvent,
        "current_stream": current_stream,
        "default_stream": default_stream,
        "set_stream": set_stream,
        "stream": stream,
        "StreamContext": EmulatedStreamContext,
        "CUDAGraph": EmulatedCUDAGraph,
        "graph": EmulatedGraphContext,
        "graph_pool_handle": graph_pool_handle,
        "is_current_stream_capturing": is_current_stream_capturing,
        "MemPool": EmulatedMemPool,
        "use_mem_pool": use_mem_pool,
    })


def _accelerator_patches() -> dict[str, Any]:
    # every entry its own object, distinct from the torch.cuda ones (see _alias)
    return {name: _alias(fn, name) for name, fn in {
        "is_available": is_available,
        "device_count": device_count,
        "current_accelerator": _accelerator_current_with_check,
        "current_device_index": current_device,
        "current_device_idx": current_device,
        "set_device_index": set_device,
        "set_device_idx": set_device,
        "synchronize": synchronize,
        "current_stream": current_stream,
        "set_stream": set_stream,
        "empty_cache": _noop,
        "memory_allocated": memory_allocated,
        "max_memory_allocated": max_memory_allocated,
        "memory_reserved": memory_allocated,
        "max_memory_reserved": max_memory_allocated,
        "reset_peak_memory_stats": reset_peak_memory_stats,
        "reset_accumulated_memory_stats": _noop,
        "memory_stats": memory_stats,
        "get_memory_info": mem_get_info,
        "get_device_capability": get_device_capability,
    }.items()}


# torch._C entry points frameworks call directly (LMDeploy at close, SGLang's
# memory-pool capture); on the CPU they have nothing to do
_C_NOOPS = (
    "_cuda_clearCublasWorkspaces",
    "_cuda_beginAllocateCurrentThreadToPool",
    "_cuda_beginAllocateCurrentStreamToPool",
    "_cuda_beginAllocateToPool",
    "_cuda_endAllocateToPool",
    "_cuda_endAllocateCurrentStreamToPool",
    "_cuda_releasePool",
    "_cuda_emptyCache",
    "_cuda_synchronize",
)


def install(device_count: int | None = None, memory_budget: int | None = None) -> None:
    """Patch torch so the CPU plays the maca device (see module doc).

    device_count: emulated devices (default 1, or MACA_INFER_EMU_DEVICE_COUNT
    once declared); memory_budget: bytes reported (default
    MACA_INFER_EMU_MEMORY_GB or a quarter of host RAM). Raises RuntimeError
    when already installed.
    """
    with _install_lock:
        if devices._state is not None:
            raise RuntimeError("the emulated maca device is already installed; call uninstall() first")
        count = _configured_device_count() if device_count is None else device_count
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"device_count={count!r} must be an integer >= 1")
        budget = default_memory_budget() if memory_budget is None else memory_budget
        if budget <= 0:
            raise ValueError(f"memory_budget={budget!r} must be > 0 bytes")
        devices._state = _State(count, _DeviceMemory(budget))
        try:
            _apply_patches()
        except BaseException:
            PATCHES.restore_all()
            _unregister_for_torchscript()
            devices._state = None
            raise
    logger.warning(
        "maca device is EMULATED on the CPU: torch.cuda and device='cuda' run on host memory "
        "(%s, %d device(s), %.1f GiB budget); no figure measured here is a GPU figure",
        EMULATED_DEVICE_NAME, count, budget / (1 << 30),
    )


# wrappers registered as TorchScript builtins (id -> op), removed on uninstall
_script_builtins: list[Any] = []


def _register_for_torchscript(wrapper: Any, original: Any) -> None:
    """Let ``torch.jit.script`` see a wrapped factory as the aten op it wraps.

    TorchScript maps ``torch.zeros`` to ``aten::zeros`` by the function's
    identity; without this, scripted code that calls a wrapped factory fails
    to compile. (Scripted code then calls aten directly: a literal
    ``device="cuda"`` inside a scripted function is not redirected.)
    """
    from torch.jit import _builtins

    op = _builtins._find_builtin(original)
    if op is not None:
        _builtins._register_builtin(wrapper, op)
        _script_builtins.append(wrapper)


def _unregister_for_torchscript() -> None:
    from torch.jit import _builtins

    table = _builtins._get_builtin_table()
    while _script_builtins:
        table.pop(id(_script_builtins.pop()), None)


def _patch_factory(name: str, *, like: bool) -> None:
    original = getattr(torch, name)
    wrapper = _wrap_factory(original, like=like)
    PATCHES.patch(torch, name, wrapper, why="emulated maca device: tensors asked for on 'cuda' live in host memory")
    _register_for_torchscript(wrapper, original)


def _apply_patches() -> None:
    why_cuda = "emulated maca device: torch.cuda answers for a CPU-backed device"
    cuda_patches = _cuda_module_patches()
    for name, replacement in cuda_patches.items():
        PATCHES.patch(torch.cuda, name, replacement, why=why_cuda)
    # modules that define these names (reached by `from torch.cuda.graphs import ...`)
    for module_name, names in (
        ("torch.cuda.graphs", ("CUDAGraph", "graph", "graph_pool_handle", "is_current_stream_capturing")),
        ("torch.cuda.streams", ("Stream", "Event")),
        ("torch.cuda.memory", ("mem_get_info", "memory_allocated", "max_memory_allocated", "memory_reserved",
                               "max_memory_reserved", "reset_peak_memory_stats", "memory_stats", "empty_cache")),
        ("torch.cuda.random", ("manual_seed", "manual_seed_all", "seed", "seed_all", "initial_seed",
                               "get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all")),
    ):
        module = __import__(module_name, fromlist=["_"])
        for name in names:  # the same objects as torch.cuda's, as in stock torch
            if hasattr(module, name):
                PATCHES.patch(module, name, cuda_patches[name], why=why_cuda)
    if hasattr(torch, "accelerator"):
        for name, replacement in _accelerator_patches().items():
            if hasattr(torch.accelerator, name):
                PATCHES.patch(torch.accelerator, name, replacement, why="emulated maca device: torch.accelerator")
    for name in _C_NOOPS:
        PATCHES.patch(torch._C, name, _alias(_noop, name), why="emulated maca device: nothing to free or sync on the CPU")

    # torch keeps cached sets of its factory functions, keyed by identity, and
    # compares the builtin it is called with against them (`with
    # torch.device("meta")` applies the device only to members). Build them
    # now, from the stock builtins, before the names are rebound to wrappers.
    import torch.utils._device as device_util

    device_util._device_constructors()
    torch.overrides.get_ignored_functions()

    why_place = "emulated maca device: tensors asked for on 'cuda' live in host memory"
    for name in _FACTORIES:
        if hasattr(torch, name):
            _patch_factory(name, like=False)
    for name in _LIKE_FACTORIES:
        _patch_factory(name, like=True)
    for name in _NEW_METHODS:
        PATCHES.patch(torch.Tensor, name, _wrap_new_method(getattr(torch.Tensor, name)), why=why_place)
    tensor_to = _make_tensor_to(torch.Tensor.to)
    PATCHES.patch(torch.Tensor, "to", tensor_to, why=why_place)
    PATCHES.patch(torch.Tensor, "cuda", _make_tensor_cuda(tensor_to), why=why_place)
    PATCHES.patch(torch.Tensor, "cpu", _make_tensor_cpu(torch.Tensor.cpu), why="device->host keeps copy semantics")
    for name in ("half", "float", "bfloat16", "double"):
        PATCHES.patch(torch.Tensor, name, _wrap_conversion(getattr(torch.Tensor, name)),
                      why="dtype conversions of device tensors count as device memory")
    PATCHES.patch(torch.Tensor, "tolist", _make_tensor_tolist(torch.Tensor.tolist),
                  why="a host read of device data during graph capture is an error, as on a device")
    PATCHES.patch(torch.Tensor, "pin_memory", _tensor_pin_memory, why="pinning needs a driver; host memory is it")
    PATCHES.patch(torch.Tensor, "record_stream", _tensor_record_stream, why="no caching allocator on the CPU")
    PATCHES.patch(torch, "load", _make_load(torch.load), why="checkpoints saved on a device load to host")

    import torch.amp.autocast_mode as autocast_mode

    PATCHES.patch(
        autocast_mode.autocast, "__init__", _autocast_init(autocast_mode.autocast.__init__),
        why="autocast('cuda') casts the ops that run on the emulated device (CPU ops)",
    )

    PATCHES.patch(
        device_util.DeviceContext,
        "__init__",
        _device_context_init(device_util.DeviceContext.__init__),
        why="`with torch.device('cuda')` / set_default_device('cuda') create host tensors",
    )


def uninstall() -> int:
    """Restore stock torch; returns how many patches were undone."""
    with _install_lock:
        undone = PATCHES.restore_all()
        _unregister_for_torchscript()
        devices._state = None
        EmulatedGraphContext.default_capture_stream = None
        return undone
