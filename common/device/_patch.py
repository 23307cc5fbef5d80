"""The one place that monkey-patches torch at run time (the emulated device).

Every runtime patch goes through ``PATCHES.patch(owner, attr, replacement,
why=...)``: it stores the original, refuses to patch the same attribute twice,
and ``PATCHES.restore_all()`` puts every original back (``deactivate()`` and
the tests rely on that). ``PATCHES.original(owner, attr)`` gives the stock
object while a patch is in place: device detection asks the *real*
``torch.cuda.is_available`` even after the emulation replaced it.

Ledger (vLLM-metax / vllm-ascend style): each entry records why it exists
(``PATCHES.records()``; the doctor reports how many are in place). Written
for the torch range in common/versions.py, tested with 2.14.1 only. Removal
condition for the whole set: torch ships a CPU-backed stand-in for the cuda
device (it does not today).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

_MISSING = object()


@dataclass(frozen=True)
class PatchRecord:
    owner: Any
    attr: str
    original: Any  # _MISSING when the owner did not hold the attribute itself
    inherited: Any  # what a class got from its bases (_MISSING if nothing)
    why: str

    @property
    def target(self) -> str:
        owner_name = getattr(self.owner, "__qualname__", None) or getattr(self.owner, "__name__", repr(self.owner))
        module = getattr(self.owner, "__module__", None)
        if module and isinstance(self.owner, type):
            owner_name = f"{module}.{owner_name}"
        return f"{owner_name}.{self.attr}"


class PatchRegistry:
    def __init__(self) -> None:
        self._records: dict[tuple[int, str], PatchRecord] = {}
        self._order: list[tuple[int, str]] = []
        self._lock = threading.RLock()

    def patch(self, owner: Any, attr: str, replacement: Any, *, why: str) -> None:
        key = (id(owner), attr)
        with self._lock:
            if key in self._records:
                raise RuntimeError(
                    f"maca-infer: {self._records[key].target} is already patched; "
                    "call deactivate() before patching it again"
                )
            # A class's own __dict__ keeps descriptors (properties,
            # staticmethods) intact; an inherited attribute (Tensor.to lives on
            # TensorBase) is restored by deleting the override, not by copying
            # the base's method onto the subclass.
            inherited = _MISSING
            if isinstance(owner, type):
                original = owner.__dict__.get(attr, _MISSING)
                if original is _MISSING:
                    inherited = getattr(owner, attr, _MISSING)
            else:
                original = getattr(owner, attr, _MISSING)
            setattr(owner, attr, replacement)
            self._records[key] = PatchRecord(owner, attr, original, inherited, why)
            self._order.append(key)

    def original(self, owner: Any, attr: str) -> Any:
        """The stock attribute, whether or not it is patched now."""
        record = self._records.get((id(owner), attr))
        if record is None:
            return getattr(owner, attr)
        if record.original is not _MISSING:
            return record.original
        if record.inherited is not _MISSING:
            return record.inherited
        raise AttributeError(f"{record.target} did not exist before maca-infer patched it")

    def is_patched(self, owner: Any, attr: str) -> bool:
        return (id(owner), attr) in self._records

    def records(self) -> list[PatchRecord]:
        return [self._records[k] for k in self._order]

    def restore_all(self) -> int:
        """Undo every patch, newest first; returns how many were undone."""
        with self._lock:
            count = 0
            for key in reversed(self._order):
                record = self._records.pop(key)
                if record.original is _MISSING:
                    try:
                        delattr(record.owner, record.attr)
                    except AttributeError:
                        pass
                else:
                    setattr(record.owner, record.attr, record.original)
                count += 1
            self._order.clear()
            return count


PATCHES = PatchRegistry()
