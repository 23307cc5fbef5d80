"""Seeded-sampling primitives are bit-exact twins of the frameworks' Triton kernels (run under the interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

from maca_infer.common.ops.sampling import murmur_hash32, philox_uniform, seeded_multinomial

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="Triton kernels run here only under TRITON_INTERPRET=1")

SEEDS = torch.tensor([0, 1, 42, -7, 2**62 + 12345, 0xFFFFFFFF], dtype=torch.int64)
OFFSETS = torch.tensor([0, 3, 100, 7, 2**31 + 5, 2**20], dtype=torch.int64)


@needs_interpreter
def test_murmur_hash32_equals_sglang_kernel():
    murmur = pytest.importorskip("sglang.kernels.ops.sampling.murmur_hash")
    n, m = SEEDS.numel(), 300
    cols = torch.arange(m)
    expected = torch.empty((n, m), dtype=torch.uint32)
    murmur.murmur_hash32_kernel[(n, triton.cdiv(m, 128))](SEEDS.to(torch.uint64), OFFSETS, cols, expected, n, m,
                                                          BLOCK_SIZE=128)
    got = murmur_hash32(SEEDS.to(torch.uint64), OFFSETS, cols)
    assert torch.equal(got, expected.to(torch.int64))
    assert int(got.min()) >= 0 and int(got.max()) <= 0xFFFFFFFF


@needs_interpreter
def test_philox_uniform_equals_tl_rand():
    @triton.jit
    def rand_kernel(seed_ptr, offset_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, tl.rand(tl.load(seed_ptr + i), tl.load(offset_ptr + i).to(tl.int32)))

    n = 8
    seeds = torch.cat([SEEDS, torch.tensor([99, 2**40 + 3])])
    offsets = torch.cat([OFFSETS, torch.tensor([1, 9])])
    expected = torch.empty(n)
    rand_kernel[(1,)](seeds, offsets, expected, n)
    assert torch.equal(philox_uniform(seeds, offsets), expected)


def test_seeded_multinomial_follows_seed_and_offset():
    torch.manual_seed(0)
    scores, idx = torch.softmax(torch.randn(4, 50), -1).sort(-1, descending=True)
    seeds = torch.tensor([3, 3, 4, 3])
    offsets = torch.tensor([10, 10, 10, 11])
    got = seeded_multinomial(scores, seeds, offsets, idx)
    assert got.dtype == torch.int64 and got.shape == (4,)
    u = philox_uniform(seeds, offsets)
    for row in range(4):
        cum = scores[row].cumsum(0)
        col = int((cum < u[row]).sum())  # first column whose cumulative sum reaches u
        assert got[row] == idx[row, min(col, 49)]
    # rows 0 and 1 have the same seed, offset and scores: the same token, whatever else is in the batch
    same = seeded_multinomial(scores[:2].flip(0), seeds[:2], offsets[:2], idx[:2].flip(0))
    assert got[0] == same[1] and got[1] == same[0]
