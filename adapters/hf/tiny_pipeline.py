"""Tiny Diffusers pipelines built offline from configs, with seeded random weights.

For tests and for trying the txt2img example without the hub:
- "ddpm": unconditional DDPMPipeline, a UNet2DModel (32 x 32 RGB, one
  attention down block and one attention up block, head_dim 16) and a
  DDPMScheduler;
- "sd": text-conditioned StableDiffusionPipeline: UNet2DConditionModel
  (cross-attention to the text, head_dim 16), AutoencoderKL (mid-block
  self-attention, head_dim 64), a 2-layer CLIPTextModel and a CLIPTokenizer
  whose byte-level vocabulary is generated here (no merges: one token per
  byte), PNDM scheduler; 32 x 32 images from 16 x 16 latents.

``build_tiny(kind, out_dir, seed=0)`` writes a directory that
``DiffusionPipeline.from_pretrained`` (and ``txt2img --pipeline``) loads.
The weights are random: the pictures are noise-like, the point is that every
component (and every attention) runs.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path

import torch

KINDS = ("sd", "ddpm")

# the CLIP text length the tiny tokenizer pads/truncates to
TEXT_LENGTH = 16


def _byte_level_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_clip_tokenizer():
    """A CLIPTokenizer over single bytes (and byte + "</w>" at word ends), no merges."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for char in _byte_level_chars():
        vocab[char] = len(vocab)
    for char in _byte_level_chars():
        vocab[char + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    else:  # transformers < 5: the tokenizer is read from vocab.json / merges.txt
        with tempfile.TemporaryDirectory() as folder:
            vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
            with open(vocab_file, "w", encoding="utf-8") as f:
                json.dump(vocab, f)
            with open(merges_file, "w", encoding="utf-8") as f:
                f.write("#version: 0.2\n")
            tokenizer = CLIPTokenizer(vocab_file, merges_file)
    tokenizer.model_max_length = TEXT_LENGTH
    return tokenizer


def _ddpm_pipeline():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
        norm_num_groups=32,
    )
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


def _sd_pipeline():
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,  # diffusers' UNet2DCondition reads this as the head count: 64 / 4 = head_dim 16
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_pipeline(kind: str = "sd", *, seed: int = 0):
    """The tiny pipeline object (random weights drawn with ``seed``)."""
    if kind not in KINDS:
        raise ValueError(f"tiny pipeline kind {kind!r} is not supported; allowed: {', '.join(KINDS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _sd_pipeline() if kind == "sd" else _ddpm_pipeline()


def build_tiny(kind: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny ``kind`` pipeline to ``out_dir`` (save_pretrained); returns the path."""
    out = Path(out_dir)
    pipe = build_pipeline(kind, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    return out
