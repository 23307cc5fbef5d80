"""Text generation with Hugging Face Transformers on the maca device.

    python -m maca_infer.adapters.hf.generate --model DIR --prompt "Hello" [--prompt ...]
        [--max-new-tokens 32] [--dtype auto] [--device maca] [--chat] [--stock] [--json]

Loads the checkpoint onto the maca device (``device_map`` from our device
resolver), swaps our kernels in (``enable``; ``--stock`` keeps stock
Transformers for comparison), and decodes greedily (``--temperature`` > 0
samples). Several prompts are left-padded into one batch. A progress bar
counts decode steps on stderr; completions go to stdout (``--json``: one
JSON object per prompt with the generated token ids).
"""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = ("auto", "float32", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m maca_infer.adapters.hf.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json + tokenizer)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the checkpoint's dtype")
    parser.add_argument("--device", default="maca", help="'maca' (default), 'maca:N' or a torch device string")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stock", action="store_true", help="run stock Transformers (no maca kernels)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


class _ProgressStreamer:
    """A generate() streamer that advances a progress bar by one per decode step."""

    def __init__(self, total: int, disable: bool) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc="decoding", unit="tok", disable=disable, file=sys.stderr)
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        self._bar.update(1)

    def end(self) -> None:
        self._bar.close()


def _validate(args) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is not allowed; use an integer >= 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature={args.temperature} is not allowed; use 0 (greedy) or a positive value")


def run(args) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import maca_infer.adapters.hf as maca_hf
    from maca_infer.adapters.hf import _compat

    _validate(args)
    target = maca_hf.resolve_device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, **_compat.dtype_kwargs(dtype), device_map=maca_hf.device_map(target)
    ).eval()
    if not args.stock:
        maca_hf.enable(model)
    texts = args.prompt
    if args.chat:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in texts
        ]
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(target)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    streamer = _ProgressStreamer(args.max_new_tokens, disable=args.no_progress)
    with torch.no_grad():
        output = model.generate(
            **batch, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            streamer=streamer, **sampling,
        )
    new_tokens = output[:, batch["input_ids"].shape[1]:].cpu()
    results = []
    for prompt, ids in zip(args.prompt, new_tokens.tolist()):
        results.append({
            "prompt": prompt,
            "completion": tokenizer.decode(ids, skip_special_tokens=True),
            "token_ids": ids,
            "device": str(target),
            "kernels": "stock" if args.stock else "maca",
        })
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for result in results:
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['prompt']}{result['completion']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
