"""The emulated device's memory: its budget, the bytes placed on it, and torch.cuda's memory figures.

The budget is ``MACA_INFER_EMU_MEMORY_GB`` (default a quarter of host RAM).
``memory_allocated()`` counts the bytes of live storages that were explicitly
placed on the device (factories with ``device=``, ``.to/.cuda``,
``new_*``/``*_like`` of device tensors); results of ordinary ops on device
tensors are host tensors to the tracker (they are not seen without
intercepting every op). ``mem_get_info()`` is ``(budget - allocated, budget)``.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import torch

from maca_infer.common import envs
from maca_infer.common.device.emulation.devices import _device_index, _st

def _host_memory_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # a container's limit is the RAM this process can really use
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def default_memory_budget() -> int:
    """Bytes the emulated device reports: MACA_INFER_EMU_MEMORY_GB or RAM/4."""
    configured = envs.emu_memory_bytes()
    if configured is not None:
        return configured
    return _host_memory_bytes() // 4


def _storage_of(tensor: torch.Tensor):
    """The tensor's untyped storage, or None (sparse and other storage-less layouts)."""
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _data_ptr(storage) -> int:
    # fake and functional tensors (torch.compile tracing) have no data pointer
    try:
        return storage.data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _storage_ptr(tensor: torch.Tensor) -> int:
    storage = _storage_of(tensor)
    return 0 if storage is None else _data_ptr(storage)


class _DeviceMemory:
    """Bytes of live storages placed on the emulated device.

    Storage-less layouts (sparse, nested) are not counted.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.allocated = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # storage data_ptr -> nbytes
        self._lock = threading.RLock()  # finalizers may run inside register()

    def register(self, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = _storage_of(tensor)
        ptr = 0 if storage is None else _data_ptr(storage)
        if ptr == 0:
            return
        with self._lock:
            if ptr in self._live:
                return
            nbytes = storage.nbytes()
            self._live[ptr] = nbytes
            self.allocated += nbytes
            self.peak = max(self.peak, self.allocated)
        # storages keep their Python object while the C++ storage lives, so
        # this fires when the memory is freed, views included
        weakref.finalize(storage, self._release, ptr)

    def _release(self, ptr: int) -> None:
        with self._lock:
            nbytes = self._live.pop(ptr, 0)
            self.allocated -= nbytes

    def is_resident(self, tensor: torch.Tensor) -> bool:
        if not self._live:
            return False
        ptr = _storage_ptr(tensor)
        return ptr != 0 and ptr in self._live

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.allocated


# --------------------------------------------------------------------------
# torch.cuda memory figures


def mem_get_info(device=None) -> tuple[int, int]:
    _device_index(device)
    memory = _st().memory
    return max(memory.budget - memory.allocated, 0), memory.budget


def memory_allocated(device=None) -> int:
    _device_index(device)
    return _st().memory.allocated


def max_memory_allocated(device=None) -> int:
    _device_index(device)
    return _st().memory.peak


def reset_peak_memory_stats(device=None) -> None:
    _device_index(device)
    _st().memory.reset_peak()


def memory_stats(device=None) -> dict[str, int]:
    _device_index(device)
    memory = _st().memory
    stats = {}
    for kind in ("allocated_bytes", "reserved_bytes", "active_bytes"):
        stats[f"{kind}.all.current"] = memory.allocated
        stats[f"{kind}.all.peak"] = memory.peak
    stats.update({"num_alloc_retries": 0, "num_ooms": 0})
    return stats


def memory_summary(device=None, abbreviated: bool = False) -> str:
    memory = _st().memory
    return (
        f"emulated maca device (CPU): {memory.allocated} bytes allocated, peak {memory.peak}, "
        f"budget {memory.budget}"
    )


def set_per_process_memory_fraction(fraction: float, device=None) -> None:
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be in [0, 1]")
    _st().memory_fraction[_device_index(device)] = fraction


def memory_tracker() -> _DeviceMemory:
    """The byte counter behind memory_allocated()/mem_get_info() (tests, doctor)."""
    return _st().memory
