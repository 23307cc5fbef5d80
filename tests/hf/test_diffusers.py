"""Diffusers models and pipelines with our attention vs stock Diffusers (the reference).

Tiny models built offline: the text-conditioned Stable Diffusion pipeline
(UNet2DCondition cross-attention, VAE mid-block attention), a UNet2D, and a
Flux transformer (the dispatcher path: set_attention_backend("maca")).
"""

from __future__ import annotations

import pytest
import torch

import maca_infer.adapters.hf as maca_hf
from maca_infer.adapters.hf import _compat, diffusers_attention, transformers_kernels
from maca_infer.adapters.hf.tiny_pipeline import build_pipeline

IMAGE_ATOL = 1e-4  # float32 images in [0, 1]


needs_dispatcher = pytest.mark.skipif(not diffusers_attention.has_dispatcher(),
                                      reason="the attention dispatcher needs diffusers >= 0.35")


@pytest.fixture(scope="module")
def sd_pipe():
    pipe = build_pipeline("sd").to(maca_hf.device())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd_image(pipe):
    # one step keeps the CPU cost low; classifier-free guidance makes it a batch of two
    return pipe("a red cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_text_to_image_pipeline_matches_stock_and_round_trips(sd_pipe, op_calls, maca_log):
    pipe = sd_pipe
    stock = _sd_image(pipe)
    maca_hf.enable(pipe)
    assert maca_hf.is_enabled(pipe)
    assert transformers_kernels.is_enabled(pipe.text_encoder)  # CLIP: our attention, its own norms
    if _compat.has_attention_interface():
        assert pipe.text_encoder.config._attn_implementation == "maca"
    ours = _sd_image(pipe)
    assert op_calls["varlen_attention"] > 0
    assert not any("runs for these calls" in line for line in maca_log), maca_log  # no fallback anywhere
    assert abs(ours - stock).max() <= IMAGE_ATOL
    maca_hf.disable(pipe)
    assert not maca_hf.is_enabled(pipe)
    assert pipe.text_encoder.config._attn_implementation == "sdpa"
    assert (_sd_image(pipe) == stock).all()


def test_unet2d_attention_blocks(op_calls):
    from diffusers import UNet2DModel

    unet = build_pipeline("ddpm").unet.eval()
    sample = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = unet(sample, 10).sample
        maca_hf.enable(unet)
        ours = unet(sample, 10).sample
        maca_hf.disable(unet)
        back = unet(sample, 10).sample
    assert isinstance(unet, UNet2DModel)
    assert op_calls["varlen_attention"] > 0
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)
    assert torch.equal(back, stock)


def test_cross_attention_with_a_text_padding_mask(sd_pipe, op_calls):
    """encoder_attention_mask [B, M] (diffusers turns it into a -10000 bias): packed as key padding."""
    unet = sd_pipe.unet.eval()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    text = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    text_mask = torch.ones(2, 16)
    text_mask[1, 6:] = 0
    with torch.no_grad():
        stock = unet(latents, 5, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample
        maca_hf.enable(unet)
        try:
            ours = unet(latents, 5, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample
        finally:
            maca_hf.disable(unet)
    assert op_calls["varlen_attention"] > 0
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()
    generator = torch.Generator().manual_seed(4)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 4, generator=generator),
        encoder_hidden_states=torch.randn(2, 6, 32, generator=generator),
        pooled_projections=torch.randn(2, 32, generator=generator),
        timestep=torch.tensor([0.5, 0.5]),
        img_ids=torch.randn(16, 3, generator=generator),
        txt_ids=torch.zeros(6, 3),
        return_dict=False,
    )
    return model, inputs


@needs_dispatcher
def test_dispatcher_backend_for_transformer_models(op_calls):
    from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend

    model, inputs = _tiny_flux()
    with torch.no_grad():
        stock = model(**inputs)[0]
        maca_hf.enable(model)
        assert all(p._attention_backend == "maca" for p in model.attn_processors.values())
        ours = model(**inputs)[0]
        maca_hf.disable(model)
        assert torch.equal(model(**inputs)[0], stock)
        calls = op_calls["varlen_attention"]
        assert calls > 0
        torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)

        # the framework's own switches reach our backend too
        maca_hf.register_attention()
        assert AttentionBackendName("maca").value == "maca"
        model.set_attention_backend("maca")
        torch.testing.assert_close(model(**inputs)[0], stock, atol=1e-4, rtol=1e-4)
        model.reset_attention_backend()
        with attention_backend("maca"):
            torch.testing.assert_close(model(**inputs)[0], stock, atol=1e-4, rtol=1e-4)
        assert op_calls["varlen_attention"] > calls
    maca_hf.unregister_attention()
    assert "maca" not in AttentionBackendName._value2member_map_
    with pytest.raises(ValueError):
        model.set_attention_backend("maca")


@needs_dispatcher
def test_dispatcher_backend_key_padding_and_fallbacks(maca_log):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]
    generator = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(2, length, 2, 32, generator=generator) for length in (5, 7, 7))
    key_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    ours = diffusers_attention.maca_dispatch_attention(query, key, value, attn_mask=key_mask)
    torch.testing.assert_close(ours, native(query, key, value, attn_mask=key_mask), atol=1e-5, rtol=1e-5)
    # a float bias is not a mask our kernel can take: the native backend runs, said once
    bias = torch.randn(2, 1, 5, 7, generator=generator)
    fallback = diffusers_attention.maca_dispatch_attention(query, key, value, attn_mask=bias)
    assert torch.equal(fallback, native(query, key, value, attn_mask=bias))
    assert sum("native backend runs" in line for line in maca_log) == 1


def test_versions_are_checked_for_diffusers(monkeypatch):
    from maca_infer.common import versions

    unet = build_pipeline("ddpm").unet
    monkeypatch.setitem(versions.SUPPORTED, "diffusers", (">=99", "test"))
    with pytest.raises(RuntimeError, match=r"diffusers .* outside the supported range >=99"):
        maca_hf.enable(unet)
    assert not maca_hf.is_enabled(unet)


def test_pipeline_enable_is_all_or_nothing(sd_pipe, monkeypatch):
    real_enable = diffusers_attention.enable_model

    def failing_on_the_vae(model):
        if type(model).__name__ == "AutoencoderKL":
            raise RuntimeError("simulated failure")
        return real_enable(model)

    monkeypatch.setattr(diffusers_attention, "enable_model", failing_on_the_vae)
    with pytest.raises(RuntimeError, match="simulated failure"):
        maca_hf.enable(sd_pipe)
    assert not maca_hf.is_enabled(sd_pipe)
    assert sd_pipe.text_encoder.config._attn_implementation == "sdpa"
