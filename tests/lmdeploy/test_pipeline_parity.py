"""``lmdeploy.pipeline(..., PytorchEngineConfig(device_type="maca"))`` on the emulated
maca device generates what Hugging Face generates on the same weights.

Each case builds one engine (graph mode unless marked eager), generates a
mixed-length batch whose longest prompt spans several KV blocks, and checks
every token against HF float32 (``lmdeploy_helpers.assert_greedy_parity``).
"""

from __future__ import annotations

import gc

import pytest

from lmdeploy_helpers import PROMPTS, assert_greedy_parity

MAX_NEW_TOKENS = 32


def _run_pipeline(kind: str, dtype: str, block_size: int, eager: bool, prompts=PROMPTS, **engine_kwargs):
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

    from maca_infer.modelzoo import get

    model_dir = str(get(kind))
    config = PytorchEngineConfig(device_type="maca", block_size=block_size, dtype=dtype, eager_mode=eager,
                                 cache_max_entry_count=0.05, max_batch_size=8, **engine_kwargs)
    pipe = pipeline(model_dir, backend_config=config, log_level="WARNING")
    try:
        gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, top_k=1, ignore_eos=True)
        responses = pipe(prompts, gen_config=gen, do_preprocess=False)
        prompt_ids = [pipe.async_engine.tokenizer.encode(p, add_bos=True) for p in prompts]
        outputs = [list(r.token_ids) for r in responses]
        again = None
        if engine_kwargs.get("enable_prefix_caching"):
            # same prompts again: the prefix blocks now come from the cache
            again = [list(r.token_ids) for r in pipe(prompts, gen_config=gen, do_preprocess=False)]
    finally:
        pipe.close()
        del pipe
        gc.collect()
    return model_dir, prompt_ids, outputs, again


@pytest.mark.parametrize(
    "kind,dtype,block_size,eager",
    [
        ("llama", "bfloat16", 16, False),   # the case: block 16, graph mode (no --eager-mode)
        ("qwen2", "float16", 16, True),
        ("qwen2", "bfloat16", 32, False),
        ("llama", "float16", 64, False),    # LMDeploy's default block size
    ],
)
def test_pipeline_matches_hf(dlinfer_ours, kind, dtype, block_size, eager):
    prefix_caching = block_size == 16
    from maca_infer.adapters.lmdeploy import lmdeploy_patches

    runners_before = lmdeploy_patches.graph_runners_built
    model_dir, prompt_ids, outputs, again = _run_pipeline(kind, dtype, block_size, eager,
                                                             enable_prefix_caching=prefix_caching)
    assert lmdeploy_patches.graph_runners_built == runners_before + 1, "the maca graph runner was not used"
    assert max(len(p) for p in prompt_ids) > 2 * block_size or block_size == 64
    assert max(len(p) for p in prompt_ids) + MAX_NEW_TOKENS > 64, "the batch must cross several blocks"
    assert all(len(o) == MAX_NEW_TOKENS for o in outputs)
    report = assert_greedy_parity(model_dir, PROMPTS, prompt_ids, outputs, dtype)
    print(f"{kind} {dtype} bs{block_size} eager={eager}: {report}")
    if again is not None:
        assert again == outputs, "prefix-cached rerun changed the greedy output"


def test_bad_block_size_is_rejected_clearly():
    from lmdeploy import PytorchEngineConfig

    with pytest.raises(AssertionError, match="power of 2"):
        PytorchEngineConfig(device_type="maca", block_size=24)
