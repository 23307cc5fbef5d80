"""What differs between the Transformers / Diffusers releases the adapter supports.

The ranges are common/versions.py's; inside them the adapter takes different
seams depending on what the installed release has:

- Transformers >= 4.48 has ``AttentionInterface``: attention is a function
  looked up by name, "maca" is registered there (``transformers_attention``).
  Older releases (4.46, 4.47) pick an attention *class* per layer from the
  modeling module's ``*_ATTENTION_CLASSES`` table; ``enable()`` then goes
  through that table (``transformers_attention_classes``) and
  ``attn_implementation="maca"`` is refused with the version it needs.
- Transformers >= 4.56 takes ``dtype=`` in ``from_pretrained`` / ``from_config``;
  older releases call it ``torch_dtype=``.
- Transformers >= 5 dispatches routed MoE experts through ``ExpertsInterface``
  (``transformers_experts.interface_available``).
- Diffusers >= 0.35 has the attention dispatcher
  (``diffusers_attention.has_dispatcher``); every release has AttnProcessor2_0.

Nothing here imports a framework at module import.
"""

from __future__ import annotations

from packaging.version import Version

from maca_infer.common import versions

ATTENTION_INTERFACE_SINCE = "4.48"
DTYPE_KEYWORD_SINCE = "4.56"


def transformers_version() -> Version:
    found = versions.installed_version("transformers")
    if found is None:
        raise RuntimeError("maca-infer: transformers is not installed (pip install 'maca-infer[hf]')")
    return Version(Version(found).base_version)


def has_attention_interface() -> bool:
    """Transformers >= 4.48 looks attention functions up by name (AttentionInterface)."""
    return transformers_version() >= Version(ATTENTION_INTERFACE_SINCE)


def dtype_kwargs(dtype) -> dict:
    """The ``from_pretrained`` / ``from_config`` keyword for a torch dtype on the installed Transformers."""
    keyword = "dtype" if transformers_version() >= Version(DTYPE_KEYWORD_SINCE) else "torch_dtype"
    return {keyword: dtype}
