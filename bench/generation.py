"""Static-inference profile through the LMDeploy pipeline on the maca device:
``maca-infer bench generation <model> --device maca -c 1 -pt 256 -ct 128``.

The same report as LMDeploy's ``benchmark/profile_generation.py`` (which
upstream removed and which never took a device): for each (concurrency,
prompt tokens, completion tokens) it runs warm-up rounds, then ``--test-round``
rounds of ``concurrency`` requests at once, and reports first-token latency
min/max/avg, per-token latency percentiles 50/75/95/99, and output and total
token throughput. Prompts are random token ids decoded to text that re-encodes
to exactly the asked length; the token counts reported are the engine's own (``input_token_len``,
``generate_token_len``), with ``ignore_eos`` so every request runs to length.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_path", help="HF model directory")
    p.add_argument("--device", default="maca", choices=["maca", "cuda", "ascend", "camb"],
                   help="PytorchEngineConfig.device_type (default maca)")
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1])
    p.add_argument("-pt", "--prompt-tokens", type=int, nargs="+", default=[256])
    p.add_argument("-ct", "--completion-tokens", type=int, nargs="+", default=[128])
    p.add_argument("-w", "--warmup-round", type=int, default=1)
    p.add_argument("-tr", "--test-round", type=int, default=3)
    p.add_argument("--block-size", type=int, default=16, help="KV cache block size (cache-block-seq-len)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16"])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--eager-mode", action="store_true")
    p.add_argument("--cache-max-entry-count", type=float, default=0.8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write all results here")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _prompt_of_length(tokenizer, length: int, rng: random.Random, vocab: list[int]) -> str:
    """Text that re-encodes to exactly ``length`` tokens (special tokens aside).

    Decoding random ids and encoding the text again merges or splits some
    tokens; re-cutting to the target a few times settles on an exact length.
    """
    ids = [rng.choice(vocab) for _ in range(length)]
    for _ in range(8):
        text = tokenizer.decode(ids)
        again = tokenizer.encode(text, add_special_tokens=False)
        if len(again) == length:
            return text
        ids = (again + [rng.choice(vocab) for _ in range(length)])[:length]
    raise RuntimeError(f"could not build a prompt of exactly {length} tokens with this tokenizer")


def _word_vocab(tokenizer, limit: int = 50000) -> list[int]:
    """Ids of whole-word tokens (" word") that decode and re-encode to themselves:
    strung together they re-encode to the same ids, so prompt lengths are exact."""
    special = set(tokenizer.all_special_ids)
    words = []
    for i in range(min(len(tokenizer), limit)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if len(text) > 1 and text[0] == " " and text[1:].isalpha() and \
                tokenizer.encode(text, add_special_tokens=False) == [i]:
            words.append(i)
    if len(words) < 16:
        raise RuntimeError(f"the tokenizer has only {len(words)} whole-word tokens: cannot build exact-length prompts")
    return words


def _prompts(tokenizer, n: int, length: int, rng: random.Random, vocab: list[int]) -> list[str]:
    return [_prompt_of_length(tokenizer, length, rng, vocab) for _ in range(n)]


def profile_one(pipe, gen_config, prompts: list[str]) -> dict:
    """One round: all prompts at once.

    A streamed chunk may carry several tokens (the engine batches detokenizer
    output): its gap since the previous chunk is shared evenly among them, so
    per-token latencies add up to each request's decode time.
    """
    start = time.perf_counter()
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    tokens = {i: 0 for i in range(len(prompts))}
    inputs = {i: 0 for i in range(len(prompts))}
    per_token: list[float] = []
    for out in pipe.stream_infer(prompts, gen_config=gen_config, do_preprocess=False):
        now = time.perf_counter()
        i = out.index
        new = out.generate_token_len - tokens[i]
        if new > 0:
            if i not in first:
                first[i] = now - start
                # its latency is the TTFT; tokens arriving with it have no gap of their own
            else:
                gap = now - last[i]
                per_token.extend([gap / new] * new)
            last[i] = now
            tokens[i] = out.generate_token_len
        inputs[i] = out.input_token_len or inputs[i]
    elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "first": list(first.values()), "per_token": per_token,
            "out_tokens": sum(tokens.values()), "in_tokens": sum(inputs.values())}


def run(args: argparse.Namespace) -> int:
    if len(args.prompt_tokens) != len(args.completion_tokens):
        raise SystemExit(f"-pt has {len(args.prompt_tokens)} values but -ct has {len(args.completion_tokens)}: "
                         "they pair one to one")
    for name in ("concurrency", "prompt_tokens", "completion_tokens"):
        bad = [v for v in getattr(args, name) if v <= 0]
        if bad:
            raise SystemExit(f"--{name.replace('_', '-')} {bad}: must be > 0")
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

    session_len = max(p + c for p, c in zip(args.prompt_tokens, args.completion_tokens)) + 16
    engine = PytorchEngineConfig(device_type=args.device, block_size=args.block_size, dtype=args.dtype,
                                 tp=args.tp, eager_mode=args.eager_mode, session_len=session_len,
                                 cache_max_entry_count=args.cache_max_entry_count,
                                 max_batch_size=max(args.concurrency))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path, trust_remote_code=True)
    vocab = _word_vocab(tokenizer)
    rng = random.Random(args.seed)
    rows = []
    with pipeline(args.model_path, backend_config=engine, log_level="ERROR") as pipe:
        for conc in args.concurrency:
            for pt, ct in zip(args.prompt_tokens, args.completion_tokens):
                gen = GenerationConfig(max_new_tokens=ct, ignore_eos=True, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p)
                for _ in range(args.warmup_round):
                    profile_one(pipe, gen, _prompts(tokenizer, conc, pt, rng, vocab))
                rounds = [profile_one(pipe, gen, _prompts(tokenizer, conc, pt, rng, vocab)) for _ in range(args.test_round)]
                first = [x for r in rounds for x in r["first"]]
                per_tok = [x for r in rounds for x in r["per_token"]]
                elapsed = sum(r["elapsed"] for r in rounds)
                out_tok = sum(r["out_tokens"] for r in rounds)
                in_tok = sum(r["in_tokens"] for r in rounds)
                rows.append({
                    "concurrency": conc, "prompt_tokens": pt, "completion_tokens": ct,
                    "first_token_latency_min_s": min(first), "first_token_latency_max_s": max(first),
                    "first_token_latency_avg_s": statistics.fmean(first),
                    **{f"per_token_latency_p{int(q * 100)}_s": _percentile(per_tok, q) for q in (0.5, 0.75, 0.95, 0.99)},
                    "output_throughput_tok_s": out_tok / elapsed,
                    "total_throughput_tok_s": (out_tok + in_tok) / elapsed,
                    "generated_tokens": out_tok, "input_tokens": in_tok,
                })
    _print(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "model": args.model_path, "results": rows},
                                              indent=2))
    return 0


def _print(rows: list[dict]) -> None:
    head = ("batch", "prompt", "output", "ftl_min", "ftl_max", "ftl_avg", "p50", "p75", "p95", "p99",
            "out tok/s", "total tok/s")
    print(("{:>7}" * 3 + "{:>10}" * 7 + "{:>12}" * 2).format(*head))
    for r in rows:
        print(("{:>7}" * 3 + "{:>10.4f}" * 7 + "{:>12.1f}" * 2).format(
            r["concurrency"], r["prompt_tokens"], r["completion_tokens"], r["first_token_latency_min_s"],
            r["first_token_latency_max_s"], r["first_token_latency_avg_s"], r["per_token_latency_p50_s"],
            r["per_token_latency_p75_s"], r["per_token_latency_p95_s"], r["per_token_latency_p99_s"],
            r["output_throughput_tok_s"], r["total_throughput_tok_s"]))
