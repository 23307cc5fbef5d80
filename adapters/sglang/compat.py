"""The one place that knows how the supported SGLang releases differ.

maca-infer carries SGLang from 0.5.17 (the last release pinning torch 2.11)
to 0.5.2x (common/versions.py). What changed in between that the adapter
touches, and what this module answers for it:

- 0.5.22 replaced the platform's flag methods (``support_cuda_graph``,
  ``support_piecewise_cuda_graph``) and per-kind pool getters
  (``get_mha_kv_pool_cls`` ...) with ``capabilities`` (a
  ``PlatformCapabilities`` struct) and ``get_kv_pool_cls(kind=)``, and made
  ``get_paged_allocator_cls`` optional: :class:`LegacyPlatformHooks` answers
  the old names from the new ones, so the platform states each fact once.
  It also added ``KVWriteLoc.for_batch`` / ``for_layer`` (a loc carrying the
  batch's physical mark): :func:`kv_write_loc`.
- 0.5.20 moved the ``--attention-backend`` choice lists from
  ``sglang.srt.server_args`` to ``sglang.srt.arg_groups.choices``
  (:func:`choices_module`).
- 0.5.18 moved the out-of-tree forward registry (``register_oot_forward``)
  from ``MultiPlatformOp`` to ``sglang.kernels.fused_op.BaseFusedOp``
  (:func:`oot_forward_registry`).
- 0.5.19 added the module flags the emulated device's DP-attention fixes set
  (``dp_attention.memcpy_func``, ``forward_batch_info._is_cpu``): DP attention
  on the emulated device needs 0.5.19 (:func:`require`, :data:`FEATURES`); and
  Qwen2-MoE's Triton ``fused_gate_sigmoid_mul``. Runtime fixes of names a
  release lacks are not applied there (:data:`FIX_SINCE`, :func:`fix_applies`).

Nothing else in the adapter asks which SGLang it runs on.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache

from packaging.version import Version

from maca_infer.common import versions

# feature -> (first SGLang release that has it, what it is, for the error)
FEATURES: dict[str, tuple[str, str]] = {
    "capabilities": ("0.5.22", "SRTPlatform.capabilities / get_kv_pool_cls(kind=)"),
    "kv_write_loc_for": ("0.5.22", "KVWriteLoc.for_batch / for_layer"),
    "emulated_paged_allocator": ("0.5.22", "--page-size > 1 on the emulated maca device (SGLang's paged "
                                           "allocator falls back to torch without Triton)"),
    "arg_groups": ("0.5.20", "sglang.srt.arg_groups.choices"),
    "fused_op_registry": ("0.5.18", "BaseFusedOp.register_oot_forward"),
    "emulated_dp_attention": ("0.5.19", "--enable-dp-attention on the emulated maca device "
                                        "(dp_attention.memcpy_func, forward_batch_info._is_cpu)"),
}


# runtime fix target (patching.py) -> first SGLang release that has the name it patches;
# fixes not listed here apply to the whole supported range
FIX_SINCE: dict[str, str] = {
    "sglang.srt.model_executor.forward_batch_info._is_cpu": "0.5.19",
    "sglang.srt.layers.dp_attention.memcpy_func": "0.5.19",
    "sglang.srt.models.qwen2_moe.fused_gate_sigmoid_mul": "0.5.19",
}


@lru_cache(maxsize=1)
def sglang_version() -> Version:
    """The installed SGLang's release (local tags and post releases count as their release)."""
    found = versions.installed_version("sglang")
    if found is None:
        raise RuntimeError("maca-infer: sglang is not installed")
    return Version(Version(found).base_version)


def has(feature: str) -> bool:
    if feature not in FEATURES:
        raise ValueError(f"unknown SGLang feature {feature!r}; known: {', '.join(FEATURES)}")
    return sglang_version() >= Version(FEATURES[feature][0])


def require(feature: str) -> None:
    """RuntimeError naming the installed SGLang and the release that has ``feature``."""
    if not has(feature):
        first, what = FEATURES[feature]
        raise RuntimeError(
            f"maca-infer: {what} needs SGLang >= {first}; this is SGLang {sglang_version()} "
            f"(supported {versions.SUPPORTED['sglang'][0]}). Install a newer SGLang for it."
        )


CHECKED_ON = ("0.5.17", "0.5.23")  # the low and high ends the tests run (tools/lane.py sglang-low, make test)


def fix_versions(target: str) -> str:
    """The SGLang range a runtime fix is written for (its ledger record's ``versions``)."""
    low, high = versions.SUPPORTED["sglang"][0].split(",")
    if target in FIX_SINCE:
        low = f">={FIX_SINCE[target]}"
    checked = [v for v in CHECKED_ON if Version(v) >= Version(low.removeprefix(">="))]
    return f"sglang {low},{high} (checked on {' and '.join(checked)})"


def fix_applies(target: str) -> bool:
    """Whether the installed SGLang has what the runtime fix on ``target`` patches."""
    return target not in FIX_SINCE or sglang_version() >= Version(FIX_SINCE[target])


def choices_module():
    """The module holding ATTENTION_BACKEND_CHOICES and add_*_choices (it moved in 0.5.20)."""
    name = "sglang.srt.arg_groups.choices" if has("arg_groups") else "sglang.srt.server_args"
    return importlib.import_module(name)


def oot_forward_registry():
    """The class whose ``register_oot_forward(op_cls, fn, key)`` SGLang's ops dispatch through."""
    if has("fused_op_registry"):
        from sglang.kernels.fused_op import BaseFusedOp

        return BaseFusedOp
    from sglang.srt.layers.utils.multi_platform import MultiPlatformOp

    return MultiPlatformOp


def kv_write_loc(forward_batch, layer=None):
    """SGLang's KVWriteLoc for a pool write of the batch (``layer``: a cross-attention layer writes its
    encoder loc)."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    if has("kv_write_loc_for"):
        return KVWriteLoc.for_batch(forward_batch) if layer is None else KVWriteLoc.for_layer(forward_batch, layer)
    cross = layer is not None and layer.is_cross_attention
    return KVWriteLoc(forward_batch.encoder_out_cache_loc if cross else forward_batch.out_cache_loc)


def topk_forward_fits(topk_cls) -> bool:
    """Whether our TopK forward (fused_ops._topk_forward) fits this SGLang's TopK: it resolves its
    routing inputs through ``TopK._resolve_routing_inputs`` (0.5.23 has it, 0.5.17 not; the releases
    between are untested, so the class is asked). Without it SGLang's own forward_native routes."""
    return hasattr(topk_cls, "_resolve_routing_inputs")


def _capabilities_class():
    if has("capabilities"):
        from sglang.srt.platforms.interface import PlatformCapabilities

        return PlatformCapabilities

    @dataclass(frozen=True)
    class PlatformCapabilities:  # SGLang < 0.5.22 has the flag methods instead (LegacyPlatformHooks)
        supports_triton: bool = False
        graph_capture: bool = False
        piecewise_graph: bool = False
        hicache_device_kernels: bool = False
        supports_pynccl: bool = False

    return PlatformCapabilities


def __getattr__(name: str):
    # ``PlatformCapabilities`` is made on first use, not at import: doctor and ``patches list`` import this
    # module (through patching.py) on hosts without SGLang, and importing sglang from here while sglang
    # itself is importing (its platform plugin) is circular
    if name == "PlatformCapabilities":
        cls = globals()["PlatformCapabilities"] = _capabilities_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LegacyPlatformHooks:
    """SGLang < 0.5.22's platform questions, answered from the current ones (unused on newer SGLang)."""

    def support_cuda_graph(self) -> bool:
        return self.capabilities.graph_capture

    def support_piecewise_cuda_graph(self) -> bool:
        return self.capabilities.piecewise_graph

    def _legacy_pool(self, kind: str) -> type:
        cls = self.get_kv_pool_cls(kind=kind)
        if cls is None:
            raise NotImplementedError(f"maca-infer: no {kind} KV pool on the maca platform (SGLang {sglang_version()})")
        return cls

    def get_mha_kv_pool_cls(self) -> type:
        return self._legacy_pool("mha")

    def get_mla_kv_pool_cls(self):
        pool_cls = self._legacy_pool("mla")

        def build(*args, index_head_dim=None, **kwargs):
            # SGLang < 0.5.22 builds an out-of-tree MLA pool with index_head_dim (DeepSeek sparse
            # attention's indexer), which its own MLATokenToKVPool does not take
            if index_head_dim is not None:
                raise NotImplementedError(
                    f"maca-infer: DeepSeek sparse attention (index_head_dim={index_head_dim}) has no maca "
                    f"backend (SGLang {sglang_version()})"
                )
            return pool_cls(*args, **kwargs)

        return build

    def get_dsa_kv_pool_cls(self) -> type:
        return self._legacy_pool("dsa")

    def get_nsa_kv_pool_cls(self) -> type:
        return self._legacy_pool("dsa")

    def get_paged_allocator_cls(self):
        if has("capabilities"):
            return None  # SGLang's own allocator, torch-native without Triton
        # before 0.5.22 an out-of-tree platform had to name its allocator, built as
        # cls(size, page_size=, dtype=, device=, kvcache=, need_sort=)
        return self._legacy_allocator

    def _legacy_allocator(self, size, *, page_size, dtype, device, kvcache, need_sort):
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

        if page_size == 1:  # torch only
            return TokenToKVPoolAllocator(size, dtype=dtype, device=device, kvcache=kvcache, need_sort=need_sort)
        if not self.capabilities.supports_triton:
            require("emulated_paged_allocator")  # raises here: its Triton kernels cannot launch
        return PagedTokenToKVPoolAllocator(size, page_size=page_size, dtype=dtype, device=device, kvcache=kvcache,
                                           need_sort=need_sort)
