"""Hugging Face reference for the real-model tests (SmolLM2), run as a script in a clean process.

Stock transformers on the CPU (no maca-infer device), in the dtype asked
(default float32, on the checkpoint's bf16 weights). Reads JSON from stdin::

    {"model": dir, "dtype": "float32", "prompts": [str], "chats": [str],
     "max_new_tokens": n, "mmlu": {"data_dir": dir, "ntrain": k} | null}

or ``{"model": dir, "preset": "smollm2"}`` for the shared SmolLM2 set below
(:data:`SMOLLM2`: the prompts, chat questions and MMLU set every framework's
real-model test uses), and prints JSON (the request's fields included):

- ``prompt_ids`` / ``greedy`` / ``margins``: per prompt, tokenizer(prompt)
  ids, HF ``generate`` greedy ids (exactly ``max_new_tokens``, no stop), and
  the top-1 minus top-2 logit at each step;
- ``chat``: per chat question, the greedy answer text to the chat-templated
  question (stops at the end-of-turn token, at most ``max_new_tokens``);
- ``mmlu``: per question key the choice, read as ``maca-infer eval`` reads a
  server's answer (the best of A-D among the first token's top-5 log-probs,
  else the letter in the 4-token greedy text, end-of-text ignored as the
  eval asks), the letter margin, accuracy.

Answers are cached under the model cache (``hf-reference/<sha256>.json``,
keyed by the request, this script and the library versions): the LMDeploy,
SGLang and HF modules share one run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path


HERE = Path(__file__).resolve().parent

# Prompts of 34-60 tokens (3-4 KV blocks of 16) whose float32 greedy
# continuations stand clear of ties for most steps; 16 new tokens.
SMOLLM2 = {
    "dtype": "float32",
    "max_new_tokens": 16,
    "prompts": [
        "The days of the week are Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday. "
        "The months of the year are January, February, March, April,",
        "Question: What is the capital of France?\nAnswer: The capital of France is Paris.\n\n"
        "Question: What is the capital of Germany?\nAnswer: The capital of Germany is Berlin.\n\n"
        "Question: What is the capital of Spain?\nAnswer:",
        "The numbers from one to forty in words: one, two, three, four, five, six, seven, eight, nine, ten, "
        "eleven, twelve, thirteen, fourteen, fifteen, sixteen, seventeen, eighteen, nineteen, twenty,",
    ],
    "chats": ["What is the capital of France?"],
    # zero-shot: this 135M model's letter choice among A-D stands clear of ties there
    "mmlu": {"data_dir": str(HERE / "data" / "mmlu_easy"), "ntrain": 0},
}


def _cache_file(req: dict) -> Path:
    from maca_infer.common import envs

    h = hashlib.sha256(json.dumps(req, sort_keys=True).encode())
    h.update(Path(__file__).read_bytes())
    for dist in ("torch", "transformers", "tokenizers"):
        h.update(f"{dist}={metadata.version(dist)}".encode())
    for csv in sorted(Path(SMOLLM2["mmlu"]["data_dir"]).rglob("*.csv")):
        h.update(csv.read_bytes())
    return Path(envs.model_cache_dir()) / "hf-reference" / f"{h.hexdigest()[:24]}.json"


def _greedy(model, ids: list[int], n: int, stop: bool):
    import torch

    inp = torch.tensor([ids])
    kwargs = {} if stop else {"min_new_tokens": n, "eos_token_id": None}
    gen = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
    out = gen.sequences[0, len(ids):].tolist()
    margins = []
    for scores in gen.scores:
        top2 = scores[0].float().topk(2).values
        margins.append(float(top2[0] - top2[1]))
    return out, margins


def _mmlu(model, tok, data_dir: str, ntrain: int) -> dict:
    import torch

    from maca_infer.eval import mmlu
    from maca_infer.eval.common import CHOICES, choice_from_logprobs, parse_choice

    dev, questions = mmlu.load(Path(data_dir))
    preds, margins = {}, {}
    for q in questions:
        ids = tok(mmlu.build_prompt(q, dev, ntrain)).input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        top = logprobs.topk(5)
        first = {tok.decode([int(i)]): float(v) for v, i in zip(top.values, top.indices)}
        pred = choice_from_logprobs([first])
        if pred is None:
            text_ids, _ = _greedy(model, ids, 4, stop=False)  # the eval asks with ignore_eos
            pred = parse_choice(tok.decode(text_ids, skip_special_tokens=True))
        letters = sorted((v for t, v in first.items() if t.strip() in CHOICES), reverse=True)
        margins[q.key] = letters[0] - letters[1] if len(letters) > 1 else None
        preds[q.key] = {"pred": pred, "gold": q.answer}
    right = sum(p["pred"] == p["gold"] for p in preds.values())
    return {"preds": preds, "letter_margins": margins, "correct": right, "n": len(preds),
            "accuracy": right / len(preds)}


def main() -> None:
    req = json.loads(sys.stdin.read())
    if req.pop("preset", None) == "smollm2":
        req = {**SMOLLM2, **req}
    cache = _cache_file(req)
    if cache.is_file():
        print(cache.read_text())
        return
    print(json.dumps(compute(req)))


def compute(req: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(req["model"])
    # transformers < 4.56 calls the keyword torch_dtype (the 4.46 CI lane runs this script too)
    from packaging.version import Version

    keyword = "dtype" if Version(metadata.version("transformers")) >= Version("4.56") else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(req["model"], **{keyword: getattr(torch, req.get("dtype", "float32"))})
    model.eval()
    n = int(req.get("max_new_tokens", 16))
    out: dict = {"prompt_ids": [], "greedy": [], "margins": [], "chat": []}
    for prompt in req.get("prompts", []):
        ids = tok(prompt).input_ids
        greedy, margins = _greedy(model, ids, n, stop=False)
        out["prompt_ids"].append(ids)
        out["greedy"].append(greedy)
        out["margins"].append(margins)
    for question in req.get("chats", []):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        answer, _ = _greedy(model, ids, n, stop=True)
        out["chat"].append(tok.decode(answer, skip_special_tokens=True))
    if req.get("mmlu"):
        out["mmlu"] = _mmlu(model, tok, req["mmlu"]["data_dir"], int(req["mmlu"].get("ntrain", 2)))
    out["request"] = req
    cache = _cache_file(req)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, cache)
    return out


if __name__ == "__main__":
    main()
