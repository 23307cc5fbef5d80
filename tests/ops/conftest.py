"""Shared fixtures of the op tests (tests/ops/test_*.py).

Every op is tested twice: as the torch reference and as the Triton kernel
running in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``), and
both are compared with a float64 computation written in the test itself.

``TRITON_INTERPRET`` must be in the environment before any ``triton.jit``
decoration runs (Triton picks interpreter or compiler at decoration time), so
it is set here, at import, before any test module imports an op. Ops that
use ``rms_norm.lazy_jit`` jit at first launch and do not depend on import
order at all.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None

# Largest allowed error relative to the largest magnitude of the float64
# answer. fp16/bf16 outputs are rounded once to 11/8 significant bits; the
# interpreter also truncates float32 -> bfloat16 instead of rounding to
# nearest, which can double bf16's rounding error (at most 2**-7). Tight
# enough that a 2% scale error (an attention scale, a norm weight) fails in
# every dtype (issue #18); the largest errors seen across tests/ops are about
# 4e-7 (fp32), 5e-4 (fp16) and 1.0e-2 (bf16: fused MoE W4A16, whose
# intermediate activation is rounded to bf16 too).
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 1.2e-2}

IMPLS = ("reference", "triton")


@pytest.fixture(params=IMPLS)
def ops_impl(request, monkeypatch):
    """Runs the test once per implementation; the forced one never falls back."""
    return _use_impl(request.param, monkeypatch)


@pytest.fixture(params=IMPLS + ("triton-device",))
def any_branch(request, monkeypatch):
    """Like ``ops_impl``, plus a third run of the kernel's device branch (see ``device_branch``)."""
    if request.param == "triton-device":
        return _use_device_branch(monkeypatch)
    return _use_impl(request.param, monkeypatch)


def _use_impl(impl, monkeypatch):
    if impl == "triton":
        if not HAVE_TRITON:
            pytest.skip("triton is not importable")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("TRITON_INTERPRET is not 1: Triton kernels cannot run on CPU tensors")
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", impl)
    return impl


@pytest.fixture
def device_branch(monkeypatch):
    return _use_device_branch(monkeypatch)


def _use_device_branch(monkeypatch):
    """Runs the Triton kernels' device branch in the interpreter (``MACA_INFER_TRITON_BRANCH=device``).

    The device branch is what a MACA or CUDA card runs: its tile sizes and
    fp16/bf16 ``tl.dot`` inputs with fp32 accumulation. The interpreter runs
    it exactly for fp16 (numpy multiplies the fp16 tiles in float32). For
    bf16 it does not: it stores bf16 as uint16 and ``tl.dot`` multiplies those
    integers (triton-lang/triton#11584), so this fixture makes the
    interpreter's dot widen bf16 tiles to float32 first (exact: a bf16 value
    is the top half of its float32), which is what the card's MMA computes.
    Every other bf16 step of these kernels is a cast (the interpreter
    truncates float32 -> bf16 where the card rounds to nearest: at most one
    bf16 ulp more, inside the bf16 tolerance); their arithmetic is float32.
    """
    if not HAVE_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the device branch runs here only in Triton's interpreter")
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen_bf16(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32),
                                        tl.float32)

    def exact_bf16_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen_bf16(a), widen_bf16(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", exact_bf16_dot)
    monkeypatch.setenv("MACA_INFER_TRITON_BRANCH", "device")
    monkeypatch.setenv("MACA_INFER_OPS_IMPL", "triton")
    return "triton"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64); NaN anywhere -> inf."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.numel() == 0:
        return 0.0
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().item() or 1.0
    return (actual - expected).abs().max().item() / scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "output",
                 factor: float = 1.0) -> None:
    """Assert ``actual`` matches the float64 ``expected`` within dtype's tolerance (times ``factor``)."""
    err = relative_error(actual, expected)
    tol = TOLERANCE[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({dtype})"


def poison(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """A tensor of NaNs: any element an op forgets to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def close():
    """``close(actual, expected_float64, dtype, what)``; see ``assert_close``."""
    return assert_close


@pytest.fixture
def nan_tensor():
    """``nan_tensor(shape, dtype)``: a poisoned output buffer."""
    return poison


@pytest.fixture
def rel_err():
    return relative_error


# ---------------------------------------------------------------------------
# Compiling kernels for a real GPU target on a CPU-only host
# ---------------------------------------------------------------------------
# The interpreter is lenient: code it runs can still fail Triton's compiler
# (types that change across loop iterations, unsupported constructs) or spill
# registers. Triton's NVIDIA backend compiles all the way to a cubin with its
# bundled ptxas and no GPU present, so kernels are also built for an sm_80
# target (the CUDA stand-in; MetaX's Triton shares the frontend). Nothing is
# launched. It runs in a subprocess: triton.language's own jitted helpers
# (tl.sum, tl.max, ...) are decorated when triton is imported, and this test
# process imported it in interpreter mode.
COMPILE_TARGET_ARCH = 80

_COMPILE_RUNNER = """
import json, os, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton, triton.language  # compiler-mode decoration of triton's own helpers
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

# _dispatch runs a forced Triton path on CPU tensors only under TRITON_INTERPRET=1;
# lazy_jit.jitted(interpret=False) decorates kernels with the variable briefly back at 0
os.environ["TRITON_INTERPRET"] = "1"
os.environ["MACA_INFER_OPS_IMPL"] = "triton"
os.environ["MACA_INFER_TRITON_BRANCH"] = "device"  # build what a card runs: device tiles, fp16/bf16 tl.dot

class CompileOnlyDriver:  # the slice of the active driver that compilation consults
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", ARCH, 32)
    def get_active_torch_device(self): return torch.device("cpu")

driver.set_active(CompileOnlyDriver())
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def resource_usage(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = " ".join(line for line in text.splitlines() if "REG:" in line).split()
    return {k: int(v) for k, _, v in (f.partition(":") for f in fields) if v.isdigit()}

from maca_infer.common.ops import _jit
builds = []

def compile_instead_of_launch(self, grid):
    def launch(*args, **kwargs):
        kernel = self.jitted(interpret=False)  # the compiler's build, shared helpers included
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        builds.append({"kernel": self.fn.__name__,
                       "constexprs": {k: v for k, v in kwargs.items() if k.isupper()},
                       "usage": resource_usage(compiled.asm["cubin"]),
                       # dynamic shared memory (what a launch asks for) and the launch options it was built with
                       "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
                       "num_stages": compiled.metadata.num_stages})
    return launch

_jit.lazy_jit.__getitem__ = compile_instead_of_launch
exec(compile(SNIPPET, "<gpu build snippet>", "exec"))
print("BUILDS=" + json.dumps(builds))
"""


@pytest.fixture
def gpu_builds(tmp_path):
    """``gpu_builds(snippet)``: run op calls with every kernel launch compiled for sm_80 instead.

    ``snippet`` is Python source that imports and calls public ops on CPU
    tensors (outputs are not written). Returns the builds in launch order:
    dicts with ``kernel`` (function name), ``constexprs``, ``usage``
    (``REG`` registers per thread, ``LOCAL`` spilled bytes, ``SHARED`` static
    shared memory), ``shared`` (the dynamic shared memory a launch asks for,
    bytes), ``num_warps`` and ``num_stages``.
    """
    import subprocess
    import sys

    if not HAVE_TRITON:
        pytest.skip("triton is not importable")
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")

    def build(snippet: str) -> list[dict]:
        import json
        import textwrap

        source = _COMPILE_RUNNER.replace("ARCH", str(COMPILE_TARGET_ARCH)).replace(
            "SNIPPET", repr(textwrap.dedent(snippet)))
        env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
        done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env, timeout=300)
        if done.returncode != 0:
            raise AssertionError(f"GPU build failed:\n{done.stderr[-4000:]}")
        line = [x for x in done.stdout.splitlines() if x.startswith("BUILDS=")][-1]
        return json.loads(line[len("BUILDS="):])

    return build


@pytest.fixture
def compile_script():
    """``compile_script(source) -> object``: run an ahead-of-time compile script
    (no GPU needed) in a fresh interpreter without TRITON_INTERPRET and return
    the JSON it prints last."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.compiler")

    def run(source: str):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
