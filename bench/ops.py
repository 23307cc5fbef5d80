"""The op benchmark suite: ``python -m maca_infer.bench`` / ``maca-infer bench ops``.

For each op and real model shapes (Llama-3-8B, Qwen2.5-7B, DeepSeek-V3 MLA +
MoE, Mixtral-8x7B) it prints the two numbers every kernel owes: the bytes it
must move (each input read once, each output written once) and its FLOPs,
and the floor time those imply at the card's peak bandwidth and rate. With a
device present it then measures the kernel (CUDA/MACA events, median of
repeats) and prints achieved GB/s, TFLOP/s and measured/floor.

With no accelerator it prints the floor table and, for one decode step of a
32-layer Llama-shaped model built from our ops, what the host can measure:
kernel launches per layer (Triton kernels counted at launch under
``TRITON_INTERPRET=1``, plus the GEMMs), host syncs per step, and host
microseconds per step on the reference path; and the host microseconds of
one step's attention (``layers`` paged decode calls) with a plan made once per
step against a plan made by every call, on the reference tier and on the
Triton tier up to the launch (issue #12, part 5).

Peak figures default to those MetaX publishes for the C500 (1.8 TB/s HBM2e,
280 TFLOP/s dense fp16/bf16, 560 TOPS INT8 for the W8A8 rows); they are not
measured here: pass ``--peak-bandwidth-gbs`` / ``--peak-tflops`` /
``--peak-int8-tops`` for your card.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from maca_infer.common import envs
from maca_infer.common.ops import _dispatch

BF16 = 2  # bytes per element of the activations/weights in every case
INT8 = 1
FP32 = 4
# MetaX C500 published peaks: INT8 560 TOPS against 280 TFLOP/s dense fp16/bf16 (MACA_TARGET.md)
C500_INT8_TOPS = 560.0
C500_BF16_TFLOPS = 280.0


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    kv_lora_rank: int = 0
    rope_dim: int = 0


MODELS = {
    "llama3-8b": Model("Llama-3-8B", 4096, 32, 8, 128, 14336, 32),
    "qwen2.5-7b": Model("Qwen2.5-7B", 3584, 28, 4, 128, 18944, 28),
    "mixtral-8x7b": Model("Mixtral-8x7B", 4096, 32, 8, 128, 14336, 32, experts=8, top_k=2, moe_intermediate=14336),
    "deepseek-v3": Model("DeepSeek-V3", 7168, 128, 128, 192, 18432, 61, experts=256, top_k=8,
                         moe_intermediate=2048, kv_lora_rank=512, rope_dim=64),
}


@dataclass
class Case:
    op: str
    model: str
    shape: str
    bytes: float
    flops: float
    make: Callable[[torch.device], Callable[[], object]] | None = None
    measured_s: float | None = None
    extra: dict = field(default_factory=dict)
    # the case's math runs at rate * rate_scale: INT8 cases (W8A8) at the INT8 peak, not the bf16 one
    rate_scale: float = 1.0

    def floor_s(self, bw: float, rate: float) -> float:
        return max(self.bytes / bw, self.flops / (rate * self.rate_scale))

    def bound(self, bw: float, rate: float) -> str:
        return "memory" if self.bytes / bw >= self.flops / (rate * self.rate_scale) else "compute"


def _experts_touched(tokens: int, experts: int, top_k: int) -> float:
    """Expected distinct experts hit by ``tokens`` uniformly routed top-k picks."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def build_cases(batch: int, context: int, prefill_len: int, block_size: int, group_size: int) -> list[Case]:
    from maca_infer.common import ops

    cases: list[Case] = []
    for key, m in MODELS.items():
        T = batch
        H, D, Hq, Hk = m.hidden, m.head_dim, m.heads, m.kv_heads

        def rms(dev, T=T, H=H):
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            w = torch.randn(H, device=dev, dtype=torch.bfloat16)
            return lambda: ops.rms_norm(x, w, 1e-6)

        cases.append(Case("rms_norm", m.name, f"T={T} H={H}", 2 * T * H * BF16 + H * BF16, 4 * T * H, rms))

        def add_rms(dev, T=T, H=H):
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            r = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            w = torch.randn(H, device=dev, dtype=torch.bfloat16)
            return lambda: ops.add_rms_norm(x, r, w, 1e-6)

        cases.append(Case("add_rms_norm", m.name, f"T={T} H={H}", 4 * T * H * BF16 + H * BF16, 5 * T * H, add_rms))

        inter = m.intermediate

        def silu(dev, T=T, inter=inter):
            x = torch.randn(T, 2 * inter, device=dev, dtype=torch.bfloat16)
            return lambda: ops.silu_and_mul(x)

        cases.append(Case("silu_and_mul", m.name, f"T={T} I={inter}", 3 * T * inter * BF16, 6 * T * inter, silu))

        if not m.kv_lora_rank:
            def rope(dev, T=T, Hq=Hq, Hk=Hk, D=D):
                q = torch.randn(T, Hq, D, device=dev, dtype=torch.bfloat16)
                k = torch.randn(T, Hk, D, device=dev, dtype=torch.bfloat16)
                cache = torch.randn(8192, D, device=dev, dtype=torch.bfloat16)
                pos = torch.randint(0, 8192, (T,), device=dev)
                return lambda: ops.rotary_embedding(pos, q, k, cache, inplace=True)

            cases.append(Case("rotary_embedding", m.name, f"T={T} Hq={Hq} Hk={Hk} D={D}",
                              2 * T * (Hq + Hk) * D * BF16 + T * D * BF16 + T * 8, 3 * T * (Hq + Hk) * D, rope))

            def fill(dev, T=T, Hk=Hk, D=D):
                nblk = math.ceil(context / block_size) * batch
                k = torch.randn(T, Hk, D, device=dev, dtype=torch.bfloat16)
                v = torch.randn_like(k)
                kc = torch.zeros(nblk, block_size, Hk, D, device=dev, dtype=torch.bfloat16)
                vc = torch.zeros_like(kc)
                slots = torch.randperm(nblk * block_size, device=dev)[:T]
                return lambda: ops.fill_kv_cache(k, v, kc, vc, slots)

            cases.append(Case("fill_kv_cache", m.name, f"T={T} Hk={Hk} D={D} bs={block_size}",
                              4 * T * Hk * D * BF16 + T * 8, 0, fill))

        if m.kv_lora_rank:  # MLA: latent cache, absorbed decode
            R, P, L = m.kv_lora_rank, m.rope_dim, context
            nblk = batch * math.ceil(L / block_size)

            def mla(dev, R=R, P=P, L=L, Hq=Hq, nblk=nblk):
                q_nope = torch.randn(batch, Hq, R, device=dev, dtype=torch.bfloat16)
                q_rope = torch.randn(batch, Hq, P, device=dev, dtype=torch.bfloat16)
                cache = torch.randn(nblk, block_size, R + P, device=dev, dtype=torch.bfloat16)
                table = torch.randperm(nblk, device=dev, dtype=torch.int32).view(batch, -1)
                lens = torch.full((batch,), L, device=dev, dtype=torch.int32)
                return lambda: ops.mla_decode(q_nope, q_rope, cache, table, lens, (128 + P) ** -0.5)

            cases.append(Case("mla_decode", m.name, f"B={batch} L={L} H={Hq} R={R}+{P}",
                              batch * L * (R + P) * BF16 + batch * Hq * (2 * R + P) * BF16,
                              2 * batch * Hq * L * (R + P) + 2 * batch * Hq * L * R, mla))
        else:
            L = context
            nblk = batch * math.ceil(L / block_size)

            def decode(dev, L=L, Hq=Hq, Hk=Hk, D=D, nblk=nblk):
                q = torch.randn(batch, Hq, D, device=dev, dtype=torch.bfloat16)
                kc = torch.randn(nblk, block_size, Hk, D, device=dev, dtype=torch.bfloat16)
                vc = torch.randn_like(kc)
                table = torch.randperm(nblk, device=dev, dtype=torch.int32).view(batch, -1)
                lens = torch.full((batch,), L, device=dev, dtype=torch.int32)
                return lambda: ops.paged_decode_attention(q, kc, vc, table, lens)

            cases.append(Case("paged_decode_attention", m.name, f"B={batch} L={L} Hq={Hq} Hk={Hk} D={D}",
                              2 * batch * L * Hk * D * BF16 + 2 * batch * Hq * D * BF16,
                              4 * batch * Hq * L * D, decode))
            S = prefill_len
            pblk = math.ceil(S / block_size)

            def prefill(dev, S=S, Hq=Hq, Hk=Hk, D=D, pblk=pblk):
                q = torch.randn(S, Hq, D, device=dev, dtype=torch.bfloat16)
                kc = torch.randn(pblk, block_size, Hk, D, device=dev, dtype=torch.bfloat16)
                vc = torch.randn_like(kc)
                table = torch.arange(pblk, device=dev, dtype=torch.int32).view(1, -1)
                cu = torch.tensor([0, S], device=dev, dtype=torch.int32)
                lens = torch.tensor([S], device=dev, dtype=torch.int32)
                return lambda: ops.paged_prefill_attention(q, kc, vc, table, cu, lens)

            cases.append(Case("paged_prefill_attention", m.name, f"S={S} Hq={Hq} Hk={Hk} D={D} causal",
                              2 * S * Hq * D * BF16 + 2 * S * Hk * D * BF16,
                              4 * Hq * D * S * (S + 1) / 2, prefill))

        if m.experts:
            E, k, I = m.experts, m.top_k, m.moe_intermediate
            for moe_batch in sorted({1, min(16, batch)}):
                touched = _experts_touched(moe_batch, E, k)
                flops = 6 * moe_batch * k * H * I
                act = 2 * moe_batch * H * BF16
                dense_bytes = touched * 3 * I * H * BF16 + act
                int4_bytes = touched * (3 * I * H * 0.5 + 3 * I * H / group_size * BF16) + act

                def moe(dev, quant, E=E, k=k, I=I, H=H, T=moe_batch):
                    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
                    logits = torch.randn(T, E, device=dev, dtype=torch.float32)
                    w, ids = ops.moe_topk_softmax(logits, k, True)
                    if not quant:
                        w13 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02
                        w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * 0.02
                        return lambda: ops.fused_moe(x, w13, w2, w, ids)
                    if quant == "w8a8":
                        q13 = torch.randint(-128, 128, (E, 2 * I, H), device=dev, dtype=torch.int8)
                        q2 = torch.randint(-128, 128, (E, H, I), device=dev, dtype=torch.int8)
                        s13 = torch.rand(E, 2 * I, device=dev) * 1e-3
                        s2 = torch.rand(E, H, device=dev) * 1e-3
                        return lambda: ops.fused_moe_w8a8(x, q13, q2, s13, s2, w, ids)
                    q13 = torch.randint(0, 256, (E, 2 * I, H // 2), device=dev, dtype=torch.uint8)
                    q2 = torch.randint(0, 256, (E, H, I // 2), device=dev, dtype=torch.uint8)
                    s13 = torch.rand(E, 2 * I, H // group_size, device=dev, dtype=torch.bfloat16) * 0.01
                    s2 = torch.rand(E, H, I // group_size, device=dev, dtype=torch.bfloat16) * 0.01
                    return lambda: ops.fused_moe_w4a16(x, q13, q2, s13, s2, w, ids, group_size=group_size)

                shape = f"T={moe_batch} E={E} top{k} H={H} I={I}"
                cases.append(Case("fused_moe bf16", m.name, shape, dense_bytes, flops,
                                  lambda dev, f=moe: f(dev, False)))
                cases.append(Case(f"fused_moe w4a16 g{group_size}", m.name, shape, int4_bytes, flops,
                                  lambda dev, f=moe: f(dev, True)))
                # int8 weights plus one fp32 scale per output channel (2I of w13, H of w2)
                int8_bytes = touched * (3 * I * H * INT8 + (2 * I + H) * FP32) + act
                cases.append(Case("fused_moe w8a8", m.name, shape, int8_bytes, flops,
                                  lambda dev, f=moe: f(dev, "w8a8"), rate_scale=C500_INT8_TOPS / C500_BF16_TFLOPS))
        if key == "llama3-8b":
            K, N = H, inter * 2  # gate_up projection

            def w4(dev, K=K, N=N):
                x = torch.randn(batch, K, device=dev, dtype=torch.bfloat16)
                q = torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8)
                s = torch.rand(N, K // group_size, device=dev, dtype=torch.bfloat16) * 0.01
                return lambda: ops.w4a16_linear(x, q, s, None, group_size)

            cases.append(Case(f"w4a16_linear g{group_size}", m.name, f"T={batch} K={K} N={N}",
                              N * K * 0.5 + N * K / group_size * BF16 + batch * (K + N) * BF16,
                              2 * batch * K * N, w4))
        if key in ("llama3-8b", "deepseek-v3"):
            K, N = H, inter * 2  # gate_up projection (DeepSeek-V3: its dense MLP layers)

            def w8(dev, K=K, N=N):
                q_x = torch.randint(-127, 128, (batch, K), device=dev, dtype=torch.int8)
                x_scale = torch.rand(batch, 1, device=dev) * 1e-2
                q_w = torch.randint(-128, 128, (N, K), device=dev, dtype=torch.int8)
                w_scale = torch.rand(N, device=dev) * 1e-3
                return lambda: ops.w8a8_int8_linear(q_x, x_scale, q_w, w_scale, out_dtype=torch.bfloat16)

            cases.append(Case("w8a8_int8_linear", m.name, f"T={batch} K={K} N={N}",
                              N * K * INT8 + N * FP32 + batch * (K * INT8 + FP32) + batch * N * BF16,
                              2 * batch * K * N, w8, rate_scale=C500_INT8_TOPS / C500_BF16_TFLOPS))
    return cases


def measure(case: Case, device: torch.device, repeats: int) -> float:
    fn = case.make(device)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------- host figures

def _decode_layer(dev: torch.device, batch: int, context: int, block_size: int, m: Model):
    """One Llama-style decoder layer's decode step, built from our ops."""
    from maca_infer.common import ops

    H, D, Hq, Hk, inter = m.hidden, m.head_dim, m.heads, m.kv_heads, m.intermediate
    dt = torch.float32  # CPUs have no fast fp16 GEMM: fp32 keeps the host figure about overhead
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.05):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(dev)

    w_qkv, w_o = rnd((Hq + 2 * Hk) * D, H), rnd(H, Hq * D)
    w_gu, w_down = rnd(2 * inter, H), rnd(H, inter)
    n1, n2 = torch.ones(H, dtype=dt, device=dev), torch.ones(H, dtype=dt, device=dev)
    nblk = batch * math.ceil((context + 1) / block_size)
    kc = rnd(nblk, block_size, Hk, D)
    vc = rnd(nblk, block_size, Hk, D)
    table = torch.arange(nblk, dtype=torch.int32, device=dev).view(batch, -1)
    lens = torch.full((batch,), context + 1, dtype=torch.int32, device=dev)
    slots = (table[:, context // block_size] * block_size + context % block_size).to(torch.int64)
    cos_sin = torch.randn(context + 1, D, generator=g).to(dt).to(dev)
    pos = torch.full((batch,), context, dtype=torch.int64, device=dev)
    x = rnd(batch, H, scale=1.0)
    residual = torch.zeros_like(x)

    def step():
        h, res = ops.add_rms_norm(x, residual.clone(), n1, 1e-6)
        qkv = h @ w_qkv.t()
        q, k, v = qkv.split([Hq * D, Hk * D, Hk * D], dim=-1)
        q, k = ops.rotary_embedding(pos, q.reshape(batch, Hq, D), k.reshape(batch, Hk, D), cos_sin)
        ops.fill_kv_cache(k, v.reshape(batch, Hk, D), kc, vc, slots)
        attn = ops.paged_decode_attention(q, kc, vc, table, lens)
        o = attn.reshape(batch, Hq * D) @ w_o.t()
        h2, res = ops.add_rms_norm(o, res, n2, 1e-6)
        mlp = ops.silu_and_mul(h2 @ w_gu.t()) @ w_down.t()
        return mlp, res

    return step


GEMMS_PER_LAYER = 4  # qkv, o, gate_up, down


TINY = Model("tiny-llama", 128, 4, 2, 32, 256, 1)


def count_triton_launches(batch: int, context: int, block_size: int) -> int:
    """Triton kernel launches in one decode layer (run with TRITON_INTERPRET=1)."""
    from maca_infer.common.ops import _jit

    launches = 0
    original = _jit.lazy_jit.__getitem__

    def counting(self, grid):
        nonlocal launches
        launches += 1
        return original(self, grid)

    _jit.lazy_jit.__getitem__ = counting
    try:
        _decode_layer(torch.device("cpu"), batch, context, block_size, TINY)()
    finally:
        _jit.lazy_jit.__getitem__ = original
    return launches


def _attention_step(batch: int, context: int, block_size: int, layers: int, planned: bool):
    """One decode step's attention on TINY's shapes: ``layers`` paged_decode_attention calls.

    ``planned``: the step first makes the batch's plan (plan_paged_decode, part of the
    step) and every layer passes it; otherwise each layer makes its own (an unplanned
    call: the full input checks, split count, scratch and tier choice per layer, as
    before issue #12 part 5).
    """
    from maca_infer.common import ops
    from maca_infer.common.ops.attention import plan_paged_decode

    m, dt = TINY, torch.float32
    g = torch.Generator().manual_seed(0)
    nblk = batch * math.ceil((context + 1) / block_size)
    table = torch.arange(nblk, dtype=torch.int32).view(batch, -1)
    lens = torch.full((batch,), context + 1, dtype=torch.int32)
    caches = [(torch.randn(nblk, block_size, m.kv_heads, m.head_dim, generator=g).to(dt),
               torch.randn(nblk, block_size, m.kv_heads, m.head_dim, generator=g).to(dt)) for _ in range(layers)]
    qs = [torch.randn(batch, m.heads, m.head_dim, generator=g).to(dt) for _ in range(layers)]
    scale = m.head_dim ** -0.5

    def step():
        if planned:
            plan = plan_paged_decode(table, lens, num_q_heads=m.heads, num_kv_heads=m.kv_heads,
                                     head_dim=m.head_dim, block_size=block_size, dtype=dt)
            for q, (kc, vc) in zip(qs, caches):
                ops.paged_decode_attention(q, kc, vc, scale=scale, plan=plan)
        else:
            for q, (kc, vc) in zip(qs, caches):
                ops.paged_decode_attention(q, kc, vc, table, lens, scale=scale)

    return step


def attention_host_us(batch: int, context: int, block_size: int, layers: int, planned: bool,
                      repeats: int = 30) -> float:
    """Host µs of one decode step's attention (``_attention_step``), median of ``repeats`` after warm-up.

    On the Triton tier the kernel launches are stubbed: the figure is the path up to the
    launch, what planning changes (the launch's own cost is Triton's, the same either way).
    """
    from maca_infer.common.ops import _jit

    step = _attention_step(batch, context, block_size, layers, planned)
    original = _jit.lazy_jit.__getitem__
    _jit.lazy_jit.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)  # stub launches (triton tier)
    try:
        for _ in range(5):
            step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    finally:
        _jit.lazy_jit.__getitem__ = original
    return statistics.median(times) * 1e6


def _attention_host_figures(out: dict, prefix: str, unplanned: float, planned: float) -> None:
    out[f"{prefix}_attention_host_us_per_step_unplanned"] = unplanned
    out[f"{prefix}_attention_host_us_per_step_planned"] = planned
    out[f"{prefix}_attention_planned_speedup"] = unplanned / planned


def host_figures(batch: int, context: int, block_size: int, layers: int) -> dict:
    """Launches per layer (Triton path), syncs and host µs per step (reference path), on CPU."""
    tiny = TINY
    cpu = torch.device("cpu")
    out = {"model": f"{layers}-layer Llama-shaped decoder (hidden 128, 4x32 heads, 2 KV heads)",
           "batch": batch, "context": context, "block_size": block_size}

    # launches on the Triton path: counted in a fresh interpreter process (triton
    # reads TRITON_INTERPRET once, at import)
    env = dict(os.environ, TRITON_INTERPRET="1", MACA_INFER_OPS_IMPL="triton")
    code = (f"import json; from maca_infer.bench.ops import count_triton_launches, attention_host_us; "
            f"print(json.dumps([count_triton_launches({batch}, {context}, {block_size})] + "
            f"[attention_host_us({batch}, {context}, {block_size}, {layers}, p) for p in (False, True)]))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 0:
        launches, unplanned, planned = json.loads(proc.stdout.strip().splitlines()[-1])
        per_layer = launches + GEMMS_PER_LAYER
        out["triton_launches_per_layer"] = per_layer
        out["triton_launches_per_step"] = per_layer * layers
        _attention_host_figures(out, "triton", unplanned, planned)
    else:
        out["triton_launches_per_layer"] = None
        out["triton_launches_error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"

    # reference path: aten ops (each a launch on a device), host syncs, host time
    with envs.temporarily(MACA_INFER_OPS_IMPL="reference"):
        step = _decode_layer(cpu, batch, context, block_size, tiny)
        with _count_aten() as c:
            step()
        out["reference_aten_ops_per_layer"] = c.ops
        out["host_syncs_per_step"] = c.syncs * layers
        for _ in range(3):
            step()
        t = []
        for _ in range(20):
            t0 = time.perf_counter()
            for _ in range(layers):
                step()
            t.append(time.perf_counter() - t0)
        out["host_us_per_step_reference"] = statistics.median(t) * 1e6
        _attention_host_figures(out, "reference", attention_host_us(batch, context, block_size, layers, False),
                                attention_host_us(batch, context, block_size, layers, True))
        for planned in (False, True):
            attention = _attention_step(batch, context, block_size, layers, planned)
            with _count_aten() as c:
                attention()
            kind = "planned" if planned else "unplanned"
            out[f"reference_attention_aten_ops_per_step_{kind}"] = c.ops
            out[f"reference_attention_host_syncs_per_step_{kind}"] = c.syncs
    return out


def _count_aten():
    """A dispatch mode counting aten ops (each a launch on a device) and host syncs while active."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0
            self.syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            if func is torch.ops.aten._local_scalar_dense.default:
                self.syncs += 1  # .item() / int(tensor): waits for the device
            return func(*args, **(kwargs or {}))

    return Count()


# ---------------------------------------------------------------- report

def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1000:
            return f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} TB"


def markdown(cases: list[Case], bw: float, rate: float, device: str, host: dict | None) -> str:
    lines = [f"# maca-infer op benchmark ({device})", "",
             f"Peaks: {bw / 1e9:.0f} GB/s, {rate / 1e12:.0f} TFLOP/s"
             + "".join(sorted({f", INT8 {rate * c.rate_scale / 1e12:.0f} TOPS" for c in cases if c.rate_scale != 1.0}))
             + ". Floor = max(bytes/bandwidth, FLOPs/rate); w8a8 rows count int8 OPs at the INT8 peak.", "",
             "| op | model | shape | bytes | FLOPs | bound | floor µs | measured µs | achieved GB/s | achieved TFLOP/s | floor/measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        floor = c.floor_s(bw, rate)
        if c.measured_s:
            meas = (f"{c.measured_s * 1e6:.1f} | {c.bytes / c.measured_s / 1e9:.0f} | "
                    f"{c.flops / c.measured_s / 1e12:.2f} | {floor / c.measured_s:.0%}")
        else:
            meas = "n/a | n/a | n/a | n/a"
        lines.append(f"| {c.op} | {c.model} | {c.shape} | {_fmt_bytes(c.bytes)} | {c.flops:.3g} | "
                     f"{c.bound(bw, rate)} | {floor * 1e6:.2f} | {meas} |")
    if host:
        lines += ["", "## Host figures (no accelerator)", ""]
        lines += [f"- {k}: {v:.1f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in host.items()]
    return "\n".join(lines) + "\n"


def plot(cases: list[Case], bw: float, rate: float, path: Path) -> None:
    """Bar chart (PIL, no matplotlib): floor vs measured µs per case, log scale."""
    from PIL import Image, ImageDraw

    rows = [(f"{c.op} | {c.model} | {c.shape}", c.floor_s(bw, rate), c.measured_s) for c in cases]
    width, left, row_h = 1400, 620, 22
    img = Image.new("RGB", (width, 60 + row_h * len(rows) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "floor (blue) vs measured (orange), microseconds, log scale", fill="black")
    values = [v for _, f, m in rows for v in (f, m) if v]
    lo, hi = math.log10(min(values) * 1e6 / 2), math.log10(max(values) * 1e6 * 2)

    def x(v):
        return left + (math.log10(v * 1e6) - lo) / (hi - lo) * (width - left - 20)

    for i, (label, floor, meas) in enumerate(rows):
        y = 40 + i * row_h
        d.text((10, y + 4), label[:95], fill="black")
        d.rectangle([left, y + 3, x(floor), y + 10], fill=(60, 110, 200))
        d.text((x(floor) + 4, y + 1), f"{floor * 1e6:.2f}", fill=(60, 110, 200))
        if meas:
            d.rectangle([left, y + 12, x(meas), y + 19], fill=(230, 140, 40))
            d.text((x(meas) + 4, y + 10), f"{meas * 1e6:.1f}", fill=(230, 140, 40))
    img.save(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=64, help="decode batch (tokens for norms/activations)")
    p.add_argument("--context", type=int, default=4096, help="KV length of each decode sequence")
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--group-size", type=int, default=128, help="W4A16 quantization group")
    p.add_argument("--peak-bandwidth-gbs", type=float, default=1800.0,
                   help="memory bandwidth for the floor (default: MetaX C500 published 1.8 TB/s)")
    p.add_argument("--peak-int8-tops", type=float, default=C500_INT8_TOPS,
                   help="dense INT8 rate for the w8a8 rows' floor (default: MetaX C500 published 560 TOPS)")
    p.add_argument("--peak-tflops", type=float, default=280.0,
                   help="dense fp16/bf16 rate for the floor (default: MetaX C500 published figure)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--layers", type=int, default=32, help="decoder layers for the host figures")
    p.add_argument("--out", default="bench-out", help="folder for ops.md, ops.png, ops.json")
    p.add_argument("--no-host", action="store_true", help="skip the host figures")


def run(args: argparse.Namespace) -> int:
    for name in ("batch", "context", "prefill_len", "repeats", "layers"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0")
    bw, rate = args.peak_bandwidth_gbs * 1e9, args.peak_tflops * 1e12
    cases = build_cases(args.batch, args.context, args.prefill_len, args.block_size, args.group_size)
    for c in cases:  # INT8 rows: their floor follows --peak-int8-tops
        if c.rate_scale != 1.0:
            c.rate_scale = args.peak_int8_tops / args.peak_tflops
    on_device = torch.cuda.is_available() and torch.device("cuda").type == "cuda" and not _emulated()
    device_name = torch.cuda.get_device_name() if on_device else "no accelerator: floors only"
    if on_device:
        for c in cases:
            c.measured_s = measure(c, torch.device("cuda"), args.repeats)
    host = None if (on_device or args.no_host) else host_figures(min(args.batch, 4), 64, args.block_size,
                                                                  args.layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(cases, bw, rate, device_name, host) + tiers_markdown()
    (out / "ops.md").write_text(md)
    plot(cases, bw, rate, out / "ops.png")
    (out / "ops.json").write_text(json.dumps({
        "device": device_name, "peak_bandwidth_Bps": bw, "peak_flops": rate,
        "peak_int8_ops": args.peak_int8_tops * 1e12, "host": host,
        "cases": [{"op": c.op, "model": c.model, "shape": c.shape, "bytes": c.bytes, "flops": c.flops,
                   "floor_s": c.floor_s(bw, rate), "measured_s": c.measured_s} for c in cases],
        "tiers": _dispatch.tiers(), "fallbacks": _dispatch.fallbacks()}, indent=2))
    print(md)
    print(f"wrote {out / 'ops.md'}, {out / 'ops.png'}, {out / 'ops.json'}")
    return 0


def tiers_markdown() -> str:
    """Which tier (vendor / triton / reference) served each op measured here, and every fallback that happened."""
    tiers, fallbacks = _dispatch.tiers(), _dispatch.fallbacks()
    if not tiers and not fallbacks:
        return ""
    lines = ["", "## Tiers", "", "| op | tier |", "|---|---|"]
    lines += [f"| {op} | {tier} |" for op, tier in tiers.items()]
    if fallbacks:
        lines += ["", "**Fallbacks to the torch reference (MACA_INFER_OPS_FALLBACK=1):**", ""]
        lines += [f"- {f['op']}: {f['reason']} (inputs {f['shapes']})" for f in fallbacks]
    return "\n".join(lines) + "\n"


def _emulated() -> bool:
    try:
        from maca_infer.common.device import is_emulated

        return is_emulated()
    except ImportError:
        return False
