"""MetaX's guide's SGLang flags on the maca device: ``--attention-backend flashinfer``, ``--enable-flashinfer-mla``.

SGLang 0.5.23 stops a flashinfer launch without flashinfer_python >= 0.7.2
("... is not installed. Please uninstall the old version and reinstall ...",
misleading on MACA, where MetaX ships flashinfer 0.2.6+metax) and no longer
knows ``--enable-flashinfer-mla`` (0.4.x). On the maca platform, when
flashinfer cannot serve SGLang, both run the ``maca`` backend with one log
line. Unit tests cover the decision; two servers (tiny Llama with
``--attention-backend flashinfer``, tiny DeepSeek-V2 with the guide's MLA flag)
must answer with Hugging Face's greedy tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import requests

pytest.importorskip("sglang")

MAX_NEW = 8
FALLBACK_LINE = "running maca-infer's 'maca' attention backend instead"
REINSTALL = "Please uninstall the old version"


@pytest.fixture()
def platform_module():
    from maca_infer.adapters.sglang import platform

    return platform


def _args(**fields):
    base = {"attention_backend": None, "prefill_attention_backend": None, "decode_attention_backend": None}
    return SimpleNamespace(**{**base, **fields})


def test_flashinfer_maps_to_maca_on_the_emulated_device(platform_module, caplog):
    args = _args(attention_backend="flashinfer", decode_attention_backend="flashinfer")
    changed = platform_module.map_flashinfer_to_maca(args, emulated=True)
    assert changed == ["attention_backend", "decode_attention_backend"]
    assert args.attention_backend == args.decode_attention_backend == "maca"
    assert args.prefill_attention_backend is None


def test_other_backends_are_left_alone(platform_module):
    args = _args(attention_backend="triton")
    assert platform_module.map_flashinfer_to_maca(args, emulated=True) == []
    assert args.attention_backend == "triton"


@pytest.mark.parametrize(
    "installed, reason_part",
    [(None, "not installed"), ("0.2.6+metax3.8.0.7", "older than the 0.7.2")],
)
def test_on_a_device_metax_flashinfer_that_cannot_serve_maps_to_maca(platform_module, monkeypatch, installed,
                                                                     reason_part):
    from importlib import metadata

    def version(dist):
        if dist == platform_module.FLASHINFER_DIST and installed is not None:
            return installed
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(metadata, "version", version)
    assert reason_part in platform_module.flashinfer_unusable_reason(emulated=False)
    args = _args(attention_backend="flashinfer")
    assert platform_module.map_flashinfer_to_maca(args, emulated=False) == ["attention_backend"]
    assert args.attention_backend == "maca"


def test_a_working_flashinfer_is_kept_on_a_device(platform_module, monkeypatch):
    import sys
    from importlib import metadata

    monkeypatch.setattr(metadata, "version", lambda dist: "0.7.2")
    monkeypatch.setitem(sys.modules, "flashinfer", SimpleNamespace())  # importable
    assert platform_module.flashinfer_unusable_reason(emulated=False) is None
    args = _args(attention_backend="flashinfer")
    assert platform_module.map_flashinfer_to_maca(args, emulated=False) == []
    assert args.attention_backend == "flashinfer"


def _greedy(server, prompts):
    out = server.post("/generate", {
        "input_ids": prompts,
        "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True},
    })
    return [o["output_ids"] for o in out]


def _prompt_ids(model_path, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    return [tok(t).input_ids for t in texts]


@pytest.mark.slow
def test_attention_backend_flashinfer_serves_with_maca(sglang_launcher, hf_greedy_fn, tmp_path):
    from maca_infer.modelzoo import get

    model = get("llama")
    prompts = _prompt_ids(model, ["The capital of France is", "one two three four five six seven eight nine ten " * 2])
    # the guide's shape (tp 1 here): --attention-backend flashinfer --enable-dp-attention (dp 1)
    # float32, as the other exact-token server tests: bf16 rounding alone flips this random model's near-ties
    with sglang_launcher(model, "--tp", "1", "--attention-backend", "flashinfer", "--enable-dp-attention",
                         "--page-size", "16", "--max-running-requests", "4", "--dtype", "float32",
                         log_dir=tmp_path) as server:
        got = _greedy(server, prompts)
        info = requests.get(server.url + "/get_server_info", timeout=30).json()
        log = server.log()
    assert log.count(FALLBACK_LINE) == 1, log[-4000:]
    assert "--attention-backend flashinfer: the emulated maca device has no GPU" in log
    assert REINSTALL not in log
    assert info["attention_backend"] == "maca"
    assert got == hf_greedy_fn(model, prompts, MAX_NEW, dtype="float32")


@pytest.mark.slow
def test_enable_flashinfer_mla_serves_deepseek_with_maca(sglang_launcher, hf_greedy_fn, tmp_path):
    from maca_infer.modelzoo import get

    model = get("deepseek_v2")
    prompts = _prompt_ids(model, ["Deep learning on MetaX GPUs", "a b c d e f g h i j k l m n o p " * 2])
    # float32: as tests/sglang/test_server_deepseek.py (random MLA weights, near-tied picks in bf16)
    with sglang_launcher(model, "--tp", "1", "--enable-flashinfer-mla", "--dtype", "float32",
                         "--max-running-requests", "4", log_dir=tmp_path) as server:
        got = _greedy(server, prompts)
        log = server.log()
    assert "--enable-flashinfer-mla (SGLang 0.4.x, as MetaX's guide types it) read as --attention-backend flashinfer" in log
    assert log.count(FALLBACK_LINE) == 1, log[-4000:]
    assert REINSTALL not in log
    assert got == hf_greedy_fn(model, prompts, MAX_NEW, dtype="float32")


def test_enable_flashinfer_mla_parses_as_the_guide_types_it():
    """The around-hook adds SGLang 0.4.x's flag to 0.5.x's argument table; an explicit backend given first wins."""
    import argparse

    from maca_infer.adapters.sglang import patching

    def add_cli_args(parser):  # stands in for ServerArgs.add_cli_args
        parser.add_argument("--attention-backend", default=None)

    parser = argparse.ArgumentParser()
    patching._with_flashinfer_mla_flag(add_cli_args, parser)
    assert parser.parse_args(["--enable-flashinfer-mla"]).attention_backend == "flashinfer"
    assert parser.parse_args([]).attention_backend is None
    assert not hasattr(parser.parse_args([]), "_maca_flashinfer_mla")
    given_first = parser.parse_args(["--attention-backend", "triton", "--enable-flashinfer-mla"])
    assert given_first.attention_backend == "triton"
    # applying twice (a second plugin load) adds the flag once
    patching._with_flashinfer_mla_flag(lambda p: None, parser)
