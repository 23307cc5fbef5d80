"""Graphs on the emulated device: ``torch.cuda.CUDAGraph`` / ``torch.cuda.graph``.

See :class:`EmulatedCUDAGraph`: capture records the aten ops of the block,
replay re-runs them on the captured tensors; a host read of device data
during capture raises, as on a device.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from dataclasses import dataclass
from typing import Any

import torch

from maca_infer.common.device.emulation import devices
from maca_infer.common.device.emulation.devices import _device_index, _st
from maca_infer.common.device.emulation.memory import _storage_ptr
from maca_infer.common.device.emulation.streams import EmulatedStream, EmulatedStreamContext
from maca_infer.common.log import get_logger

logger = get_logger(__package__)  # the package's one logger

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
    st = devices._state
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
