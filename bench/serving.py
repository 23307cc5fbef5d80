"""An OpenAI-API load generator: ``maca-infer bench serving``.

Sends requests to ``/v1/completions`` (or ``/v1/chat/completions`` with
``--chat``) at a Poisson request rate or a fixed concurrency, streaming, and
reports request throughput, input/output token throughput, TTFT, TPOT and
ITL (mean / median / P99) and the errors counted, like
``sglang.bench_serving`` and LMDeploy's ``profile_restful_api.py``.

Datasets: ``random`` (prompts of ``--input-len`` tokens drawn from the
tokenizer's vocabulary when ``--tokenizer`` is given, else words) or
``sharegpt`` (a local ShareGPT-format JSON: a list of objects with
``conversations`` [{from, value}, ...]; the first human turn is the prompt,
the first gpt turn's length the output length).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly "
         "judge boxing matches near the old river bank during winter").split()


@dataclass
class Request:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def _tokenizer(path: str | None):
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=True)


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float, tokenizer, seed: int) -> list[Request]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        lo = max(1, int(input_len * range_ratio))
        ilen = rng.randint(lo, input_len)
        olen = rng.randint(max(1, int(output_len * range_ratio)), output_len)
        if tokenizer is not None:
            special = set(tokenizer.all_special_ids)
            vocab = [i for i in range(min(len(tokenizer), 50000)) if i not in special]
            ids = [rng.choice(vocab) for _ in range(ilen)]
            prompt = tokenizer.decode(ids)
            ilen = len(tokenizer.encode(prompt, add_special_tokens=False))
        else:
            prompt = " ".join(rng.choice(WORDS) for _ in range(ilen))
        reqs.append(Request(prompt, ilen, olen))
    return reqs


def sharegpt_requests(path: Path, n: int, tokenizer, fixed_output_len: int | None, seed: int) -> list[Request]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    pairs = []
    for item in data:
        conv = item.get("conversations") or item.get("conversation") or []
        human = next((t["value"] for t in conv if t.get("from") in ("human", "user")), None)
        gpt = next((t["value"] for t in conv if t.get("from") in ("gpt", "assistant")), None)
        if human and gpt:
            pairs.append((human, gpt))
    if not pairs:
        raise ValueError(f"{path}: no ShareGPT conversations (objects with conversations: [{{from, value}}])")
    rng = random.Random(seed)
    rng.shuffle(pairs)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer else len(text.split())

    return [Request(h, count(h), fixed_output_len or max(1, count(g))) for h, g in pairs[:n]]


async def _one(session, url: str, model: str, req: Request, chat: bool, temperature: float, ignore_eos: bool) -> Result:
    import aiohttp

    payload = {"model": model, "max_tokens": req.output_len, "temperature": temperature, "stream": True,
               "stream_options": {"include_usage": True}}
    if ignore_eos:
        payload["ignore_eos"] = True
    if chat:
        payload["messages"] = [{"role": "user", "content": req.prompt}]
        endpoint = f"{url}/v1/chat/completions"
    else:
        payload["prompt"] = req.prompt
        endpoint = f"{url}/v1/completions"
    res = Result(prompt_tokens=req.prompt_len)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with session.post(endpoint, json=payload) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                usage = msg.get("usage")
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens") or res.prompt_tokens
                    res.output_tokens = usage.get("completion_tokens") or res.output_tokens
                choices = msg.get("choices") or []
                if not choices:
                    continue
                delta = choices[0].get("delta", {}).get("content") if chat else choices[0].get("text")
                if not delta:
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
        res.latency = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = chunks > 0 or res.output_tokens > 0
        if not res.ok:
            res.error = "empty response"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def _run(url: str, model: str, reqs: list[Request], rate: float, concurrency: int | None, chat: bool,
               temperature: float, ignore_eos: bool, progress: bool, seed: int, timeout: float):
    import aiohttp

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(reqs), desc="requests", unit="req")
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(seed)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def task(req):
            if sem:
                async with sem:
                    r = await _one(session, url, model, req, chat, temperature, ignore_eos)
            else:
                r = await _one(session, url, model, req, chat, temperature, ignore_eos)
            if bar:
                bar.update(1)
            return r

        start = time.perf_counter()
        tasks = []
        for req in reqs:
            tasks.append(asyncio.create_task(task(req)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if bar:
        bar.close()
    return results, duration


def _stats(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    xs = sorted(v * scale for v in values)
    p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
    return {"mean": statistics.fmean(xs), "median": statistics.median(xs), "p99": p99}


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "input_throughput": sum(r.prompt_tokens for r in ok) / duration if duration else 0.0,
        "output_throughput": sum(r.output_tokens for r in ok) / duration if duration else 0.0,
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": sum(r.output_tokens for r in ok),
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2e_latency_ms": _stats([r.latency for r in ok]),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:23333")
    p.add_argument("--model", help="model name (default: the first of /v1/models)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    p.add_argument("--dataset-path", help="ShareGPT-format JSON file (for --dataset sharegpt)")
    p.add_argument("--tokenizer", help="tokenizer dir (token counts, random prompts from its vocabulary)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=1.0, help="random lengths in [ratio*len, len]")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default 1.0: 0.0 sporadically gives NaN on MACA)")
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-session total timeout (s)")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0")
    if not 0 < args.range_ratio <= 1:
        raise SystemExit(f"--range-ratio {args.range_ratio}: must be in (0, 1]")
    if args.request_rate <= 0:
        raise SystemExit(f"--request-rate {args.request_rate}: must be > 0 (inf = all at once)")
    url = args.url.rstrip("/").removesuffix("/v1")
    tokenizer = _tokenizer(args.tokenizer)
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise SystemExit("--dataset sharegpt needs --dataset-path FILE (no downloads here)")
        reqs = sharegpt_requests(Path(args.dataset_path), args.num_prompts, tokenizer, None, args.seed)
    else:
        reqs = random_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio, tokenizer, args.seed)
    model = args.model
    if model is None:
        import requests

        model = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    results, duration = asyncio.run(_run(url, model, reqs, args.request_rate, args.max_concurrency, args.chat,
                                         args.temperature, not args.no_ignore_eos, not args.no_progress,
                                         args.seed, args.timeout))
    summary = summarize(results, duration)
    summary.update(url=url, model=model, dataset=args.dataset, request_rate=args.request_rate,
                   max_concurrency=args.max_concurrency)
    _print(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if summary["completed"] else 1


def _print(s: dict) -> None:
    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}"

    print("============ Serving Benchmark Result ============")
    print(f"{'Successful requests:':<40}{s['completed']}")
    print(f"{'Failed requests:':<40}{s['errors']}")
    for e in s["error_samples"]:
        print(f"  error: {e}")
    print(f"{'Benchmark duration (s):':<40}{s['duration_s']:.2f}")
    print(f"{'Total input tokens:':<40}{s['total_input_tokens']}")
    print(f"{'Total generated tokens:':<40}{s['total_output_tokens']}")
    print(f"{'Request throughput (req/s):':<40}{s['request_throughput']:.2f}")
    print(f"{'Input token throughput (tok/s):':<40}{s['input_throughput']:.2f}")
    print(f"{'Output token throughput (tok/s):':<40}{s['output_throughput']:.2f}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2e_latency_ms", "End-to-end Latency")):
        print(f"---------------{title}---------------")
        for stat in ("mean", "median", "p99"):
            print(f"{stat.capitalize() + ' (ms):':<40}{fmt(s[key][stat])}")
    print("==================================================")


def as_dict(r: Result) -> dict:
    return asdict(r)
