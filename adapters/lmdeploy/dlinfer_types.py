"""``dlinfer.utils.type_annotation`` and ``dlinfer.utils.registry`` as LMDeploy imports them.

LMDeploy 0.18 imports ``MoECommType`` and ``MoeMetadata`` from here and
builds ``MoeMetadata`` only on Ascend; on maca the step context carries none.
Written from the interface LMDeploy uses (field names it reads/sets).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union  # noqa: F401 - re-exported names

import torch
from torch import Tensor  # noqa: F401 - re-exported

__all__ = ["MoECommType", "MoeMetadata", "register_ops", "Tensor", "Optional", "Sequence", "Tuple"]


class MoECommType(Enum):
    """How MoE tokens travel between ranks (only the single-rank path runs on maca)."""

    NAIVE = auto()
    ALLGATHER = auto()
    ALLTOALL = auto()
    MC2 = auto()
    TP = auto()
    UNDEFINED = auto()


@dataclass
class MoeMetadata:
    """Per-step MoE context an engine may attach (LMDeploy sets ``router_n_groups`` and
    ``expert_ids_per_ep_rank`` on it)."""

    max_tokens_across_dp: int = 1
    pad_size: int = 0
    dp_size: int = 1
    tp_size: int = 1
    ep_size: int = 1
    tp_rank: int = 0
    ep_rank: int = 0
    tp_group: Optional[Any] = None
    ep_group: Optional[Any] = None
    moe_comm_type: MoECommType = MoECommType.UNDEFINED
    x_active_mask: Optional[torch.Tensor] = None
    moe_group_name: Optional[str] = None
    expert_ids_per_ep_rank: Optional[torch.Tensor] = None
    router_n_groups: int = -1


# upstream dlinfer types these as torch.Tensor on Ascend, float elsewhere
linear_w8a8_scale_type = float
dynamic_quant_scale_type = float


def register_ops(registry: dict) -> Callable:
    """Decorator: ``registry[fn.__name__] = fn`` (dlinfer's vendor registration style)."""

    def wrap(fn: Callable) -> Callable:
        registry[fn.__name__] = fn
        return fn

    return wrap
