"""The greedy-parity rule of ``lmdeploy_helpers.assert_greedy_parity``, on made-up HF answers.

A run may part from HF's float32 greedy tokens only at HF's own near-tie (its
top-2 margin on the shared prefix below the tie tolerance, the run's token
within it of the top), and nothing after that first difference is compared.
"""

from __future__ import annotations

import pytest

import lmdeploy_helpers
from lmdeploy_helpers import TIE_TOLERANCE, assert_greedy_parity

GREEDY = [5, 6, 7, 8, 9]


def _fake_hf(monkeypatch, margins, teacher_gap):
    """HF answer for one prompt: greedy GREEDY, margins per step, the run's token ``teacher_gap`` below the top."""

    def hf_reference(model_dir, prompts, max_new_tokens=0, check=(), act_quant=None):
        (prompt_ids, out), = check
        teacher = [[0.0 if out[i] == GREEDY[i] else -teacher_gap, 0.0, GREEDY[i]] for i in range(len(out))]
        return {"prompt_ids": [prompt_ids], "greedy": [GREEDY], "margins": [margins], "teacher": [teacher]}

    monkeypatch.setattr(lmdeploy_helpers, "hf_reference", hf_reference)


def _check(out):
    return assert_greedy_parity("model", ["p"], [[1, 2]], [out], "bfloat16")


def test_identical_tokens_pass(monkeypatch):
    _fake_hf(monkeypatch, [3.0] * 5, 0.0)
    report = _check(GREEDY)
    assert report.compared_steps == report.total_steps == 5 and report.excused == []


def test_a_difference_where_hf_was_decided_fails(monkeypatch):
    # the run's token is close to HF's top (0.1 below), but HF's own margin was 1.0: not a tie
    _fake_hf(monkeypatch, [2.0, 2.0, 1.0, 2.0, 2.0], 0.1)
    with pytest.raises(AssertionError, match="step 2: .*HF was decided there"):
        _check([5, 6, 70, 8, 9])


def test_a_difference_at_hfs_own_near_tie_stops_the_comparison(monkeypatch):
    tol = TIE_TOLERANCE["bfloat16"]
    _fake_hf(monkeypatch, [2.0, tol / 4, 2.0, 2.0, 2.0], tol / 4)
    report = _check([5, 60, 1, 1, 1])  # everything after the tie differs and is not compared
    assert report.greedy_prefix == [1] and report.compared_steps == 2 and len(report.excused) == 1


def test_a_near_tie_does_not_excuse_a_token_far_below_the_top(monkeypatch):
    tol = TIE_TOLERANCE["bfloat16"]
    _fake_hf(monkeypatch, [tol / 4] * 5, 3 * tol)
    with pytest.raises(AssertionError, match="step 0"):
        _check([50, 6, 7, 8, 9])
