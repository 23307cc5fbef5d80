"""The runtime patches of the Hugging Face adapter, declared in the one patch helper's ledger.

Each is a record of ``maca_infer.common.patching.LEDGER`` (target, why, how,
versions, remove-when), declared when this module is imported (no
Transformers / Diffusers import, so ``maca-infer patches list --runtime``
lists them anywhere). The code that applies them lives next to the feature
that needs them and goes through the helper (original kept, refused twice,
undone by ``disable()`` / ``unregister_attention()``):

- ``transformers_kernels.py`` patches each architecture's
  ``apply_rotary_pos_emb`` (one part of :data:`ROTARY` per architecture);
- ``transformers_attention_classes.py`` replaces torch's
  ``scaled_dot_product_attention`` on Transformers without AttentionInterface
  (:data:`SDPA_CLASSES`);
- ``diffusers_attention.py`` adds the "maca" member (:data:`DIFFUSERS_BACKEND`).
"""

from __future__ import annotations

from maca_infer.common.patching import LEDGER
from maca_infer.common.versions import range_of

ROTARY = LEDGER.declare(
    "transformers.models.<arch>.modeling_<arch>.apply_rotary_pos_emb",
    owner="hf",
    why="the attention modules call this module-level function directly; it is the only seam where our "
        "rotary kernel can run",
    how="the replacement runs maca_infer.common.ops.apply_rotary only inside attention modules of a model "
        "passed to enable() (neox-style cos/sin) and the stock function everywhere else; one part per "
        "architecture, restored when its last enabled model is disabled",
    versions=f"{range_of('transformers')} (checked on 4.46.3 and 5.19.0)",
    remove_when="transformers lets a model instance choose its rotary function",
)
SDPA_CLASSES = LEDGER.declare(
    "torch.nn.functional.scaled_dot_product_attention",
    owner="hf",
    why="Transformers before 4.48 has no AttentionInterface: each layer's attention class (picked from the "
        "modeling module's *_ATTENTION_CLASSES table when the model is built) calls torch's "
        "scaled_dot_product_attention itself, so that call is the only seam for our attention",
    how="enable() turns a model's attention modules into their table's SDPA class and marks them with forward "
        "hooks; the replacement runs our varlen attention only for calls from inside a marked module (eager "
        "modules keep their softcap and eager fallback) and torch's own function everywhere else; installed "
        "with the first enabled model, removed with the last",
    versions="transformers >=4.46,<4.48 (checked on 4.46.3)",
    remove_when="transformers >= 4.48 is the oldest supported release (AttentionInterface everywhere)",
)
DIFFUSERS_BACKEND = LEDGER.declare(
    "diffusers.models.attention_dispatch.AttentionBackendName.MACA",
    owner="hf",
    why="diffusers' dispatcher only accepts members of its closed AttentionBackendName enum; a 'maca' member "
        "lets set_attention_backend('maca') and attention_backend('maca') reach our attention",
    how="a 'maca' member built the way Enum builds one (member and value maps, member names); our function "
        "registered for it in _AttentionBackendRegistry; only diffusers with the dispatcher (>= 0.35)",
    versions=f"{range_of('diffusers')} (dispatcher from 0.35; checked on 0.42.1; nothing to add on 0.31.0)",
    remove_when="diffusers offers registration of out-of-tree attention backends",
)
