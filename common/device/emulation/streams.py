"""Streams and events of the emulated device: work is done when it is enqueued.

Everything runs synchronously on the CPU, so synchronize/query/wait are
trivially true; the current stream is per thread and per device, as in CUDA.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from maca_infer.common.device.emulation.devices import _device_index, _st

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


def stream(stream: EmulatedStream | None = None) -> EmulatedStreamContext:
    """``torch.cuda.stream(s)``: a context that makes ``s`` current."""
    return EmulatedStreamContext(stream)
