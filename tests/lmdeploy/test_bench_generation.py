"""maca-infer bench generation: the static-inference profile on the LMDeploy
pipeline (emulated maca device). Counts, not timings: every request runs to
its length (ignore_eos), so the generated-token total is known in advance,
and the prompt lengths the engine reports are those asked for (plus the BOS
token the engine adds, if any)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from lmdeploy_helpers import PYTHON

pytestmark = pytest.mark.slow


def test_profile_counts_and_report(tmp_path):
    from maca_infer.modelzoo import get

    out = tmp_path / "gen.json"
    env = dict(os.environ, MACA_INFER_DEVICE="emulated")
    cmd = [PYTHON, "-m", "maca_infer", "bench", "generation", str(get("llama")), "--device", "maca",
           "-c", "1", "2", "-pt", "24", "-ct", "5", "-w", "1", "-tr", "2", "--block-size", "16",
           "--dtype", "float16", "--eager-mode", "--cache-max-entry-count", "0.05", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r in rows:
        rounds, conc = 2, r["concurrency"]
        assert r["generated_tokens"] == rounds * conc * 5
        assert rounds * conc * 24 <= r["input_tokens"] <= rounds * conc * 25
        assert 0 < r["first_token_latency_min_s"] <= r["first_token_latency_avg_s"] <= r["first_token_latency_max_s"]
        assert r["per_token_latency_p50_s"] <= r["per_token_latency_p99_s"]
        assert r["output_throughput_tok_s"] > 0
    assert "ftl_min" in result.stdout  # the human-readable table
