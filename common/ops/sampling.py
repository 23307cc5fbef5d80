"""Seeded sampling primitives: the random numbers frameworks derive from a request's seed.

A seeded request must draw the same numbers on the maca device as on CUDA,
so these are bit-exact torch versions of the frameworks' own device kernels
(integer math in int64, no torch RNG state involved):

- :func:`murmur_hash32` -- SGLang's ``murmur_hash32`` (``sglang.kernels.ops.
  sampling.murmur_hash``), the hash behind ``multinomial_with_seed`` (its
  seeded Gumbel-max sampler under ``--enable-deterministic-inference``).
- :func:`philox_uniform` / :func:`seeded_multinomial` -- Triton's
  ``tl.rand(seed, offset)`` (Philox-4x32-10) and LMDeploy's
  ``_multinomial_sampling_kernel``, which draws one uniform per sequence from
  (``random_seed``, tokens so far) and walks the sorted probabilities.

Both are cheap elementwise integer math; on a device they run as torch ops
too (no Triton kernel: the frameworks' own kernels already serve CUDA-like
devices, these exist for the paths that lack one).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2**32 for int64 ``a`` in [0, 2**32), without int64 overflow."""
    lo = (a & 0xFFFF) * c
    hi = ((a >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _murmur3_mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k = _mul32(k, 0xCC9E2D51)
    k = _rotl32(k, 15)
    k = _mul32(k, 0x1B873593)
    h = h ^ k
    h = _rotl32(h, 13)
    return (h * 5 + 0xE6546B64) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _as_int64_bits(x: torch.Tensor) -> torch.Tensor:
    """The same 64 bits as int64 (uint64 is viewed, narrower ints widened)."""
    if x.dtype == torch.uint64:
        return x.view(torch.int64)
    return x.to(torch.int64)


def murmur_hash32(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 (32-bit) of (64-bit seed, 32-bit position, 32-bit column) per row and column.

    seed, positions: ``[n]`` integer tensors (seed's 64 bits are hashed as two
    32-bit blocks, low first; position keeps its low 32 bits); col_indices:
    ``[m]``. Returns ``[n, m]`` int64 holding the uint32 hash, bit-identical
    to SGLang's Triton ``murmur_hash32_kernel``.
    """
    if seed.shape != positions.shape or seed.dim() != 1 or col_indices.dim() != 1:
        raise ValueError(f"seed and positions must be the same 1-D shape and col_indices 1-D; got "
                         f"{tuple(seed.shape)}, {tuple(positions.shape)}, {tuple(col_indices.shape)}")
    s = _as_int64_bits(seed)
    pos = (_as_int64_bits(positions) & _MASK32).view(-1, 1)
    col = (_as_int64_bits(col_indices) & _MASK32).view(1, -1)
    h = torch.zeros_like(s)
    h = _murmur3_mix(h, s & _MASK32)
    h = _murmur3_mix(h, (s >> 32) & _MASK32).view(-1, 1)
    h = _murmur3_mix(h, pos)
    h = _murmur3_mix(h, col)
    return _fmix32(h ^ 16)


_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product of uint32 ``a`` and constant ``b``."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll = a_lo * b_lo
    lh = a_lo * b_hi
    hl = a_hi * b_lo
    hh = a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    low = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    high = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return high & _MASK32, low & _MASK32


def philox_uniform(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.rand(seed, offset)``: one float32 uniform in [0, 1) per element.

    Philox-4x32 with 10 rounds on counter (offset, 0, 0, 0) and key (low,
    high 32 bits of seed); the first output word, read as int32, mapped as
    ``uint_to_uniform_float`` does. ``seed``, ``offset``: integer tensors of
    one shape (offset keeps its low 32 bits, as the kernels' int32 cast).
    """
    s = _as_int64_bits(seed)
    c0 = _as_int64_bits(offset) & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = s & _MASK32
    k1 = (s >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * 4.6566127342e-10


def seeded_multinomial(scores: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
                       indices: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from sorted probabilities, drawn from (seed, offset): LMDeploy's seeded sampler.

    scores: ``[batch, n]`` probabilities sorted in descending order (rows sum
    to ~1); seeds, offsets: ``[batch]`` integers (LMDeploy passes the
    request's ``random_seed`` and the sequence's token count, so each step of
    a request draws its own number); indices: ``[batch, n]`` token ids of the
    sorted columns (default: the column numbers). Returns ``[batch]`` int64
    token ids: the first column whose cumulative probability (float32) reaches
    the draw ``u = tl.rand(seed, offset)`` (bit-exact), or column 0 when none
    does, as LMDeploy's Triton ``_multinomial_sampling_kernel`` (which sums in
    blocks of 128: the last bits of a cumulative sum may differ).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, n]; got {tuple(scores.shape)}")
    batch, num_tokens = scores.shape
    if indices is None:
        indices = torch.arange(num_tokens, device=scores.device).expand_as(scores)
    if indices.shape != scores.shape:
        raise ValueError(f"indices {tuple(indices.shape)} must match scores {tuple(scores.shape)}")
    if num_tokens == 1:
        return indices[:, 0].to(torch.int64)
    u = philox_uniform(seeds.view(-1), offsets.view(-1)).view(-1, 1)
    probs = scores.to(torch.float32)
    cum = torch.cumsum(probs, dim=1)
    hit = (u > cum - probs) & (u <= cum)
    found = hit.any(dim=1)
    pos = torch.where(found, hit.to(torch.int32).argmax(dim=1), torch.zeros_like(found, dtype=torch.int64))
    return torch.gather(indices, 1, pos.view(-1, 1)).view(-1).to(torch.int64)
