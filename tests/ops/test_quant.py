"""Int4 (W4A16) packing, AWQ/GPTQ converters, dequant and w4a16_linear.

Checkpoint tensors are packed here with plain Python integers following the
published formats (AutoAWQ GEMM, GPTQ v1), independently of quant.py, and
must dequantize to the float weights they were built from. The linear op
(reference and Triton kernel) is compared with float64 math.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maca_infer.common.ops import _dispatch
from maca_infer.common.ops.quant import (
    awq_to_w4a16,
    dequant_w4a16,
    gptq_to_w4a16,
    int32_to_uint8_packing,
    pack_int4,
    unpack_int4,
    w4a16_linear,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# AutoAWQ's packer writes logical column AWQ_PACK_ORDER[i] of each group of 8 into nibble i
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


# --------------------------------------------------------------------------
# independent packers (plain Python ints, numpy)
# --------------------------------------------------------------------------

def to_int32(words: np.ndarray) -> torch.Tensor:
    """Unsigned 32-bit words (Python ints) -> torch int32 with the same bits."""
    return torch.from_numpy(np.asarray(words, dtype=np.uint64).astype(np.uint32).view(np.int32).copy())


def awq_pack(values: np.ndarray) -> torch.Tensor:
    """``[R, N]`` ints in 0..15 -> AutoAWQ ``[R, N // 8]`` int32."""
    rows, cols = values.shape
    words = np.zeros((rows, cols // 8), dtype=np.uint64)
    for r in range(rows):
        for c in range(cols // 8):
            word = 0
            for nibble, column in enumerate(AWQ_PACK_ORDER):
                word |= int(values[r, 8 * c + column]) << (4 * nibble)
            words[r, c] = word
    return to_int32(words)


def gptq_pack_rows(values: np.ndarray) -> torch.Tensor:
    """``[K, N]`` ints in 0..15 -> GPTQ qweight ``[K // 8, N]`` int32 (8 consecutive rows per word)."""
    k, n = values.shape
    words = np.zeros((k // 8, n), dtype=np.uint64)
    for r in range(k // 8):
        for col in range(n):
            words[r, col] = sum(int(values[8 * r + i, col]) << (4 * i) for i in range(8))
    return to_int32(words)


def gptq_pack_zeros(zeros: np.ndarray) -> torch.Tensor:
    """``[G, N]`` zero points -> GPTQ v1 qzeros ``[G, N // 8]`` int32 storing ``zero - 1`` (mod 16)."""
    groups, n = zeros.shape
    words = np.zeros((groups, n // 8), dtype=np.uint64)
    for g in range(groups):
        for c in range(n // 8):
            words[g, c] = sum(((int(zeros[g, 8 * c + i]) - 1) & 0xF) << (4 * i) for i in range(8))
    return to_int32(words)


def dequant_float64(q: np.ndarray, zeros: np.ndarray, scales: torch.Tensor, group: int) -> torch.Tensor:
    """``W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]`` in float64, K-major like the checkpoints."""
    k = q.shape[0]
    group_of_row = np.arange(k) // group
    s = scales.double().numpy()
    return torch.from_numpy((q.astype(np.float64) - zeros[group_of_row].astype(np.float64)) * s[group_of_row])


# --------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2,), (3, 10), (2, 3, 64)])
def test_pack_unpack_round_trip(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    values = torch.randint(0, 16, shape, dtype=torch.uint8, generator=generator)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    flat_values = values.reshape(-1, shape[-1]).tolist()
    expected = [[row[2 * j] + 16 * row[2 * j + 1] for j in range(len(row) // 2)] for row in flat_values]
    assert packed.reshape(-1, shape[-1] // 2).tolist() == expected  # low nibble first
    assert torch.equal(unpack_int4(packed), values)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="K even"):
        pack_int4(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([3, 16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="dtype float32"):
        pack_int4(torch.zeros(4))
    with pytest.raises(ValueError, match="dtype int32"):
        unpack_int4(torch.zeros(4, dtype=torch.int32))


def test_int32_packing_matches_uint8_layout():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 16, size=(5, 32))  # [N, K], nibble i of word j = channel 8j + i
    words = np.zeros((5, 4), dtype=np.uint64)
    for n in range(5):
        for j in range(4):
            words[n, j] = sum(int(values[n, 8 * j + i]) << (4 * i) for i in range(8))
    as_int32 = to_int32(words)
    expected = pack_int4(torch.from_numpy(values).to(torch.uint8))
    assert torch.equal(int32_to_uint8_packing(as_int32), expected)
    # a non-contiguous view cannot be reinterpreted and takes the shift path
    strided = torch.cat([as_int32, torch.zeros_like(as_int32)], dim=1)[:, :4]
    assert not strided.is_contiguous()
    assert torch.equal(int32_to_uint8_packing(strided), expected)


# --------------------------------------------------------------------------
# AWQ / GPTQ checkpoints
# --------------------------------------------------------------------------

@pytest.mark.parametrize("scale_dtype", (torch.float16, torch.float32))
@pytest.mark.parametrize("in_features,out_features,group_size", [(64, 24, 32), (96, 16, -1), (256, 8, 128)])
def test_awq_checkpoint_dequantizes_to_its_weights(in_features, out_features, group_size, scale_dtype):
    rng = np.random.default_rng(in_features + out_features)
    group = in_features if group_size == -1 else group_size
    q = rng.integers(0, 16, size=(in_features, out_features))
    zeros = rng.integers(0, 16, size=(in_features // group, out_features))
    scales = (torch.rand(in_features // group, out_features, generator=torch.Generator().manual_seed(1)) * 0.1
              + 0.01).to(scale_dtype)
    qweight, scales_nk, zeros_nk = awq_to_w4a16(awq_pack(q), awq_pack(zeros), scales, group_size)
    assert qweight.shape == (out_features, in_features // 2) and qweight.dtype == torch.uint8
    assert scales_nk.shape == (out_features, in_features // group) and scales_nk.dtype == scale_dtype
    assert torch.equal(zeros_nk, torch.from_numpy(zeros.T.copy()).to(torch.uint8))
    weight = dequant_w4a16(qweight, scales_nk, zeros_nk, group_size)
    expected = dequant_float64(q, zeros, scales, group).t()
    assert weight.dtype == scale_dtype
    tol = 1e-3 if scale_dtype == torch.float16 else 1e-6
    torch.testing.assert_close(weight.double(), expected, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("sym", (True, False))
@pytest.mark.parametrize("in_features,out_features,group_size", [(64, 16, 32), (128, 24, -1)])
def test_gptq_checkpoint_dequantizes_to_its_weights(in_features, out_features, group_size, sym):
    rng = np.random.default_rng(in_features * 3 + out_features)
    group = in_features if group_size == -1 else group_size
    q = rng.integers(0, 16, size=(in_features, out_features))
    if sym:
        zeros = np.full((in_features // group, out_features), 8)
    else:  # include a zero point of 0: v1 stores it as 15 (-1 wrapped)
        zeros = rng.integers(0, 16, size=(in_features // group, out_features))
        zeros[0, 0] = 0
    scales = (torch.rand(in_features // group, out_features, generator=torch.Generator().manual_seed(2)) + 0.1) * 0.05
    g_idx = torch.arange(in_features, dtype=torch.int32) // group
    qweight, scales_nk, zeros_nk = gptq_to_w4a16(gptq_pack_rows(q), gptq_pack_zeros(zeros), scales, group_size,
                                                 g_idx=g_idx, sym=sym)
    assert torch.equal(zeros_nk, torch.from_numpy(zeros.T.copy()).to(torch.uint8))
    weight = dequant_w4a16(qweight, scales_nk, zeros_nk, group_size)
    torch.testing.assert_close(weight.double(), dequant_float64(q, zeros, scales, group).t(), rtol=1e-6, atol=1e-9)
    if sym:  # qzeros may be omitted for symmetric checkpoints
        _, _, implied = gptq_to_w4a16(gptq_pack_rows(q), None, scales, group_size, sym=True)
        assert torch.equal(implied, zeros_nk)


def test_gptq_rejects_act_order_and_mislabelled_sym():
    rng = np.random.default_rng(5)
    q = rng.integers(0, 16, size=(64, 8))
    scales = torch.ones(2, 8)
    qweight = gptq_pack_rows(q)
    shuffled = (torch.arange(64) // 32)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="desc_act"):
        gptq_to_w4a16(qweight, None, scales, 32, g_idx=shuffled)
    asym = gptq_pack_zeros(rng.integers(0, 8, size=(2, 8)))
    with pytest.raises(ValueError, match="sym=False"):
        gptq_to_w4a16(qweight, asym, scales, 32, sym=True)
    with pytest.raises(ValueError, match="qzeros=None"):
        gptq_to_w4a16(qweight, None, scales, 32, sym=False)
    with pytest.raises(ValueError, match="group_size=48"):
        gptq_to_w4a16(qweight, None, scales, 48)


def test_awq_rejects_bad_shapes():
    qweight = torch.zeros(64, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="scales has shape"):
        awq_to_w4a16(qweight, torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 8), 32)
    with pytest.raises(ValueError, match="qzeros has shape"):
        awq_to_w4a16(qweight, torch.zeros(1, 2, dtype=torch.int32), torch.ones(2, 16), 32)
    with pytest.raises(ValueError, match="qweight has dtype uint8"):
        awq_to_w4a16(qweight.to(torch.uint8), torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 16), 32)


# --------------------------------------------------------------------------
# w4a16_linear
# --------------------------------------------------------------------------

def random_w4a16(out_features: int, in_features: int, group: int, with_zeros: bool, scale_dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(out_features, in_features // group, generator=generator) * 0.05 + 0.005).to(scale_dtype)
    zeros = (torch.randint(0, 16, (out_features, in_features // group), dtype=torch.uint8, generator=generator)
             if with_zeros else None)
    return q, scales, zeros


def linear_float64(x, q, scales, zeros, group, bias):
    """``y = x @ W.T + b`` with W rebuilt element-wise from q, z, s in float64."""
    out_features, in_features = q.shape
    z = zeros.double() if zeros is not None else torch.full(scales.shape, 8.0, dtype=torch.float64)
    col_group = torch.arange(in_features) // group
    weight = (q.double() - z[:, col_group]) * scales.double()[:, col_group]
    y = x.double().reshape(-1, in_features) @ weight.t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], out_features)


LINEAR_CASES = [
    # (lead shape of x, N, K, group_size, zeros, bias, split_k)
    ((1,), 37, 96, 32, True, False, None),        # decode row, ragged N
    ((3, 5), 16, 160, 32, False, True, None),     # 3-d x, bias, 5 groups
    ((20,), 24, 128, 64, True, True, 3),          # split-K partials (uneven split of 2 tiles)
    ((2,), 10, 200, -1, True, False, 2),          # per-channel group over a ragged K
    ((4,), 8, 48, 16, True, False, None),         # smallest group size
    ((2,), 12, 80, 80, False, True, None),        # group_size == K spelled out (per channel)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,k,group_size,with_zeros,with_bias,split_k", LINEAR_CASES)
def test_w4a16_linear(ops_impl, dtype, lead, n, k, group_size, with_zeros, with_bias, split_k, close, nan_tensor):
    group = k if group_size == -1 else group_size
    q, scales, zeros = random_w4a16(n, k, group, with_zeros, dtype, seed=n + k)
    generator = torch.Generator().manual_seed(k)
    x = torch.randn(*lead, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype) if with_bias else None
    out = nan_tensor((*lead, n), dtype)
    y = w4a16_linear(x, pack_int4(q), scales, zeros, group_size, bias, split_k=split_k, out=out)
    assert y is out
    assert _dispatch.last_impl("w4a16_linear") == ops_impl
    close(y, linear_float64(x, q, scales, zeros, group, bias), dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("case", [LINEAR_CASES[1], LINEAR_CASES[2]], ids=("groups-bias", "split-k"))
def test_w4a16_linear_device_branch(device_branch, dtype, case, close, nan_tensor):
    """The card's branch (64-wide tiles, fp16/bf16 tl.dot inputs) in the interpreter; see conftest.device_branch."""
    test_w4a16_linear(device_branch, dtype, *case, close, nan_tensor)


def test_w4a16_linear_int32_weights_and_fp16_scales_for_bf16(ops_impl, close):
    """8-per-int32 packing is read directly; scales may have another float dtype than x."""
    q, scales, zeros = random_w4a16(12, 64, 32, True, torch.float16, seed=3)
    words = pack_int4(q).view(torch.int32)  # little-endian: 8 nibbles per word, channel 8j + i at nibble i
    x = torch.randn(4, 64).to(torch.bfloat16)
    y = w4a16_linear(x, words, scales, zeros, 32)
    assert y.dtype == torch.bfloat16
    close(y, linear_float64(x, q, scales, zeros, 32, None), torch.bfloat16)


def test_w4a16_linear_auto_runs_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("MACA_INFER_OPS_IMPL", raising=False)
    q, scales, zeros = random_w4a16(8, 32, 32, False, torch.float32, seed=4)
    w4a16_linear(torch.randn(2, 32), pack_int4(q), scales, zeros, 32)
    assert _dispatch.last_impl("w4a16_linear") == "reference"


def test_w4a16_linear_rejects_bad_input():
    q, scales, zeros = random_w4a16(8, 64, 32, True, torch.float16, seed=6)
    packed = pack_int4(q)
    x = torch.randn(3, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="last dim must be K=64"):
        w4a16_linear(torch.randn(3, 60, dtype=torch.float16), packed, scales, zeros, 32)
    with pytest.raises(ValueError, match="group_size=48"):
        w4a16_linear(x, packed, scales, zeros, 48)
    with pytest.raises(ValueError, match="group_size=8"):
        w4a16_linear(x, packed, scales, zeros, 8)
    with pytest.raises(ValueError, match="scales has shape"):
        w4a16_linear(x, packed, scales, zeros, 64)
    with pytest.raises(ValueError, match="qweight has dtype float16"):
        w4a16_linear(x, packed.half(), scales, zeros, 32)
    with pytest.raises(ValueError, match="zeros has dtype int32"):
        w4a16_linear(x, packed, scales, zeros.int(), 32)
    with pytest.raises(ValueError, match="x has dtype int32"):
        w4a16_linear(x.int(), packed, scales, zeros, 32)
    with pytest.raises(ValueError, match="bias has shape"):
        w4a16_linear(x, packed, scales, zeros, 32, torch.zeros(7, dtype=torch.float16))
    with pytest.raises(ValueError, match="one device"):
        w4a16_linear(x, packed, scales.to("meta"), zeros, 32)
    with pytest.raises(ValueError, match="contiguous"):
        w4a16_linear(x, torch.cat([packed, packed], 1)[:, ::2], scales, zeros, 32)
    with pytest.raises(ValueError, match="split_k=0"):
        w4a16_linear(x, packed, scales, zeros, 32, split_k=0)


# Runs in a fresh interpreter: once TRITON_INTERPRET=1 has run a kernel, triton.language is
# patched for numpy in this process and cannot generate GPU code any more.
_COMPILE_SCRIPT = r"""
import inspect, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from maca_infer.common.ops import quant

kernel = quant._w4a16_gemm_kernel.jitted(interpret=False)  # with its shared int4 helpers
names = list(inspect.signature(kernel.fn).parameters)
result = {}
for split_k in (1, 4):
    constexprs = dict(HAS_ZEROS=True, HAS_BIAS=True, SPLIT_K=split_k, DOT_FP32=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    signature = {name: "i32" for name in names}
    signature.update(x_ptr="*fp16", qweight_ptr="*u8", scales_ptr="*fp16", zeros_ptr="*u8", bias_ptr="*fp16",
                     out_ptr="*fp16" if split_k == 1 else "*fp32")
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    result[f"split_k={split_k}"] = "mma.sync.aligned" in ptx and ".f32.f16.f16.f32" in ptx
print(json.dumps(result))
"""


@pytest.mark.slow
def test_w4a16_gemm_kernel_compiles_to_tensor_core_mma(compile_script):
    """Ahead-of-time compile for sm_90 (no GPU needed): the dequantized int4 tile must feed tensor cores."""
    assert compile_script(_COMPILE_SCRIPT) == {"split_k=1": True, "split_k=4": True}
