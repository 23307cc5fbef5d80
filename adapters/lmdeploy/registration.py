"""Registering maca-infer ops into an installed upstream dlinfer.

Upstream dlinfer keeps ``dlinfer.vendor.vendor_ops_registry`` (op name ->
function) and its public ``dlinfer.ops`` functions look names up there at
call time. With an upstream dlinfer chosen (``MACA_INFER_DLINFER=upstream``,
or ``auto`` with one installed) we leave its modules alone and put every op
maca-infer implements into that registry:

- the ops upstream's maca vendor has (attention, KV fill, norms, rotary,
  SiLU-and-mul, MoE gating, ...) are *replaced*: upstream calls MetaX's
  flash_attn / mcoplib directly, maca-infer reaches the same kernels through
  its op dispatch's vendor tier (``common/ops/vendor.py``), so there is one
  path with one set of checks, tier reports and fallbacks (issue #12);
- the ops it lacks are *added*: ``weight_quant_matmul`` (AWQ W4A16 linear),
  ``fused_moe_w4a16`` and ``w4a16_linear``, ``fill_mla_cache``,
  ``mla_decode``, ``mla_prefill`` (DeepSeek MLA), and the INT8 W8A8 ops
  ``dynamic_quant``, ``linear_w8a8``, ``rms_norm_w8a8``,
  ``add_rms_norm_w8a8``, ``fused_moe_w8a8`` (LMDeploy's smooth-quant modules;
  a registry entry cannot help where upstream's ``dlinfer.ops`` lacks the
  function itself, as for ``fused_moe_w8a8`` today: LMDeploy then stops at
  model build with an error saying so).

Every registration is recorded (``registered()``: "added" or "replaced").
"""

from __future__ import annotations

import types

from maca_infer.adapters.lmdeploy import dlinfer_ops
from maca_infer.common.log import get_logger

logger = get_logger(__name__)

# the ops upstream's maca vendor lacks (added); the others of dlinfer_ops.__all__ replace upstream's
GAP_OPS = dlinfer_ops.GAP_OPS

_registered: dict[str, str] = {}  # op name -> "added" | "replaced"


def register_into(dlinfer_module: types.ModuleType) -> dict[str, str]:
    """Put maca-infer's ops into ``dlinfer.vendor.vendor_ops_registry``.

    Called right after an upstream ``dlinfer`` finished importing (its vendor
    registered its own ops by then). Returns what happened per op name.
    """
    if getattr(dlinfer_module, "provided_by", None) == "maca-infer":
        return {}
    vendor = getattr(dlinfer_module, "vendor", None)
    registry = getattr(vendor, "vendor_ops_registry", None)
    if not isinstance(registry, dict):
        logger.warning("installed dlinfer has no dlinfer.vendor.vendor_ops_registry dict; "
                       "maca-infer ops were not registered into it")
        return {}
    vendor_name = getattr(vendor, "vendor_name", "?")
    for name in dlinfer_ops.__all__:
        ours = getattr(dlinfer_ops, name)
        if registry.get(name) is not ours:  # a second call changes nothing
            _registered[name] = "replaced" if name in registry else "added"
            registry[name] = ours
    for state in ("replaced", "added"):
        names = sorted(n for n, s in _registered.items() if s == state)
        logger.info("upstream dlinfer (vendor %s) in use; maca-infer %s: %s", vendor_name, state,
                    ", ".join(names) or "nothing")
    return dict(_registered)


def registered() -> dict[str, str]:
    return dict(_registered)
