"""The vendor tier: MetaX's own kernel libraries behind maca-infer's public ops.

On a MetaX host the fastest attention, MLA and fused elementwise kernels are
MetaX's builds (/work/shared/MACA_TARGET.md, "The software on a MetaX host"):

- ``flash_attn`` 2.6.3+metax: ``flash_attn_varlen_func`` (packed prefill;
  paged prefill through its ``block_table``) and ``flash_attn_with_kvcache``
  (paged decode; pages smaller than flash-attn's 256 with
  ``MACA_SMALL_PAGESIZE_ENABLE=1``; head dim 576 for absorbed MLA, as
  DeepLink's dlinfer maca vendor calls it);
- ``flash_mla`` 1.0.1+metax: ``get_mla_metadata`` / ``flash_mla_with_kvcache``
  (absorbed MLA decode over 64-token pages);
- ``mcoplib``: vLLM-schema custom ops registered by ``import mcoplib._C`` /
  ``mcoplib._moe_C``: ``torch.ops._C.rms_norm``, ``fused_add_rms_norm``,
  ``silu_and_mul``, ``rotary_embedding``, ``torch.ops._C_cache_ops.
  reshape_and_cache_flash`` and ``torch.ops._moe_C.topk_softmax``.

Covered: varlen / paged prefill / paged decode attention, MLA decode,
prefill and latent-cache fill, KV-cache fill, RMSNorm and add-RMSNorm,
SiLU-and-mul, rotary (both forms), MoE top-k softmax.

One function per op. Each takes the same arguments as that op's Triton
launcher (``_dispatch.dispatch`` passes them), converts maca-infer's layout
to the vendor call (index dtypes, cache views, the 512 + 64 MLA split,
window and scale conventions), writes the op's outputs and returns what the
launcher returns. Before launching anything it checks that the vendor can
serve the call and otherwise raises ``_dispatch.CannotServe`` naming the
reason (library not importable; a dtype, head dim or page size the library
does not take; an option it lacks). ``_dispatch`` then moves to the Triton
tier (``auto``) or raises (``MACA_INFER_OPS_IMPL=vendor``).

Signatures follow the libraries' public docstrings (flash-attn v2.6.3's
``flash_attn_interface.py``, FlashMLA's ``flash_mla_interface.py``) and the
vLLM op schemas mcoplib registers; tests/ops/vendor_fakes holds CPU fakes
written from the same documents, and tests/ops/test_vendor_*.py checks every
marshaller against float64 math through them.
"""

from __future__ import annotations

import functools
import importlib

import torch

from maca_infer.common import envs
from maca_infer.common.ops._dispatch import CannotServe

HALF_DTYPES = (torch.float16, torch.bfloat16)
# flash-attn 2.x: head dims up to 256; pages a multiple of 256 (v2.6.3 docstring),
# or MetaX's small pages (a power of two from 16) with MACA_SMALL_PAGESIZE_ENABLE=1
FLASH_ATTN_MAX_HEAD_DIM = 256
FLASH_ATTN_PAGE_MULTIPLE = 256
SMALL_PAGE_SIZES = (16, 32, 64, 128)
# absorbed MLA through flash_attn_with_kvcache: MetaX's head dim 576 = kv_lora_rank 512 + rope 64
MLA_KV_LORA_RANK = 512
MLA_ROPE_DIM = 64
FLASH_MLA_PAGE = 64  # FlashMLA's paged cache block size

LIBRARIES = ("flash_attn", "flash_mla", "mcoplib")


# ==========================================================================
# Importing the libraries
# ==========================================================================
@functools.cache
def _import(name: str):
    """The module, or the reason it is missing (a string); cached per process (see ``forget_libraries``)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a broken vendor build is as unusable as a missing one
        return f"{name} is not importable ({type(exc).__name__}: {exc})"


def forget_libraries() -> None:
    """Drop the cached imports (tests that put fakes on sys.path, or take them away)."""
    _import.cache_clear()


def _module(name: str):
    mod = _import(name)
    if isinstance(mod, str):
        raise CannotServe(mod)
    return mod


def available() -> dict[str, bool]:
    """library -> importable, for the doctor (imports each library once)."""
    return {name: not isinstance(_import(name), str) for name in ("flash_attn", "flash_mla", "mcoplib._C")}


def _torch_op(namespace: str, name: str, module: str):
    """``torch.ops.<namespace>.<name>`` after importing ``module`` (which registers it)."""
    _module(module)
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError) as exc:
        raise CannotServe(f"{module} registered no torch.ops.{namespace}.{name} ({exc})") from None


# ==========================================================================
# Shared checks
# ==========================================================================
def _need(condition: bool, reason: str) -> None:
    if not condition:
        raise CannotServe(reason)


def _need_half(lib: str, t: torch.Tensor) -> None:
    _need(t.dtype in HALF_DTYPES, f"{lib} takes float16/bfloat16, not {str(t.dtype).replace('torch.', '')}")


def _need_page_size(block_size: int) -> None:
    if block_size % FLASH_ATTN_PAGE_MULTIPLE == 0:
        return
    if envs.maca_small_pages():
        _need(block_size in SMALL_PAGE_SIZES,
              f"flash_attn's small pages are {SMALL_PAGE_SIZES} (or a multiple of 256); block_size {block_size}")
        return
    _need(False, f"flash_attn needs a page size that is a multiple of 256, got block_size {block_size} "
                 f"(MetaX's build takes {SMALL_PAGE_SIZES} with MACA_SMALL_PAGESIZE_ENABLE=1)")


def _int32(t: torch.Tensor) -> torch.Tensor:
    """Index tensors: flash-attn and FlashMLA take contiguous int32."""
    return t.to(torch.int32).contiguous()


def _planned(plan, key: str, make):
    """``make()``, kept on a decode plan (attention.DecodePlan / mla.MLADecodePlan) for its other layers."""
    if plan is None:
        return make()
    if key not in plan._memo:
        plan._memo[key] = make()
    return plan._memo[key]


def _window(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    """maca-infer's window W (the query and W - 1 keys before it) as flash-attn's (left, right)."""
    if sliding_window is None:
        return (-1, -1)
    return (sliding_window - 1, 0) if causal else (sliding_window - 1, sliding_window - 1)


def _check_attention(q, head_dim_v, causal, logit_softcap, alibi_slopes, pad_v=False) -> None:
    """``pad_v``: a narrower value head dim is served by zero-padding v (packed K/V only, as dlinfer's
    maca vendor does for DeepSeek's 192/128 prefill); a paged cache cannot be padded per call."""
    _need_half("flash_attn", q)
    head_dim = q.shape[-1]
    _need(head_dim <= FLASH_ATTN_MAX_HEAD_DIM, f"flash_attn takes head dims up to 256, got {head_dim}")
    _need(head_dim_v == head_dim or (pad_v and head_dim_v < head_dim),
          f"flash_attn needs the value head dim to equal the key's ({head_dim_v} != {head_dim})")
    if alibi_slopes is not None:
        # flash-attn's bias is -slope * |p_i - j|; ours is slope * (j - p_i): equal only where j <= p_i
        _need(causal, "flash_attn's ALiBi bias is symmetric (-slope * |p - j|); non-causal ALiBi differs from ours")
        _need(logit_softcap is None, "flash_attn does not document the order of softcap and ALiBi")


def _lse_of_empty_rows(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn reports +inf for a row that sees no key; maca-infer's contract is -inf."""
    return lse.masked_fill(torch.isposinf(lse), float("-inf"))


# ==========================================================================
# Attention (flash_attn)
# ==========================================================================
def prefill(q, k, v, cu_seqlens_q, kv_index, block_table, max_seqlen_q, scale, causal, sliding_window,
            logit_softcap, alibi_slopes, out, paged, max_seqlen_k=None):
    """varlen_attention (``paged=False``, ``kv_index`` = cu_seqlens_k) and paged_prefill_attention
    (``paged=True``: ``k``/``v`` are the caches, ``kv_index`` = kv_seqlens) through
    ``flash_attn_varlen_func`` (its ``block_table`` argument for the paged one). The longest
    sequences are the caller's when given; otherwise one host read each (paged keys: the
    block table's capacity, an upper bound flash-attn accepts)."""
    _check_attention(q, v.shape[-1], causal, logit_softcap, alibi_slopes, pad_v=not paged)
    if paged:
        _need_page_size(k.shape[1])
        _need(k.stride(-1) == 1 and v.stride(-1) == 1, "flash_attn needs caches with a contiguous last dim")
    fa = _module("flash_attn")
    cu_q = _int32(cu_seqlens_q)
    if paged:
        kv_lens = _int32(kv_index)
        cu_k = torch.cat([kv_lens.new_zeros(1), torch.cumsum(kv_lens, 0, dtype=torch.int32)])
        max_seqlen_k = block_table.shape[1] * k.shape[1]  # an upper bound: no host sync
        table = _int32(block_table)
    else:
        cu_k = _int32(kv_index)
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
        table = None
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
    head_dim_v = v.shape[-1]
    if head_dim_v < q.shape[-1]:
        v = torch.nn.functional.pad(v, (0, q.shape[-1] - head_dim_v))
    result = fa.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
        dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=_window(sliding_window, causal),
        softcap=logit_softcap or 0.0, alibi_slopes=alibi_slopes, block_table=table,
    )
    out.copy_(result[..., :head_dim_v])
    return out


def paged_decode(q4, key_cache, value_cache, block_table, kv_seqlens, scale, sliding_window, logit_softcap,
                 alibi_slopes, num_kv_splits, out4, lse3, plan=None):
    """paged_decode_attention through ``flash_attn_with_kvcache`` (q ``[B, q_len, H, D]``, causal).

    ``plan`` (attention.DecodePlan, when the op passes one): the int32 index tensors are made once
    per batch and kept on it for the other layers."""
    _check_attention(q4, value_cache.shape[-1], True, logit_softcap, alibi_slopes)
    _need_page_size(key_cache.shape[1])
    _need(key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1,
          "flash_attn needs caches with a contiguous last dim")
    fa = _module("flash_attn")
    # num_kv_splits is a maca-infer tuning knob: flash-attn picks its own (num_splits=0)
    seqlens, table = _planned(plan, "vendor_index", lambda: (_int32(kv_seqlens), _int32(block_table)))
    result = fa.flash_attn_with_kvcache(
        q4, key_cache, value_cache, cache_seqlens=seqlens, block_table=table,
        softmax_scale=scale, causal=True, window_size=_window(sliding_window, True),
        softcap=logit_softcap or 0.0, alibi_slopes=alibi_slopes, num_splits=0,
        return_softmax_lse=lse3 is not None,
    )
    if lse3 is not None:
        result, lse = result
        lse3.copy_(_lse_of_empty_rows(lse).transpose(1, 2))  # [B, H, q_len] -> [B, q_len, H]
    out4.copy_(result)


# ==========================================================================
# Absorbed MLA decode (flash_mla, else flash_attn with head dim 576)
# ==========================================================================
def mla_decode(q_nope, q_rope, cache, block_table, kv_seqlens, scale, num_kv_splits, out, lse, plan=None):
    """mla_decode: query = [q_nope (512) | q_rope (64)] = 576 against the latent rows
    ``[num_blocks, block_size, 576]`` viewed as one KV head; the value is the
    first 512 columns of the same rows. FlashMLA serves 64-token pages; other
    page sizes go to flash_attn_with_kvcache with head dim 576."""
    kv_lora_rank, rope_dim = q_nope.shape[-1], q_rope.shape[-1]
    _need((kv_lora_rank, rope_dim) == (MLA_KV_LORA_RANK, MLA_ROPE_DIM),
          f"MetaX's MLA kernels take kv_lora_rank {MLA_KV_LORA_RANK} + rope {MLA_ROPE_DIM}, "
          f"got {kv_lora_rank} + {rope_dim}")
    _need_half("flash_mla/flash_attn", q_nope)
    batch, num_heads = q_nope.shape[:2]
    q = torch.cat([q_nope, q_rope], dim=-1).unsqueeze(1)  # [B, 1, H, 576]
    kv = cache.unsqueeze(2)  # [NB, BS, 1, 576], a view
    seqlens, table = _planned(plan, "vendor_index", lambda: (_int32(kv_seqlens), _int32(block_table)))
    block_size = cache.shape[1]
    if block_size == FLASH_MLA_PAGE and not isinstance(_import("flash_mla"), str):
        fm = _module("flash_mla")
        # FlashMLA's tile schedule depends on the lengths and head count only: once per batch with a plan
        metadata, splits = _planned(plan, "flash_mla_metadata", lambda: fm.get_mla_metadata(seqlens, num_heads, 1))
        o, l = fm.flash_mla_with_kvcache(q, kv, table, seqlens, kv_lora_rank, metadata, splits,
                                         softmax_scale=scale, causal=True)
        o = o[:, 0]
    else:
        _need_page_size(block_size)
        fa = _module("flash_attn")
        # NOTE: dlinfer's maca vendor passes a re-laid-out v_cache for 576 (key_cache.transpose(2, 3)
        # reshaped); flash-attn's documented call (v_cache = the same rows) is used here: check on a card.
        o, l = fa.flash_attn_with_kvcache(q, kv, kv, cache_seqlens=seqlens, block_table=table,
                                          softmax_scale=scale, causal=True, return_softmax_lse=True)
        o = o[:, 0, :, :kv_lora_rank]
    out.copy_(o)
    if lse is not None:
        lse.copy_(_lse_of_empty_rows(l[:, :, 0]))


def mla_prefill(q, cache, block_table, cu_seqlens_q, kv_seqlens, kv_b_proj_weight, qk_nope_head_dim, v_head_dim,
                *rest):
    """mla_prefill (non-absorbed): the latents expanded through ``kv_b_proj`` (one GEMM, the vendor
    BLAS), then ``varlen_attention``, whose own dispatch takes flash_attn (v zero-padded to the
    qk head dim) -- the composition the Triton tier uses, with flash_attn as its attention."""
    from maca_infer.common.ops import mla

    _need_half("flash_attn", q)
    _need(q.shape[-1] <= FLASH_ATTN_MAX_HEAD_DIM and v_head_dim <= q.shape[-1],
          f"flash_attn takes a qk head dim up to 256 and a value head dim not above it, "
          f"got {q.shape[-1]} / {v_head_dim}")
    return mla._mla_prefill_triton(q, cache, block_table, cu_seqlens_q, kv_seqlens, kv_b_proj_weight,
                                   qk_nope_head_dim, v_head_dim, *rest)


# ==========================================================================
# KV-cache fill, norms, activation, rotary, MoE routing (mcoplib)
# ==========================================================================
def fill_kv_cache(key, value, key_cache, value_cache, slot_mapping):
    """fill_kv_cache through ``_C_cache_ops.reshape_and_cache_flash`` (vLLM schema; slot -1 skipped)."""
    _need(value.shape[-1] == key.shape[-1], "reshape_and_cache_flash takes one head size for keys and values, "
                                            f"got {key.shape[-1]} and {value.shape[-1]}")
    for name, t in (("key", key), ("value", value)):
        _need(t.stride(1) == t.shape[2], f"reshape_and_cache_flash needs {name}'s heads packed (stride {t.stride()})")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        _need(t[0].is_contiguous(), f"reshape_and_cache_flash needs each block of {name} contiguous "
                                    f"(stride {t.stride()})")
    op = _torch_op("_C_cache_ops", "reshape_and_cache_flash", "mcoplib._C")
    one = torch.ones((), dtype=torch.float32, device=key.device)
    op(key, value, key_cache, value_cache, slot_mapping.to(torch.int64), "auto", one, one)


def fill_mla_cache(kv_c, k_pe, latent_cache, slot_mapping):
    """fill_mla_cache through ``reshape_and_cache_flash``: the row [kv_c | k_pe] is one KV head of
    the latent cache viewed ``[num_blocks, block_size, 1, L + R]``, written as key and as value
    (the same cache twice: the kernel takes two caches, MLA has one)."""
    _need(latent_cache[0].is_contiguous(), "reshape_and_cache_flash needs each block of the latent cache "
                                           f"contiguous (stride {latent_cache.stride()})")
    op = _torch_op("_C_cache_ops", "reshape_and_cache_flash", "mcoplib._C")
    row = torch.cat([kv_c, k_pe], dim=-1).unsqueeze(1)  # [T, 1, L + R]
    cache = latent_cache.unsqueeze(2)
    one = torch.ones((), dtype=torch.float32, device=kv_c.device)
    op(row, row, cache, cache, slot_mapping.to(torch.int64), "auto", one, one)


def rms_norm(x, residual, weight, eps, gemma, out):
    """rms_norm / add_rms_norm through ``_C.rms_norm(out, x, w, eps)`` / ``_C.fused_add_rms_norm(x, res, w, eps)``
    (the latter in place: ``res += x``, ``x = norm(res)``; run on ``out`` holding a copy of ``x``)."""
    _need(not gemma, "mcoplib's RMSNorm scales by weight, not Gemma's 1 + weight")
    _need(weight.dtype == x.dtype, f"mcoplib's RMSNorm takes the weight in x's dtype "
                                   f"({str(weight.dtype).replace('torch.', '')} != {str(x.dtype).replace('torch.', '')})")
    hidden = x.shape[-1]
    if residual is None:
        op = _torch_op("_C", "rms_norm", "mcoplib._C")
        op(out.view(-1, hidden), x.reshape(-1, hidden).contiguous(), weight, eps)
        return
    op = _torch_op("_C", "fused_add_rms_norm", "mcoplib._C")
    out.copy_(x)
    op(out.view(-1, hidden), residual.view(-1, hidden), weight, eps)


def act_and_mul(x, out, activation):
    """silu_and_mul through ``_C.silu_and_mul(out, x)``."""
    _need(activation == "silu", f"mcoplib's act-and-mul here is SiLU only, not {activation}")
    op = _torch_op("_C", "silu_and_mul", "mcoplib._C")
    d = out.shape[-1]
    op(out.view(-1, d), x.reshape(-1, 2 * d).contiguous())


def _cos_sin_cache(cos, sin, half_rotary):
    """[rows, R] with cos then sin: the original cache when cos/sin are its two halves (rotary_embedding)."""
    if (sin.stride() == cos.stride() and sin.shape == cos.shape
            and sin.data_ptr() == cos.data_ptr() + half_rotary * cos.element_size()):
        return cos.as_strided((cos.shape[0], 2 * half_rotary), cos.stride())
    return torch.cat([cos, sin], dim=-1)


def rotary(query, key, q_out, k_out, cos, sin, positions, half_rotary, style):
    """apply_rotary / rotary_embedding through ``_C.rotary_embedding(positions, q, k, head_size, cache, is_neox)``,
    in place on ``q_out``/``k_out`` (a copy of the inputs unless ``inplace``)."""
    _need(key is not None, "mcoplib's rotary_embedding rotates a query and a key together (key=None given)")
    for name, t in (("query", q_out), ("key", k_out)):
        _need(t.stride(1) == t.shape[2], f"mcoplib's rotary_embedding needs {name}'s heads packed "
                                         f"(stride {t.stride()})")
    cache = _cos_sin_cache(cos, sin, half_rotary)
    if positions is None:  # apply_rotary: row t of the tables belongs to token t
        positions = torch.arange(query.shape[0], device=query.device)
    elif cache.dtype != query.dtype:
        # a whole-cache conversion per call would cost more than the kernel saves
        _need(False, f"mcoplib's rotary_embedding takes cos_sin_cache in the query's dtype, got "
                     f"{str(cache.dtype).replace('torch.', '')}")
    op = _torch_op("_C", "rotary_embedding", "mcoplib._C")
    if q_out is not query:
        q_out.copy_(query)
        k_out.copy_(key)
    op(positions.to(torch.int64), q_out, k_out, query.shape[2], cache.to(query.dtype).contiguous(), style == "neox")


def moe_topk_softmax(router_logits, top_k, renormalize):
    """moe_topk_softmax through ``_moe_C.topk_softmax(weights, ids, token_expert_indices, logits)``."""
    op = _torch_op("_moe_C", "topk_softmax", "mcoplib._moe_C")
    num_tokens = router_logits.shape[0]
    device = router_logits.device
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=device)
    token_expert_indices = torch.empty((num_tokens, top_k), dtype=torch.int32, device=device)
    op(weights, ids, token_expert_indices, router_logits.float().contiguous())
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
