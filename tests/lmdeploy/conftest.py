"""Shared fixtures of the LMDeploy adapter tests.

The interface tests call LMDeploy's own kernel wrappers
(``lmdeploy.pytorch.kernels.dlinfer``), which ``import dlinfer.ops``: the
adapter's import hooks must be installed before the first such import.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

if importlib.util.find_spec("lmdeploy") is None:  # pragma: no cover - CI installs it
    pytest.skip("lmdeploy is not installed", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def dlinfer_ours():
    """``dlinfer`` served by maca-infer in this process (no upstream dlinfer here)."""
    os.environ.setdefault("MACA_INFER_DLINFER", "auto")
    from maca_infer.adapters.lmdeploy import install_hooks

    install_hooks()
    import dlinfer
    import dlinfer.ops

    assert getattr(dlinfer, "provided_by", None) == "maca-infer", (
        f"dlinfer resolved to {getattr(dlinfer, '__file__', dlinfer)}: an upstream dlinfer is installed "
        "in this environment; these tests exercise maca-infer's own"
    )
    return dlinfer.ops
