"""Hugging Face reference for the LMDeploy parity tests (run as a script).

Runs in a separate process without the emulated device so that the reference
is stock transformers on the CPU in float32. Reads JSON from stdin:
``{"model": dir, "prompts": [str], "max_new_tokens": n, "check": [[ids...]]}``
and prints JSON:

- ``prompt_ids``: tokenizer(prompt).input_ids per prompt;
- ``greedy``: HF ``generate`` greedy continuation ids, ``margins``: the
  top-1 minus top-2 logit at each generated step (near-ties make any two
  implementations disagree legitimately);
- ``teacher``: for each ``check`` sequence (prompt + candidate continuation),
  per generated position the candidate token's logit, the best logit and the
  best token, from one teacher-forced forward pass.

``"act_quant": "int8_per_token"`` makes the reference a W8A8 model on the
(dequantized) weights it loads: the input of every quantized Linear (all but
``lm_head`` and MoE routers) and of every expert projection is replaced by its
per-token symmetric INT8 quantize-dequantize ``q * s`` (``s = max|x| / 127``,
``q`` rounded half away from zero), computed here in float64, independently
of maca-infer's ops.
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """``q * s`` per row (float64 math, returned in ``x.dtype``)."""
    xd = x.double()
    scale = xd.abs().amax(dim=-1, keepdim=True).clamp_min(1e-10) / 127.0
    v = xd / scale
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127)
    return (q * scale).to(x.dtype)


def _quantized_experts_forward(experts):
    """transformers' stacked-expert forward (gate_up_proj [E, 2I, H], down_proj [E, H, I]) with INT8 inputs."""
    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        x = int8_per_token(hidden_states)
        for e in range(experts.gate_up_proj.shape[0]):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            gate, up = torch.nn.functional.linear(x[token_idx], experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = int8_per_token(experts.act_fn(gate) * up)
            y = torch.nn.functional.linear(h, experts.down_proj[e]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    return forward


def quantize_activations(model) -> int:
    """Install INT8 per-token activation quantization; returns how many modules got it."""
    count = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and leaf not in ("lm_head", "gate"):
            module.register_forward_pre_hook(lambda _m, args: (int8_per_token(args[0]), *args[1:]))
            count += 1
        elif isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter) and module.gate_up_proj.dim() == 3:
            module.forward = _quantized_experts_forward(module)
            count += 1
    return count


def main() -> None:
    req = json.loads(sys.stdin.read())
    tok = AutoTokenizer.from_pretrained(req["model"])
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32)
    model.eval()
    act_quant = req.get("act_quant")
    if act_quant not in (None, "int8_per_token"):
        raise ValueError(f"act_quant={act_quant!r}; allowed: None, 'int8_per_token'")
    if act_quant and quantize_activations(model) == 0:
        raise ValueError(f"act_quant: no Linear or stacked-expert module found in {req['model']}")
    out: dict = {"prompt_ids": [], "greedy": [], "margins": [], "teacher": []}
    n = int(req.get("max_new_tokens", 0))
    for prompt in req["prompts"]:
        ids = tok(prompt, return_tensors="pt").input_ids
        out["prompt_ids"].append(ids[0].tolist())
        if n:
            gen = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True)
            out["greedy"].append(gen.sequences[0, ids.shape[1]:].tolist())
            margins = []
            for scores in gen.scores:
                top2 = scores[0].float().topk(2).values
                margins.append(float(top2[0] - top2[1]))
            out["margins"].append(margins)
    for prompt_ids, continuation in req.get("check", []):
        seq = torch.tensor([prompt_ids + continuation])
        with torch.no_grad():
            logits = model(seq).logits[0].float()
        rows = []
        for i, token in enumerate(continuation):
            step_logits = logits[len(prompt_ids) - 1 + i]
            rows.append([float(step_logits[token]), float(step_logits.max()), int(step_logits.argmax())])
        out["teacher"].append(rows)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
