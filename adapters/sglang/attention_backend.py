"""SGLang attention backend "maca": paged attention and MLA over SGLang's KV pools.

SGLang (0.5.x) keeps the KV cache as one flat token pool per layer:

    MHATokenToKVPool   k_buffer[l] [size + page_size, Hk, D], v_buffer[l] [.., Hk, Dv]
    MLATokenToKVPool   kv_buffer[l] [size + page_size, 1, kv_lora_rank + rope_dim]

and maps a request's token positions to slots with
``ReqToTokenPool.req_to_token[req, pos]`` (int32). With ``page_size`` P a slot
is ``page * P + offset`` and the pool's slots of one page are contiguous, so
the flat buffer *is* a paged cache ``[NB, P, H, D]`` (NB = (size + P) / P) and
a request's block table is ``req_to_token[req, 0::P] // P``. With P == 1 the
block table is the slot list itself (one-token blocks). That view lets the
backend call maca_infer.common.ops directly, without copying K/V:

    decode   paged_decode_attention(q [B, Hq, D], ..., block_table, kv_seqlens)
    extend   paged_prefill_attention(q [T, Hq, D], ..., cu_seqlens_q, kv_seqlens)
             (new tokens' K/V are written first, so kv_seqlens = prefix + new)
    MLA      mla_decode over the latent cache (absorbed q), for decode and for
             extend with a cached prefix (one decode row per new token, row i
             of sequence b sees kv_len_b - q_len_b + i + 1 latents: causal);
             varlen_attention for the non-absorbed MHA prefill SGLang's
             DeepSeek models run when no prefix is cached.

Metadata is built once per forward (``init_forward_metadata``) from host-side
lengths (``seq_lens_cpu``), so building it never waits on the device. For
graph capture the decode metadata lives in static buffers
(``init_cuda_graph_state``) refreshed in ``init_forward_metadata_out_graph``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from maca_infer.common import ops
from maca_infer.common.log import get_logger

if TYPE_CHECKING:  # pragma: no cover - typing only
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = get_logger(__name__)

BACKEND_NAME = "maca"
SUPPORTED_PAGE_SIZES = (1, 16, 32, 64)
SUPPORTED_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GATHER_BLOCK = 16  # block size of the latents gathered for page_size 1 (mla_decode needs >= 8)


def _check_heads_match_pool(model, pool) -> None:
    """Every attention layer must hold as many KV heads per rank as the pool stores, checked once at start-up.

    SGLang sizes the KV pool by the attention-TP size, and with DP attention
    (``--enable-dp-attention``: attention TP = tp / dp) a model must split its
    heads the same way. Models written for plain TP only (in SGLang 0.5.x e.g.
    Llama, Qwen2, Mixtral) split heads over the whole ``--tp`` group instead,
    which would write K/V of the wrong width and reduce o_proj across
    different DP batches: refuse with the reason instead of serving wrong text.
    """
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    if type(pool) is not MHATokenToKVPool:
        return
    for module in model.modules():
        if not isinstance(module, RadixAttention) or module.is_cross_attention:
            continue
        if module.tp_k_head_num == pool.head_num:
            continue
        arch = type(model).__name__
        from sglang.srt.runtime_context import get_parallel

        par = get_parallel()
        if par.attn_tp_size != par.tp_size:
            raise ValueError(
                f"maca attention backend: {arch} does not support DP attention in this SGLang: its layers split "
                f"attention heads over the whole tp group (tp={par.tp_size}: {module.tp_k_head_num} KV heads per "
                f"rank) while DP attention gives each rank attention-TP size {par.attn_tp_size} "
                f"({pool.head_num} KV heads). Serve it without --enable-dp-attention (plain --tp / --dp), or use a "
                "model family whose SGLang implementation supports DP attention (e.g. Qwen3, Qwen2-MoE, Qwen3-MoE, "
                "DeepSeek-V2/V3)."
            )
        raise ValueError(
            f"maca attention backend: layer {module.layer_id} of {arch} has {module.tp_k_head_num} KV heads per "
            f"rank but the KV pool stores {pool.head_num}"
        )


def _base_class():
    # Imported lazily: installing maca-infer never forces SGLang.
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    return AttentionBackend


@dataclass
class MacaForwardMetadata:
    """Per-forward attention metadata shared by every layer.

    block_table  int32 [B, max_pages]  page ids (slot ids when page_size == 1)
    kv_seqlens   int32 [B]             tokens each request attends to (prefix + new)
    cu_seqlens_q int32 [B + 1]         extend only: prefix sums of new tokens
    max_seqlen_q / max_kv_seqlen       host ints (no device sync in the kernels)
    token_rows / token_kv_seqlens  MLA extend only: request of each new token, and
                                   how many latents that token sees
    plans        the ops' per-batch plans (paged decode, MLA decode) and what they read,
                 made by the first layer that needs each and reused by the others
    """

    block_table: torch.Tensor
    kv_seqlens: torch.Tensor
    max_kv_seqlen: int
    cu_seqlens_q: Optional[torch.Tensor] = None
    max_seqlen_q: int = 1
    has_prefix: bool = False
    token_rows: Optional[torch.Tensor] = None
    token_kv_seqlens: Optional[torch.Tensor] = None
    plans: dict = field(default_factory=dict, repr=False)

    def plan(self, key, make):
        """The batch's plan under ``key``, made by ``make()`` the first time (once per forward)."""
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = make()
        return plan


def build_block_table(
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, max_kv_seqlen: int, page_size: int
) -> torch.Tensor:
    """Block table of a batch from SGLang's request-to-slot map.

    req_to_token      int32 [R, max_context_len]   slot of each token position
    req_pool_indices  int   [B]                    row of each request
    returns           int32 [B, ceil(max_kv_seqlen / page_size)]

    Column j holds slot(j * page_size) // page_size: SGLang allocates whole
    pages, so the first slot of a page names it. Columns past a request's
    length hold stale ids that the kernels never read (kv_seqlens bounds them).
    """
    num_cols = min(max(1, -(-max_kv_seqlen // page_size)) * page_size, req_to_token.shape[1])
    # gather only the first slot of each page (a strided view, then one row gather)
    first_slots = req_to_token[:, :num_cols:page_size].index_select(0, req_pool_indices.long())
    if page_size == 1:
        return first_slots if first_slots.dtype == torch.int32 else first_slots.to(torch.int32)
    # page sizes are powers of two: slot >> log2(P) == slot // P
    return first_slots.bitwise_right_shift_(page_size.bit_length() - 1).to(torch.int32)


def _max_seq_len(forward_batch: "ForwardBatch") -> int:
    """Longest sequence of the batch as a host int, without a device sync when SGLang has it."""
    lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
    return int(lens.max()) if lens.numel() else 0


def _window_for_ops(layer: "RadixAttention") -> Optional[int]:
    # SGLang's window W shows key j to query i iff i - W <= j <= i (W + 1
    # keys); the ops' convention is i - W' < j <= i, so W' = W + 1.
    size = layer.sliding_window_size
    if size is None or size < 0:
        return None
    return size + 1


def _softcap_for_ops(layer: "RadixAttention") -> Optional[float]:
    if not layer.logit_cap or layer.logit_cap <= 0:
        return None
    method = getattr(layer, "logit_capping_method", "tanh")
    if method != "tanh":
        raise ValueError(
            f"maca attention backend: logit_capping_method={method!r} is not supported; allowed: tanh"
        )
    return float(layer.logit_cap)


def _deterministic_inference() -> bool:
    """SGLang's ``--enable-deterministic-inference`` for this server (False with no server config)."""
    from sglang.srt.runtime_context import get_exec

    try:
        return bool(get_exec().deterministic.enable_deterministic_inference)
    except ValueError:  # config namespace not published: a backend built outside a server
        return False


class _MacaBackendBase:
    """Metadata shared by the MHA and MLA backends (mixed into AttentionBackend)."""

    def _init_common(self, model_runner) -> None:
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.page_size = int(getattr(self.token_to_kv_pool, "page_size", 1) or 1)
        if self.page_size not in SUPPORTED_PAGE_SIZES:
            raise ValueError(
                f"maca attention backend: page_size={self.page_size} is not supported; "
                f"allowed: {', '.join(map(str, SUPPORTED_PAGE_SIZES))}"
            )
        kv_dtype = getattr(self.token_to_kv_pool, "dtype", None)
        if kv_dtype is not None and kv_dtype not in SUPPORTED_KV_DTYPES:
            raise ValueError(
                f"maca attention backend: kv cache dtype {kv_dtype} is not supported; "
                "allowed: float16, bfloat16, float32 (use --kv-cache-dtype auto)"
            )
        self.max_context_len = int(self.req_to_token_pool.req_to_token.shape[1])
        self.forward_metadata: Optional[MacaForwardMetadata] = None
        # static decode buffers for graph capture (init_cuda_graph_state)
        self.graph_block_table: Optional[torch.Tensor] = None
        self.graph_kv_seqlens: Optional[torch.Tensor] = None
        # --enable-deterministic-inference promises batch invariance: the
        # decode kernels' auto split-KV count follows the batch size and the
        # batch's longest context, so it is pinned to one split there (the
        # torch references on the emulated device ignore it).
        self.decode_kv_splits: Optional[int] = 1 if _deterministic_inference() else None

    # -- metadata -----------------------------------------------------------

    def _build_metadata(self, forward_batch: "ForwardBatch") -> MacaForwardMetadata:
        mode = forward_batch.forward_mode
        bs = forward_batch.batch_size
        req_to_token = self.req_to_token_pool.req_to_token
        if bs == 0 or mode.is_idle():
            # DP attention: an idle rank still runs the layers on 0 tokens.
            empty = torch.zeros((0, 1), dtype=torch.int32, device=req_to_token.device)
            return MacaForwardMetadata(empty, empty.new_zeros((0,)), 0, empty.new_zeros((1,)), 0)
        if mode.is_target_verify() or mode.is_draft_extend_v2() or forward_batch.spec_info is not None:
            raise NotImplementedError(
                f"maca attention backend: forward mode {mode.name} (speculative decoding) is not supported"
            )
        max_kv = _max_seq_len(forward_batch)
        block_table = build_block_table(req_to_token, forward_batch.req_pool_indices, max_kv, self.page_size)
        kv_seqlens = forward_batch.seq_lens.to(torch.int32)
        if mode.is_decode():
            return MacaForwardMetadata(block_table, kv_seqlens, max_kv)
        if not mode.is_extend():
            raise NotImplementedError(f"maca attention backend: forward mode {mode.name} is not supported")
        q_lens_host = forward_batch.extend_seq_lens_cpu
        if q_lens_host is None:
            q_lens_host = forward_batch.extend_seq_lens.tolist()
        prefix_host = forward_batch.extend_prefix_lens_cpu
        has_prefix = any(prefix_host) if prefix_host is not None else True
        cu_seqlens_q = torch.zeros(bs + 1, dtype=torch.int32, device=kv_seqlens.device)
        torch.cumsum(forward_batch.extend_seq_lens.to(torch.int32), 0, out=cu_seqlens_q[1:])
        return MacaForwardMetadata(
            block_table,
            kv_seqlens,
            max_kv,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=max(q_lens_host) if q_lens_host else 0,
            has_prefix=has_prefix,
        )

    def init_forward_metadata(self, forward_batch: "ForwardBatch"):
        self.forward_metadata = self._build_metadata(forward_batch)

    # -- graph capture hooks --------------------------------------------------

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        max_pages = -(-self.max_context_len // self.page_size)
        device = self.req_to_token_pool.req_to_token.device
        self.graph_block_table = torch.zeros((max_bs, max_pages), dtype=torch.int32, device=device)
        self.graph_kv_seqlens = torch.ones((max_bs,), dtype=torch.int32, device=device)

    def init_forward_metadata_out_graph(self, forward_batch: "ForwardBatch", in_capture: bool = False):
        """Decode metadata in the static graph buffers (capture and replay)."""
        mode = forward_batch.forward_mode
        if not mode.is_decode_or_idle():
            raise NotImplementedError(
                f"maca attention backend: graph capture of {mode.name} batches is not supported (decode only)"
            )
        if self.graph_block_table is None:
            raise RuntimeError("maca attention backend: init_cuda_graph_state was not called before capture")
        bs = forward_batch.batch_size
        max_kv = max(1, _max_seq_len(forward_batch))
        table = build_block_table(
            self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, max_kv, self.page_size
        )
        self.graph_block_table[:bs, : table.shape[1]].copy_(table)
        self.graph_kv_seqlens[:bs].copy_(forward_batch.seq_lens[:bs])
        # Kernels read the full-width static table: shapes stay fixed across replays.
        self.forward_metadata = MacaForwardMetadata(
            self.graph_block_table[:bs], self.graph_kv_seqlens[:bs], self.max_context_len
        )

    def get_cuda_graph_seq_len_fill_value(self):
        # Padded rows attend to one (padding) token: finite softmax, output ignored.
        return 1

    def get_cpu_graph_seq_len_fill_value(self):
        # SGLang asks this name when it pads batches of host tensors (DP attention
        # on the emulated device): same answer.
        return 1

    def support_triton(self):
        return False

    # -- helpers --------------------------------------------------------------

    def _paged_view(self, buffer: torch.Tensor) -> torch.Tensor:
        """[size + P, H, D] flat pool buffer -> [NB, P, H, D] without a copy."""
        rows = buffer.shape[0]
        if rows % self.page_size:
            raise ValueError(
                f"maca attention backend: KV buffer has {rows} rows, not a multiple of page_size={self.page_size}"
            )
        return buffer.view(rows // self.page_size, self.page_size, *buffer.shape[1:])


class MacaAttnBackend(_MacaBackendBase, _base_class()):
    """AttentionBackend for MHA / GQA / MQA models on the maca device."""

    def __init__(self, model_runner):
        super().__init__()
        self._init_common(model_runner)
        model = getattr(model_runner, "model", None)  # a real runner has loaded it by now
        if model is not None:
            _check_heads_match_pool(model, self.token_to_kv_pool)

    def _store_kv(self, layer, forward_batch, k, v) -> None:
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        from maca_infer.adapters.sglang.compat import kv_write_loc

        pool = self.token_to_kv_pool
        loc = forward_batch.out_cache_loc if not layer.is_cross_attention else forward_batch.encoder_out_cache_loc
        plain_pool = type(pool) is MHATokenToKVPool and pool.store_dtype == pool.dtype
        if plain_pool and self.page_size >= 8 and getattr(layer, "k_scale", None) is None:
            # our paged fill kernel writes straight into the pool's pages
            k_cache = self._paged_view(pool.get_key_buffer(layer.layer_id))
            v_cache = self._paged_view(pool.get_value_buffer(layer.layer_id))
            ops.fill_kv_cache(
                k.view(-1, layer.tp_k_head_num, layer.qk_head_dim).to(k_cache.dtype),
                v.view(-1, layer.tp_v_head_num, layer.v_head_dim).to(v_cache.dtype),
                k_cache,
                v_cache,
                loc,
            )
        else:
            # one-token pages (or a quantized / composite pool): SGLang's own writer
            pool.set_kv_buffer(layer, kv_write_loc(forward_batch, layer), k, v)

    def _caches(self, layer):
        pool = self.token_to_kv_pool
        return (
            self._paged_view(pool.get_key_buffer(layer.layer_id)),
            self._paged_view(pool.get_value_buffer(layer.layer_id)),
        )

    @staticmethod
    def _check_layer(layer) -> None:
        from sglang.srt.layers.radix_attention import AttentionType

        if layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY:
            raise NotImplementedError(
                "maca attention backend: cross attention and encoder-only (non-causal) layers are not supported"
            )

    def _prepare(self, q, k, v, layer, forward_batch, save_kv_cache: bool, kwargs):
        """Shared by extend and decode: checks, KV store, q as [T, Hq, D] in the cache dtype.

        Returns (metadata, q3, k_cache, v_cache), or None for an empty batch.
        """
        self._check_layer(layer)
        _reject_extra(kwargs)
        if q.shape[0] == 0:
            return None
        if save_kv_cache and k is not None and v is not None:
            self._store_kv(layer, forward_batch, k, v)
        k_cache, v_cache = self._caches(layer)
        q3 = q.reshape(q.shape[0], layer.tp_q_head_num, layer.qk_head_dim)
        if q3.dtype != k_cache.dtype:
            q3 = q3.to(k_cache.dtype)
        return self.forward_metadata, q3, k_cache, v_cache

    def forward_extend(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch",
                       save_kv_cache: bool = True, **kwargs):
        """q [T, Hq * D] (or [T, Hq, D]); k/v [T, Hk, D] new tokens -> [T, Hq * Dv]."""
        num_tokens = q.shape[0]
        prepared = self._prepare(q, k, v, layer, forward_batch, save_kv_cache, kwargs)
        if prepared is None:
            return q.new_empty((0, layer.tp_q_head_num * layer.v_head_dim))
        md, q3, k_cache, v_cache = prepared
        out = ops.paged_prefill_attention(
            q3, k_cache, v_cache, md.block_table, md.cu_seqlens_q, md.kv_seqlens,
            max_seqlen_q=md.max_seqlen_q, max_kv_seqlen=md.max_kv_seqlen,
            scale=layer.scaling, causal=True,
            sliding_window=_window_for_ops(layer), logit_softcap=_softcap_for_ops(layer),
        )
        return out.to(q.dtype).reshape(num_tokens, layer.tp_q_head_num * layer.v_head_dim)

    def forward_decode(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch",
                       save_kv_cache: bool = True, **kwargs):
        """q [B, Hq * D]; k/v [B, Hk, D] (the new token) -> [B, Hq * Dv]."""
        bs = q.shape[0]
        prepared = self._prepare(q, k, v, layer, forward_batch, save_kv_cache, kwargs)
        if prepared is None:
            return q.new_empty((0, layer.tp_q_head_num * layer.v_head_dim))
        md, q3, k_cache, v_cache = prepared
        # one plan per forward batch (and head geometry): its checks, split count and scratch serve every layer
        plan = md.plan(("decode", q3.shape[1], k_cache.shape[2], q3.shape[2], v_cache.shape[3], q3.dtype),
                       lambda: _ops_attention().plan_paged_decode(
                           md.block_table, md.kv_seqlens, num_q_heads=q3.shape[1], num_kv_heads=k_cache.shape[2],
                           head_dim=q3.shape[2], head_dim_v=v_cache.shape[3], block_size=k_cache.shape[1],
                           dtype=q3.dtype, num_kv_splits=self.decode_kv_splits))
        out = ops.paged_decode_attention(
            q3, k_cache, v_cache, plan=plan,
            scale=layer.scaling, sliding_window=_window_for_ops(layer), logit_softcap=_softcap_for_ops(layer),
        )
        return out.to(q.dtype).reshape(bs, layer.tp_q_head_num * layer.v_head_dim)


class MacaMLAAttnBackend(_MacaBackendBase, _base_class()):
    """AttentionBackend for MLA models (DeepSeek-V2/V3 shape) on the maca device.

    Absorbed layers (SGLang's ``attn_mqa``: one shared latent head,
    qk_head_dim = kv_lora_rank + rope_dim, v_head_dim = kv_lora_rank) read the
    latent cache with ``mla_decode``; the non-absorbed prefill layer
    (``attn_mha``: per-head K/V computed by the model, nothing cached by the
    backend) runs ``varlen_attention``.
    """

    def __init__(self, model_runner):
        super().__init__()
        self._init_common(model_runner)
        cfg = model_runner.model_config
        self.kv_lora_rank = int(cfg.kv_lora_rank)
        self.qk_rope_head_dim = int(cfg.qk_rope_head_dim)

    def _build_metadata(self, forward_batch):
        md = super()._build_metadata(forward_batch)
        if md.cu_seqlens_q is not None and md.block_table.shape[0] > 0:
            # absorbed extend = one decode row per new token; row i of sequence b
            # sees the first kv_len_b - q_len_b + i + 1 latents (causal).
            q_lens = forward_batch.extend_seq_lens.long()
            rows = torch.repeat_interleave(torch.arange(q_lens.numel(), device=q_lens.device), q_lens)
            starts = md.cu_seqlens_q[:-1].long()
            pos_in_seq = torch.arange(rows.numel(), device=q_lens.device) - starts[rows]
            md.token_rows = rows
            md.token_kv_seqlens = (
                md.kv_seqlens.long()[rows] - q_lens[rows] + pos_in_seq + 1
            ).to(torch.int32)
        return md

    def _paged_latents(self, layer, block_table: torch.Tensor, max_kv_seqlen: int):
        """(latent cache [NB, BS, L + R], block table) that mla_decode can read.

        Pages of 16+ tokens are the pool itself. One-token pages (page_size 1)
        are gathered per request into 16-token blocks first: mla_decode reads
        blocks of >= 8 tokens, and with page_size 1 ``block_table`` holds slots.
        """
        latent = self._latent_cache(layer)
        if self.page_size >= 8:
            return latent, block_table
        flat = latent.view(-1, latent.shape[-1])

        def gather_indices():  # the same for every layer of the batch
            blocks_per_row = max(1, -(-max_kv_seqlen // _GATHER_BLOCK))
            width = blocks_per_row * _GATHER_BLOCK
            slots = block_table[:, :width].long()
            if slots.shape[1] < width:  # columns past the request are never read: point them at slot 0
                slots = torch.nn.functional.pad(slots, (0, width - slots.shape[1]))
            rows = block_table.shape[0] * blocks_per_row
            return slots, torch.arange(rows, dtype=torch.int32, device=flat.device).view(-1, blocks_per_row)

        slots, table = self.forward_metadata.plan(("gather", block_table.shape[0], max_kv_seqlen), gather_indices)
        return flat[slots].view(-1, _GATHER_BLOCK, flat.shape[-1]), table

    def _is_absorbed(self, layer) -> bool:
        return layer.tp_k_head_num == 1 and layer.v_head_dim == self.kv_lora_rank and (
            layer.qk_head_dim == self.kv_lora_rank + self.qk_rope_head_dim
        )

    def _latent_cache(self, layer) -> torch.Tensor:
        buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)  # [size + P, 1, L + R]
        return self._paged_view(buf.view(buf.shape[0], buf.shape[-1]))

    def _store_latent(self, layer, forward_batch, k, k_rope) -> None:
        from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

        from maca_infer.adapters.sglang.compat import kv_write_loc

        pool = self.token_to_kv_pool
        L = self.kv_lora_rank
        if k_rope is not None:
            kv_c, k_pe = k.reshape(-1, L), k_rope.reshape(-1, self.qk_rope_head_dim)
        else:
            flat = k.reshape(k.shape[0], -1)
            kv_c, k_pe = flat[:, :L], flat[:, L:]
        if type(pool) is MLATokenToKVPool and pool.store_dtype == pool.dtype and self.page_size >= 8:
            latent = self._latent_cache(layer)
            ops.fill_mla_cache(kv_c.to(latent.dtype), k_pe.to(latent.dtype), latent, forward_batch.out_cache_loc)
        elif k_rope is not None:
            pool.set_mla_kv_buffer(layer, forward_batch.out_cache_loc, kv_c.unsqueeze(1), k_pe.unsqueeze(1))
        else:
            pool.set_kv_buffer(layer, kv_write_loc(forward_batch), k, None)

    def _split_q(self, q, q_rope, layer, rows):
        H, L = layer.tp_q_head_num, self.kv_lora_rank
        if q_rope is not None:
            return q.reshape(rows, H, L), q_rope.reshape(rows, H, self.qk_rope_head_dim)
        q3 = q.reshape(rows, H, L + self.qk_rope_head_dim)
        return q3[..., :L], q3[..., L:]

    def _absorbed(self, q, k, layer, forward_batch, save_kv_cache, q_rope, k_rope, token_rows, kv_seqlens):
        """Absorbed MLA for ``q`` rows; ``token_rows`` maps rows to requests (None: one row each)."""
        rows = q.shape[0]
        if rows == 0:
            return q.new_empty((0, layer.tp_q_head_num * self.kv_lora_rank))
        if save_kv_cache and k is not None:
            self._store_latent(layer, forward_batch, k, k_rope)
        md = self.forward_metadata
        latent, block_table = self._paged_latents(layer, md.block_table, md.max_kv_seqlen)
        q_nope, q_pe = self._split_q(q, q_rope, layer, rows)
        # one plan per forward batch: block table rows, length checks, split count and scratch serve every layer
        plan = md.plan(("mla", token_rows is not None, q_nope.shape[1], latent.dtype),
                       lambda: _ops_mla().plan_mla_decode(
                           block_table[token_rows] if token_rows is not None else block_table, kv_seqlens,
                           num_heads=q_nope.shape[1], kv_lora_rank=self.kv_lora_rank,
                           rope_dim=self.qk_rope_head_dim, block_size=latent.shape[1], dtype=latent.dtype,
                           num_kv_splits=self.decode_kv_splits))
        out = ops.mla_decode(
            q_nope.to(latent.dtype).contiguous(), q_pe.to(latent.dtype).contiguous(), latent,
            scale=layer.scaling, plan=plan,
        )
        return out.to(q.dtype).reshape(rows, layer.tp_q_head_num * self.kv_lora_rank)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True,
                       q_rope=None, k_rope=None, **kwargs):
        """Absorbed decode: q [B, H*(L+R)] (or q_nope [B, H*L] + q_rope) -> [B, H*L]."""
        _reject_extra(kwargs)
        md = self.forward_metadata
        return self._absorbed(q, k, layer, forward_batch, save_kv_cache, q_rope, k_rope, None, md.kv_seqlens)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True,
                       q_rope=None, k_rope=None, **kwargs):
        _reject_extra(kwargs)
        md = self.forward_metadata
        if self._is_absorbed(layer):
            if q.shape[0] == 0:
                return q.new_empty((0, layer.tp_q_head_num * self.kv_lora_rank))
            return self._absorbed(q, k, layer, forward_batch, save_kv_cache, q_rope, k_rope,
                                  md.token_rows, md.token_kv_seqlens)
        # non-absorbed prefill: the model computed per-head K/V for the new tokens
        if md.has_prefix:
            raise NotImplementedError(
                "maca MLA backend: the non-absorbed (MHA) prefill path with a cached prefix is not "
                "supported; the maca DeepSeek handler routes such batches to the absorbed path"
            )
        num_tokens = q.shape[0]
        if num_tokens == 0:
            return q.new_empty((0, layer.tp_q_head_num * layer.v_head_dim))
        q3 = q.reshape(num_tokens, layer.tp_q_head_num, layer.qk_head_dim)
        k3 = k.reshape(num_tokens, layer.tp_k_head_num, layer.qk_head_dim)
        v3 = v.reshape(num_tokens, layer.tp_v_head_num, layer.v_head_dim)
        out = ops.varlen_attention(
            q3, k3.to(q3.dtype), v3.to(q3.dtype), md.cu_seqlens_q, md.cu_seqlens_q,
            max_seqlen_q=md.max_seqlen_q, max_seqlen_k=md.max_seqlen_q, scale=layer.scaling, causal=True,
        )
        return out.reshape(num_tokens, layer.tp_q_head_num * layer.v_head_dim)


def _ops_attention():
    # imported when the first batch is planned, not with the backend (the op modules import triton)
    from maca_infer.common.ops import attention

    return attention


def _ops_mla():
    from maca_infer.common.ops import mla

    return mla


def _reject_extra(kwargs: dict) -> None:
    # Keyword features of other backends (sinks, fused rope, topk indices) are
    # not silently dropped: they change the math.
    unsupported = {k: v for k, v in kwargs.items() if v is not None}
    if unsupported:
        raise NotImplementedError(
            f"maca attention backend: unsupported arguments {sorted(unsupported)}"
        )


def create_maca_backend(model_runner):
    """Factory registered under the name "maca" (picks MLA for MLA models)."""
    if getattr(model_runner, "use_mla_backend", False):
        return MacaMLAAttnBackend(model_runner)
    return MacaAttnBackend(model_runner)
