"""Import-time plumbing: serve ``dlinfer`` and patch LMDeploy when it loads.

Two small ``sys.meta_path`` finders, installed once per process by
``install()`` (the ``torch.backends`` entry point runs it in every process
that imports torch, so LMDeploy's spawned engine/checker children get it too):

``DlinferFinder``
    Decides once, at ``import dlinfer``, who provides dlinfer
    (``MACA_INFER_DLINFER``):

    - ``ours``: maca-infer's modules, even if an upstream dlinfer is installed;
    - ``upstream``: the installed dlinfer (an error if there is none);
    - ``auto`` (default): the installed dlinfer if one is importable, else ours.

    When ours is chosen, ``dlinfer``, ``dlinfer.ops``, ``dlinfer.vendor``,
    ``dlinfer.utils``, ``dlinfer.utils.type_annotation``,
    ``dlinfer.utils.registry``, ``dlinfer.framework`` and
    ``dlinfer.framework.lmdeploy_ext`` resolve to maca-infer module objects
    (the same objects under both names, never a second copy). When upstream is
    chosen, the finder steps aside and, once ``dlinfer`` has finished
    importing, registers maca-infer's ops into its ``vendor_ops_registry``
    (replacing its maca vendor's ops, adding the ones it lacks: ``registration.py``).

``PostImportHooks``
    Runs a callback right after a named module finishes executing, so LMDeploy
    is patched when *it* imports its own modules, without maca-infer importing
    LMDeploy early.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from typing import Callable

from maca_infer.adapters.lmdeploy import patching
from maca_infer.common import envs

_PKG = "maca_infer.adapters.lmdeploy"

# the LMDeploy modules whose import applies maca-infer's fixes (lmdeploy_patches.py; declared in patching.py):
# the maca op backend, the api_server's engine-process module (start-up race fix) and
# tensor-parallel workers (process-group backend fix)
LMDEPLOY_MACA_OP_BACKEND = patching.MACA_OP_BACKEND
LMDEPLOY_ZMQ_ENGINE = patching.ZMQ_ENGINE
LMDEPLOY_BASE_WORKER = patching.BASE_WORKER

# dlinfer module name -> maca-infer module that provides it (None: an empty namespace package)
DLINFER_MODULES: dict[str, str | None] = {
    "dlinfer": f"{_PKG}.dlinfer_package",
    "dlinfer.ops": f"{_PKG}.dlinfer_ops",
    "dlinfer.vendor": f"{_PKG}.dlinfer_vendor",
    "dlinfer.utils": None,
    "dlinfer.utils.type_annotation": f"{_PKG}.dlinfer_types",
    "dlinfer.utils.registry": f"{_PKG}.dlinfer_types",
    "dlinfer.framework": None,
    "dlinfer.framework.lmdeploy_ext": f"{_PKG}.lmdeploy_ext",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads a dlinfer name as an existing maca-infer module object."""

    def __init__(self, provider: str | None):
        self.provider = provider

    def create_module(self, spec):
        if self.provider is None:
            module = types.ModuleType(spec.name, f"{spec.name}: namespace served by maca-infer")
            module.__path__ = []
            return module
        return importlib.import_module(self.provider)

    def exec_module(self, module):
        # the provider module already ran when create_module imported it
        return None


def upstream_dlinfer_spec():
    """Spec of an installed (non-maca-infer) dlinfer, or None. Does not import it."""
    return importlib.machinery.PathFinder.find_spec("dlinfer")


class DlinferFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self._choice: str | None = None  # "ours" | "upstream", fixed at first `import dlinfer`

    def choice(self) -> str:
        if self._choice is None:
            mode = envs.dlinfer_mode()
            installed = upstream_dlinfer_spec() is not None
            if mode == "upstream" and not installed:
                raise ImportError(
                    "MACA_INFER_DLINFER=upstream but no dlinfer package is installed; "
                    "install DeepLink's dlinfer built for maca, or use MACA_INFER_DLINFER=auto|ours"
                )
            self._choice = "upstream" if (mode == "upstream" or (mode == "auto" and installed)) else "ours"
        return self._choice

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "dlinfer" and not fullname.startswith("dlinfer."):
            return None
        if self.choice() == "upstream":
            return None
        if fullname not in DLINFER_MODULES:
            return None  # e.g. dlinfer.vendor.ascend: not provided -> ModuleNotFoundError
        provider = DLINFER_MODULES[fullname]
        is_package = provider is None or fullname in ("dlinfer", "dlinfer.framework.lmdeploy_ext")
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(provider), is_package=is_package)


class _HookedLoader(importlib.abc.Loader):
    """Wraps a module's real loader and runs callbacks after it executed the module."""

    def __init__(self, inner, callbacks: list[Callable[[types.ModuleType], None]]):
        self.inner = inner
        self.callbacks = callbacks

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        for callback in self.callbacks:
            callback(module)

    def __getattr__(self, name):  # get_source, is_package, ... for tools that ask
        return getattr(self.inner, name)


class PostImportHooks(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.hooks: dict[str, list[Callable[[types.ModuleType], None]]] = {}
        self._busy = threading.local()

    def register(self, module_name: str, callback: Callable[[types.ModuleType], None]) -> None:
        """Run ``callback(module)`` after ``module_name`` is imported (now, if it already is)."""
        self.hooks.setdefault(module_name, []).append(callback)
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "__spec__", None) is not None:
            callback(module)

    def find_spec(self, fullname, path=None, target=None):
        callbacks = self.hooks.get(fullname)
        if not callbacks or getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.name = None
        if spec is None or spec.loader is None:
            return None
        spec.loader = _HookedLoader(spec.loader, callbacks)
        return spec


_installed_lock = threading.Lock()
dlinfer_finder: DlinferFinder | None = None
post_import_hooks: PostImportHooks | None = None


def install() -> None:
    """Put both finders at the front of sys.meta_path (idempotent, imports nothing heavy)."""
    global dlinfer_finder, post_import_hooks
    with _installed_lock:
        if dlinfer_finder is None:
            dlinfer_finder = DlinferFinder()
            post_import_hooks = PostImportHooks()
        for finder in (dlinfer_finder, post_import_hooks):
            if finder not in sys.meta_path:
                sys.meta_path.insert(0, finder)


def uninstall() -> None:
    """Remove the finders (tests); modules already imported stay imported."""
    with _installed_lock:
        for finder in (dlinfer_finder, post_import_hooks):
            while finder is not None and finder in sys.meta_path:
                sys.meta_path.remove(finder)
