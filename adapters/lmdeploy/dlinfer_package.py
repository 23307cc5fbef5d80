"""The ``dlinfer`` top-level package that maca-infer serves when no upstream
dlinfer is installed (or ``MACA_INFER_DLINFER=ours``).

Only the modules LMDeploy imports exist: ``dlinfer.ops``, ``dlinfer.vendor``,
``dlinfer.utils.type_annotation``, ``dlinfer.utils.registry`` and
``dlinfer.framework.lmdeploy_ext``. ``import_hooks.DlinferFinder`` maps these
names onto maca-infer modules (one module object per name, never a copy).
"""

from __future__ import annotations

__version__ = "0.0.0+maca_infer"
# a package needs __path__ for `import dlinfer.ops` to be attempted; the
# finder serves every submodule, so the path itself stays empty
__path__: list[str] = []
provided_by = "maca-infer"

# `import dlinfer` is where LMDeploy's maca path starts in every engine process:
# check the LMDeploy version and bring up the maca device here.
from maca_infer.adapters.lmdeploy import activate as _activate  # noqa: E402

_activate()
