"""Fake ``mcoplib._moe_C``: vLLM's ``torch.ops._moe_C.topk_softmax`` in plain torch (CPU)."""

from __future__ import annotations

import torch

calls: list[str] = []
libraries: list[torch.library.Library] = []


def topk_softmax(topk_weights, topk_indices, token_expert_indices, gating_output):
    """softmax over all experts, then the top-k probabilities (not renormalized) and their expert ids;
    token_expert_indices[t, k] = k * num_tokens + t (the row of a [k, T] expansion)."""
    calls.append("topk_softmax")
    if topk_weights.dtype != torch.float32 or topk_indices.dtype != torch.int32:
        raise RuntimeError("_moe_C.topk_softmax (fake): topk_weights float32 and topk_indices int32")
    if not gating_output.is_contiguous():
        raise RuntimeError("_moe_C.topk_softmax (fake): gating_output must be contiguous")
    probs = torch.softmax(gating_output.float(), dim=-1)
    top_k = topk_weights.shape[1]
    # ties go to the lower expert id: a stable sort of the negated probabilities
    order = torch.sort(-probs, dim=-1, stable=True).indices[:, :top_k]
    topk_indices.copy_(order)
    topk_weights.copy_(torch.gather(probs, 1, order))
    tokens = torch.arange(gating_output.shape[0], dtype=torch.int32)[:, None]
    token_expert_indices.copy_(torch.arange(top_k, dtype=torch.int32)[None, :] * gating_output.shape[0] + tokens)


_lib = torch.library.Library("_moe_C", "FRAGMENT")
_lib.define("topk_softmax(Tensor(a!) topk_weights, Tensor(b!) topk_indices, Tensor(c!) token_expert_indices, "
            "Tensor gating_output) -> ()")
_lib.impl("topk_softmax", topk_softmax, "CompositeExplicitAutograd")
libraries.append(_lib)
