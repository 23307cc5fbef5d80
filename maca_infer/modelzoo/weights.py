"""Seeded random weights that make a usable tiny model.

Each tensor draws from its own generator, seeded from (seed, tensor name), so
a tensor's values do not depend on which other tensors a kind has: "llama"
and "llama-awq" share every float weight, and adding a tensor to one family
never reshuffles the others.

Scales are chosen so that the model behaves like a trained one in the ways
tests rely on:
- linear weights std 1/sqrt(fan_in) keep activations O(1) through layers;
- the output head has rows of unequal norm (log-normal), so the top logit
  usually stands clear of the second (greedy comparisons between two
  implementations are not decided by rounding), and the logits have a spread
  of a few units, neither flat nor saturated;
- rows of special tokens and of vocabulary padding are tiny, so greedy
  decoding never stops at once on an end-of-sequence token nor emits padding.
"""

from __future__ import annotations

import hashlib

import torch

from maca_infer.modelzoo.architectures import TensorSpec

LOGIT_STD = 4.0  # target std of logits for a unit-RMS final hidden state
# Spread of log(row norm) of an untied output head. Measured on llama, 8
# prompts x 16 greedy tokens: at 0 (equal norms) ~9% of steps have a top-1
# margin under 0.1 (logit std 4); at 0.25, 2-5%, and greedy text still
# varies (8-16 distinct tokens of 16); at 0.5+ a few large rows win nearly
# everywhere and greedy decoding falls into 1-3 token loops. A tied head
# (Gemma) loops even at 0.15, so it keeps equal norms.
ROW_NORM_LOG_STD = 0.25
ROUTER_GAIN = 3.0  # router logits std ~3: top-k experts are clearly chosen
BIAS_STD = 0.1
NORM_NOISE_STD = 0.1
QUIET_ROW_STD = 1e-3  # special-token and padding rows of the output head
# Tied embedding (Gemma): the input side is multiplied by sqrt(hidden), so
# rows of std 1/sqrt(hidden) enter the residual stream at unit RMS. The final
# hidden state then still points along the current token's own row, and a
# tied head would repeat that token forever: the final norm's gains get
# random signs, which turns that direction away from the row, and a size
# that restores the logit spread.


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def init_tensor(spec: TensorSpec, seed: int, quiet_rows: range | list[int] = ()) -> torch.Tensor:
    """float32 values of one tensor.

    quiet_rows: rows of an output head (``lm_head``, or a tied embedding)
    that must never win greedy decoding: special tokens and padding.
    """
    gen = _generator(seed, spec.name)
    shape = spec.shape
    if spec.init == "linear":
        return _normal(shape, shape[-1] ** -0.5, gen)
    if spec.init == "router":
        return _normal(shape, ROUTER_GAIN * shape[-1] ** -0.5, gen)
    if spec.init == "bias":
        return _normal(shape, BIAS_STD, gen)
    if spec.init == "norm":
        return 1.0 + _normal(shape, NORM_NOISE_STD, gen)
    if spec.init == "norm_offset":
        return _normal(shape, NORM_NOISE_STD, gen)
    if spec.init == "final_norm_offset":
        # stored as gain - 1 (Gemma); |gain| makes logit std ~ LOGIT_STD for
        # a head of std 1/sqrt(hidden)
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
        return sign * LOGIT_STD * (1.0 + _normal(shape, NORM_NOISE_STD, gen)) - 1.0
    if spec.init == "score_bias":
        return _normal(shape, BIAS_STD, gen)
    if spec.init in ("embed", "tied_embed", "lm_head"):
        vocab, hidden = shape
        weight = _normal(shape, 1.0, gen)
        if spec.init != "embed":
            # logit_i = |row_i| * (unit direction . h): log-normal row norms
            # stretch the upper tail so top-1 margins are wide
            log_std = ROW_NORM_LOG_STD if spec.init == "lm_head" else 0.0
            row_norm = torch.exp(_normal((vocab, 1), log_std, gen))
            std = LOGIT_STD / hidden**0.5 if spec.init == "lm_head" else hidden**-0.5
            weight = weight * row_norm * std
        quiet = torch.as_tensor(list(quiet_rows), dtype=torch.long)
        if quiet.numel():
            weight[quiet] = _normal((quiet.numel(), hidden), QUIET_ROW_STD, gen)
        return weight
    raise ValueError(f"unknown init {spec.init!r} for tensor {spec.name}")
