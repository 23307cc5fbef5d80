"""LMDeploy's ``random_seed`` on the maca device: a seeded request repeats, other seeds differ.

On CUDA LMDeploy draws each token from ``tl.rand(random_seed, tokens so far)``
(its Triton multinomial kernel); its dlinfer backends (maca included) used
``torch.multinomial`` on the global RNG and ignored the seed. maca-infer's
``MacaOpsBackend.build_op`` fix gives maca the same seeded draw.
"""

from __future__ import annotations

import gc

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
MAX_NEW = 24


@pytest.fixture(scope="module")
def pipe(dlinfer_ours):
    from lmdeploy import PytorchEngineConfig, pipeline

    from maca_infer.modelzoo import get

    config = PytorchEngineConfig(device_type="maca", block_size=16, dtype="float16", eager_mode=True,
                                 cache_max_entry_count=0.05, max_batch_size=8)
    p = pipeline(str(get("llama")), backend_config=config, log_level="WARNING")
    yield p
    p.close()
    del p
    gc.collect()


def _sample(pipe, seeds):
    from lmdeploy import GenerationConfig

    gens = [GenerationConfig(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             ignore_eos=True, random_seed=s) for s in seeds]
    out = pipe([PROMPT] * len(seeds), gen_config=gens, do_preprocess=False)
    return [list(r.token_ids) for r in out]


def test_same_seed_same_tokens_other_seeds_differ(pipe):
    first = _sample(pipe, [1234])[0]
    again = _sample(pipe, [1234])[0]
    assert len(first) == MAX_NEW
    assert first == again, "the same seeded request gave different tokens"
    others = [_sample(pipe, [seed])[0] for seed in (1, 2, 3)]
    assert any(o != first for o in others), "every seed gave the same tokens: the seed is not used"


def test_seeded_draw_is_the_cuda_kernels_draw(pipe):
    """The fix is the one LMDeploy builds for maca, and it draws as the cuda kernel would."""
    import torch
    from lmdeploy.pytorch.backends.dlinfer.maca.op_backend import MacaOpsBackend
    from lmdeploy.pytorch.backends.multinomial_sampling import MultinomialSamplingBuildSpec

    from maca_infer.adapters.lmdeploy import lmdeploy_patches
    from maca_infer.common.ops.sampling import philox_uniform

    impl = MacaOpsBackend.build_op(MultinomialSamplingBuildSpec())
    assert isinstance(impl, lmdeploy_patches.MacaSeededMultinomialSampling)
    scores = torch.full((3, 4), 0.25)
    seeds, offsets = torch.tensor([5, 5, 6]), torch.tensor([10, 10, 10])
    indices = torch.tensor([[7, 8, 9, 10]] * 3)
    got = impl.forward(scores, seeds, offsets, indices)
    u = philox_uniform(seeds, offsets)
    assert got.tolist() == [7 + min(3, int(x * 4)) for x in u.tolist()]
    assert got[0] == got[1]
