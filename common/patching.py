"""The one runtime-patch helper of maca-infer, and its ledger.

Every change maca-infer makes to someone else's code at run time (torch for
the emulated device, LMDeploy, SGLang, Transformers / Diffusers, torch's
backend switches on a MACA host) goes through :data:`LEDGER`, in the manner
of vLLM-metax's ``patch(target, attr)`` helper and vllm-ascend's patch ledger:

- a :class:`RuntimePatch` record says what is replaced (``target``), why,
  how, which upstream versions it was written for and when it can be removed;
- records are *declared* when the adapter module that owns them is imported
  (``LEDGER.declare``), so ``maca-infer patches list --runtime`` can list the
  LMDeploy and SGLang patches from a process that never loads those
  frameworks; they are *applied* later, in the framework's own processes;
- applying refuses a second application of the same target, keeps what is
  needed to undo it, and ``LEDGER.undo(target)`` / ``LEDGER.undo_all(owner)``
  put the original back.

Two ways to apply:

``LEDGER.set_attr(record, obj, attr, new)``
    ``setattr`` with the original kept (a class's own ``__dict__`` entry, so
    descriptors survive; an inherited attribute is undone by deleting the
    override).
``LEDGER.apply(record, do)``
    anything else: ``do()`` makes the change and returns the callable that
    undoes it (a torch backend switch, a hook registered with a framework).

A record may name a *set* (``part_of``): the emulated device declares one
record for its ~160 torch patches and each applied patch is a part of it.

This module imports nothing outside the standard library (the ``torch.backends``
autoload imports it in every process that imports torch).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable

__all__ = ["RuntimePatch", "Ledger", "LEDGER", "MISSING"]

OWNERS = ("device", "lmdeploy", "sglang", "hf")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()  # an attribute that did not exist (or was only inherited) before the patch


@dataclass(frozen=True)
class RuntimePatch:
    """One ledger entry: what maca-infer changes at run time and why."""

    target: str        # dotted path of what is replaced, e.g. "torch.cuda.is_available"
    owner: str         # who applies it: "device", "lmdeploy", "sglang" or "hf"
    why: str           # the upstream problem or gap it works around
    how: str           # what the replacement does
    versions: str      # the upstream versions it was written for
    remove_when: str   # the condition for deleting it
    part_of: str = ""  # target of the declared set this patch belongs to ("" when none)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class _Applied:
    record: RuntimePatch
    undo: Callable[[], None]
    obj: Any = None       # set_attr patches: the patched object ...
    attr: str = ""        # ... the attribute ...
    original: Any = MISSING   # ... its own value before the patch ...
    inherited: Any = MISSING  # ... and what it inherited, when it had no own value


def _check_fields(target: str, owner: str, fields: dict[str, str]) -> None:
    if owner not in OWNERS:
        raise ValueError(f"runtime patch {target!r}: owner={owner!r} is not allowed; use one of {', '.join(OWNERS)}")
    for name, value in fields.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"runtime patch {target!r}: {name}={value!r} must be a non-empty explanation")


def object_path(obj: Any) -> str:
    """Dotted name of a module, class or function (what a record's target starts with)."""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if name is None:
        return f"<{type(obj).__name__} object>"
    module = getattr(obj, "__module__", None)
    if module and (isinstance(obj, type) or callable(obj)) and module != name:
        return f"{module}.{name}"
    return name


class Ledger:
    """Declared and applied runtime patches of this process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._declared: dict[str, RuntimePatch] = {}
        self._applied: dict[str, _Applied] = {}          # target -> what undoes it, in apply order
        self._by_attr: dict[tuple[int, str], str] = {}   # (id(obj), attr) -> target, for set_attr patches

    # ---------------------------------------------------------------- records

    def declare(self, target: str, *, owner: str, why: str, how: str, versions: str, remove_when: str) -> RuntimePatch:
        """Declare a patch (at import of the module that owns it); returns its record.

        Declaring the same record again (a module imported twice under
        importlib's test mode) returns it; a different record for a declared
        target is a ValueError: two fixes on one target would hide each other.
        """
        fields = {"target": target, "why": why, "how": how, "versions": versions, "remove_when": remove_when}
        _check_fields(target, owner, fields)
        record = RuntimePatch(target.strip(), owner, why.strip(), how.strip(), versions.strip(), remove_when.strip())
        with self._lock:
            known = self._declared.get(record.target)
            if known is not None and known != record:
                raise ValueError(f"runtime patch {record.target} is already declared by {known.owner}: {known.why}")
            self._declared[record.target] = record
            return record

    def declared(self, owner: str | None = None) -> list[RuntimePatch]:
        with self._lock:
            return [r for r in self._declared.values() if owner is None or r.owner == owner]

    def record(self, target: str) -> RuntimePatch:
        """The declared record of ``target`` (KeyError if none)."""
        with self._lock:
            if target not in self._declared:
                raise KeyError(f"no runtime patch is declared for {target}")
            return self._declared[target]

    def part(self, of: RuntimePatch, target: str, *, why: str | None = None) -> RuntimePatch:
        """A patch belonging to the declared set ``of`` (its how, versions and removal condition)."""
        return RuntimePatch(target, of.owner, (why or of.why).strip(), of.how, of.versions, of.remove_when,
                            part_of=of.target)

    # ---------------------------------------------------------------- applying

    def set_attr(self, record: RuntimePatch, obj: Any, attr: str, new: Any) -> None:
        """``setattr(obj, attr, new)`` recorded under ``record`` (see the module doc).

        Raises RuntimeError when the target or ``obj.attr`` is already patched.
        """
        key = (id(obj), attr)
        with self._lock:
            self._refuse_twice(record, key)
            inherited = MISSING
            if isinstance(obj, type):
                original = obj.__dict__.get(attr, MISSING)
                if original is MISSING:
                    inherited = getattr(obj, attr, MISSING)
            else:
                original = getattr(obj, attr, MISSING)

            def undo() -> None:
                if original is MISSING:
                    try:
                        delattr(obj, attr)
                    except AttributeError:
                        pass
                else:
                    setattr(obj, attr, original)

            setattr(obj, attr, new)
            self._applied[record.target] = _Applied(record, undo, obj, attr, original, inherited)
            self._by_attr[key] = record.target

    def apply(self, record: RuntimePatch, do: Callable[[], Callable[[], None]]) -> None:
        """Run ``do()`` (which makes the change and returns its undo) under ``record``."""
        with self._lock:
            self._refuse_twice(record, None)
            undo = do()
            if not callable(undo):
                raise TypeError(f"runtime patch {record.target}: do() must return the callable that undoes it")
            self._applied[record.target] = _Applied(record, undo)

    def _refuse_twice(self, record: RuntimePatch, key: tuple[int, str] | None) -> None:
        target = record.target if record.target in self._applied else None
        if target is None and key is not None:
            target = self._by_attr.get(key)
        if target is not None:
            raise RuntimeError(f"maca-infer: {target} is already patched; undo it before patching it again")

    # ---------------------------------------------------------------- state

    def is_applied(self, target: str) -> bool:
        return target in self._applied

    def attr_target(self, obj: Any, attr: str) -> str | None:
        """Target of the set_attr patch on ``obj.attr``, or None when it is not patched."""
        return self._by_attr.get((id(obj), attr))

    def original(self, obj: Any, attr: str) -> Any:
        """``obj.attr`` as it was before maca-infer patched it (the live value when unpatched)."""
        target = self._by_attr.get((id(obj), attr))
        if target is None:
            return getattr(obj, attr)
        applied = self._applied[target]
        if applied.original is not MISSING:
            return applied.original
        if applied.inherited is not MISSING:
            return applied.inherited
        raise AttributeError(f"{target} did not exist before maca-infer patched it")

    def applied(self, owner: str | None = None) -> list[RuntimePatch]:
        """Records of the patches in effect, in the order they were applied."""
        with self._lock:
            return [a.record for a in self._applied.values() if owner is None or a.record.owner == owner]

    # ---------------------------------------------------------------- undoing

    def undo(self, target: str) -> None:
        """Undo one applied patch (KeyError when it is not applied)."""
        with self._lock:
            if target not in self._applied:
                raise KeyError(f"{target} is not patched by maca-infer")
            self._undo(target)

    def undo_all(self, owner: str | None = None, part_of: str | None = None) -> int:
        """Undo every applied patch of ``owner`` (all when None), newest first; returns how many."""
        with self._lock:
            targets = [t for t, a in self._applied.items()
                       if (owner is None or a.record.owner == owner)
                       and (part_of is None or a.record.part_of == part_of)]
            for target in reversed(targets):
                self._undo(target)
            return len(targets)

    def _undo(self, target: str) -> None:
        applied = self._applied.pop(target)
        if applied.attr:
            self._by_attr.pop((id(applied.obj), applied.attr), None)
        applied.undo()

    # ---------------------------------------------------------------- listing

    def entries(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Every declared patch with its state, then applied patches declared nowhere.

        Each entry is the record's fields plus ``applied`` (bool) and, for a
        declared set, ``applied_parts`` (how many of its parts are in effect).
        """
        with self._lock:
            rows: list[dict[str, Any]] = []
            parts: dict[str, int] = {}
            for applied in self._applied.values():
                if applied.record.part_of:
                    parts[applied.record.part_of] = parts.get(applied.record.part_of, 0) + 1
            for record in self._declared.values():
                if owner is not None and record.owner != owner:
                    continue
                row: dict[str, Any] = record.as_dict()
                row.pop("part_of")
                count = parts.get(record.target, 0)
                row["applied"] = record.target in self._applied or count > 0
                if count:
                    row["applied_parts"] = count
                rows.append(row)
            for applied in self._applied.values():
                record = applied.record
                if record.target in self._declared or record.part_of in self._declared:
                    continue
                if owner is not None and record.owner != owner:
                    continue
                row = record.as_dict()
                row.pop("part_of")
                row["applied"] = True
                rows.append(row)
            return rows


LEDGER = Ledger()
