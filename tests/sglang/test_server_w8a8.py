"""End to end: INT8 W8A8 (``--quantization w8a8_int8`` and compressed-tensors) through our W8A8 ops.

The tiny compressed-tensors INT8 checkpoints (``llama-w8a8``; ``deepseek-w8a8``,
DeepSeek-V3/R1's shape: MLA, q LoRA, noaux_tc MoE, every projection and
expert int8) are served with ``--attention-backend maca``; linear layers run
``per_token_quant_int8`` + ``w8a8_int8_linear``, experts ``fused_moe_w8a8``.

Reference (the choice, stated): W8A8 quantizes activations per token at run
time, so the server cannot equal a float model of the dequantized weights.
The reference is Hugging Face float32 on the ``-dequant`` checkpoint (the
exact ``q * scale`` weights) with every quantized matmul's input replaced by
its per-token int8 round trip, computed here by the test's own code
(``absmax / 127`` scale, round half away from zero, clamp to +-127; the code
by the float32 rule of common/ops/w8a8.py, the rest in float64): the same
math the server runs, done by other code. Tokens are compared with
``check_greedy_agreement`` on the reference's logits: they must agree until
the reference itself is undecided (top-1 margin under 0.5). The dense model
runs in float32 and its log-probabilities must also match (within 1e-3;
measured 3e-6), which float activations would miss; DeepSeek runs in
bfloat16 because SGLang's MLA decode dequantizes ``kv_b_proj`` into bf16
``w_kc`` / ``w_vc`` (its int8 path), which a float32 server cannot multiply.
"""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest

pytest.importorskip("sglang")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_NEW = 6
PROMPTS = [[17, 300, 45, 99, 1000, 23, 7], [5, 6], list(range(100, 124))]
COMMON = ("--attention-backend", "maca", "--max-running-requests", "8")


def _fake_quant_int8(x):
    """Per-token symmetric int8 round trip (the test's own implementation), back in x.dtype.

    The code ``q`` follows the rule common/ops/w8a8.py documents: float32 ``127 / absmax`` and float32
    ``x * that``, rounded half away from zero. Computing ``v`` in float64 instead would be a different
    rule: these models put activations exactly on .5 boundaries (in layer 0, ``x / absmax`` is a ratio
    of bf16 products), where float32 and float64 round apart. ``q * absmax / 127`` is then float64.
    """
    import torch

    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-10)
    v = xf * (torch.full_like(absmax, 127.0) / absmax)
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127).double()
    return (q * (absmax.double() / 127.0)).to(x.dtype)


@contextlib.contextmanager
def _activations_quantized(model):
    """Inside: every F.linear on a quantized weight (projections, experts; not embeddings, routers, lm_head) sees int8-round-tripped inputs."""
    import torch

    quantized = {p.untyped_storage().data_ptr() for name, p in model.named_parameters()
                 if p.dim() >= 2 and not any(s in name for s in ("embed_tokens", "lm_head", "mlp.gate.weight"))}
    original = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        if weight.untyped_storage().data_ptr() in quantized:
            x = _fake_quant_int8(x)
        return original(x, weight, bias)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original


def hf_w8a8_reference(kind: str):
    """[(tokens, logits)] per prompt: HF float32 on ``kind``'s -dequant weights, activations int8-quantized per token."""
    import torch
    from transformers import AutoModelForCausalLM

    from maca_infer.modelzoo import dequant_kind, get

    model = AutoModelForCausalLM.from_pretrained(str(get(dequant_kind(kind))), dtype=torch.float32).eval()
    outs = []
    with torch.no_grad(), _activations_quantized(model):
        for ids in PROMPTS:
            inp = torch.tensor([ids])
            gen = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=MAX_NEW, do_sample=False,
                                 min_new_tokens=MAX_NEW, output_scores=True, return_dict_in_generate=True)
            outs.append((gen.sequences[0, len(ids):].tolist(), torch.stack([s[0] for s in gen.scores]).float()))
    return outs


def _generate(server) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and the server's logprob of each."""
    out = server.post("/generate", {
        "input_ids": PROMPTS,
        "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
    })
    return ([o["output_ids"] for o in out],
            [[entry[0] for entry in o["meta_info"]["output_token_logprobs"]] for o in out])


def _check_against_reference(kind: str, got: list[list[int]], logprobs: list[list[float]],
                             logprob_tol: float | None) -> None:
    """Tokens: check_greedy_agreement. With ``logprob_tol``: on the agreed steps, the server's logprob of
    each token within ``logprob_tol`` of the reference's (llama fp32: measured 3e-6; HF with float
    activations is up to 0.1 off the reference on these very tokens)."""
    import torch

    from maca_infer.modelzoo import check_greedy_agreement

    reference = hf_w8a8_reference(kind)
    matched, worst = [], 0.0
    for (ref_tokens, ref_logits), tokens, server_lp in zip(reference, got, logprobs):
        steps = check_greedy_agreement(ref_tokens, ref_logits, tokens).matched
        matched.append(steps)
        ref_lp = torch.log_softmax(ref_logits.double(), dim=-1)
        for t in range(steps):
            worst = max(worst, abs(float(ref_lp[t, tokens[t]]) - server_lp[t]))
    # a tie may end a comparison early, never all of them at the first token
    assert sum(matched) >= MAX_NEW, f"{kind}: agreement too short to mean anything: {matched}"
    print(f"{kind}: matched {matched}, worst |logprob - reference| {worst:.2e}")
    if logprob_tol is not None:
        assert worst < logprob_tol, f"{kind}: server logprob off the reference's by {worst:.3e} (tol {logprob_tol})"


W8A8_LOG = ["w8a8: linear layers run maca_infer per_token_quant_int8 + w8a8_int8_linear"]
MOE_LOG = W8A8_LOG + ["w8a8: experts run maca_infer fused_moe_w8a8"]


@pytest.mark.parametrize("kind,args,dtype,expected_log,logprob_tol", [
    # MetaX's launch flag, dense model
    ("llama-w8a8", ("--quantization", "w8a8_int8"), "float32", W8A8_LOG, 1e-3),
    # no flag: SGLang reads quant_method compressed-tensors from the checkpoint
    ("deepseek-w8a8", (), "bfloat16", MOE_LOG, None),
    # MetaX's DeepSeek-R1-W8A8 line scaled down: DP attention over two ranks
    ("deepseek-w8a8", ("--quantization", "w8a8_int8", "--tp", "2", "--dp", "2", "--enable-dp-attention"),
     "bfloat16", MOE_LOG, None),
], ids=["llama-w8a8_int8", "deepseek-compressed-tensors", "deepseek-w8a8_int8-tp2-dp2-dpattn"])
def test_w8a8_server_matches_activation_quantized_hf(kind, args, dtype, expected_log, logprob_tol,
                                                      sglang_launcher, tmp_path_factory):
    from maca_infer.modelzoo import get

    with sglang_launcher(get(kind), *COMMON, "--dtype", dtype, *args,
                         log_dir=tmp_path_factory.mktemp("sglang")) as server:
        got, logprobs = _generate(server)
        log = server.all_logs(10**7)
    for line in expected_log:
        assert line in log
    assert "sgl_kernel" not in log
    _check_against_reference(kind, got, logprobs, logprob_tol)


def test_fp8_checkpoint_is_refused_at_start_up(sglang_expect_failure, tmp_path):
    """A compressed-tensors FP8 W8A8 checkpoint: one clear error at start-up, naming the field (no FP8 on the C500)."""
    from maca_infer.modelzoo import get

    model = tmp_path / "llama-fp8"
    shutil.copytree(get("llama-w8a8"), model)
    config = json.loads((model / "config.json").read_text())
    for part in ("weights", "input_activations"):
        config["quantization_config"]["config_groups"]["group_0"][part]["type"] = "float"
    config["quantization_config"]["format"] = "float-quantized"
    (model / "config.json").write_text(json.dumps(config))
    log = sglang_expect_failure(model, *COMMON, log_dir=tmp_path,
                                until="cannot run on the maca device")
    assert "format='float-quantized' is not supported" in log and "FP8" in log
