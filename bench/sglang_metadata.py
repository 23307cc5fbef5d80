"""Host overhead of SGLang attention metadata: ``init_forward_metadata`` for decode batches.

Every decode step SGLang calls ``attn_backend.init_forward_metadata(batch)``
before the model runs; on a fast device that host time is on the critical
path (without graphs) or in the replay prologue (with them). This script
builds SGLang's real ReqToTokenPool / MHATokenToKVPool and decode
ForwardBatches of 1, 64 and 256 requests (ragged lengths, pages scattered over
the pool) and reports microseconds per call (median and p90 of many calls)
for:

- ``maca``          maca_infer.adapters.sglang (block table from req_to_token)
- ``torch_native``  SGLang's reference backend (builds no metadata: it re-gathers
                    every request's K/V slots inside every layer instead, so
                    its near-zero figure here is paid L times per step later)
- ``triton``        SGLang's triton backend: only where its metadata kernels
                    can launch (a CUDA/MACA device); on a CPU-only host it is
                    reported as not measurable rather than timed under the
                    Triton interpreter, which would time numpy, not the host
                    overhead.

Usage:
    python -m maca_infer.bench.sglang_metadata [--page-size 16] [--iters 200] [--json]

This is a benchmark, not a test: numbers depend on the host and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

import torch

BATCH_SIZES = (1, 64, 256)


def _decode_batch(batch_size: int, page_size: int, max_context: int, device: str, seed: int = 0):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(max_context // 8, max_context // 2, (batch_size,), generator=gen)
    pages_per_req = (seq_lens + page_size - 1) // page_size
    num_pages = int(pages_per_req.sum()) + 1
    req_to_token = ReqToTokenPool(size=batch_size, max_context_len=max_context, device=device,
                                  enable_memory_saver=False)
    kv_pool = MHATokenToKVPool(size=num_pages * page_size, page_size=page_size, dtype=torch.bfloat16,
                               head_num=8, head_dim=128, layer_num=1, device=device, enable_memory_saver=False)
    page_ids = torch.randperm(num_pages - 1, generator=gen) + 1
    start = 0
    for row, (n, p) in enumerate(zip(seq_lens.tolist(), pages_per_req.tolist()), start=1):
        pos = torch.arange(n)
        slots = page_ids[start:start + p][pos // page_size] * page_size + pos % page_size
        req_to_token.req_to_token[row, :n] = slots.to(torch.int32)
        start += p
    out_cache_loc = torch.tensor(
        [int(req_to_token.req_to_token[r + 1, n - 1]) for r, n in enumerate(seq_lens.tolist())], dtype=torch.int64)
    batch = ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=batch_size,
        input_ids=torch.zeros(batch_size, dtype=torch.int64, device=device),
        req_pool_indices=torch.arange(1, batch_size + 1, device=device),
        seq_lens=seq_lens.to(device), out_cache_loc=out_cache_loc.to(device),
        seq_lens_sum=int(seq_lens.sum()), seq_lens_cpu=seq_lens,
    )
    runner = SimpleNamespace(device=device, req_to_token_pool=req_to_token, token_to_kv_pool=kv_pool)
    return batch, runner


def _time_us(fn, iters: int, sync) -> tuple[float, float]:
    for _ in range(min(20, iters)):
        fn()
    sync()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        sync()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]


def _backends(runner, device: str):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from maca_infer.adapters.sglang.attention_backend import MacaAttnBackend

    made = {"maca": MacaAttnBackend(runner), "torch_native": TorchNativeAttnBackend(runner)}
    if device == "cpu":
        made["triton"] = "not measurable here: its decode metadata launches Triton kernels (no GPU on this host)"
    else:
        made["triton"] = "not measured: building TritonAttnBackend needs a full SGLang ModelRunner context"
    return made


def run(page_size: int, iters: int, max_context: int) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for bs in BATCH_SIZES:
        batch, runner = _decode_batch(bs, page_size, max_context, device)
        for name, backend in _backends(runner, device).items():
            if isinstance(backend, str):
                rows.append({"backend": name, "batch": bs, "page_size": page_size, "median_us": None,
                             "p90_us": None, "note": backend})
                continue
            median, p90 = _time_us(lambda: backend.init_forward_metadata(batch), iters, sync)
            note = device if name != "torch_native" else f"{device}; no metadata (per-layer gathers instead)"
            rows.append({"backend": name, "batch": bs, "page_size": page_size, "median_us": round(median, 1),
                         "p90_us": round(p90, 1), "note": note})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page-size", type=int, default=16, choices=(1, 16, 32, 64))
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f"--iters={args.iters} must be >= 1")
    rows = run(args.page_size, args.iters, args.max_context)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"init_forward_metadata, decode, page_size={args.page_size}, host microseconds per call "
          f"(median / p90 of {args.iters})")
    print(f"{'backend':<14}{'batch':>6}{'median us':>12}{'p90 us':>10}  note")
    for r in rows:
        med = "-" if r["median_us"] is None else f"{r['median_us']:.1f}"
        p90 = "-" if r["p90_us"] is None else f"{r['p90_us']:.1f}"
        print(f"{r['backend']:<14}{r['batch']:>6}{med:>12}{p90:>10}  {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
