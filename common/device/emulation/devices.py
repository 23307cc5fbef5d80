"""Which emulated maca devices exist and which is current.

The installed state (device count, current device and stream per thread,
memory tracker, graphs being captured), the parsing of device arguments
(``"cuda"``, ``"cuda:N"``, ``torch.device``, an int ordinal, a stream), and
``torch.cuda``'s device queries (count, name, capability, properties).
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from maca_infer.common import envs
from maca_infer.common.device.detect import EMULATED_DEVICE_NAME

if TYPE_CHECKING:
    from maca_infer.common.device.emulation.graphs import EmulatedCUDAGraph
    from maca_infer.common.device.emulation.memory import _DeviceMemory
    from maca_infer.common.device.emulation.streams import EmulatedStream

# What the emulated device reports as its compute capability: the sm80 level
# frameworks gate bf16 and their flash paths on.
EMULATED_CAPABILITY = (8, 0)
# MetaX GPUs execute 64-wide warps (waves).
EMULATED_WARP_SIZE = 64


def _configured_device_count() -> int:
    return envs.emu_device_count()


@dataclass(frozen=True)
class EmulatedDeviceProperties:
    """What ``torch.cuda.get_device_properties`` returns under emulation."""

    name: str
    major: int
    minor: int
    total_memory: int
    multi_processor_count: int
    warp_size: int
    max_threads_per_multi_processor: int
    L2_cache_size: int
    uuid: str
    is_integrated: int = 0
    is_multi_gpu_board: int = 0
    gcnArchName: str = "emulated"
    clock_rate: int = 0
    memory_clock_rate: int = 0
    memory_bus_width: int = 0
    shared_memory_per_block: int = 64 * 1024
    shared_memory_per_multiprocessor: int = 64 * 1024
    regs_per_multiprocessor: int = 131072
    has_fp64: bool = True
    is_emulated: bool = True


class _State:
    def __init__(self, device_count: int, memory: _DeviceMemory) -> None:
        self.device_count = device_count
        self.memory = memory
        self.tls = threading.local()  # current device and stream are per thread, as in CUDA
        self.capturing: dict[int, EmulatedCUDAGraph] = {}  # thread id -> graph being captured
        self.memory_fraction: dict[int, float] = {}
        self.default_streams: dict[int, EmulatedStream] = {}

    def current_device(self) -> int:
        return getattr(self.tls, "device", 0)

    def set_current_device(self, index: int) -> None:
        self.tls.device = index


_state: _State | None = None  # set by install.install(), cleared by install.uninstall()
_install_lock = threading.Lock()


def is_installed() -> bool:
    return _state is not None


def _st() -> _State:
    if _state is None:
        raise RuntimeError("the emulated maca device is not installed; call maca_infer.common.device.activate()")
    return _state


# --------------------------------------------------------------------------
# device arguments


def _device_index(device: Any, *, optional: bool = True) -> int:
    """Ordinal of a maca device argument (None -> current), validated."""
    st = _st()
    if device is None:
        return st.current_device()
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type != "cuda":
            raise ValueError(f"expected a cuda (maca) device, got {device}")
        index = st.current_device() if device.index is None else device.index
    elif isinstance(device, int) and not isinstance(device, bool):
        index = device
    else:
        from maca_infer.common.device.emulation.streams import EmulatedStream  # streams import this module

        if isinstance(device, EmulatedStream):
            return device.device_index
        raise ValueError(f"device={device!r} is not a device; use an int, 'cuda', 'cuda:N' or torch.device")
    if index == -1 and optional:
        return st.current_device()
    if not 0 <= index < st.device_count:
        raise ValueError(
            f"device index {index} is out of range: the emulated maca device has "
            f"{st.device_count} device(s) (valid: 0..{st.device_count - 1})"
        )
    return index


def _is_maca(device: Any) -> bool:
    """Does this device argument name the (emulated) maca device? Validates the ordinal."""
    if device is None or device == "cpu":
        return False
    if device == "cuda":  # the common spelling: the current device, always valid
        return True
    if isinstance(device, torch.device):
        is_cuda = device.type == "cuda"
    elif isinstance(device, str):
        is_cuda = device.split(":", 1)[0].strip() == "cuda"
    elif isinstance(device, int) and not isinstance(device, bool):
        is_cuda = True  # torch reads a bare int as an accelerator ordinal
    else:
        return False
    if is_cuda:
        try:
            _device_index(device)
        except ValueError as exc:
            # torch raises RuntimeError for a bad ordinal; keep that type
            raise RuntimeError(f"{exc}") from None
    return is_cuda


def _map_device(device: Any) -> Any:
    return torch.device("cpu") if _is_maca(device) else device


# --------------------------------------------------------------------------
# torch.cuda device queries


def is_available() -> bool:
    return True


def device_count() -> int:
    return _st().device_count


def current_device() -> int:
    return _st().current_device()


def set_device(device) -> None:
    if device is None:
        return
    index = _device_index(device, optional=True)
    _st().set_current_device(index)


def _exchange_device(device: int) -> int:
    st = _st()
    previous = st.current_device()
    if device >= 0:
        set_device(device)
    return previous


def get_device_name(device=None) -> str:
    _device_index(device)
    return EMULATED_DEVICE_NAME


def get_device_capability(device=None) -> tuple[int, int]:
    _device_index(device)
    return EMULATED_CAPABILITY


def get_device_properties(device=None) -> EmulatedDeviceProperties:
    index = _device_index(device)
    return EmulatedDeviceProperties(
        name=EMULATED_DEVICE_NAME,
        major=EMULATED_CAPABILITY[0],
        minor=EMULATED_CAPABILITY[1],
        total_memory=_st().memory.budget,
        multi_processor_count=os.cpu_count() or 1,  # the CPU cores really doing the work
        warp_size=EMULATED_WARP_SIZE,
        max_threads_per_multi_processor=2048,
        L2_cache_size=4 << 20,  # nonzero: some heuristics divide by it
        uuid=str(uuid.uuid5(uuid.NAMESPACE_DNS, f"maca-infer-emulated-{index}")),
    )


def synchronize(device=None) -> None:
    _device_index(device)  # CPU work is done when the op returns


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def is_bf16_supported(including_emulation: bool = True) -> bool:
    return True


def _lazy_init() -> None:
    return None


def is_initialized() -> bool:
    return True


def can_device_access_peer(device, peer_device) -> bool:
    _device_index(device)
    _device_index(peer_device)
    return True


def _accelerator_current() -> torch.device:
    return torch.device("cuda")


def _accelerator_current_with_check(check_available: bool = False) -> torch.device:
    return torch.device("cuda")
