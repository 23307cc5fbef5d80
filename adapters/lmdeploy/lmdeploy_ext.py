"""``dlinfer.framework.lmdeploy_ext``: LMDeploy imports it once per engine process
(``lmdeploy.utils.try_import_deeplink``) to let the vendor adapt LMDeploy.

maca-infer's adaptations are applied by import hooks when the patched LMDeploy
modules load (see ``lmdeploy_patches.py``); importing this module makes sure
the hooks are in place and that the adapter's activation checks ran.
"""

from __future__ import annotations

from maca_infer.adapters.lmdeploy import activate as _activate

_activate()
__path__: list[str] = []
