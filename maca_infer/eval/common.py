"""Shared pieces of the accuracy scripts: questions, prompts, the client,
answer parsing and a resumable results store.

A ``Question`` is one multiple-choice item (four options A-D). Each is asked
with a few-shot prompt through ``/v1/completions`` (``max_tokens`` small,
``temperature`` 0, ``logprobs`` when the server gives them), and the choice is
read from the logprobs of the tokens A/B/C/D when present, else from the
text. Every finished answer is appended to a JSONL file at once, so a crash
loses nothing: a rerun skips the keys already there.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    import requests

CHOICES = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    subject: str
    index: int
    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A".."D"

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.index}"


def format_item(q: Question, answer_label: str, with_answer: bool) -> str:
    body = q.question.strip() + "\n" + "".join(f"{c}. {o}\n" for c, o in zip(CHOICES, q.options))
    return body + f"{answer_label}" + (f" {q.answer}\n\n" if with_answer else "")


_PATTERNS = [
    re.compile(r"(?:answer|Answer|ANSWER)\s*(?:is|:)?\s*\(?([ABCD])\b"),
    re.compile(r"答案(?:是|为|：|:)?\s*\(?([ABCD])"),
    re.compile(r"^\s*\(?([ABCD])[\).:：。\s]"),
    re.compile(r"^\s*([ABCD])\s*$"),
    re.compile(r"\b([ABCD])\b"),
]


def parse_choice(text: str) -> str | None:
    """The option letter a completion chose, or None when it names none."""
    if not text:
        return None
    for pattern in _PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1)
    return None


def choice_from_logprobs(top_logprobs: list[dict] | None) -> str | None:
    """Most likely of A-D among the first generated token's alternatives."""
    if not top_logprobs:
        return None
    first = top_logprobs[0] or {}
    best, best_lp = None, -math.inf
    for token, lp in first.items():
        letter = token.strip()
        if letter in CHOICES and lp is not None and lp > best_lp:
            best, best_lp = letter, lp
    return best


class Client:
    """Minimal OpenAI-compatible completions client (thread-safe).

    Needs ``requests`` (the ``eval`` extra). It is imported here, not at module
    level, so that the base install's ``maca-infer`` starts without it.
    """

    def __init__(self, url: str, model: str | None = None, timeout: float = 120.0, retries: int = 2):
        import requests

        self._requests = requests
        self.base = url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.timeout = timeout
        self.retries = retries
        self._local = threading.local()
        self.model = model or self._first_model()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "s"):
            self._local.s = self._requests.Session()
        return self._local.s

    def _first_model(self) -> str:
        r = self._session().get(f"{self.base}/v1/models", timeout=self.timeout)
        r.raise_for_status()
        data = r.json().get("data") or []
        if not data:
            raise RuntimeError(f"{self.base}/v1/models lists no model; pass --model")
        return data[0]["id"]

    def complete(self, prompt: str, max_tokens: int = 4, logprobs: int | None = 5) -> tuple[str, list | None]:
        # ignore_eos (LMDeploy / SGLang / vLLM extension): a model whose likeliest first token ends the
        # text (an instruct model after "Answer:") would otherwise return no token and no logprobs,
        # hiding its A-D choice
        payload = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                   "ignore_eos": True}
        if logprobs:
            payload["logprobs"] = logprobs
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                r = self._session().post(f"{self.base}/v1/completions", json=payload, timeout=self.timeout)
                if r.status_code == 400 and logprobs:
                    # some servers refuse logprobs: ask again without them
                    payload.pop("logprobs", None)
                    logprobs = None
                    continue
                r.raise_for_status()
                choice = r.json()["choices"][0]
                lp = (choice.get("logprobs") or {}).get("top_logprobs")
                return choice.get("text", ""), lp
            except (self._requests.RequestException, KeyError, ValueError) as exc:
                last = exc
                time.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"request to {self.base}/v1/completions failed: {last}")


class ResultStore:
    """Append-only JSONL of finished answers, keyed by ``Question.key``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.done: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash: that question is asked again
                self.done[rec["key"]] = rec

    def add(self, rec: dict) -> None:
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
            self.done[rec["key"]] = rec


def run_questions(
    client: Client,
    questions: Iterable[Question],
    build_prompt: Callable[[Question], str],
    store: ResultStore,
    concurrency: int = 8,
    progress: bool = True,
) -> None:
    todo = [q for q in questions if q.key not in store.done]
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="questions", unit="q")
        except ImportError:
            bar = None

    def ask(q: Question) -> dict:
        text, lp = client.complete(build_prompt(q))
        pred = choice_from_logprobs(lp) or parse_choice(text)
        return {"key": q.key, "subject": q.subject, "index": q.index, "gold": q.answer,
                "pred": pred, "text": text, "correct": pred == q.answer}

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(ask, q) for q in todo]
        for fut in as_completed(futures):
            store.add(fut.result())
            if bar:
                bar.update(1)
    if bar:
        bar.close()


def summarize(questions: list[Question], store: ResultStore) -> dict:
    """Per-subject and average accuracy over ``questions`` (all must be answered)."""
    per: dict[str, list[bool]] = {}
    for q in questions:
        rec = store.done[q.key]
        per.setdefault(q.subject, []).append(bool(rec["correct"]))
    subjects = {s: {"n": len(v), "correct": sum(v), "accuracy": sum(v) / len(v)} for s, v in sorted(per.items())}
    total = sum(len(v) for v in per.values())
    right = sum(sum(v) for v in per.values())
    return {
        "subjects": subjects,
        "macro_accuracy": sum(s["accuracy"] for s in subjects.values()) / max(len(subjects), 1),
        "micro_accuracy": right / max(total, 1),
        "n_questions": total,
        "unparsed": sum(1 for q in questions if store.done[q.key]["pred"] is None),
    }


def question_dicts(questions: list[Question]) -> list[dict]:
    return [asdict(q) for q in questions]
