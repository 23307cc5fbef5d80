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
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    req = json.loads(sys.stdin.read())
    tok = AutoTokenizer.from_pretrained(req["model"])
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32)
    model.eval()
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
