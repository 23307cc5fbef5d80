"""Entry point ``sglang.srt.plugins: maca``: wire maca-infer into SGLang.

SGLang runs general plugins early in every process (before argument parsing
in the launcher; in every scheduler / detokenizer / DP-controller child).
:func:`register` does nothing unless the maca platform is the active one, so
an ordinary SGLang launch in the same environment is untouched. When it is,
it registers, through SGLang's own extension points only:

- the attention backend ``maca`` (``register_attention_backend``) and its
  ``--attention-backend`` choice (``add_attention_backend_choices``);
- the DeepSeek (MLA) forward-method handler for ``maca``
  (``AttentionBackendRegistry.register``): non-absorbed prefill when no
  prefix is cached, absorbed MLA otherwise;
- OOT forwards of RMSNorm / SiluAndMul / RotaryEmbedding (fused_ops.py);
- the ledgered runtime fixes declared in patching.py (records of the one patch
  helper, common/patching.py; hooks through SGLang's HookRegistry).

``--quantization moe_wna16`` and ``w8a8_int8`` / compressed-tensors need
nothing here: the platform answers ``get_quantization_config`` with
moe_wna16.py's and w8a8_int8.py's configs.
"""

from __future__ import annotations

import logging

from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)

_done = False


def maca_platform_active() -> bool:
    from sglang.srt.platforms import current_platform

    return current_platform.is_out_of_tree() and current_platform.device_name == "maca"


def register() -> None:
    global _done
    if _done:
        return
    if not maca_platform_active():
        return
    _done = True
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    from maca_infer.adapters.sglang.attention_backend import BACKEND_NAME, create_maca_backend
    from maca_infer.adapters.sglang.compat import choices_module
    from maca_infer.adapters.sglang.fused_ops import register_fused_op_forwards
    from maca_infer.adapters.sglang.platform import DISPATCH_KEY

    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_maca_backend)
    choices = choices_module()
    if BACKEND_NAME not in choices.ATTENTION_BACKEND_CHOICES:  # a list.extend: add once
        choices.add_attention_backend_choices([BACKEND_NAME])
    _register_deterministic_choice(BACKEND_NAME)
    _register_deepseek_handler()
    register_fused_op_forwards(DISPATCH_KEY)
    from sglang.srt.platforms import current_platform

    # ledgered runtime fixes (patching.py, records of common/patching.py), reaching SGLang
    # through its HookRegistry; the platform class knows its device's set. moe_wna16 needs
    # no registration: the platform hands out its config (get_quantization_config)
    current_platform.register_runtime_fixes()
    log_once(logger, logging.INFO, "SGLang: attention backend 'maca', fused ops and runtime fixes registered")


def _register_deterministic_choice(name: str) -> None:
    """Accept ``--enable-deterministic-inference`` with ``--attention-backend maca``.

    That flag is what makes SGLang honour a request's ``sampling_seed``
    (OpenAI ``seed``): without it SGLang drops the seed on every device. SGLang
    refuses the flag for a backend missing from its deterministic list. The
    maca backend qualifies: each request's attention reads only its own rows,
    with no atomics, and under the flag its decode split-KV count (otherwise
    chosen from the batch) is pinned to one. It is not added to the
    radix-supported list, so SGLang turns the radix cache off under the flag
    (a cached-prefix extend is not bitwise the same as a full prefill).
    """
    from maca_infer.adapters.sglang.compat import choices_module

    choices = choices_module()
    if name not in choices.DETERMINISTIC_ATTENTION_BACKEND_CHOICES:  # a list.extend: add once
        choices.add_deterministic_attention_backend_choices([name])


def handle_attention_maca(attn, forward_batch):
    """DeepSeek forward method for the maca backend.

    Extend batches with no cached prefix run the non-absorbed MHA prefill
    (per-head K/V from kv_b_proj: ``varlen_attention``); everything else
    (decode, extend on a cached prefix) runs absorbed MLA over the latent cache
    (``mla_decode``).
    """
    from sglang.srt.models.deepseek_common.attention_backend_handler import _dispatch_mla_subtype
    from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import AttnForwardMethod

    mode = forward_batch.forward_mode
    prefix = forward_batch.extend_prefix_lens_cpu
    if mode.is_extend_without_speculative() and prefix is not None and sum(prefix) == 0:
        return AttnForwardMethod.MHA
    return _dispatch_mla_subtype(attn, forward_batch)


def _register_deepseek_handler() -> None:
    from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry

    AttentionBackendRegistry.register("maca", handle_attention_maca)
