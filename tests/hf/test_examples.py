"""The runnable examples: python -m maca_infer.adapters.hf.generate / .txt2img.

The subprocess runs start from a bare environment (only what a user would
have), so the device activation, the emulated maca device and the CLI are
all exercised; their results are checked against stock Transformers /
Diffusers computed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_module(module: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    # a user's environment: none of our variables except where the model zoo caches
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACA_INFER_") or k == "MACA_INFER_MODEL_CACHE"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_generate_cli_matches_stock_greedy(load_llm):
    from transformers import AutoTokenizer

    from maca_infer.modelzoo import get

    path = get("llama")
    prompts = ["The quick brown fox", "Hi"]
    result = _run_module(
        "maca_infer.adapters.hf.generate", "--model", str(path), "--prompt", prompts[0], "--prompt", prompts[1],
        "--max-new-tokens", "6", "--dtype", "float32", "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decoding" in result.stderr  # the progress bar
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in lines] == prompts and all(line["kernels"] == "maca" for line in lines)

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_llm("llama")
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        stock = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = stock[:, batch["input_ids"].shape[1]:].tolist()
    assert [line["token_ids"] for line in lines] == expected


@pytest.mark.slow
def test_txt2img_cli_writes_the_stock_picture(tmp_path):
    from PIL import Image

    from maca_infer.adapters.hf.txt2img import build_parser, generate_image, load_pipeline

    pipeline_dir, png = tmp_path / "tiny-sd", tmp_path / "out" / "cat.png"
    result = _run_module(
        "maca_infer.adapters.hf.txt2img", "--build-tiny", str(pipeline_dir), "--prompt", "a red cat",
        "--out", str(png), "--steps", "1", "--seed", "3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "denoising" in result.stderr  # diffusers' progress bar
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"

    # the same pipeline, prompt and seed through stock Diffusers here
    args = build_parser().parse_args(["--pipeline", str(pipeline_dir), "--prompt", "a red cat", "--out", "x.png",
                                      "--steps", "1", "--seed", "3", "--no-progress"])
    stock = generate_image(load_pipeline(str(pipeline_dir), device=torch.device("cpu")), args)
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(stock, dtype=np.int16))
    assert difference.max() <= 1  # 8-bit rounding of float images that agree to ~1e-6


def test_txt2img_unconditional_pipeline_ignores_the_prompt(tmp_path, maca_log):
    from PIL import Image

    from maca_infer.adapters.hf import txt2img

    png = tmp_path / "ddpm.png"
    code = txt2img.main(["--build-tiny", str(tmp_path / "ddpm"), "--tiny-kind", "ddpm", "--prompt", "a cat",
                         "--out", str(png), "--steps", "1", "--no-progress"])
    assert code == 0
    assert Image.open(png).size == (32, 32)
    assert any("DDPMPipeline is unconditional: the prompt is ignored" in line for line in maca_log)


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("txt2img", ["--pipeline", "somewhere"], "--out is required"),
        ("txt2img", [], "give --pipeline DIR"),
        ("txt2img", ["--build-tiny", "d", "--steps", "0"], "--steps=0 is not allowed"),
        ("txt2img", ["--pipeline", "p", "--out", "img.jpg"], "use a .png file name"),
        ("generate", ["--model", "m", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens=0 is not allowed"),
    ],
)
def test_example_argument_errors(module, argv, message, capsys):
    import importlib

    example = importlib.import_module(f"maca_infer.adapters.hf.{module}")
    assert example.main(argv) == 2
    assert message in capsys.readouterr().err


def test_tiny_pipeline_kind_is_validated():
    from maca_infer.adapters.hf.tiny_pipeline import build_pipeline

    with pytest.raises(ValueError, match="'dit' is not supported; allowed: sd, ddpm"):
        build_pipeline("dit")
