"""The emulated device's facade over the one runtime-patch helper (common/patching.py).

``emulation`` (its ``install`` module) patches torch through ``PATCHES.patch(owner, attr,
replacement, why=...)``; every such patch is a part of the one declared
record :data:`EMULATION` in ``maca_infer.common.patching.LEDGER`` (its how,
versions and removal condition), keeps its original, is refused a second
time, and ``PATCHES.restore_all()`` undoes the device's patches only
(``deactivate()`` and the tests rely on that). ``PATCHES.original(owner,
attr)`` gives the stock object while a patch is in place: device detection
asks the *real* ``torch.cuda.is_available`` even after the emulation
replaced it.

Kept cheap: it runs in every process that imports torch with the emulation
on (one dict entry per patch, no torch import here).
"""

from __future__ import annotations

from typing import Any

from maca_infer.common.patching import LEDGER, RuntimePatch, object_path
from maca_infer.common.versions import range_of

EMULATION = LEDGER.declare(
    "torch.* (emulated maca device)",
    owner="device",
    why="MACA_INFER_DEVICE=emulated: framework code hard-codes torch.cuda.* and device='cuda'; on a host with "
        "no accelerator those calls must reach CPU-safe equivalents",
    how="torch.cuda.*, torch.accelerator.*, torch's tensor factories and Tensor methods are replaced by "
        "wrappers that put 'cuda' tensors in host memory and answer device queries for the emulated device "
        "(the technique of torch_npu's transfer_to_npu); each part records its own why",
    versions=range_of("torch"),
    remove_when="torch ships a CPU-backed stand-in for the cuda device (it does not today)",
)


class PatchRegistry:
    """``patch`` / ``original`` / ``is_patched`` / ``records`` / ``restore_all`` for the emulation."""

    def __init__(self, of: RuntimePatch) -> None:
        self._of = of

    def patch(self, owner: Any, attr: str, replacement: Any, *, why: str) -> None:
        existing = LEDGER.attr_target(owner, attr)
        if existing is not None:
            raise RuntimeError(
                f"maca-infer: {existing} is already patched; call deactivate() before patching it again"
            )
        target = f"{object_path(owner)}.{attr}"
        if LEDGER.is_applied(target):  # two objects under one name (a re-imported module)
            target = f"{target} [{id(owner):#x}]"
        LEDGER.set_attr(LEDGER.part(self._of, target, why=why), owner, attr, replacement)

    def original(self, owner: Any, attr: str) -> Any:
        """The stock attribute, whether or not it is patched now."""
        return LEDGER.original(owner, attr)

    def is_patched(self, owner: Any, attr: str) -> bool:
        return LEDGER.attr_target(owner, attr) is not None

    def records(self) -> list[RuntimePatch]:
        return [r for r in LEDGER.applied("device") if r.part_of == self._of.target]

    def restore_all(self) -> int:
        """Undo every emulation patch, newest first; returns how many were undone."""
        return LEDGER.undo_all("device", part_of=self._of.target)


PATCHES = PatchRegistry(EMULATION)
