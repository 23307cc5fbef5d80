"""The adapter feeds our Triton kernels (not only the torch references) correctly.

Runs in a fresh interpreter with TRITON_INTERPRET=1 (Triton reads it when it
is first imported) and MACA_INFER_OPS_IMPL=triton (an explicit request: a
kernel that cannot run raises instead of falling back). A tiny Llama forward
with left padding must match stock Transformers, and every swapped op must
report that its Triton kernel ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from transformers import AutoModelForCausalLM
    import maca_infer.adapters.hf as maca_hf
    from maca_infer.adapters.hf import _compat
    from maca_infer.common.ops import _dispatch
    from maca_infer.modelzoo import get

    model = AutoModelForCausalLM.from_pretrained(get("llama"), **_compat.dtype_kwargs(torch.float32),
                                                 device_map=maca_hf.device_map()).eval()
    ids = torch.randint(3, model.config.vocab_size - 3, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits
        maca_hf.enable(model)
        ours = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    print(json.dumps({
        "max_error": (ours - stock)[real].abs().max().item(),
        "impl": {op: _dispatch.last_impl(op) for op in ("rms_norm", "silu_and_mul", "apply_rotary", "varlen_attention")},
    }))
    """
)


@pytest.mark.slow
def test_llama_forward_on_triton_kernels_matches_stock():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACA_INFER_") or k == "MACA_INFER_MODEL_CACHE"}
    env.update(TRITON_INTERPRET="1", MACA_INFER_OPS_IMPL="triton")
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["impl"] == {op: "triton" for op in report["impl"]}
    assert report["max_error"] < 1e-4


GENERATE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    import maca_infer.adapters.hf as maca_hf
    from maca_infer.adapters.hf import _compat
    from maca_infer.common.ops import _dispatch
    from maca_infer.modelzoo import get

    model = AutoModelForCausalLM.from_pretrained(get(sys.argv[1]), **_compat.dtype_kwargs(torch.float32),
                                                 device_map=maca_hf.device_map()).eval()
    ids = torch.randint(3, model.config.vocab_size - 3, (1, 9), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        stock = model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
        maca_hf.enable(model)
        ours = model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
    print(json.dumps({"stock": stock, "ours": ours, "impl": dict(_dispatch._last)}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kind,model_ops", [
    ("llama", {"rms_norm", "silu_and_mul", "apply_rotary", "varlen_attention"}),
    ("qwen2_moe", {"rms_norm", "apply_rotary", "varlen_attention", "fused_moe"}),
])
def test_greedy_generate_on_triton_kernels_matches_stock(kind, model_ops):
    from maca_infer.adapters.hf import transformers_experts

    if "fused_moe" in model_ops and not transformers_experts.interface_available():
        # transformers < 5: the routed experts are Qwen2MoeMLP modules, our fused gated MLP runs in them
        model_ops = model_ops - {"fused_moe"} | {"silu_and_mul"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACA_INFER_") or k == "MACA_INFER_MODEL_CACHE"}
    env.update(TRITON_INTERPRET="1", MACA_INFER_OPS_IMPL="triton")
    result = subprocess.run([sys.executable, "-c", GENERATE, kind], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert model_ops <= set(report["impl"]), report["impl"]
    assert report["impl"] == {op: "triton" for op in report["impl"]}
    assert report["ours"] == report["stock"]
