"""Every runtime patch the Hugging Face adapter makes, in one place.

In the manner of vLLM-metax's ``patch(target, attr)`` helper: each patch
stores the original, refuses to be applied twice, and carries why it exists,
the upstream versions it was written for and when it can go. ``restore`` puts
the original back (``disable()`` and the tests rely on that).

The patches themselves (what they replace and why) are listed in LEDGER; the
code that applies them lives next to the feature that needs it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

_MISSING = object()

# name -> (why, upstream versions, removal condition)
LEDGER: dict[str, tuple[str, str, str]] = {
    "transformers.<arch>.apply_rotary_pos_emb": (
        "the attention modules call this module-level function directly; it is the only seam where our "
        "rotary kernel can run. The replacement runs our kernel only inside attention modules of a model "
        "passed to enable() and the stock function everywhere else.",
        "transformers 4.56 - 5.19",
        "remove when transformers lets a model instance choose its rotary function",
    ),
    "diffusers.AttentionBackendName.MACA": (
        "diffusers' dispatcher only accepts members of its AttentionBackendName enum; adding a 'maca' member "
        "lets set_attention_backend('maca') and attention_backend('maca') reach our attention.",
        "diffusers 0.35 - 0.42",
        "remove when diffusers offers registration of out-of-tree attention backends",
    ),
}


@dataclass
class _Applied:
    owner: Any
    attr: str
    original: Any


class PatchSet:
    """setattr-style patches, each undone by restore(owner, attr)."""

    def __init__(self) -> None:
        self._applied: dict[tuple[int, str], _Applied] = {}
        self._lock = threading.Lock()

    def patch(self, owner: Any, attr: str, new: Any) -> None:
        key = (id(owner), attr)
        with self._lock:
            if key in self._applied:
                raise RuntimeError(f"maca-infer: {_name(owner)}.{attr} is already patched; restore it first")
            original = vars(owner).get(attr, _MISSING)
            self._applied[key] = _Applied(owner, attr, original)
            setattr(owner, attr, new)

    def is_patched(self, owner: Any, attr: str) -> bool:
        return (id(owner), attr) in self._applied

    def restore(self, owner: Any, attr: str) -> None:
        with self._lock:
            applied = self._applied.pop((id(owner), attr), None)
        if applied is None:
            return
        if applied.original is _MISSING:
            try:
                delattr(owner, attr)
            except AttributeError:
                pass
        else:
            setattr(owner, attr, applied.original)


def _name(owner: Any) -> str:
    return getattr(owner, "__name__", None) or type(owner).__name__


# the adapter's module-level patches (the architectures' apply_rotary_pos_emb)
PATCHES = PatchSet()
