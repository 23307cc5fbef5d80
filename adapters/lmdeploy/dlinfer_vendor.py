"""``dlinfer.vendor`` served by maca-infer: vendor "maca", ops from ``dlinfer_ops``.

``vendor_ops_registry`` maps op name -> implementation, the same shape as
upstream dlinfer's registry, so code that looks ops up by name works.
"""

from __future__ import annotations

from maca_infer.adapters.lmdeploy import dlinfer_ops

vendor_name = "maca"
dispatch_key = "CUDA"  # mcPyTorch tensors live on the "cuda" dispatch key
vendor_is_initialized = True
vendor_ops_registry: dict = {name: getattr(dlinfer_ops, name) for name in dlinfer_ops.__all__}


def vendor_torch_init() -> None:
    """Nothing to initialise: the ops are registered at import."""
