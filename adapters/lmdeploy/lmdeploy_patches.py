"""maca-infer's runtime fixes to LMDeploy's maca backend (records declared in ``patching.py``).

1. ``MacaOpsBackend.update_step_context`` (LMDeploy 0.18.0): upstream builds
   ``DlinferAttentionMetadata(max_q_seq_len=...)`` but the 0.18 dataclass
   has ``max_q_seqlen`` plus ``cu_seqlens_q``, ``cu_seqlens_q_cpu`` and
   ``kv_seqlens_cpu`` that ``DlinferAttentionImpl`` reads: every maca run
   dies with a TypeError at the first step, on real MetaX hardware too.
   Ours builds the complete metadata (vectorised slot computation, no
   per-sequence Python loop), and a single-rank ``MoeMetadata``: LMDeploy's
   dlinfer W8A8 MoE (``DlinferFusedMoEW8A8Impl``) refuses to run without
   one, and only Ascend's backend makes one.
2. ``MacaOpsBackend.build_graph_runner``: LMDeploy reuses the CUDA graph
   runner for maca, whose buffer filling (``CudaGraphMixin``) runs a CUDA
   Triton kernel and knows nothing of dlinfer's metadata
   (``kv_start_indices``, the CPU length tensors). Ours keeps LMDeploy's
   runner and swaps in maca buffer handling for the captured decode graphs.

3. ``ModelWeightLoader.load_model_weights``: a smooth-quant (INT8 W8A8)
   checkpoint is checked before it is loaded (``w8a8_checkpoint.py``).

Each function here is installed by ``apply()``, which the import hook runs
right after LMDeploy imports ``lmdeploy.pytorch.backends.dlinfer.maca.op_backend``.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

from maca_infer.adapters.lmdeploy import dlinfer_ops, patching
from maca_infer.adapters.lmdeploy.patching import is_patched
from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)


# --------------------------------------------------------------------------- step context


def flat_slots(block_offsets: torch.Tensor, q_seqlens: torch.Tensor, kv_seqlens: torch.Tensor,
               block_size: int) -> torch.Tensor:
    """Cache slot of every new token.

    Args:
        block_offsets: [B, max_blocks] physical block ids per sequence.
        q_seqlens: [B] new tokens per sequence; kv_seqlens: [B] cached + new tokens.
        block_size: BS.

    Returns:
        [sum(q_seqlens)] int64 ``block_offsets[b, p // BS] * BS + p % BS`` for the new
        positions ``p in [kv_b - q_b, kv_b)`` of each sequence b, in token order.
    """
    device = block_offsets.device
    q_lens = q_seqlens.to(device=device, dtype=torch.long)
    kv_lens = kv_seqlens.to(device=device, dtype=torch.long)
    batch = q_lens.numel()
    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=device), q_lens)
    first_token = torch.cumsum(q_lens, 0) - q_lens
    token_ids = torch.arange(seq_of_token.numel(), device=device)
    positions = token_ids - first_token[seq_of_token] + (kv_lens - q_lens)[seq_of_token]
    blocks = block_offsets.long()[seq_of_token, positions // block_size]
    return blocks * block_size + positions % block_size


def maca_update_step_context(cls, step_context):
    """Build ``DlinferAttentionMetadata`` for one engine step (see module doc, fix 1)."""
    dlinfer_ops.new_step()  # the layers' attention plans are made again from this step's tables
    key_cache = step_context.kv_caches[0][0]
    block_size = int(key_cache.shape[1])  # caches are [num_blocks, block_size, kv_heads, head_dim]

    q_seqlens = step_context.q_seqlens.to(torch.int32)
    kv_seqlens = step_context.kv_seqlens.to(torch.int32)
    block_offsets = step_context.block_offsets.to(torch.int32)
    cu_seqlens_q = torch.nn.functional.pad(torch.cumsum(q_seqlens, 0, dtype=torch.int32), (1, 0))

    # the host copies feed LMDeploy's kernel wrappers (they slice cu_seqlens_q_cpu[1:]);
    # one sync per step, the same as upstream's .item() calls
    q_cpu = q_seqlens.cpu()
    kv_cpu = kv_seqlens.cpu()
    max_q_seqlen = step_context.max_q_seqlen or int(q_cpu.max())
    max_kv_seqlen = step_context.max_kv_seqlen or int(kv_cpu.max())
    is_prefill_no_cache = (not step_context.is_decoding) and bool(torch.equal(q_cpu, kv_cpu))

    kv_start_indices = flat_slots(block_offsets, q_seqlens, kv_seqlens, block_size)

    attn_meta_cls = cls.get_attention_metadata_cls()
    step_context.attn_metadata = attn_meta_cls(
        step_context.is_decoding,
        block_offsets,
        q_start_loc=cu_seqlens_q[:-1],
        q_seqlens=q_seqlens,
        kv_seqlens=kv_seqlens,
        cu_seqlens_q=cu_seqlens_q,
        kv_start_indices=kv_start_indices,
        block_size=block_size,
        attention_mask=[],
        is_prefill_no_cache=is_prefill_no_cache,
        max_q_seqlen=int(max_q_seqlen),
        max_kv_seq_len=int(max_kv_seqlen),
        kv_flatten_size=int(step_context.sum_kv_seqlen or int(kv_cpu.sum())),
        cu_seqlens_q_cpu=torch.nn.functional.pad(torch.cumsum(q_cpu, 0, dtype=torch.int32), (1, 0)),
        kv_seqlens_cpu=kv_cpu,
        quant_policy=step_context.kv_quant_policy,
    )
    if getattr(step_context, "moe_metadata", None) is None:
        # single rank: maca's MoE ops read only router_n_groups (set by LMDeploy's router) and ep_size
        from dlinfer.utils.type_annotation import MoeMetadata

        step_context.moe_metadata = MoeMetadata()
    return step_context


# --------------------------------------------------------------------------- graph runner


def make_buffers_maca(graph_meta, input_ids, position_ids, past_key_values, attn_metadata,
                      inputs_embeds=None, **kwargs) -> dict[str, torch.Tensor]:
    """Stable input buffers of one captured decode graph (addresses never change)."""
    max_batches = graph_meta.max_batchs
    max_tokens = graph_meta.max_tokens
    device = graph_meta.device
    buffers: dict[str, torch.Tensor] = {
        "input_ids": torch.zeros((1, max_tokens), dtype=torch.int64, device=device),
        "position_ids": torch.zeros((1, max_tokens), dtype=torch.int64, device=device),
        "block_offsets": torch.zeros((max_batches, graph_meta.num_blocks), dtype=torch.int32, device=device),
        "q_seqlens": torch.zeros(max_batches, dtype=torch.int32, device=device),
        "kv_seqlens": torch.zeros(max_batches, dtype=torch.int32, device=device),
        "cu_seqlens_q": torch.zeros(max_batches + 1, dtype=torch.int32, device=device),
        "kv_start_indices": torch.full((max_tokens,), -1, dtype=torch.int64, device=device),
        "local_adapter_ids": torch.zeros(max_batches, dtype=torch.int64, device=device),
    }
    return buffers


def fill_buffers_maca(graph_meta, input_ids, position_ids, past_key_values, attn_metadata, inputs_embeds=None,
                      **kwargs) -> dict[str, Any]:
    """Copy this step's inputs into the graph's buffers; padded sequences get no keys
    (kv_seqlens 0, slot -1: nothing is written to the cache for them)."""
    dlinfer_ops.new_step()  # same buffers, new contents: plans are made again
    buffers = graph_meta.input_buffers
    batch, num_blocks = attn_metadata.block_offsets.shape
    num_tokens = input_ids.size(-1)
    q_len = max(1, num_tokens // max(1, batch))
    max_batches = buffers["q_seqlens"].numel()

    buffers["input_ids"].zero_()
    buffers["input_ids"][:, :num_tokens] = input_ids
    buffers["position_ids"].zero_()
    buffers["position_ids"][:, :num_tokens] = position_ids
    buffers["block_offsets"].zero_()
    buffers["block_offsets"][:batch, :num_blocks] = attn_metadata.block_offsets
    buffers["q_seqlens"].fill_(q_len)
    buffers["q_seqlens"][:batch] = attn_metadata.q_seqlens
    buffers["kv_seqlens"].zero_()
    buffers["kv_seqlens"][:batch] = attn_metadata.kv_seqlens
    # padded sequences keep q_len tokens each so the token count matches max_tokens
    buffers["cu_seqlens_q"].copy_(torch.arange(max_batches + 1, dtype=torch.int32,
                                               device=buffers["cu_seqlens_q"].device) * q_len)
    buffers["cu_seqlens_q"][:batch + 1] = attn_metadata.cu_seqlens_q
    buffers["cu_seqlens_q"][batch + 1:] += int(attn_metadata.cu_seqlens_q[-1]) - batch * q_len
    buffers["kv_start_indices"].fill_(-1)
    buffers["kv_start_indices"][:num_tokens] = attn_metadata.kv_start_indices.reshape(-1)

    if inputs_embeds is not None:
        if "inputs_embeds" not in buffers:
            buffers["inputs_embeds"] = inputs_embeds.new_zeros(1, buffers["input_ids"].size(-1), inputs_embeds.size(-1))
        buffers["inputs_embeds"][:, :num_tokens] = inputs_embeds

    attn_metadata.block_offsets = buffers["block_offsets"]
    attn_metadata.q_seqlens = buffers["q_seqlens"]
    attn_metadata.kv_seqlens = buffers["kv_seqlens"]
    attn_metadata.cu_seqlens_q = buffers["cu_seqlens_q"]
    attn_metadata.q_start_loc = buffers["cu_seqlens_q"][:-1]
    attn_metadata.kv_start_indices = buffers["kv_start_indices"]
    # inside a graph the lengths must come from the buffers, not from host copies
    attn_metadata.cu_seqlens_q_cpu = buffers["cu_seqlens_q"]
    attn_metadata.kv_seqlens_cpu = buffers["kv_seqlens"]

    new_inputs = dict(past_key_values=past_key_values, attn_metadata=attn_metadata)
    new_inputs.update(kwargs)
    new_inputs["input_ids"] = buffers["input_ids"]
    new_inputs["position_ids"] = buffers["position_ids"]
    if inputs_embeds is not None:
        new_inputs["inputs_embeds"] = buffers["inputs_embeds"]
    return new_inputs


def update_context_maca(graph_meta, context) -> None:
    buffers = graph_meta.input_buffers
    if context.local_adapter_ids is not None:
        buffers["local_adapter_ids"].zero_()
        buffers["local_adapter_ids"][:context.local_adapter_ids.size(0)] = context.local_adapter_ids
        context.local_adapter_ids = buffers["local_adapter_ids"]
    context.q_seqlens = buffers["q_seqlens"]
    context.kv_seqlens = buffers["kv_seqlens"]
    context.q_start_loc = buffers["cu_seqlens_q"][:-1]
    context.block_offsets = buffers["block_offsets"]


class _MacaGraphModelView:
    """The model as the single-graph runner sees it: LMDeploy's model with the
    three buffer methods replaced by the maca ones above."""

    def __init__(self, model: torch.nn.Module):
        object.__setattr__(self, "_model", model)

    def make_buffers_cudagraph(self, graph_meta, *args, **kwargs):
        return make_buffers_maca(graph_meta, *args, **kwargs)

    def fill_buffers_cudagraph(self, graph_meta, *args, **kwargs):
        return fill_buffers_maca(graph_meta, *args, **kwargs)

    def update_context_cudagraph(self, graph_meta, context):
        return update_context_maca(graph_meta, context)

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _graph_runner_classes():
    """Subclasses of LMDeploy's CUDA graph runners, built lazily (LMDeploy is
    imported by then: this runs from inside ``build_graph_runner``)."""
    from lmdeploy.pytorch.backends.cuda.graph_runner.full_graph import CUDASingleGraphRunner
    from lmdeploy.pytorch.backends.cuda.graph_runner.runner import CUDAGraphRunner

    class MacaSingleGraphRunner(CUDASingleGraphRunner):
        def __init__(self, model, *args, **kwargs):
            super().__init__(model, *args, **kwargs)
            self.model = _MacaGraphModelView(model)
            from maca_infer.common.device import is_emulated

            if is_emulated() and self._use_graph:
                # The emulated device can capture and replay aten ops, but the torch
                # reference ops (paged decode attention, fused MoE) pick their work by
                # the lengths in the batch: data-dependent shapes a replay cannot
                # repeat. So the graph runner keeps its static buffers and padding
                # and re-runs the forward on them: LMDeploy's own fake-capture mode.
                log_once(logger, logging.INFO,
                         "maca decode graphs on the emulated device: static buffers + padded batches as "
                         "captured, forward re-run per step (LMDeploy fake capture); real capture on MACA")
                self._use_graph = False

    class MacaGraphRunner(CUDAGraphRunner):
        """LMDeploy's graph runner with maca decode-graph buffers."""

        def _capture_full_graph(self, graph_key, kwargs):
            runner = MacaSingleGraphRunner(
                self.model,
                model_forward=self._get_decode_model_forward(),
                max_batches=graph_key[0],
                max_tokens=self._get_max_tokens(graph_key, kwargs["input_ids"], kwargs["attn_metadata"].q_seqlens),
                num_blocks=self.num_blocks,
                is_decoding=graph_key[1],
                decode_query_len=graph_key[3],
                pool=self._full_graph_pool_handle,
                model_config=self.model_config,
                device=self.device,
            )
            output = runner.capture(**kwargs)
            self._full_graph_runners[graph_key] = runner
            return output

    return MacaGraphRunner


graph_runners_built = 0  # how many maca graph runners this process built (the doctor and tests read it)


def maca_build_graph_runner(model, model_config, cache_config, backend_config, device):
    """Graph runner for maca (see module doc, fix 2)."""
    global graph_runners_built
    graph_runners_built += 1
    return _graph_runner_classes()(model, model_config, cache_config, backend_config, device)


def _emulated() -> bool:
    from maca_infer.common.device import is_emulated

    return is_emulated()


def _collective_backends(upstream_ccl_backend, upstream_support_ray):
    """ccl_backend/support_ray for maca: unchanged on a device; on the emulated device
    the collectives run on host tensors (gloo) and the workers are local processes (mp)."""

    def ccl_backend() -> str:
        return "gloo" if _emulated() else upstream_ccl_backend()

    def support_ray() -> bool:
        return False if _emulated() else upstream_support_ray()

    return ccl_backend, support_ray


class MacaSeededMultinomialSampling:
    """LMDeploy's MultinomialSamplingImpl for maca: the request's seed decides the draw.

    Same contract and draw as LMDeploy's cuda ``TritonMultinomialSamplingImpl``
    (``u = tl.rand(seed, offset)`` against the sorted probabilities), so a
    seeded request repeats, independently of the batch it runs in.
    """

    def forward(self, scores, seeds, offsets, indices=None):
        from maca_infer.common.ops.sampling import seeded_multinomial

        return seeded_multinomial(scores, seeds, offsets, indices)


class MacaRouterNoauxTC:
    """LMDeploy's RouterNoauxTCImpl for maca: DeepSeek-V3 noaux_tc routing in one op.

    ``forward(logits [T, E], bias [E])`` -> (weights [T, k] float32, ids [T, k]
    int64), LMDeploy's contract: scores (sigmoid or softmax), groups ranked by
    their two best biased scores, top-k of the biased scores in the kept
    groups, weights = unbiased scores, renormalized, times
    routed_scaling_factor. Experts of dropped groups are never picked (LMDeploy's
    torch default fills them with 0, which can beat a negative biased score).
    """

    def __init__(self, spec):
        self.scoring_func = spec.scoring_func
        self.top_k = spec.top_k
        self.n_group = spec.n_group
        self.topk_group = spec.top_k_group
        self.renormalize = spec.renormalize
        self.routed_scaling_factor = spec.routed_scaling_factor

    def forward(self, logits, bias):
        from maca_infer.common.ops.moe import moe_grouped_topk

        weights, ids = moe_grouped_topk(
            logits, self.top_k, num_expert_group=self.n_group, topk_group=self.topk_group,
            renormalize=self.renormalize, scoring=self.scoring_func, correction_bias=bias,
            routed_scaling_factor=float(self.routed_scaling_factor))
        return weights, ids.long()


# the dlinfer.ops functions each LMDeploy 0.18 dlinfer W8A8 module calls
_W8A8_DLINFER_OPS = {
    "LinearW8A8": ("dynamic_quant", "linear_w8a8"),
    "RMSNormW8A8": ("rms_norm_w8a8", "add_rms_norm_w8a8"),
    "FusedMoEW8A8": ("fused_moe_w8a8",),
}


def check_w8a8_spec(spec) -> None:
    """Refuse, while the model is built, a W8A8 module that maca's dlinfer ops cannot run.

    LMDeploy builds one ``LinearW8A8`` / ``RMSNormW8A8`` / ``FusedMoEW8A8`` spec per
    smooth-quant module; without this check an upstream dlinfer without the W8A8 ops,
    an FP8 checkpoint, the NN weight layout or expert parallelism would fail only at
    the first forward, deep in an op.
    """
    from lmdeploy.pytorch.backends.moe import FusedMoEW8A8BuildSpec
    from lmdeploy.pytorch.backends.qmodules import LinearW8A8BuildSpec, RMSNormW8A8BuildSpec

    from maca_infer.common import envs

    if not isinstance(spec, (LinearW8A8BuildSpec, RMSNormW8A8BuildSpec, FusedMoEW8A8BuildSpec)):
        return
    module = type(spec).__name__.removesuffix("BuildSpec")
    import dlinfer
    import dlinfer.ops

    missing = [name for name in _W8A8_DLINFER_OPS[module] if not hasattr(dlinfer.ops, name)]
    if missing:
        raise ValueError(
            f"maca-infer: LMDeploy's {module} calls dlinfer.ops.{', dlinfer.ops.'.join(missing)}, which the "
            f"installed dlinfer ({getattr(dlinfer, '__file__', '?')}) does not have; use maca-infer's dlinfer "
            "(MACA_INFER_DLINFER=ours) or a dlinfer release that has them")
    if spec.quant_dtype != torch.int8:
        raise ValueError(
            f"maca-infer: this checkpoint's W8A8 modules ({module}) quantize to {spec.quant_dtype}; maca serves "
            "INT8 W8A8 only (quantization_config quant_dtype 'int8'; FP8 needs an FP8 card, MetaX C500 has none)")
    if isinstance(spec, LinearW8A8BuildSpec) and envs.dlinfer_linear_nn_layout():
        raise ValueError(
            "maca-infer: DLINFER_LINEAR_USE_NN_LAYOUT=1 makes LMDeploy store W8A8 weights as [K, N]; maca's INT8 "
            "GEMM reads LMDeploy's default [N, K]: unset DLINFER_LINEAR_USE_NN_LAYOUT (or set it to 0)")
    if isinstance(spec, FusedMoEW8A8BuildSpec) and spec.ep_size > 1:
        raise ValueError(f"maca-infer: W8A8 MoE with expert parallelism (ep={spec.ep_size}) is not supported on "
                         "maca; allowed: ep=1")


def _maca_build_op(upstream_build_op):
    def build_op(cls, spec, *, enable_deterministic: bool = False):
        from lmdeploy.pytorch.backends.moe_router import RouterNoauxTCBuildSpec
        from lmdeploy.pytorch.backends.multinomial_sampling import MultinomialSamplingBuildSpec

        check_w8a8_spec(spec)

        if isinstance(spec, MultinomialSamplingBuildSpec):
            return MacaSeededMultinomialSampling()
        if isinstance(spec, RouterNoauxTCBuildSpec) and spec.router_n_groups <= 0:
            return MacaRouterNoauxTC(spec)
        return upstream_build_op.__func__(cls, spec, enable_deterministic=enable_deterministic)

    return classmethod(build_op)


def apply(op_backend_module: types.ModuleType) -> None:
    """Install the fixes on ``MacaOpsBackend`` (idempotent per process)."""
    from maca_infer.adapters.lmdeploy import activate

    activate()  # version check: these fixes are written for the supported range only
    backend = op_backend_module.MacaOpsBackend
    if is_patched(backend, "update_step_context"):
        return
    patching.apply(patching.UPDATE_STEP_CONTEXT, backend, "update_step_context",
                   classmethod(maca_update_step_context))
    patching.apply(patching.BUILD_GRAPH_RUNNER, backend, "build_graph_runner",
                   staticmethod(maca_build_graph_runner))
    ccl_backend, support_ray = _collective_backends(backend.ccl_backend, backend.support_ray)
    patching.apply(patching.CCL_BACKEND, backend, "ccl_backend", staticmethod(ccl_backend))
    patching.apply(patching.SUPPORT_RAY, backend, "support_ray", staticmethod(support_ray))
    patching.apply(patching.BUILD_OP, backend, "build_op", _maca_build_op(backend.build_op))
    from lmdeploy.pytorch.weight_loader.model_weight_loader import ModelWeightLoader

    from maca_infer.adapters.lmdeploy.w8a8_checkpoint import checked_load_model_weights

    patching.apply(patching.LOAD_MODEL_WEIGHTS, ModelWeightLoader, "load_model_weights",
                   checked_load_model_weights(ModelWeightLoader.load_model_weights))


# --------------------------------------------------------------------------- mp engine start-up race




class _ReleaseTolerantCondition:
    """A manager Condition whose final release survives the manager shutting down.

    LMDeploy's api_server parent leaves its ``mp.Manager()`` block as soon as it
    reads the engine's RPC port; the engine child is then still inside
    ``with condition:`` and its release round-trip can hit a manager that is
    already gone (EOFError), killing the engine before it starts. The parent
    only wakes after the release took effect, so a lost reply is harmless.
    """

    def __init__(self, condition):
        self._condition = condition

    def __enter__(self):
        return self._condition.__enter__()

    def __exit__(self, *exc_info):
        try:
            return self._condition.__exit__(*exc_info)
        except (EOFError, ConnectionError, BrokenPipeError):
            return False

    def __getattr__(self, name):
        return getattr(self._condition, name)


def apply_zmq_engine_fix(zmq_engine_module: types.ModuleType) -> None:
    """Install the start-up race fix on ``ZMQMPEngine._mp_proc`` (idempotent per process).

    The engine child is spawned with ``target=ZMQMPEngine._mp_proc``, pickled by
    qualified name, so the replacement keeps that name and the child (where the
    same import hook runs) resolves it to the same wrapper.
    """
    from maca_infer.common import versions

    engine_cls = zmq_engine_module.ZMQMPEngine
    if is_patched(engine_cls, "_mp_proc") or not versions.status("lmdeploy").ok:
        return  # outside the supported range the maca path refuses to start anyway
    upstream_mp_proc = engine_cls.__dict__["_mp_proc"].__func__

    def _mp_proc(shared_dict, condition, *args, **kwargs):
        return upstream_mp_proc(shared_dict, _ReleaseTolerantCondition(condition), *args, **kwargs)

    _mp_proc.__module__ = zmq_engine_module.__name__
    _mp_proc.__qualname__ = f"{engine_cls.__name__}._mp_proc"
    patching.apply(patching.MP_PROC, engine_cls, "_mp_proc", staticmethod(_mp_proc))


# --------------------------------------------------------------------------- tensor-parallel process group


def apply_worker_fix(base_worker_module: types.ModuleType) -> None:
    """Make tensor-parallel workers create their process group with the maca backend's
    collective (``ccl_backend``) instead of the default device's (idempotent)."""
    from maca_infer.common import versions

    worker_cls = base_worker_module.WorkerWrapperBase
    if is_patched(worker_cls, "init_process_group") or not versions.status("lmdeploy").ok:
        return
    upstream_init = worker_cls.__dict__["init_process_group"]

    def init_process_group(self, rank: int, master_addr: str = None, master_port: str = None):
        if getattr(self, "device_type", None) != "maca":
            return upstream_init(self, rank, master_addr, master_port)
        from lmdeploy.pytorch.devices import DeviceContext, get_device_manager

        # dist_utils.init_process_group asks get_backend() without a device type,
        # i.e. the process's default ("cuda") backend: answer for maca instead
        with get_device_manager().context(DeviceContext(self.device_type)):
            return upstream_init(self, rank, master_addr, master_port)

    patching.apply(patching.INIT_PROCESS_GROUP, worker_cls, "init_process_group", init_process_group)
