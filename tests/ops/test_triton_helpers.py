"""Shared Triton device helpers (``_triton_helpers``), ``lazy_jit`` helper resolution and the split-KV merge."""

from __future__ import annotations

import os

import pytest
import torch

from maca_infer.common.ops import _split_kv
from maca_infer.common.ops._jit import lazy_jit, tl

needs_interpreter = pytest.mark.skipif(
    tl is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and TRITON_INTERPRET=1 (kernels run on CPU tensors)")


# A helper calling a helper, and a kernel calling both by their global names.
@lazy_jit
def _add_one(x):
    return x + 1.0


@lazy_jit
def _twice_plus_one(x, SCALE: tl.constexpr):
    return _add_one(x * SCALE)


def _kernel_fn(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, _twice_plus_one(x, 2.0), mask=offs < n)


_kernel = lazy_jit(_kernel_fn)


@needs_interpreter
def test_kernel_calls_nested_helpers_under_the_interpreter():
    x = torch.randn(13)
    out = torch.full_like(x, float("nan"))
    _kernel[(1,)](x, out, 13, BLOCK=16)
    torch.testing.assert_close(out, x * 2 + 1)


@pytest.mark.skipif(tl is None, reason="triton is not importable")
def test_jitted_resolves_helpers_for_the_requested_mode():
    from triton.runtime.jit import JITFunction

    environment = os.environ.get("TRITON_INTERPRET")
    compiled = _kernel.jitted(interpret=False)
    assert type(compiled) is JITFunction
    helper = compiled.fn.__globals__["_twice_plus_one"]
    assert type(helper) is JITFunction  # not the lazy wrapper, not an interpreted function
    assert type(helper.fn.__globals__["_add_one"]) is JITFunction
    assert isinstance(globals()["_twice_plus_one"], lazy_jit)  # the module itself is left alone
    assert _kernel.jitted(interpret=False) is compiled  # made once per mode
    assert os.environ.get("TRITON_INTERPRET") == environment  # set only while triton.jit ran


_COMPILE_SCRIPT = r"""
import importlib.util, json
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
spec = importlib.util.spec_from_file_location("helper_tests", PATH)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
kernel = module._kernel.jitted(interpret=False)
signature = {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
compiled = compile(ASTSource(kernel, signature, {"BLOCK": 16}), target=GPUTarget("cuda", 80, 32))
print(json.dumps({"ptx": bool(compiled.asm.get("ptx"))}))
"""


def test_kernel_with_helpers_compiles_for_a_gpu_target(compile_script):
    assert compile_script(_COMPILE_SCRIPT.replace("PATH", repr(__file__))) == {"ptx": True}


@needs_interpreter
@pytest.mark.parametrize("splits", [1, 3, 5])
def test_merge_kv_splits_matches_float64_and_skips_empty_splits(splits):
    torch.manual_seed(splits)
    batch, tokens, heads, dim = 2, 2, 3, 24
    partial_out = torch.randn(batch, tokens, heads, splits, dim)
    partial_lse = torch.randn(batch, tokens, heads, splits) * 4
    if splits > 1:  # some splits saw no key: lse -inf, output rows never written
        partial_lse[0, 1, :, 1] = float("-inf")
        partial_out[0, 1, :, 1] = float("nan")
    partial_lse[1, 0, 2] = float("-inf")  # a row that saw no key at all
    partial_out[1, 0, 2] = float("nan")
    out = torch.full((batch, tokens, heads, dim), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((batch, tokens, heads), float("nan"))
    _split_kv.merge_kv_splits(partial_out, partial_lse, out, lse)

    lse64 = partial_lse.double()
    expected_lse = torch.logsumexp(lse64, dim=-1)
    weights = torch.exp(lse64 - expected_lse[..., None]).nan_to_num(0.0)
    expected = (weights[..., None] * partial_out.double().nan_to_num(0.0)).sum(-2)
    expected[1, 0, 2] = 0.0
    assert torch.isneginf(lse[1, 0, 2]) and torch.isneginf(expected_lse[1, 0, 2])
    finite = torch.isfinite(expected_lse)
    torch.testing.assert_close(lse[finite].double(), expected_lse[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


def test_one_split_rule_for_attention_and_mla():
    cpu = torch.device("cpu")
    assert _split_kv.auto_num_kv_splits(8, 100, cpu) == 1  # short contexts never split
    assert _split_kv.auto_num_kv_splits(8, 3 * _split_kv.MIN_KEYS_PER_SPLIT, cpu) == 3
    assert _split_kv.auto_num_kv_splits(1, 1 << 20, cpu) == 4  # interpreter cap
