"""The one way maca-infer changes LMDeploy (or an installed dlinfer) at runtime.

Every runtime patch goes through :func:`patch`, which

- stores the original attribute so :func:`revert_all` can restore it,
- refuses to patch the same ``target.attr`` twice (a second activation is a
  bug, not something to paper over),
- records *why* the patch exists, which upstream versions it was written for
  and the condition under which it can be deleted (the ledger).

``ledger()`` lists the patches in effect; ``maca-infer``'s README shows the
same table. Patches are applied lazily, when the patched module is imported
(see ``import_hooks.py``), never by importing LMDeploy ourselves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from maca_infer.common.log import get_logger

logger = get_logger(__name__)

_MISSING = object()


@dataclass(frozen=True)
class PatchRecord:
    """One ledger entry: what was replaced, why, and when it can go."""

    target: str            # dotted path of the patched object, e.g. "lmdeploy...MacaOpsBackend"
    attr: str              # attribute replaced on it
    why: str               # the upstream problem this works around
    upstream_versions: str  # versions of the upstream package the patch was written for
    remove_when: str       # the condition for deleting the patch

    @property
    def key(self) -> str:
        return f"{self.target}.{self.attr}"


_lock = threading.Lock()
_originals: dict[str, tuple[Any, str, Any]] = {}   # key -> (owner object, attr, original or _MISSING)
_records: dict[str, PatchRecord] = {}


def _qualname(target: Any) -> str:
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if isinstance(target, type) or callable(target):
        return f"{module}.{name}" if module else str(name)
    return getattr(target, "__name__", repr(target))  # a module


def patch(target: Any, attr: str, new: Any, *, why: str, upstream_versions: str, remove_when: str) -> PatchRecord:
    """Replace ``target.attr`` with ``new`` and record it in the ledger.

    Args:
        target: the module or class that owns ``attr``.
        attr: attribute name; it need not exist yet (then revert deletes it).
        new: the replacement.
        why: the upstream bug or gap, in one or two sentences.
        upstream_versions: e.g. ``"lmdeploy 0.18.0"``.
        remove_when: e.g. ``"lmdeploy's MacaOpsBackend fills max_q_seqlen"``.

    Raises:
        RuntimeError: ``target.attr`` is already patched.
        ValueError: an empty ``why``/``upstream_versions``/``remove_when``.
    """
    for field_name, value in (("why", why), ("upstream_versions", upstream_versions), ("remove_when", remove_when)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"patch({attr!r}): {field_name}={value!r} must be a non-empty explanation")
    record = PatchRecord(_qualname(target), attr, why.strip(), upstream_versions.strip(), remove_when.strip())
    with _lock:
        if record.key in _records:
            raise RuntimeError(f"{record.key} is already patched by maca-infer; refusing to patch it twice")
        original = target.__dict__.get(attr, _MISSING) if hasattr(target, "__dict__") else getattr(target, attr, _MISSING)
        _originals[record.key] = (target, attr, original)
        _records[record.key] = record
        setattr(target, attr, new)
    logger.debug("patched %s (%s)", record.key, record.why)
    return record


def is_patched(target: Any, attr: str) -> bool:
    return f"{_qualname(target)}.{attr}" in _records


def original(target: Any, attr: str) -> Any:
    """The attribute as it was before maca-infer patched it."""
    key = f"{_qualname(target)}.{attr}"
    if key not in _originals:
        raise KeyError(f"{key} is not patched by maca-infer")
    value = _originals[key][2]
    if value is _MISSING:
        raise AttributeError(f"{key} did not exist before maca-infer added it")
    return value


def ledger() -> list[PatchRecord]:
    """The patches in effect, in the order they were applied."""
    with _lock:
        return list(_records.values())


def format_ledger() -> str:
    rows = ledger()
    if not rows:
        return "no runtime patches in effect"
    lines = []
    for r in rows:
        lines.append(f"- {r.key}\n    why: {r.why}\n    written for: {r.upstream_versions}\n    remove when: {r.remove_when}")
    return "\n".join(lines)


def revert(target: Any, attr: str) -> None:
    """Restore one patched attribute and drop it from the ledger."""
    key = f"{_qualname(target)}.{attr}"
    with _lock:
        if key not in _originals:
            raise KeyError(f"{key} is not patched by maca-infer")
        owner, name, value = _originals.pop(key)
        del _records[key]
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)


def revert_all() -> None:
    """Restore every patched attribute (tests use this)."""
    with _lock:
        for key in reversed(list(_originals)):
            owner, attr, value = _originals[key]
            if value is _MISSING:
                try:
                    delattr(owner, attr)
                except AttributeError:
                    pass
            else:
                setattr(owner, attr, value)
        _originals.clear()
        _records.clear()
