"""Accuracy scripts against a scripted OpenAI-compatible server.

The fake server knows, for each question text, which letter to answer and how
(bare letter, a sentence, top logprobs, or nonsense), so the expected accuracy
is computed independently in the test from that script. A real-server run is
in tests/lmdeploy (it needs the tiny model served on the maca device).
"""

from __future__ import annotations

import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from maca_infer.eval import ceval, mmlu
from maca_infer.eval.cli import add_arguments, run
from maca_infer.eval.common import parse_choice

AWKWARD = [
    'Which "quoted" word, with commas, is right?',
    "A question\nspanning two lines?",
    "中文问题：下列哪个是正确的？",
    "Plain question 4",
    "Plain question 5",
]


class Script:
    """question text -> (letter, style); counts requests; can fail after N."""

    def __init__(self):
        self.answers: dict[str, tuple[str, str]] = {}
        self.fail_after: int | None = None
        self.requests = 0
        self.lock = threading.Lock()

    def reply(self, prompt: str) -> tuple[int, dict]:
        with self.lock:
            self.requests += 1
            if self.fail_after is not None and self.requests > self.fail_after:
                return 500, {"error": "scripted failure"}
        # the asked question is the last block of the prompt
        last = prompt.rsplit("\n\n", 1)[-1]
        for text, (letter, style) in self.answers.items():
            if last.startswith(text.strip()):
                if style == "logprobs":
                    lps = {" A": -3.0, " B": -2.5, " C": -4.0, " D": -5.0}
                    lps[" " + letter] = -0.1
                    return 200, {"choices": [{"text": " Z", "logprobs": {"top_logprobs": [lps]}}]}
                if style == "sentence":
                    return 200, {"choices": [{"text": f" The answer is ({letter}).", "logprobs": None}]}
                if style == "nonsense":
                    return 200, {"choices": [{"text": " no idea", "logprobs": None}]}
                return 200, {"choices": [{"text": f" {letter}", "logprobs": None}]}
        return 200, {"choices": [{"text": " ?", "logprobs": None}]}


@pytest.fixture()
def server():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, {"data": [{"id": "tiny"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            code, reply = script.reply(body["prompt"])
            self._send(code, reply)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()
    httpd.server_close()


def _write_mmlu(root):
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
    golds = {}
    for subject, texts in {"abstract_algebra": AWKWARD[:3], "world_religions": AWKWARD[3:]}.items():
        with open(root / "dev" / f"{subject}_dev.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            for i in range(3):
                w.writerow([f"dev q{i}, with comma", "1", "2", "3", "4", "ABCD"[i]])
        with open(root / "test" / f"{subject}_test.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            for i, text in enumerate(texts):
                gold = "ABCD"[(i + len(subject)) % 4]
                w.writerow([text, 'opt "a"', "opt, b", "选项C", "opt\nd", gold])
                golds[text] = gold
    return golds


def _args(ns: list[str]):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(ns)


def test_mmlu_loader_keeps_awkward_rows(tmp_path):
    golds = _write_mmlu(tmp_path)
    dev, questions = mmlu.load(tmp_path)
    assert [q.question for q in questions] == AWKWARD
    assert questions[0].options[1] == "opt, b" and questions[0].options[3] == "opt\nd"
    assert {q.question: q.answer for q in questions} == golds
    prompt = mmlu.build_prompt(questions[0], dev, ntrain=2)
    assert prompt.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert prompt.count("Answer:") == 3 and prompt.endswith("Answer:")


def test_mmlu_accuracy_arithmetic_and_resume(tmp_path, server):
    url, script = server
    golds = _write_mmlu(tmp_path / "mmlu")
    # script: right via letter, right via sentence, wrong via logprobs, right via logprobs, unparsable
    styles = ["letter", "sentence", "logprobs", "logprobs", "nonsense"]
    right = [True, True, False, True, False]
    for text, style, ok in zip(AWKWARD, styles, right):
        gold = golds[text]
        letter = gold if ok else "ABCD"[("ABCD".index(gold) + 1) % 4]
        script.answers[text] = (letter, style)

    out = tmp_path / "res.json"
    script.fail_after = 2  # the run dies after two answers
    with pytest.raises(Exception):
        run(_args(["mmlu", "--url", url, "--data-dir", str(tmp_path / "mmlu"), "--ntrain", "2",
                   "--output", str(out), "--concurrency", "1", "--no-progress"]))
    answers = tmp_path / "res.json.answers.jsonl"
    kept = answers.read_text().splitlines()
    assert len(kept) == 2

    script.fail_after = None
    before = script.requests
    assert run(_args(["mmlu", "--url", url, "--data-dir", str(tmp_path / "mmlu"), "--ntrain", "2",
                      "--output", str(out), "--no-progress"])) == 0
    assert script.requests - before == 3  # only the unanswered questions were asked again
    summary = json.loads(out.read_text())
    per_subject = {"abstract_algebra": right[:3], "world_religions": right[3:]}
    for s, oks in per_subject.items():
        assert summary["subjects"][s]["accuracy"] == pytest.approx(sum(oks) / len(oks))
    assert summary["micro_accuracy"] == pytest.approx(sum(right) / len(right))
    assert summary["macro_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert summary["unparsed"] == 1


def test_ceval_csv_and_jsonl(tmp_path, server):
    url, script = server
    root = tmp_path / "ceval"
    for split in ("dev", "val"):
        (root / split).mkdir(parents=True)
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    rows = [["0", "下列说法，“正确”的是？", "甲", "乙", "丙", "丁", "C", "因为, 所以"],
            ["1", "多行\n题目", "1", "2", "3", "4", "A", ""]]
    for split in ("dev", "val"):
        with open(root / split / f"computer_network_{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    script.answers[rows[0][1]] = ("C", "letter")
    script.answers[rows[1][1]] = ("B", "letter")
    out = tmp_path / "ceval.json"
    assert run(_args(["ceval", "--url", url, "--data", str(root), "--ntrain", "1",
                      "--output", str(out), "--no-progress"])) == 0
    summary = json.loads(out.read_text())
    assert summary["micro_accuracy"] == pytest.approx(0.5)
    dev, qs = ceval.load(root)
    assert ceval.build_prompt(qs[0], dev, 1).count("答案：") == 2

    jsonl = tmp_path / "ceval.jsonl"
    jsonl.write_text("\n".join(json.dumps({"subject": "law", "question": r[1], "A": r[2], "B": r[3], "C": r[4],
                                           "D": r[5], "answer": r[6]}, ensure_ascii=False) for r in rows))
    dev, qs = ceval.load(jsonl)
    assert [q.answer for q in qs] == ["C", "A"]


@pytest.mark.parametrize("text,expected", [
    (" B", "B"), ("The answer is (C).", "C"), ("答案是D", "D"), ("A. because", "A"),
    ("answer: A", "A"), ("I cannot tell", None), ("", None),
])
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


def test_bad_rows_are_clear_errors(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="answer 'E' is not one of A, B, C, D"):
        mmlu.load(tmp_path)
    with pytest.raises(ValueError, match="no test/ folder"):
        mmlu.load(tmp_path / "nope")
