"""Deferred ``triton.jit`` for the op kernels, and small launch helpers.

Every op file does ``from maca_infer.common.ops._jit import lazy_jit, tl``:
``tl`` is ``triton.language`` or None, so op modules (and their torch
references) import on hosts without triton.
"""

from __future__ import annotations

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

    Kernels wrapped this way must not call other plain Python helpers (the
    compiler only inlines jitted functions).

    Usage: ``_kernel = lazy_jit(_kernel_fn)``; ``_kernel[grid](*args, **constexprs)``.
    """

    def __init__(self, fn):
        self.fn = fn
        self._jitted = {}

    def __getitem__(self, grid):
        if triton is None:
            raise RuntimeError(f"{self.fn.__name__}: triton is not importable")
        interpret = envs.triton_interpret()
        kernel = self._jitted.get(interpret)
        if kernel is None:
            if _helpers_interpreted() != interpret:
                raise RuntimeError(
                    f"{self.fn.__name__}: TRITON_INTERPRET is {int(interpret)} now but was "
                    f"{int(not interpret)} when triton was imported, so triton's own helpers (tl.sum, ...) "
                    "are built for the other mode; set TRITON_INTERPRET before anything imports triton"
                )
            kernel = triton.jit(self.fn)
            self._jitted[interpret] = kernel
        return kernel[grid]


def _helpers_interpreted() -> bool:
    """Whether triton.language's own jitted helpers were built for the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()
