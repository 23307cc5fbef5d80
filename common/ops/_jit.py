"""Deferred ``triton.jit`` for the op kernels, and small launch helpers.

Every op file does ``from maca_infer.common.ops._jit import lazy_jit, tl``:
``tl`` is ``triton.language`` or None, so op modules (and their torch
references) import on hosts without triton.
"""

from __future__ import annotations

import contextlib
import functools
import types

from maca_infer.common import envs

try:  # the ops must import (and the references run) without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on hosts without triton
    triton = None
    tl = None


class lazy_jit:  # noqa: N801 - used like the ``triton.jit`` decorator it wraps
    """``triton.jit`` applied at the first launch, once per TRITON_INTERPRET mode.

    Triton decides between the compiler and the numpy interpreter when
    ``triton.jit`` runs, reading ``TRITON_INTERPRET`` at that moment. A kernel
    decorated at import time is stuck with whatever the environment said when
    some earlier code (an adapter, another test) first imported its module.
    Deferring the decoration, and keeping one jitted copy per mode, makes our
    kernels follow the environment at launch time, which is also what
    ``_dispatch`` consults. Triton's own jitted helpers (``tl.sum``,
    ``tl.cdiv``, ...) are still decorated when ``triton`` is first imported,
    so an interpreter run also needs ``TRITON_INTERPRET=1`` before that
    import; a launch that would mix the two modes raises a RuntimeError
    saying so instead of failing deep inside Triton.

    Device helpers (functions a kernel calls) are wrapped the same way,
    usually as a decorator (``@lazy_jit def online_softmax_step(...)``, see
    ``_triton_helpers``): a kernel jitted for one mode calls its helpers
    jitted for that same mode. A kernel must reach a helper by a plain global
    name (``from ._triton_helpers import online_softmax_step``), not as a
    module attribute, and must not call plain (unjitted) Python functions.

    Usage: ``_kernel = lazy_jit(_kernel_fn)``; ``_kernel[grid](*args, **constexprs)``;
    ``_kernel.jitted(interpret=False)`` is the compiler's JITFunction (what
    the ahead-of-time compile checks build).
    """

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted = {}

    def __getitem__(self, grid):
        if triton is None:
            raise RuntimeError(f"{self.fn.__name__}: triton is not importable")
        interpret = envs.triton_interpret()
        if interpret not in self._jitted and _helpers_interpreted() != interpret:
            raise RuntimeError(
                f"{self.fn.__name__}: TRITON_INTERPRET is {int(interpret)} now but was "
                f"{int(not interpret)} when triton was imported, so triton's own helpers (tl.sum, ...) "
                "are built for the other mode; set TRITON_INTERPRET before anything imports triton"
            )
        return self.jitted(interpret)[grid]

    def jitted(self, interpret: bool):
        """``triton.jit(fn)`` for one mode (interpreter or compiler), made once.

        Every ``lazy_jit`` the function names as a global (its helpers) is
        replaced, in a copy of the function's globals, by that helper jitted
        for the same mode; Triton resolves calls through those globals, both
        when it compiles and when it interprets.
        """
        if triton is None:
            raise RuntimeError(f"{self.fn.__name__}: triton is not importable")
        kernel = self._jitted.get(interpret)
        if kernel is None:
            fn = self.fn
            helpers = {name: value.jitted(interpret) for name, value in fn.__globals__.items()
                       if isinstance(value, lazy_jit) and name in fn.__code__.co_names}
            if helpers:
                fn = types.FunctionType(fn.__code__, {**fn.__globals__, **helpers}, fn.__name__,
                                        fn.__defaults__, fn.__closure__)
                fn = functools.update_wrapper(fn, self.fn, updated=())
                fn.__kwdefaults__ = self.fn.__kwdefaults__
                del fn.__wrapped__  # Triton reads the source of fn itself, not of a wrapped function
            with _interpret_mode(interpret):
                kernel = triton.jit(fn)
            self._jitted[interpret] = kernel
        return kernel


@contextlib.contextmanager
def _interpret_mode(interpret: bool):
    """TRITON_INTERPRET set to ``interpret`` while ``triton.jit`` decides its mode (reads the variable)."""
    if envs.triton_interpret() == interpret:
        yield
        return
    with envs.temporarily(TRITON_INTERPRET="1" if interpret else "0"):
        yield


def _helpers_interpreted() -> bool:
    """Whether triton.language's own jitted helpers were built for the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def interpreter_branch(device: "torch.device") -> bool:
    """Whether a launch on ``device`` takes the kernels' interpreter branch.

    Tensors off a GPU run in Triton's interpreter, where every program runs
    in numpy: there the kernels use small tiles, and fp32 ``tl.dot`` inputs
    (the interpreter multiplies bf16 wrongly, triton-lang/triton#11584).
    ``MACA_INFER_TRITON_BRANCH=device`` makes interpreted launches take the
    device branch instead (device tile sizes, fp16/bf16 ``tl.dot`` inputs),
    so the tests check the code a MACA or CUDA device runs.
    """
    return device.type != "cuda" and not envs.triton_device_branch()
