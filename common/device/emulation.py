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
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from maca_infer.common import envs
from maca_infer.common.device._patch import PATCHES
from maca_infer.common.device.detect import EMULATED_DEVICE_NAME
from maca_infer.common.log import get_logger

logger = get_logger(__name__)

# What the emulated device reports as its compute capability: the sm80 level
# frameworks gate bf16 and their flash paths on.
EMULATED_CAPABILITY = (8, 0)
# MetaX GPUs execute 64-wide warps (waves).
EMULATED_WARP_SIZE = 64


# --------------------------------------------------------------------------
# state


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


def _configured_device_count() -> int:
    return envs.emu_device_count()


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
    def __init__(self, device_count: int, budget: int) -> None:
        self.device_count = device_count
        self.memory = _DeviceMemory(budget)
        self.tls = threading.local()  # current device and stream are per thread, as in CUDA
        self.capturing: dict[int, EmulatedCUDAGraph] = {}  # thread id -> graph being captured
        self.memory_fraction: dict[int, float] = {}
        self.default_streams: dict[int, EmulatedStream] = {}

    def current_device(self) -> int:
        return getattr(self.tls, "device", 0)

    def set_current_device(self, index: int) -> None:
        self.tls.device = index


_state: _State | None = None
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
    if isinstance(device, EmulatedStream):
        return device.device_index
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type != "cuda":
            raise ValueError(f"expected a cuda (maca) device, got {device}")
        index = st.current_device() if device.index is None else device.index
    elif isinstance(device, int) and not isinstance(device, bool):
        index = device
    else:
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
# tensor placement


_FACTORIES = (
    "empty", "empty_strided", "zeros", "ones", "full", "arange", "range", "linspace", "logspace",
    "eye", "rand", "randn", "randint", "randperm", "normal", "tensor", "as_tensor", "asarray", "scalar_tensor",
    "tril_indices", "triu_indices", "from_file", "sparse_coo_tensor",
    "hann_window", "hamming_window", "bartlett_window", "blackman_window", "kaiser_window",
)
_LIKE_FACTORIES = (
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
)
_NEW_METHODS = ("new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "new_tensor")


def _wrap_factory(fn, *, like: bool):
    memory = _st().memory

    @functools.wraps(fn)
    def factory(*args, **kwargs):
        device = kwargs.get("device")
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # host memory is all the emulated device has
        if _is_maca(device):
            kwargs["device"] = "cpu"
            out = fn(*args, **kwargs)
            memory.register(out)
            return out
        out = fn(*args, **kwargs)
        if like and device is None and args and isinstance(args[0], torch.Tensor) and memory.is_resident(args[0]):
            memory.register(out)  # *_like of a device tensor is a device tensor
        return out

    factory.__maca_infer_emulated__ = True
    return factory


def _wrap_new_method(fn):
    memory = _st().memory

    @functools.wraps(fn)
    def new_method(self, *args, **kwargs):
        device = kwargs.get("device")
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if _is_maca(device):
            kwargs["device"] = "cpu"
            out = fn(self, *args, **kwargs)
            memory.register(out)
            return out
        out = fn(self, *args, **kwargs)
        if device is None and memory.is_resident(self):
            memory.register(out)
        return out

    return new_method


def _split_copy_flag(args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """Take ``copy`` out of Tensor.to's arguments (torch's own parser rejects it).

    Positional forms are ``to(device|dtype|tensor, [dtype,] non_blocking, copy)``:
    when two bools follow the first argument, the second is ``copy``.
    """
    if "copy" in kwargs:
        kwargs = dict(kwargs)
        return args, kwargs, bool(kwargs.pop("copy"))
    bool_positions = [i for i, a in enumerate(args) if i > 0 and isinstance(a, bool)]
    if len(bool_positions) >= 2:
        i = bool_positions[1]
        return args[:i] + args[i + 1:], kwargs, bool(args[i])
    return args, kwargs, False


def _names_host(args: tuple, kwargs: dict) -> bool:
    """Does this Tensor.to call spell the host as a string ("cpu")?

    Only a string is taken as host intent: a ``torch.device("cpu")`` object
    usually comes from ``other.device``, and under emulation a device
    tensor's ``.device`` reads ``cpu`` too, so ``t.to(x.device)`` for a
    device tensor ``x`` means "stay on the device".
    """
    raw = kwargs.get("device", args[0] if args else None)
    return isinstance(raw, str) and raw.split(":", 1)[0].strip() == "cpu"


def _make_tensor_to(original_to):
    memory = _st().memory

    def to(self, *args, **kwargs):
        if not args and not kwargs:
            return original_to(self)
        other = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("other")
        parse_args, parse_kwargs, copy = _split_copy_flag(args, kwargs)
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*parse_args, **parse_kwargs)
        if isinstance(other, torch.Tensor):
            to_maca = memory.is_resident(other)
        else:
            to_maca = _is_maca(device)
        if not to_maca:
            resident = memory.is_resident(self)
            if resident and _names_host(args, kwargs):
                # device -> host is a copy on a real device; keep it one
                _check_host_read(self, "Tensor.to('cpu')")
                return original_to(
                    self, device="cpu", dtype=dtype, non_blocking=non_blocking, copy=True,
                    memory_format=memory_format if memory_format is not None else torch.preserve_format,
                )
            out = original_to(self, *args, **kwargs)
            if out is not self and resident:
                # a dtype conversion of a device tensor stays on the device; so does
                # to(other.device): under emulation other.device reads "cpu"
                memory.register(out)
            return out
        resident = memory.is_resident(self)
        out = original_to(
            self, device="cpu", dtype=dtype, non_blocking=non_blocking,
            copy=copy or not resident,
            memory_format=memory_format if memory_format is not None else torch.preserve_format,
        )
        if out is not self:
            memory.register(out)
        return out

    return to


def _make_tensor_cuda(tensor_to):
    def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        target = "cuda" if device is None else device
        if isinstance(target, int):
            target = f"cuda:{target}"
        return tensor_to(self, target, non_blocking=non_blocking, memory_format=memory_format)

    return cuda


def _make_tensor_cpu(original_cpu):
    memory = _st().memory

    def cpu(self, memory_format=torch.preserve_format):
        if memory.is_resident(self):
            _check_host_read(self, "Tensor.cpu()")
            return self.clone(memory_format=memory_format)
        return original_cpu(self, memory_format=memory_format)

    return cpu


def _wrap_conversion(original):
    """Tensor.half/float/bfloat16/double: the result of a device tensor is a device tensor."""
    memory = _st().memory

    @functools.wraps(original)
    def conversion(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out is not self and memory.is_resident(self):
            memory.register(out)
        return out

    return conversion


def _make_tensor_tolist(original_tolist):
    def tolist(self):
        # tolist() reads memory in C++ without an aten op: check here
        _check_host_read(self, "Tensor.tolist()")
        return original_tolist(self)

    return tolist


def _tensor_pin_memory(self, device=None):
    # pinned host memory needs a driver; the emulated device reads host memory
    # directly, so an ordinary copy has the same meaning (a new host tensor)
    return self.clone()


def _tensor_record_stream(self, stream):
    # the caching allocator is not in play: CPU storage lives by refcount
    return None


def _map_location(location):
    if location is None:
        return None
    if callable(location) and not isinstance(location, (str, torch.device)):
        return lambda storage, loc: location(storage, "cpu" if str(loc).startswith("cuda") else loc)
    if isinstance(location, dict):
        return {k: ("cpu" if _is_maca(v) else v) for k, v in location.items()}
    return _map_device(location)


def _make_load(original_load):
    @functools.wraps(original_load)
    def load(f, map_location=None, *args, **kwargs):
        if map_location is None:
            # checkpoints saved on a device name "cuda" storages: read them to host
            map_location = lambda storage, loc: storage  # noqa: E731  (stay on CPU)
        else:
            map_location = _map_location(map_location)
        return original_load(f, map_location, *args, **kwargs)

    return load


# --------------------------------------------------------------------------
# streams and events


_stream_ids = itertools.count(1)


class EmulatedStream:
    """A maca stream on the CPU: work is already done when it is enqueued.

    device: the maca device it belongs to; priority: kept for inspection.
    """

    def __init__(self, device=None, priority: int = 0, **_unused: Any) -> None:
        self.device_index = _device_index(device)
        self.priority = priority
        self.cuda_stream = next(_stream_ids)
        self.stream_id = self.cuda_stream
        self.device_type = 1  # DeviceType.CUDA
        self._prev: list[EmulatedStream] = []

    @classmethod
    def _default(cls, index: int) -> EmulatedStream:
        stream = cls.__new__(cls)
        stream.device_index = index
        stream.priority = 0
        stream.cuda_stream = 0  # the null stream
        stream.stream_id = 0
        stream.device_type = 1
        stream._prev = []
        return stream

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index)

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def wait_event(self, event: EmulatedEvent) -> None:
        return None

    def wait_stream(self, stream: EmulatedStream) -> None:
        return None

    def record_event(self, event: EmulatedEvent | None = None) -> EmulatedEvent:
        event = EmulatedEvent() if event is None else event
        event.record(self)
        return event

    def __enter__(self) -> EmulatedStream:
        self._prev.append(current_stream(self.device_index))
        set_stream(self)
        return self

    def __exit__(self, *exc: object) -> None:
        set_stream(self._prev.pop())

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, EmulatedStream)
            and other.cuda_stream == self.cuda_stream
            and other.device_index == self.device_index
        )

    def __hash__(self) -> int:
        return hash((self.cuda_stream, self.device_index))

    def __repr__(self) -> str:
        return f"<EmulatedStream device=cuda:{self.device_index} id={self.cuda_stream} (CPU)>"


class EmulatedEvent:
    """A maca event on the CPU; the timestamp is taken at ``record()``.

    Work is synchronous, so the wall time between two recorded events is the
    time the work between them took (``elapsed_time``, milliseconds).
    """

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False, **_unused):
        self.enable_timing = enable_timing
        self.blocking = blocking
        self.interprocess = interprocess
        self._recorded_at: float | None = None

    def record(self, stream: EmulatedStream | None = None) -> None:
        self._recorded_at = time.perf_counter()

    def wait(self, stream: EmulatedStream | None = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, end_event: EmulatedEvent) -> float:
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError("elapsed_time needs both events created with enable_timing=True")
        if self._recorded_at is None or end_event._recorded_at is None:
            raise RuntimeError("elapsed_time needs both events recorded (call record() first)")
        return (end_event._recorded_at - self._recorded_at) * 1000.0

    def ipc_handle(self):
        raise RuntimeError("the emulated maca device has no IPC events (processes share nothing on CPU)")

    @classmethod
    def from_ipc_handle(cls, device, handle):
        raise RuntimeError("the emulated maca device has no IPC events (processes share nothing on CPU)")

    def __repr__(self) -> str:
        state = "recorded" if self._recorded_at is not None else "not recorded"
        return f"<EmulatedEvent {state} (CPU)>"


def _default_stream_of(index: int) -> EmulatedStream:
    st = _st()
    stream = st.default_streams.get(index)
    if stream is None:
        stream = st.default_streams.setdefault(index, EmulatedStream._default(index))
    return stream


def current_stream(device=None) -> EmulatedStream:
    st = _st()
    index = _device_index(device)
    streams = getattr(st.tls, "streams", None)
    if streams and index in streams:
        return streams[index]
    return _default_stream_of(index)


def default_stream(device=None) -> EmulatedStream:
    return _default_stream_of(_device_index(device))


def set_stream(stream: EmulatedStream | None) -> None:
    if stream is None:
        return
    if not isinstance(stream, EmulatedStream):
        raise ValueError(f"stream={stream!r} is not a stream of the emulated maca device")
    st = _st()
    if not hasattr(st.tls, "streams"):
        st.tls.streams = {}
    st.tls.streams[stream.device_index] = stream


class EmulatedStreamContext:
    """``torch.cuda.stream(s)``: make ``s`` current in this block (None: no-op)."""

    def __init__(self, stream: EmulatedStream | None) -> None:
        self.stream = stream
        self._prev: EmulatedStream | None = None

    def __enter__(self) -> EmulatedStream | None:
        if self.stream is not None:
            self._prev = current_stream(self.stream.device_index)
            set_stream(self.stream)
        return self.stream

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            set_stream(self._prev)


# --------------------------------------------------------------------------
# graphs


_pool_ids = itertools.count(1)

# replaying these would only rewrite memory whose contents are undefined
_UNDEFINED_CONTENT_OPS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
                          "aten::new_empty_strided"}


def _schema_kind(func) -> str:
    """"mutates" (writes an argument), "view" (aliases an input), or "functional"."""
    schema = func._schema
    for arg in schema.arguments:
        if arg.alias_info is not None and arg.alias_info.is_write:
            return "mutates"
    for ret in schema.returns:
        if ret.alias_info is not None:
            return "view"
    return "functional"


@dataclass
class _RecordedOp:
    func: Any
    args: tuple
    kwargs: dict
    out: Any
    kind: str


def _copy_into(op_name: str, captured: Any, fresh: Any) -> None:
    if isinstance(captured, torch.Tensor):
        if not isinstance(fresh, torch.Tensor):
            raise RuntimeError(f"emulated graph replay: {op_name} returned {type(fresh).__name__}, captured a tensor")
        if captured.shape != fresh.shape:
            raise RuntimeError(
                f"emulated graph replay: {op_name} produced shape {tuple(fresh.shape)} but the capture saw "
                f"{tuple(captured.shape)}; data-dependent shapes cannot be replayed (nor on a real CUDA graph)"
            )
        if captured.data_ptr() == fresh.data_ptr() and captured.stride() == fresh.stride():
            return  # same memory (an un-annotated view): nothing to move
        with torch.no_grad():
            captured.copy_(fresh)
    elif isinstance(captured, (tuple, list)):
        for c, f in zip(captured, fresh):
            _copy_into(op_name, c, f)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


# Ops that make the host wait for device data: illegal while a real device
# captures a graph (cudaErrorStreamCaptureUnsupported). Refusing them keeps a
# capture that would fail on the device from "working" here with its
# data-dependent host logic frozen (and replays silently wrong).
_HOST_SYNC_OPS = {
    "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::nonzero",
    "aten::masked_select", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
}


def _refuse_host_read(what: str) -> None:
    raise RuntimeError(
        f"{what} reads device data on the host while a graph is being captured; a real maca/CUDA "
        "device refuses this too (operation not permitted when stream is capturing). Read the value "
        "before the capture, keep it on the device, or run this code eagerly."
    )


def _check_host_read(tensor: torch.Tensor, what: str) -> None:
    """Raise if this thread is capturing a graph and ``tensor`` holds device data."""
    st = _state
    if st is None or not st.capturing:
        return
    graph = st.capturing.get(threading.get_ident())
    if graph is not None and graph._holds_device_data(tensor):
        _refuse_host_read(what)


@functools.lru_cache(maxsize=1)
def _recorder_class():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class GraphRecorder(TorchDispatchMode):
        """Runs each aten op and appends it to the graph being captured."""

        def __init__(self, graph: EmulatedCUDAGraph) -> None:
            super().__init__()
            self.graph = graph

        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            # torch wraps a mode's __torch_dispatch__ in dynamo.disable, which
            # imports torch._dynamo (seconds) at the first op; nothing here is
            # ever compiled, so skip the wrapper
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            graph = self.graph
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            reads_device = any(graph._holds_device_data(t) for t in inputs)
            if reads_device and func._schema.name in _HOST_SYNC_OPS:
                _refuse_host_read(func._schema.name)
            out = func(*args, **kwargs)
            graph._ops.append(_RecordedOp(func, args, kwargs, out, _schema_kind(func)))
            if reads_device:
                graph._mark_device_data(out)
            return out

    return GraphRecorder


class EmulatedCUDAGraph:
    """``torch.cuda.CUDAGraph`` on the emulated device.

    Capture (``capture_begin`` ... ``capture_end``, or ``with
    torch.cuda.graph(g):``) runs the block eagerly while a dispatch mode
    records each aten op with the tensors it read and wrote. ``replay()``
    re-runs those ops in order on the same tensors:

    - ops that write an argument (``add_``, ``copy_``, ``out=``) run again
      and write the same tensors;
    - ops that return a view are skipped: the captured view still aliases
      its base, which replay refreshes;
    - other ops run again and their results are copied into the tensors the
      capture produced (the graph's fixed output addresses);
    - ``empty*`` are skipped (their contents are undefined anyway).

    Device data read on the host during capture raises (see module doc).
    So inputs copied into the captured input tensors before ``replay()`` flow
    through to the captured outputs, as on a real device.
    """

    def __init__(self, keep_graph: bool = False) -> None:
        self._ops: list[_RecordedOp] = []
        self._device_ptrs: set[int] = set()  # storages written by device work during capture
        self._pool: tuple[int, int] | None = None
        self._recorder = None
        self._captured = False
        self._debug = False

    def _holds_device_data(self, tensor: torch.Tensor) -> bool:
        ptr = _storage_ptr(tensor)
        return (ptr != 0 and ptr in self._device_ptrs) or _st().memory.is_resident(tensor)

    def _mark_device_data(self, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            ptr = _storage_ptr(out)
            if ptr:
                self._device_ptrs.add(ptr)
        elif isinstance(out, (tuple, list)):
            for item in out:
                self._mark_device_data(item)

    # capture
    def capture_begin(self, pool=None, capture_error_mode: str = "global", **_unused: Any) -> None:
        st = _st()
        if capture_error_mode not in ("global", "thread_local", "relaxed"):
            raise ValueError(
                f"capture_error_mode={capture_error_mode!r} is not allowed; use global, thread_local or relaxed"
            )
        if self._recorder is not None:
            raise RuntimeError("this graph is already capturing")
        self._ops = []
        self._device_ptrs = set()
        self._pool = tuple(pool) if isinstance(pool, tuple) else (0, next(_pool_ids))
        self._recorder = _recorder_class()(self)
        self._recorder.__enter__()
        st.capturing[threading.get_ident()] = self

    def capture_end(self) -> None:
        st = _st()
        if self._recorder is None:
            raise RuntimeError("capture_end() without capture_begin()")
        recorder, self._recorder = self._recorder, None
        st.capturing.pop(threading.get_ident(), None)
        recorder.__exit__(None, None, None)
        self._captured = True
        if self._debug:
            logger.debug("emulated graph captured %d aten ops", len(self._ops))

    def instantiate(self) -> None:
        return None

    # replay
    def replay(self) -> None:
        if not self._captured:
            raise RuntimeError("replay() before a capture: capture the graph first")
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for op in self._ops:
                if op.kind == "view" or op.func._schema.name in _UNDEFINED_CONTENT_OPS:
                    continue
                if op.kind == "functional" and not _has_tensor(op.out):
                    continue  # host-side reads (item(), equal()) are frozen at capture
                fresh = op.func(*op.args, **op.kwargs)
                if op.kind == "functional":
                    _copy_into(op.func._schema.name, op.out, fresh)

    def reset(self) -> None:
        self._ops = []
        self._captured = False

    def pool(self) -> tuple[int, int]:
        if self._pool is None:
            raise RuntimeError("pool() before a capture")
        return self._pool

    def enable_debug_mode(self) -> None:
        self._debug = True

    def debug_dump(self, debug_path: str, **_unused: Any) -> None:
        with open(debug_path, "w") as fh:
            for op in self._ops:
                fh.write(f"{op.kind}\t{op.func}\n")

    def raw_cuda_graph(self) -> int:
        raise RuntimeError("the emulated maca device has no raw CUDA graph handle")

    @property
    def recorded_op_count(self) -> int:
        return len(self._ops)


class EmulatedGraphContext:
    """``torch.cuda.graph(g, pool=None, stream=None, capture_error_mode=...)``."""

    default_capture_stream: EmulatedStream | None = None

    def __init__(self, cuda_graph: EmulatedCUDAGraph, pool=None, stream=None,
                 capture_error_mode: str = "global", **_unused: Any) -> None:
        if not isinstance(cuda_graph, EmulatedCUDAGraph):
            raise ValueError(f"cuda_graph={cuda_graph!r} is not a torch.cuda.CUDAGraph of the emulated device")
        if stream is None:
            if EmulatedGraphContext.default_capture_stream is None:
                EmulatedGraphContext.default_capture_stream = EmulatedStream()
            stream = EmulatedGraphContext.default_capture_stream
        self.cuda_graph = cuda_graph
        self.pool = getattr(pool, "id", pool)  # a MemPool or a pool handle
        self.stream_ctx = EmulatedStreamContext(stream)
        self.capture_error_mode = capture_error_mode

    def __enter__(self) -> None:
        self.stream_ctx.__enter__()
        self.cuda_graph.capture_begin(self.pool, capture_error_mode=self.capture_error_mode)

    def __exit__(self, *exc: object) -> None:
        try:
            self.cuda_graph.capture_end()
        finally:
            self.stream_ctx.__exit__(*exc)


def graph_pool_handle() -> tuple[int, int]:
    return (0, next(_pool_ids))


def is_current_stream_capturing() -> bool:
    return threading.get_ident() in _st().capturing


class EmulatedMemPool:
    """``torch.cuda.MemPool``: an id only (the CPU has no pools)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.id = graph_pool_handle()

    def use_count(self) -> int:
        return 1

    def snapshot(self) -> list:
        return []


@contextlib.contextmanager
def use_mem_pool(pool: EmulatedMemPool, device=None):
    # a contextmanager function like torch's: Dynamo reads its __wrapped__
    _device_index(device)
    yield


# --------------------------------------------------------------------------
# torch.cuda functions


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


# The device's generator is the CPU generator: tensors live there. Go to
# torch.default_generator directly: torch.manual_seed itself calls
# torch.cuda.manual_seed_all.
def manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def seed() -> None:
    torch.default_generator.seed()


def initial_seed() -> int:
    return torch.default_generator.initial_seed()


def get_rng_state(device="cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
    torch.default_generator.set_state(new_state)


def get_rng_state_all() -> list[torch.Tensor]:
    return [torch.default_generator.get_state() for _ in range(_st().device_count)]


def set_rng_state_all(new_states) -> None:
    for state in new_states:
        torch.default_generator.set_state(state)


def _accelerator_current() -> torch.device:
    return torch.device("cuda")


def _accelerator_current_with_check(check_available: bool = False) -> torch.device:
    return torch.device("cuda")


def _autocast_init(original_init):
    # autocast("cuda") must cast what runs on the emulated device, which is
    # the CPU: the numbers then match a device run under autocast
    def __init__(self, device_type, *args, **kwargs):
        if device_type == "cuda":
            device_type = "cpu"
        original_init(self, device_type, *args, **kwargs)

    return __init__


def _device_context_init(original_init):
    def __init__(self, device):
        original_init(self, _map_device(device))

    return __init__


# --------------------------------------------------------------------------
# install / uninstall


def stream(stream: EmulatedStream | None = None) -> EmulatedStreamContext:
    """``torch.cuda.stream(s)``: a context that makes ``s`` current."""
    return EmulatedStreamContext(stream)


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
    global _state
    with _install_lock:
        if _state is not None:
            raise RuntimeError("the emulated maca device is already installed; call uninstall() first")
        count = _configured_device_count() if device_count is None else device_count
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"device_count={count!r} must be an integer >= 1")
        budget = default_memory_budget() if memory_budget is None else memory_budget
        if budget <= 0:
            raise ValueError(f"memory_budget={budget!r} must be > 0 bytes")
        _state = _State(count, budget)
        try:
            _apply_patches()
        except BaseException:
            PATCHES.restore_all()
            _unregister_for_torchscript()
            _state = None
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
    global _state
    with _install_lock:
        undone = PATCHES.restore_all()
        _unregister_for_torchscript()
        _state = None
        EmulatedGraphContext.default_capture_stream = None
        return undone


def memory_tracker() -> _DeviceMemory:
    """The byte counter behind memory_allocated()/mem_get_info() (tests, doctor)."""
    return _st().memory
