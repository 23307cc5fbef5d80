"""LMDeploy's INT8 W8A8 (smooth-quant) path on maca: dlinfer ops, start-up checks, tiny models end to end.

Interface tests call LMDeploy 0.18's own wrappers (``lmdeploy.pytorch.kernels.dlinfer``:
``dynamic_quant``, ``linear_w8a8``, ``rms_norm_w8a8`` with and without residual,
``fused_moe_w8a8``) the way its ``DlinferLinearW8A8Impl`` / ``DlinferRMSNormW8A8Impl`` /
``DlinferFusedMoEW8A8Impl`` do, and compare with float64 math written here.

End to end: ``llama-w8a8-smoothquant`` (every linear -> ``linear_w8a8``, both norms ->
``rms_norm_w8a8``) and ``mixtral-w8a8-smoothquant`` (attention W8A8, experts ->
``fused_moe_w8a8``) through ``lmdeploy.pipeline(device_type="maca")``. Reference choice:
Hugging Face float32 on the float32 *dequantized* weights (``q * scale``, the -dequant kind)
with the same dynamic per-token INT8 activation quantization applied to the input of every
quantized linear and expert projection (``hf_reference.py``, ``act_quant="int8_per_token"``,
an independent float64 implementation). The only differences left are arithmetic (fp16
activations and norms, where LMDeploy rounds before quantizing), judged by the tie rule of
``assert_greedy_parity``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request

import pytest
import torch

from lmdeploy_helpers import (
    PROMPTS,
    OpCallCounter,
    api_server_command,
    assert_greedy_parity,
    free_port,
    pipeline_greedy,
    server_env,
    stop_process,
    wait_http,
)

MAX_NEW_TOKENS = 16
# Dynamic INT8 activations amplify rounding: an fp16 difference of one ulp moves a value across
# an int8 rounding boundary now and then. Measured on these tiny models, the W8A8 HF reference
# itself run in float16 differs from its float32 run by logit p99 0.46 (llama) / 0.48 (mixtral),
# median 0.26-0.30 (without activation quantization: 0.03). Ties within 0.5 are excused;
# a wrong scale, norm or routing weight moves decided tokens far more (see the report).
W8A8_TIE_TOLERANCE = 0.5


def quantize64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row INT8 (half away from zero): (q float64, scale float64 [..., 1])."""
    xd = x.double()
    scale = xd.abs().amax(dim=-1, keepdim=True).clamp_min(1e-10) / 127.0
    v = xd / scale
    return (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127), scale


def rms64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def int8_weight(n: int, k: int, experts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (n, k) if experts is None else (experts, n, k)
    q = torch.randint(-127, 128, shape, dtype=torch.int8)
    return q, torch.rand(*shape[:-1], 1) * 0.02 + 0.001


@pytest.fixture(scope="module")
def w8a8_kernels(dlinfer_ours):
    import lmdeploy.pytorch.kernels.dlinfer as kernels
    from lmdeploy.pytorch.kernels.dlinfer import w8a8_kernels

    return kernels, w8a8_kernels


# --------------------------------------------------------------------------- ops through LMDeploy's wrappers


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dynamic_quant_then_linear_w8a8(w8a8_kernels, dtype):
    """DlinferLinearW8A8Impl.forward on a plain tensor: dynamic_quant, then linear_w8a8."""
    _, k8 = w8a8_kernels
    torch.manual_seed(0)
    x = torch.randn(1, 7, 96, dtype=dtype)  # LMDeploy's [1, T, K]; K not a multiple of 64
    weight, scale = int8_weight(40, 96)
    bias = torch.randn(40, dtype=dtype)
    q, s = k8.dynamic_quant(x, torch.int8)
    ref_q, ref_s = quantize64(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.shape == x.shape[:-1], "dlinfer's per-token scale is x.shape[:-1]"
    assert torch.equal(q.double(), ref_q)
    torch.testing.assert_close(s.double(), ref_s.squeeze(-1), rtol=1e-6, atol=0)
    out = k8.linear_w8a8(q, weight, s, scale, dtype, torch.int8, bias)
    expected = (ref_q @ weight.double().T) * ref_s * scale.double().T + bias.double()
    assert out.dtype == dtype and out.shape == (1, 7, 40)
    err = float((out.double() - expected).abs().max() / expected.abs().max())
    assert err < (2e-3 if dtype == torch.float16 else 1.2e-2), err


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_w8a8(w8a8_kernels, with_residual):
    """DlinferRMSNormW8A8Impl: rms_norm_w8a8 / add_rms_norm_w8a8 -> (int8, per-token scale[, residual])."""
    _, k8 = w8a8_kernels
    torch.manual_seed(1)
    dtype, eps = torch.float16, 1e-5
    x = torch.randn(5, 72, dtype=dtype)
    weight = torch.rand(72, dtype=dtype) + 0.5
    if with_residual:
        residual = torch.randn(5, 72, dtype=dtype)
        summed = (x.double() + residual.double()).to(dtype)
        q, s, new_residual = k8.rms_norm_w8a8(x, weight, eps, torch.int8, residual)
        assert torch.equal(new_residual, summed)
    else:
        summed = x
        q, s = k8.rms_norm_w8a8(x, weight, eps, torch.int8)
    normed = rms64(summed, weight, eps).to(dtype)  # the norm's output in the model dtype, then quantized
    ref_q, ref_s = quantize64(normed)
    assert q.dtype == torch.int8 and s.shape == (5,)
    # one-step differences only where the fp16 rounding of the normed value differs
    assert (q.double() - ref_q).abs().max() <= 1
    assert (q.double() != ref_q).float().mean() < 0.02
    torch.testing.assert_close(s.double(), ref_s.squeeze(-1), rtol=2e-3, atol=0)


@pytest.mark.parametrize("renormalize,scale_dtype", [(False, torch.float32), (True, torch.float32),
                                                     (True, torch.bfloat16)])
def test_fused_moe_w8a8(w8a8_kernels, renormalize, scale_dtype):
    """DlinferFusedMoEW8A8Impl.forward -> fused_moe_w8a8 with LMDeploy's [E, N, 1] scales (its
    update_weights turns them bfloat16 for a bf16 model)."""
    kernels, _ = w8a8_kernels
    from dlinfer.utils.type_annotation import MoeMetadata

    torch.manual_seed(2)
    tokens, hidden, inter, experts, top_k = 6, 64, 48, 4, 2
    dtype = torch.float16
    x = torch.randn(tokens, hidden, dtype=dtype)
    w13, s13 = int8_weight(2 * inter, hidden, experts)
    w2, s2 = int8_weight(hidden, inter, experts)
    s13, s2 = s13.to(scale_dtype), s2.to(scale_dtype)
    logits = torch.randn(tokens, experts)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    out = kernels.fused_moe_w8a8(x, w13, s13, w2, s2, weights, ids.to(torch.int32), top_k, renormalize,
                                 MoeMetadata())
    w = weights.double()
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    qx, sx = quantize64(x)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for j in range(top_k):
            e = int(ids[t, j])
            h = (w13[e].double() @ qx[t]) * sx[t] * s13[e, :, 0].double()
            act = torch.nn.functional.silu(h[:inter]) * h[inter:]
            qh, sh = quantize64(act)
            expected[t] += w[t, j] * (w2[e].double() @ qh) * sh * s2[e, :, 0].double()
    assert out.shape == x.shape and out.dtype == dtype
    err = float((out.double() - expected).abs().max() / expected.abs().max())
    assert err < 2e-3, err


def test_w8a8_ops_reject_bad_input(w8a8_kernels):
    kernels, k8 = w8a8_kernels
    x = torch.randn(3, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="quant_dtype=.*float8.*allowed: torch.int8"):
        k8.dynamic_quant(x, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="quant_granularity='PER_TENSOR'"):
        k8.dynamic_quant(x, torch.int8, "PER_TENSOR")
    q, s = k8.dynamic_quant(x, torch.int8)
    weight, scale = int8_weight(32, 64)
    with pytest.raises(ValueError, match="q_w has dtype float16"):
        k8.linear_w8a8(q, weight.half(), s, scale, torch.float16, torch.int8)
    with pytest.raises(ValueError, match=r"w_scale has shape \(16, 1\)"):
        k8.linear_w8a8(q, weight, s, scale[:16], torch.float16, torch.int8)
    w13, s13 = int8_weight(64, 64, 2)
    w2, s2 = int8_weight(64, 32, 2)
    ids = torch.zeros(3, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"w13_scale has shape \(2, 32, 1\)"):
        kernels.fused_moe_w8a8(x, w13, s13[:, :32], w2, s2, torch.ones(3, 1), ids, 1, False, None)


# --------------------------------------------------------------------------- start-up checks


def test_build_op_refuses_w8a8_specs_maca_cannot_run(dlinfer_ours, monkeypatch):
    """An FP8 smooth-quant module, the NN weight layout, W8A8 expert parallelism or a dlinfer without the
    module's op: one ValueError when LMDeploy builds the module (model construction), not at the first forward."""
    import lmdeploy.pytorch.backends.dlinfer.maca.op_backend as maca_backend
    from lmdeploy.pytorch.backends.moe import FusedMoEW8A8BuildSpec
    from lmdeploy.pytorch.backends.qmodules import LinearW8A8BuildSpec, RMSNormW8A8BuildSpec

    backend = maca_backend.MacaOpsBackend
    linear = LinearW8A8BuildSpec(in_features=64, out_features=32, bias=False, output_dtype=torch.float16,
                                 quant_dtype=torch.int8)
    norm = RMSNormW8A8BuildSpec(64, 1e-6, quant_dtype=torch.int8)
    moe = FusedMoEW8A8BuildSpec(top_k=2, num_experts=4, renormalize=True, output_dtype=torch.float16,
                                quant_dtype=torch.int8, ep_size=1, ep_group=None)
    for spec in (linear, norm, moe):  # INT8 builds
        assert backend.build_op(spec) is not None
    for spec in (linear, norm, moe):
        fp8 = type(spec)(**{**spec.__dict__, "quant_dtype": torch.float8_e4m3fn})
        with pytest.raises(ValueError, match="W8A8 modules .* quantize to torch.float8_e4m3fn; maca serves INT8"):
            backend.build_op(fp8)
    with pytest.raises(ValueError, match=r"W8A8 MoE with expert parallelism \(ep=2\)"):
        backend.build_op(FusedMoEW8A8BuildSpec(**{**moe.__dict__, "ep_size": 2}))
    monkeypatch.setenv("DLINFER_LINEAR_USE_NN_LAYOUT", "1")
    with pytest.raises(ValueError, match="DLINFER_LINEAR_USE_NN_LAYOUT=1"):
        backend.build_op(linear)
    # a dlinfer without the op LMDeploy's module calls (upstream dlinfer has no fused_moe_w8a8 today)
    import dlinfer.ops

    monkeypatch.delattr(dlinfer.ops, "fused_moe_w8a8")
    with pytest.raises(ValueError, match=r"LMDeploy's FusedMoEW8A8 calls dlinfer.ops.fused_moe_w8a8, which the "
                                         r"installed dlinfer .* does not have; use maca-infer's dlinfer"):
        backend.build_op(moe)


def _layout(kind: str) -> dict:
    from maca_infer.adapters.lmdeploy.w8a8_checkpoint import read_layout
    from maca_infer.modelzoo import get

    return read_layout([str(get(kind) / "model.safetensors")])


def test_checkpoint_check_accepts_the_smooth_quant_kinds(dlinfer_ours):
    from maca_infer.adapters.lmdeploy.w8a8_checkpoint import check_smooth_quant_layout, smooth_quant_config
    from maca_infer.modelzoo import get

    for kind in ("llama-w8a8-smoothquant", "mixtral-w8a8-smoothquant"):
        assert smooth_quant_config(str(get(kind))) == {"quant_method": "smooth_quant", "quant_dtype": "int8"}
        check_smooth_quant_layout(_layout(kind), model_name="MixtralForCausalLM", float_experts=False)
    assert smooth_quant_config(str(get("llama-awq"))) is None


@pytest.mark.parametrize("breakage,message", [
    ("float_weight", r"q_proj.weight is F16 \[128, 128\] beside its scale .*q_proj.scale; expected LMDeploy "
                     r"smooth-quant W8A8: <module>.weight int8 \[N, K\]"),
    ("flat_scale", r"q_proj.scale is F32 \[128\]; expected float32 \[128, 1\], one scale per output channel"),
    ("int_scale", r"q_proj.scale is I32 \[128, 1\]; expected float32 \[128, 1\]"),
    ("no_scale", r"q_proj.weight is int8 \[128, 128\] without model.layers.0.self_attn.q_proj.scale"),
    ("no_weight", r"q_proj.scale: a W8A8 scale without model.layers.0.self_attn.q_proj.weight"),
])
def test_checkpoint_check_names_the_tensor_and_the_layout(dlinfer_ours, breakage, message):
    from maca_infer.adapters.lmdeploy.w8a8_checkpoint import check_smooth_quant_layout

    layout = _layout("llama-w8a8-smoothquant")
    q_proj = "model.layers.0.self_attn.q_proj"
    if breakage == "float_weight":
        layout[f"{q_proj}.weight"] = ("F16", layout[f"{q_proj}.weight"][1])
    elif breakage == "flat_scale":
        layout[f"{q_proj}.scale"] = ("F32", (128,))
    elif breakage == "int_scale":
        layout[f"{q_proj}.scale"] = ("I32", (128, 1))
    elif breakage == "no_scale":
        del layout[f"{q_proj}.scale"]
    else:
        del layout[f"{q_proj}.weight"]
    with pytest.raises(ValueError, match=message):
        check_smooth_quant_layout(layout, model_name="LlamaForCausalLM", float_experts=False)


def test_checkpoint_check_refuses_int8_experts_in_a_model_with_float_experts(dlinfer_ours):
    from maca_infer.adapters.lmdeploy.w8a8_checkpoint import check_smooth_quant_layout

    with pytest.raises(ValueError, match=r"LMDeploy's Qwen2MoeForCausalLM builds its MoE experts as float FusedMoE"
                                         r".*first: model.layers.0.block_sparse_moe.experts.0.w1.weight"
                                         r".*Missing: a FusedMoEW8A8 module"):
        check_smooth_quant_layout(_layout("mixtral-w8a8-smoothquant"), model_name="Qwen2MoeForCausalLM",
                                  float_experts=True)


# --------------------------------------------------------------------------- tiny models end to end


@pytest.mark.slow
@pytest.mark.parametrize("kind,ops", [
    ("llama-w8a8-smoothquant", ("rms_norm_w8a8", "add_rms_norm_w8a8", "dynamic_quant", "linear_w8a8")),
    ("mixtral-w8a8-smoothquant", ("rms_norm_w8a8", "linear_w8a8", "fused_moe_w8a8")),
])
def test_smooth_quant_model_matches_int8_hf_reference(dlinfer_ours, monkeypatch, kind, ops):
    from maca_infer.modelzoo import dequant_kind, get

    counter = OpCallCounter(monkeypatch, ops + ("fused_moe",))
    prompt_ids, outputs = pipeline_greedy(str(get(kind)), PROMPTS, MAX_NEW_TOKENS, "float16")
    for name in ops:
        assert counter.calls[name] > 0, f"{kind}: nothing ran through dlinfer.ops.{name}"
    assert counter.calls["fused_moe"] == 0, f"{kind}: float fused_moe ran: the experts were not W8A8"
    report = assert_greedy_parity(str(get(dequant_kind(kind), dtype="float32")), PROMPTS, prompt_ids, outputs,
                                  "float16", act_quant="int8_per_token", tie_tolerance=W8A8_TIE_TOLERANCE)
    print(kind, report, counter.calls)


def _broken_checkpoint(tmp_path, breakage: str) -> str:
    """A smooth-quant checkpoint LMDeploy must refuse at start-up."""
    from safetensors.torch import load_file, save_file

    from maca_infer.modelzoo import get
    from maca_infer.modelzoo.quantize import quantize_int8_per_channel

    model_dir = tmp_path / breakage
    if breakage == "fp8":  # an FP8 smooth-quant config: no FP8 on the C500
        shutil.copytree(get("llama-w8a8-smoothquant"), model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        config["quantization_config"]["quant_dtype"] = "float8_e4m3fn"
        (model_dir / "config.json").write_text(json.dumps(config))
    else:  # "qwen2_moe": int8 experts in a model LMDeploy builds with float experts
        shutil.copytree(get("qwen2_moe"), model_dir)
        state = load_file(model_dir / "model.safetensors")
        for name in [n for n in state if ".experts." in n or (".self_attn." in n and n.endswith("proj.weight"))]:
            state[name], state[name.removesuffix(".weight") + ".scale"] = quantize_int8_per_channel(state[name])
        save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((model_dir / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "smooth_quant", "quant_dtype": "int8"}
        (model_dir / "config.json").write_text(json.dumps(config))
    return str(model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("breakage,message", [
    ("fp8", "quantize to torch.float8_e4m3fn; maca serves INT8 W8A8 only"),
    ("qwen2_moe", "LMDeploy's Qwen2MoeForCausalLM builds its MoE experts as float FusedMoE"),
])
def test_unservable_smooth_quant_checkpoint_fails_at_start_up(dlinfer_ours, tmp_path, breakage, message):
    """The pipeline does not start, and its error says why (no crash at the first forward)."""
    model_dir = _broken_checkpoint(tmp_path, breakage)
    with pytest.raises(Exception) as caught:
        pipeline_greedy(model_dir, PROMPTS[:1], 1, "float16")
    chain, error = [], caught.value
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    assert any(message in text for text in chain), chain


# --------------------------------------------------------------------------- api_server


def _start_server(model_dir: str, log_path):
    port = free_port()
    log = open(log_path, "w+")
    proc = subprocess.Popen(api_server_command(model_dir, port, "--session-len", "256", "--max-batch-size", "4"),
                            stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True)
    return proc, log, f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_api_server_w8a8_moe_matches_int8_hf_reference(dlinfer_ours, tmp_path):
    """``lmdeploy serve api_server <mixtral-w8a8-smoothquant> --device maca``: W8A8 attention linears and
    norms plus W8A8 experts in one server; /generate greedy ids vs the same W8A8 HF reference."""
    from transformers import AutoTokenizer

    from maca_infer.modelzoo import dequant_kind, get

    model_dir = str(get("mixtral-w8a8-smoothquant"))
    proc, log, base = _start_server(model_dir, tmp_path / "server.log")
    try:
        wait_http(f"{base}/v1/models", proc, timeout=240, log_path=str(tmp_path / "server.log"))
        tok = AutoTokenizer.from_pretrained(model_dir)
        prompts = PROMPTS[:2]
        prompt_ids = [tok(p).input_ids for p in prompts]
        outputs = []
        for ids in prompt_ids:
            body = {"input_ids": ids, "max_tokens": MAX_NEW_TOKENS, "ignore_eos": True, "temperature": 0, "top_k": 1}
            req = urllib.request.Request(f"{base}/generate", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                outputs.append(json.loads(r.read())["output_ids"])
    finally:
        stop_process(proc)
        log.close()
    assert all(len(o) == MAX_NEW_TOKENS for o in outputs)
    print(assert_greedy_parity(str(get(dequant_kind("mixtral-w8a8-smoothquant"), dtype="float32")), prompts,
                               prompt_ids, outputs, "float16", act_quant="int8_per_token",
                               tie_tolerance=W8A8_TIE_TOLERANCE))


@pytest.mark.slow
def test_api_server_refuses_unservable_w8a8_checkpoint_at_start_up(dlinfer_ours, tmp_path):
    """int8 experts in a Qwen2-MoE checkpoint: the server exits during start-up, and its log names the cause."""
    model_dir = _broken_checkpoint(tmp_path, "qwen2_moe")
    proc, log, base = _start_server(model_dir, tmp_path / "server.log")
    try:
        with pytest.raises(RuntimeError, match="server exited") as caught:
            wait_http(f"{base}/v1/models", proc, timeout=240, log_path=str(tmp_path / "server.log"))
    finally:
        stop_process(proc)
        log.close()
    text = str(caught.value)
    assert "LMDeploy's Qwen2MoeForCausalLM builds its MoE experts as float FusedMoE" in text, text
    assert text.count("ValueError: LMDeploy's Qwen2MoeForCausalLM") >= 1, text
