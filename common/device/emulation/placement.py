"""Tensor placement: tensors asked for on the maca device land in host memory.

Tensor factories, ``Tensor.to/.cuda/.cpu``, ``new_*``, ``*_like``,
``torch.load(map_location=...)``, ``with torch.device("cuda")`` and
``autocast("cuda")`` are wrapped so that ``"cuda"``/``"cuda:N"``/
``torch.device("cuda")``/an int ordinal mean the CPU, and the memory tracker
sees what was placed on the device. Host/device copies keep their copy
semantics (see the package doc). The wrappers are made here; ``install.py``
puts them in place.
"""

from __future__ import annotations

import functools

import torch

from maca_infer.common.device.emulation.devices import _is_maca, _map_device, _st
from maca_infer.common.device.emulation.graphs import _check_host_read

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
