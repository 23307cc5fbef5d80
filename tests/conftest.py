"""Shared fixtures (keep this file small).

- ``run_python(code, env=None, timeout=120)``: run ``code`` in a fresh
  interpreter of this venv from the repository root; maca-infer's own
  variables are cleared first, so a test states exactly what it sets.
- ``fake_maca_host``: a temporary MACA_PATH tree with a fake ``mx-smi``
  (prints recorded output from tests/device/data), ``torch.version.maca``
  set and the stock-CUDA seam of device detection answering "one MetaX
  device". No MetaX binary or driver is involved.
- ``maca_tree_factory``: builds such a tree where a test wants its own.
- ``no_kernel_launch``: any Triton launch through ``lazy_jit`` fails the test
  (an empty batch has nothing to launch); ``ops_tier``: both op tiers
  (reference, interpreted Triton) with no launch allowed, for the adapters'
  zero-token tests.
- ``vendor_fakes``: CPU fakes of MetaX's flash_attn / flash_mla / mcoplib
  (tests/ops/vendor_fakes) importable and ``MACA_INFER_OPS_IMPL=vendor``
  forced, for the vendor tier's contract tests; removed again afterwards.
- ``smollm2_dir`` / ``smollm2_ref``: the real model's HF folder and its
  stock float32 Hugging Face reference (tests/hf_real_model.py, run once per
  session in a clean process), for the real-model tests of every framework.
"""

from __future__ import annotations

import os

# Triton fixes interpreter-vs-compiler mode for its own helpers when it is
# first imported: the kernel tests need the interpreter on this CPU host, so
# set it before any test module (or framework) imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE_DATA = REPO_ROOT / "tests" / "device" / "data"
MACA_TREE_DIRS = ("bin", "lib", "mxgpu_llvm/bin", "mxgpu_llvm/lib", "ompi/lib", "tools/cu-bridge/bin")


def _clean_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACA_INFER_")}
    env.update(extra or {})
    return env


@pytest.fixture
def run_python():
    def run(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=REPO_ROOT,
            env=_clean_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@dataclass
class FakeMacaHost:
    maca_path: Path
    mx_smi: Path
    device_name: str
    version_maca: str


def make_maca_tree(root: Path, smi_fixture: str = "mx-smi_2.2.9_c500x8.txt",
                   topo_fixture: str = "mx-smi_topo-m_2.2.9_node.txt") -> Path:
    """A MACA_PATH tree whose bin/mx-smi prints recorded output; returns mx-smi's path."""
    for rel in MACA_TREE_DIRS:
        (root / rel).mkdir(parents=True, exist_ok=True)
    mx_smi = root / "bin" / "mx-smi"
    mx_smi.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "topo" ]; then cat "{DEVICE_DATA / topo_fixture}"; else cat "{DEVICE_DATA / smi_fixture}"; fi\n'
    )
    mx_smi.chmod(mx_smi.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return mx_smi


@pytest.fixture
def fake_maca_host(tmp_path, monkeypatch):
    import torch

    from maca_infer.common.device import detect

    root = tmp_path / "maca"
    mx_smi = make_maca_tree(root)
    host = FakeMacaHost(root, mx_smi, "MetaX C500", "3.3.0.15")
    monkeypatch.setenv("MACA_PATH", str(root))
    monkeypatch.setattr(torch.version, "maca", host.version_maca, raising=False)
    # the one seam where detection asks the hardware
    monkeypatch.setattr(detect, "_stock_cuda_query", lambda: (True, 1))
    monkeypatch.setattr(detect, "_device_name", lambda evidence: host.device_name)
    detect.clear_cache()
    yield host
    detect.clear_cache()


@pytest.fixture
def maca_tree_factory():
    """``make_maca_tree(root, smi_fixture=..., topo_fixture=...)`` for tests that build their own tree."""
    return make_maca_tree


@pytest.fixture
def no_kernel_launch(monkeypatch):
    """Any Triton launch through lazy_jit fails the test: an empty batch has nothing to launch."""
    from maca_infer.common.ops import _jit

    def launch(self, grid):
        raise AssertionError(f"{self.fn.__name__} was launched with grid {grid} for an empty batch")

    monkeypatch.setattr(_jit.lazy_jit, "__getitem__", launch)


VENDOR_FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops", "vendor_fakes")
_VENDOR_PACKAGES = ("flash_attn", "flash_mla", "mcoplib")


def _drop_vendor_modules() -> None:
    import sys

    for name in [n for n in sys.modules if n.split(".")[0] in _VENDOR_PACKAGES]:
        for lib in getattr(sys.modules[name], "libraries", ()):
            lib._destroy()  # unregister the fake torch.ops._C / _C_cache_ops / _moe_C ops
        del sys.modules[name]


@pytest.fixture
def vendor_fakes(monkeypatch):
    """The fake vendor libraries on sys.path, MACA_INFER_OPS_IMPL=vendor, MetaX's small pages on."""
    from maca_infer.common.ops import vendor

    _drop_vendor_modules()
    monkeypatch.syspath_prepend(VENDOR_FAKES)
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "vendor")
    monkeypatch.setenv("MACA_SMALL_PAGESIZE_ENABLE", "1")
    vendor.forget_libraries()
    yield VENDOR_FAKES
    _drop_vendor_modules()
    vendor.forget_libraries()


@pytest.fixture(params=["reference", "triton"])
def ops_tier(request, monkeypatch, no_kernel_launch):
    """Both op tiers (Triton interpreted); any kernel launch fails the test."""
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", request.param)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from maca_infer.modelzoo import get

    return str(get("smollm2"))


@pytest.fixture(scope="session")
def smollm2_ref(smollm2_dir) -> dict:
    """tests/hf_real_model.py's answer for SmolLM2: stock torch on the CPU, no maca-infer device in that process."""
    import json

    env = _clean_env({"OMP_NUM_THREADS": "1", "MACA_INFER_MODEL_CACHE": os.environ.get("MACA_INFER_MODEL_CACHE", "")})
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "hf_real_model.py")],
                          input=json.dumps({"model": smollm2_dir, "preset": "smollm2"}),
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)
