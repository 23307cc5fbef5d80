"""Text-to-image with Hugging Face Diffusers on the maca device.

    python -m maca_infer.adapters.hf.txt2img --pipeline DIR --prompt "a red cat" --out img.png
        [--steps 20] [--seed 0] [--guidance-scale 7.5] [--dtype auto] [--device maca] [--stock]
    python -m maca_infer.adapters.hf.txt2img --build-tiny DIR [--tiny-kind sd|ddpm]
        [--prompt ... --out img.png]

Loads a saved pipeline directory onto the maca device, puts our attention
into every model of it (``enable``; ``--stock`` keeps stock Diffusers), and
writes the first image as PNG. The progress bar is Diffusers' own.
``--build-tiny`` writes a tiny random pipeline offline (tiny_pipeline.py);
with ``--out`` it also generates from it. Unconditional pipelines (DDPM)
ignore the prompt and say so.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from maca_infer.common.log import get_logger

logger = get_logger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m maca_infer.adapters.hf.txt2img", description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", help="saved Diffusers pipeline directory (model_index.json)")
    parser.add_argument("--build-tiny", metavar="DIR", help="write a tiny random pipeline to DIR (offline)")
    parser.add_argument("--tiny-kind", default="sd", help="tiny pipeline: sd (text-conditioned, default) or ddpm")
    parser.add_argument("--prompt", default="", help="text prompt (ignored by unconditional pipelines)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--out", help="PNG file to write")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (pipeline default if unset)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float32 on CPU, the checkpoint's otherwise")
    parser.add_argument("--device", default="maca", help="'maca' (default), 'maca:N' or a torch device string")
    parser.add_argument("--stock", action="store_true", help="run stock Diffusers attention (no maca kernels)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _validate(args) -> None:
    if args.pipeline is None and args.build_tiny is None:
        raise ValueError("give --pipeline DIR (a saved pipeline) or --build-tiny DIR")
    if args.steps < 1:
        raise ValueError(f"--steps={args.steps} is not allowed; use an integer >= 1")
    if args.pipeline is not None and args.out is None:
        raise ValueError("--out is required with --pipeline (the PNG to write)")
    if args.out is not None and not args.out.lower().endswith(".png"):
        raise ValueError(f"--out={args.out!r} is not allowed; the image is written as PNG: use a .png file name")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"--{name}={value} is not allowed; use a multiple of 8")


def load_pipeline(path: str, *, device, dtype: str = "auto"):
    """DiffusionPipeline.from_pretrained(path) on ``device`` (a torch.device)."""
    import torch
    from diffusers import DiffusionPipeline

    if dtype == "auto":
        # half precision convolutions are slow or missing on CPU: an emulated device runs float32
        torch_dtype = torch.float32 if device.type == "cpu" else None
    else:
        torch_dtype = getattr(torch, dtype)
    kwargs = {}
    if torch_dtype is not None:
        # diffusers 0.42 renamed torch_dtype to dtype (the old name still works there, with a warning)
        from packaging.version import Version

        from maca_infer.common.versions import installed_version

        renamed = Version(installed_version("diffusers") or "0") >= Version("0.42")
        kwargs["dtype" if renamed else "torch_dtype"] = torch_dtype
    return DiffusionPipeline.from_pretrained(path, **kwargs).to(device)


def generate_image(pipe, args):
    """Run the pipeline once with the CLI's options; returns the first PIL image."""
    import torch

    call_params = inspect.signature(pipe.__call__).parameters
    options = {"num_inference_steps": args.steps, "output_type": "pil"}
    generator_device = "cpu"  # a CPU generator gives the same noise on every device kind
    options["generator"] = torch.Generator(generator_device).manual_seed(args.seed)
    if "prompt" in call_params:
        options["prompt"] = args.prompt
        if args.negative_prompt is not None and "negative_prompt" in call_params:
            options["negative_prompt"] = args.negative_prompt
    elif args.prompt:
        logger.info("%s is unconditional: the prompt is ignored", type(pipe).__name__)
    for name, value in (("guidance_scale", args.guidance_scale), ("height", args.height), ("width", args.width)):
        if value is not None:
            if name not in call_params:
                raise ValueError(f"--{name.replace('_', '-')} is not supported by {type(pipe).__name__}")
            options[name] = value
    pipe.set_progress_bar_config(desc="denoising", disable=args.no_progress)
    return pipe(**options).images[0]


def run(args) -> Path | None:
    import maca_infer.adapters.hf as maca_hf
    from maca_infer.adapters.hf.tiny_pipeline import build_tiny

    _validate(args)
    path = args.pipeline
    if args.build_tiny is not None:
        path = str(build_tiny(args.tiny_kind, args.build_tiny, seed=args.seed))
        print(f"tiny {args.tiny_kind} pipeline written to {path}", file=sys.stderr)
        if args.out is None:
            return None
    target = maca_hf.resolve_device(args.device)
    pipe = load_pipeline(path, device=target, dtype=args.dtype)
    if not args.stock:
        maca_hf.enable(pipe)
    image = generate_image(pipe, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    print(f"{out} ({image.width}x{image.height}, {type(pipe).__name__} on {target}, "
          f"{'stock' if args.stock else 'maca'} attention)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
