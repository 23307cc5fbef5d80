"""Registering maca-infer ops into an installed upstream dlinfer.

Upstream dlinfer keeps ``dlinfer.vendor.vendor_ops_registry`` (op name ->
function) and its public ``dlinfer.ops`` functions look names up there at
call time. With an upstream dlinfer chosen (``MACA_INFER_DLINFER=upstream``,
or ``auto`` with one installed) we leave its modules and its own ops alone
and only *add* the ops its maca vendor lacks:

- ``weight_quant_matmul`` (AWQ W4A16 linear, what LMDeploy's AWQ path calls),
- ``fused_moe_w4a16`` and ``w4a16_linear`` (int4 MoE experts / linears),
- ``fill_mla_cache``, ``mla_decode``, ``mla_prefill`` (DeepSeek MLA).

Every addition is recorded (``registered()``); nothing existing is replaced.
"""

from __future__ import annotations

import types

from maca_infer.adapters.lmdeploy import dlinfer_ops
from maca_infer.common.log import get_logger

logger = get_logger(__name__)

# the ops maca-infer adds to an upstream registry when it lacks them
GAP_OPS = dlinfer_ops.GAP_OPS

_registered: dict[str, str] = {}  # op name -> "added" | "kept upstream"


def register_into(dlinfer_module: types.ModuleType) -> dict[str, str]:
    """Add maca-infer's gap ops to ``dlinfer.vendor.vendor_ops_registry``.

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
    for name in GAP_OPS:
        if name in registry:
            _registered[name] = "kept upstream"
            continue
        registry[name] = getattr(dlinfer_ops, name)
        _registered[name] = "added"
    added = sorted(n for n, s in _registered.items() if s == "added")
    logger.info("upstream dlinfer (vendor %s) in use; maca-infer registered: %s",
                vendor_name, ", ".join(added) or "nothing (it has them all)")
    return dict(_registered)


def registered() -> dict[str, str]:
    return dict(_registered)
