"""Comparing greedy generations of two implementations of one tiny model.

Random weights give no guarantee that the top-1 logit stands clear of the
second. Measured on the seven float kinds (seed 0, 8 prompts x 16 greedy
tokens), Hugging Face in bfloat16 and in float32 agree on all 16 tokens for
41 of 56 (kind, prompt) pairs; in the other 15 they part at some step
(as early as the first), always one whose float32 top-1 margin is under 0.5,
while bfloat16's max |delta logit| is ~0.15-0.25 for logits of std ~4. A
kernel test that demands equal tokens everywhere is then flaky, and one that
gives up on tokens loses its sharpest check.

``check_greedy_agreement`` keeps the check sharp and fair: tokens must match
step by step until the reference itself is undecided (its top-1 margin is
under ``tie_margin``) at a step where the two differ; only there may they part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_TIE_MARGIN = 0.5  # ~2-3x the bfloat16 logit error measured on these models


@dataclass(frozen=True)
class GreedyAgreement:
    """Outcome of a comparison that did not fail.

    matched: steps with equal tokens before the sequences parted (or all).
    parted_at_tie: True when they parted at a step the reference left undecided.
    """

    matched: int
    parted_at_tie: bool


def check_greedy_agreement(
    reference_tokens: Sequence[int],
    reference_logits,
    candidate_tokens: Sequence[int],
    *,
    tie_margin: float = DEFAULT_TIE_MARGIN,
) -> GreedyAgreement:
    """Check a candidate's greedy tokens against a reference's.

    Args:
        reference_tokens: ``[steps]`` int, the reference's greedy tokens.
        reference_logits: ``[steps, vocab]`` float tensor (torch), the
            reference's next-token logits at each step (``scores`` of
            ``generate(..., output_scores=True)``, batch row taken).
        candidate_tokens: ``[>= 1]`` int, the tokens under test; compared
            over ``min(len(reference_tokens), len(candidate_tokens))`` steps.
        tie_margin: a step whose reference top-1 minus top-2 logit is below
            this counts as undecided.

    Step ``t`` passes when the tokens agree, or when they differ and the
    reference's margin at ``t`` is under ``tie_margin`` and the candidate's
    token is one of the reference's near-top tokens (within ``tie_margin`` of
    the top); after such a step the sequences condition on different
    prefixes, so comparison stops there.

    Raises:
        AssertionError: naming the first step where the candidate differs
            while the reference was decided, with both tokens and the margin.
        ValueError: on empty or mismatched inputs.
    """
    import torch

    logits = torch.as_tensor(reference_logits).float()
    steps = min(len(reference_tokens), len(candidate_tokens))
    if steps == 0:
        raise ValueError("nothing to compare: reference_tokens and candidate_tokens must be non-empty")
    if logits.dim() != 2 or logits.shape[0] < steps:
        raise ValueError(
            f"reference_logits must be [steps, vocab] with steps >= {steps}; got shape {tuple(logits.shape)}"
        )
    if tie_margin < 0:
        raise ValueError(f"tie_margin={tie_margin} must be >= 0")
    for t in range(steps):
        ref, cand = int(reference_tokens[t]), int(candidate_tokens[t])
        if ref == cand:
            continue
        top2 = logits[t].topk(2).values
        margin = float(top2[0] - top2[1])
        cand_gap = float(top2[0] - logits[t, cand])
        if margin < tie_margin and cand_gap < tie_margin:
            return GreedyAgreement(matched=t, parted_at_tie=True)
        raise AssertionError(
            f"greedy step {t}: candidate token {cand} != reference token {ref}; the reference "
            f"was decided there (top-1 margin {margin:.3f} >= tie_margin {tie_margin}, candidate's "
            f"logit {cand_gap:.3f} below the top). Reference {list(map(int, reference_tokens[:steps]))}, "
            f"candidate {list(map(int, candidate_tokens[:steps]))}"
        )
    return GreedyAgreement(matched=steps, parted_at_tie=False)
