"""The emulated maca device: framework code written for CUDA runs on the CPU.

When :func:`maca_infer.common.device.resolve` says ``emulated``,
:func:`install` makes a CPU-only process look like a host with a maca device
(reached, as on MetaX's mcPyTorch, through ``torch.cuda`` and
``device="cuda"``):

- ``torch.cuda.*`` answers for an emulated device: is_available, device
  count/index/name/properties/capability, memory figures from a budget,
  streams and events, graphs, RNG seeding. Everything runs synchronously on
  the CPU, so synchronize/query/wait are trivially true.
- Tensors asked for on ``"cuda"``/``"cuda:N"``/``torch.device("cuda")``/an
  int ordinal land on the CPU: tensor factories, ``Tensor.to/.cuda/.cpu``,
  ``new_*``, ``*_like``, ``torch.load(map_location=...)`` and
  ``with torch.device("cuda")`` / ``torch.set_default_device("cuda")``.
- Host/device copies keep their copy semantics: ``x.to("cuda")`` of a host
  tensor returns a new tensor (a later write to the pinned host buffer must
  not change the "device" copy), and ``.cpu()``/``.to("cpu")`` of a device
  tensor copies. A tensor already on the emulated device is returned as is,
  like CUDA does. A device tensor's ``.device`` reads ``cpu``, so
  ``t.to(x.device)`` (a ``torch.device``, not the string ``"cpu"``) keeps
  ``t`` where it is.

Why global function patching and not a ``TorchFunctionMode``: modes are
thread-local, and LMDeploy/SGLang run model code in threads they create
(torch_npu's ``transfer_to_npu`` patches for the same reason). Every patch is
made through ``_patch.PATCHES`` (original kept, no double patching,
``uninstall()`` restores stock torch).

Memory: the device has a budget (``MACA_INFER_EMU_MEMORY_GB``, default a
quarter of host RAM). ``memory_allocated()`` counts the bytes of live storages
that were explicitly placed on the device (factories with ``device=``,
``.to/.cuda``, ``new_*``/``*_like`` of device tensors); results of ordinary
ops on device tensors are host tensors to the tracker (they are not seen
without intercepting every op). ``mem_get_info()`` is
``(budget - allocated, budget)``.

Graphs (``torch.cuda.CUDAGraph`` / ``torch.cuda.graph``): see
:class:`EmulatedCUDAGraph`. Capture records every aten op the block runs
(a ``TorchDispatchMode``, active only in the capturing thread, like CUDA's
thread-local capture); replay re-runs the recorded ops on the same tensors,
writing results into the tensors captured, which is what a CUDA graph does
with its fixed addresses. Runners that fill static input buffers, replay,
then read static output buffers (LMDeploy, SGLang) get the right numbers.
As on a device, reading device data on the host during capture
(``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero``, ``bool(t)``) raises:
otherwise host logic that depends on it would be frozen into the graph and
replays would be silently wrong. Limits, the same as real CUDA graphs plus
one: Python control flow is frozen at capture; an op on host data whose
output shape changes fails at replay; work done outside aten (a Triton
kernel under ``TRITON_INTERPRET=1``, numpy on ``.numpy()`` views) is not
replayed. Under emulation the ops dispatch to torch references, which are
aten.

The package, one module per concern (``install`` imports the rest; this
``__init__`` re-exports the public names, so ``from
maca_infer.common.device import emulation`` then ``emulation.install()``
works as before):

==============  ==============================================================
``devices``     installed state, device arguments, torch.cuda device queries
``memory``      the budget, the tracker of bytes placed on the device, figures
``placement``   tensor factories, ``Tensor.to/.cuda/.cpu``, ``torch.load``
``streams``     streams and events (synchronous on the CPU)
``graphs``      ``CUDAGraph`` capture/replay, ``graph()``, memory pools
``rng``         the device's generator (the CPU one)
``install``     the patch tables, :func:`install` / :func:`uninstall`
==============  ==============================================================
"""

from __future__ import annotations

from maca_infer.common.device.emulation.devices import (
    EMULATED_CAPABILITY,
    EMULATED_WARP_SIZE,
    EmulatedDeviceProperties,
    _configured_device_count,
    can_device_access_peer,
    current_device,
    device_count,
    get_device_capability,
    get_device_name,
    get_device_properties,
    is_available,
    is_bf16_supported,
    is_initialized,
    is_installed,
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
from maca_infer.common.device.emulation.install import install, uninstall
from maca_infer.common.device.emulation.memory import (
    _host_memory_bytes,
    default_memory_budget,
    max_memory_allocated,
    mem_get_info,
    memory_allocated,
    memory_stats,
    memory_summary,
    memory_tracker,
    reset_peak_memory_stats,
    set_per_process_memory_fraction,
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

__all__ = [
    "EMULATED_CAPABILITY", "EMULATED_WARP_SIZE", "EmulatedCUDAGraph", "EmulatedDeviceProperties",
    "EmulatedEvent", "EmulatedGraphContext", "EmulatedMemPool", "EmulatedStream", "EmulatedStreamContext",
    "can_device_access_peer", "current_device", "current_stream", "default_memory_budget", "default_stream",
    "device_count", "get_device_capability", "get_device_name", "get_device_properties", "get_rng_state",
    "get_rng_state_all", "graph_pool_handle", "initial_seed", "install", "is_available", "is_bf16_supported",
    "is_current_stream_capturing", "is_initialized", "is_installed", "manual_seed", "max_memory_allocated",
    "mem_get_info", "memory_allocated", "memory_stats", "memory_summary", "memory_tracker",
    "reset_peak_memory_stats", "seed", "set_device", "set_per_process_memory_fraction", "set_rng_state",
    "set_rng_state_all", "set_stream", "stream", "synchronize", "uninstall", "use_mem_pool",
]
