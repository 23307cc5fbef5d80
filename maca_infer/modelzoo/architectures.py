"""What each tiny model is: its config.json and its checkpoint's tensors.

Every architecture is written out as a real Hugging Face checkpoint of that
family would be on disk (the per-expert names ``experts.{e}.gate_proj``,
``block_sparse_moe.experts.{e}.w1``, MLA's ``kv_a_proj_with_mqa`` and so on),
not as transformers' in-memory modules happen to be laid out this year:
LMDeploy and SGLang read those on-disk names with their own loaders.

Common tiny shape: hidden 128, 4 query heads of head_dim 32, 2 KV heads
(GQA), intermediate 256, 2 decoder layers, max_position_embeddings 4096.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from maca_infer.modelzoo.tokenizer import TokenizerInfo

HIDDEN = 128
NUM_HEADS = 4
HEAD_DIM = 32
NUM_KV_HEADS = 2
INTERMEDIATE = 256
NUM_LAYERS = 2
MAX_POSITIONS = 4096
VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor and how to initialise it.

    init: "linear" (normal, std = 1/sqrt(fan_in), fan_in = shape[-1]),
    "embed" (normal, std 1), "lm_head" and "tied_embed" (see weights.py),
    "norm" (around 1), "norm_offset" (around 0: Gemma stores RMSNorm
    weights as w - 1), "final_norm_offset" (Gemma's final norm, the gain
    that sets the logit spread of a tied head),
    "bias" (normal, std 0.1), "router" (MoE gate: wider spread so the
    top-k choice is clear), "score_bias" (DeepSeek-V3's routing bias,
    float32 on disk as in the real checkpoints).
    quantizable: a Linear weight that AWQ/GPTQ checkpoints store as int4.
    """

    name: str
    shape: tuple[int, ...]
    init: str
    quantizable: bool = False


def padded_vocab(tokenizer: TokenizerInfo) -> int:
    return -(-tokenizer.size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _linear(name: str, out_features: int, in_features: int, quantizable: bool = True) -> TensorSpec:
    return TensorSpec(f"{name}.weight", (out_features, in_features), "linear", quantizable)


def _mlp(prefix: str, intermediate: int, names=("gate_proj", "up_proj", "down_proj")) -> list[TensorSpec]:
    gate, up, down = names
    return [
        _linear(f"{prefix}.{gate}", intermediate, HIDDEN),
        _linear(f"{prefix}.{up}", intermediate, HIDDEN),
        _linear(f"{prefix}.{down}", HIDDEN, intermediate),
    ]


def _gqa_attention(prefix: str, qkv_bias: bool) -> list[TensorSpec]:
    specs = [
        _linear(f"{prefix}.q_proj", NUM_HEADS * HEAD_DIM, HIDDEN),
        _linear(f"{prefix}.k_proj", NUM_KV_HEADS * HEAD_DIM, HIDDEN),
        _linear(f"{prefix}.v_proj", NUM_KV_HEADS * HEAD_DIM, HIDDEN),
        _linear(f"{prefix}.o_proj", HIDDEN, NUM_HEADS * HEAD_DIM),
    ]
    if qkv_bias:
        specs += [
            TensorSpec(f"{prefix}.q_proj.bias", (NUM_HEADS * HEAD_DIM,), "bias"),
            TensorSpec(f"{prefix}.k_proj.bias", (NUM_KV_HEADS * HEAD_DIM,), "bias"),
            TensorSpec(f"{prefix}.v_proj.bias", (NUM_KV_HEADS * HEAD_DIM,), "bias"),
        ]
    return specs


def _skeleton(config: dict, layer_fn: Callable[[int, str], list[TensorSpec]], norm: str = "norm") -> list[TensorSpec]:
    vocab = config["vocab_size"]
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, HIDDEN), "embed")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs.append(TensorSpec(f"{p}.input_layernorm.weight", (HIDDEN,), norm))
        specs.append(TensorSpec(f"{p}.post_attention_layernorm.weight", (HIDDEN,), norm))
        specs += layer_fn(i, p)
    specs.append(TensorSpec("model.norm.weight", (HIDDEN,), norm))
    if not config.get("tie_word_embeddings", False):
        specs.append(TensorSpec("lm_head.weight", (vocab, HIDDEN), "lm_head"))
    return specs


def _common_config(arch: str, model_type: str, tok: TokenizerInfo) -> dict:
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": None,  # filled in by config_for
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
    }


# ---------------------------------------------------------------- families


def llama_config(tok: TokenizerInfo) -> dict:
    c = _common_config("LlamaForCausalLM", "llama", tok)
    c.update(
        head_dim=HEAD_DIM, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
        attention_bias=False, mlp_bias=False, pretraining_tp=1,
        eos_token_id=list(tok.stop_ids),
    )
    return c


def llama_tensors(config: dict) -> list[TensorSpec]:
    return _skeleton(
        config,
        lambda i, p: _gqa_attention(f"{p}.self_attn", qkv_bias=False) + _mlp(f"{p}.mlp", INTERMEDIATE),
    )


def qwen2_config(tok: TokenizerInfo) -> dict:
    c = _common_config("Qwen2ForCausalLM", "qwen2", tok)
    c.update(
        rope_theta=1000000.0, rope_scaling=None, use_sliding_window=False,
        sliding_window=MAX_POSITIONS, max_window_layers=NUM_LAYERS,
        bos_token_id=tok.pad_id,  # Qwen2 configs name <|endoftext|> as bos
    )
    return c


def qwen2_tensors(config: dict) -> list[TensorSpec]:
    return _skeleton(
        config,
        lambda i, p: _gqa_attention(f"{p}.self_attn", qkv_bias=True) + _mlp(f"{p}.mlp", INTERMEDIATE),
    )


def qwen3_config(tok: TokenizerInfo) -> dict:
    c = qwen2_config(tok)
    c.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=HEAD_DIM, attention_bias=False)
    return c


def qwen3_tensors(config: dict) -> list[TensorSpec]:
    def layer(i: int, p: str) -> list[TensorSpec]:
        a = f"{p}.self_attn"
        # per-head RMSNorm of q and k before rotary (Qwen3's only change to the Qwen2 layer, besides no bias)
        norms = [TensorSpec(f"{a}.q_norm.weight", (HEAD_DIM,), "norm"), TensorSpec(f"{a}.k_norm.weight", (HEAD_DIM,), "norm")]
        return _gqa_attention(a, qkv_bias=False) + norms + _mlp(f"{p}.mlp", INTERMEDIATE)

    return _skeleton(config, layer)


QWEN2_MOE_EXPERTS = 8
QWEN2_MOE_INTERMEDIATE = 64
QWEN2_MOE_SHARED_INTERMEDIATE = 128


def qwen2_moe_config(tok: TokenizerInfo) -> dict:
    c = qwen2_config(tok)
    c.update(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
        num_experts=QWEN2_MOE_EXPERTS, num_experts_per_tok=2,
        moe_intermediate_size=QWEN2_MOE_INTERMEDIATE,
        shared_expert_intermediate_size=QWEN2_MOE_SHARED_INTERMEDIATE,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False,
        output_router_logits=False, router_aux_loss_coef=0.001, qkv_bias=True,
    )
    return c


def qwen2_moe_tensors(config: dict) -> list[TensorSpec]:
    def layer(i: int, p: str) -> list[TensorSpec]:
        specs = _gqa_attention(f"{p}.self_attn", qkv_bias=True)
        specs.append(TensorSpec(f"{p}.mlp.gate.weight", (QWEN2_MOE_EXPERTS, HIDDEN), "router"))
        for e in range(QWEN2_MOE_EXPERTS):
            specs += _mlp(f"{p}.mlp.experts.{e}", QWEN2_MOE_INTERMEDIATE)
        specs += _mlp(f"{p}.mlp.shared_expert", QWEN2_MOE_SHARED_INTERMEDIATE)
        specs.append(TensorSpec(f"{p}.mlp.shared_expert_gate.weight", (1, HIDDEN), "router"))
        return specs

    return _skeleton(config, layer)


MIXTRAL_EXPERTS = 8
MIXTRAL_INTERMEDIATE = 128


def mixtral_config(tok: TokenizerInfo) -> dict:
    c = _common_config("MixtralForCausalLM", "mixtral", tok)
    c.update(
        head_dim=HEAD_DIM, intermediate_size=MIXTRAL_INTERMEDIATE, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=None, num_local_experts=MIXTRAL_EXPERTS,
        num_experts_per_tok=2, output_router_logits=False, router_aux_loss_coef=0.02,
        router_jitter_noise=0.0,
    )
    return c


def mixtral_tensors(config: dict) -> list[TensorSpec]:
    def layer(i: int, p: str) -> list[TensorSpec]:
        specs = _gqa_attention(f"{p}.self_attn", qkv_bias=False)
        specs.append(TensorSpec(f"{p}.block_sparse_moe.gate.weight", (MIXTRAL_EXPERTS, HIDDEN), "router"))
        for e in range(MIXTRAL_EXPERTS):
            specs += _mlp(f"{p}.block_sparse_moe.experts.{e}", MIXTRAL_INTERMEDIATE, names=("w1", "w3", "w2"))
        return specs

    return _skeleton(config, layer)


def gemma_config(tok: TokenizerInfo) -> dict:
    c = _common_config("GemmaForCausalLM", "gemma", tok)
    c.update(
        head_dim=HEAD_DIM, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
        rope_theta=10000.0, rope_scaling=None, attention_bias=False,
        tie_word_embeddings=True, pad_token_id=tok.pad_id,
    )
    return c


def gemma_tensors(config: dict) -> list[TensorSpec]:
    specs = _skeleton(
        config,
        lambda i, p: _gqa_attention(f"{p}.self_attn", qkv_bias=False) + _mlp(f"{p}.mlp", INTERMEDIATE),
        norm="norm_offset",
    )
    # the embedding is also the output head (tied): see weights.py
    retyped = {"model.embed_tokens.weight": "tied_embed", "model.norm.weight": "final_norm_offset"}
    return [TensorSpec(t.name, t.shape, retyped.get(t.name, t.init), t.quantizable) for t in specs]


# DeepSeek MLA: latent KV of kv_lora_rank plus a shared rope key of
# qk_rope_head_dim per token; per head a no-rope query/key part and a value.
MLA_KV_LORA_RANK = 64
MLA_Q_LORA_RANK_V3 = 64  # V2-Lite projects q directly (q_lora_rank None)
MLA_QK_NOPE_HEAD_DIM = 32
MLA_QK_ROPE_HEAD_DIM = 16
MLA_V_HEAD_DIM = 32
DEEPSEEK_EXPERTS = 8
DEEPSEEK_MOE_INTERMEDIATE = 64


def _deepseek_common(arch: str, model_type: str, tok: TokenizerInfo, q_lora_rank: int | None) -> dict:
    c = _common_config(arch, model_type, tok)
    c.update(
        num_key_value_heads=NUM_HEADS, q_lora_rank=q_lora_rank, kv_lora_rank=MLA_KV_LORA_RANK,
        qk_nope_head_dim=MLA_QK_NOPE_HEAD_DIM, qk_rope_head_dim=MLA_QK_ROPE_HEAD_DIM,
        v_head_dim=MLA_V_HEAD_DIM, n_routed_experts=DEEPSEEK_EXPERTS, n_shared_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=DEEPSEEK_MOE_INTERMEDIATE,
        first_k_dense_replace=1, moe_layer_freq=1, rope_theta=10000.0, rope_scaling=None,
        attention_bias=False, aux_loss_alpha=0.001, seq_aux=True,
    )
    return c


def deepseek_v2_config(tok: TokenizerInfo) -> dict:
    # V2-Lite style: no q LoRA, softmax scores, plain greedy top-k
    c = _deepseek_common("DeepseekV2ForCausalLM", "deepseek_v2", tok, q_lora_rank=None)
    c.update(
        topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=1.0,
    )
    return c


def deepseek_v3_config(tok: TokenizerInfo) -> dict:
    # V3 style: q LoRA, sigmoid scores, group-limited top-k with a score
    # correction bias (noaux_tc), renormalised and scaled weights
    c = _deepseek_common("DeepseekV3ForCausalLM", "deepseek_v3", tok, q_lora_rank=MLA_Q_LORA_RANK_V3)
    c.update(
        topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=0,
        rope_interleave=True,
    )
    return c


def deepseek_tensors(config: dict) -> list[TensorSpec]:
    heads = config["num_attention_heads"]
    qk_head_dim = MLA_QK_NOPE_HEAD_DIM + MLA_QK_ROPE_HEAD_DIM
    q_lora_rank = config["q_lora_rank"]
    is_v3 = config["model_type"] == "deepseek_v3"

    def layer(i: int, p: str) -> list[TensorSpec]:
        a = f"{p}.self_attn"
        if q_lora_rank is None:
            specs = [_linear(f"{a}.q_proj", heads * qk_head_dim, HIDDEN)]
        else:
            specs = [
                _linear(f"{a}.q_a_proj", q_lora_rank, HIDDEN),
                TensorSpec(f"{a}.q_a_layernorm.weight", (q_lora_rank,), "norm"),
                _linear(f"{a}.q_b_proj", heads * qk_head_dim, q_lora_rank),
            ]
        specs += [
            _linear(f"{a}.kv_a_proj_with_mqa", MLA_KV_LORA_RANK + MLA_QK_ROPE_HEAD_DIM, HIDDEN),
            TensorSpec(f"{a}.kv_a_layernorm.weight", (MLA_KV_LORA_RANK,), "norm"),
            _linear(f"{a}.kv_b_proj", heads * (MLA_QK_NOPE_HEAD_DIM + MLA_V_HEAD_DIM), MLA_KV_LORA_RANK),
            _linear(f"{a}.o_proj", HIDDEN, heads * MLA_V_HEAD_DIM),
        ]
        if i < config["first_k_dense_replace"]:
            return specs + _mlp(f"{p}.mlp", INTERMEDIATE)
        specs.append(TensorSpec(f"{p}.mlp.gate.weight", (DEEPSEEK_EXPERTS, HIDDEN), "router"))
        if is_v3:
            specs.append(TensorSpec(f"{p}.mlp.gate.e_score_correction_bias", (DEEPSEEK_EXPERTS,), "score_bias"))
        for e in range(DEEPSEEK_EXPERTS):
            specs += _mlp(f"{p}.mlp.experts.{e}", DEEPSEEK_MOE_INTERMEDIATE)
        specs += _mlp(f"{p}.mlp.shared_experts", DEEPSEEK_MOE_INTERMEDIATE * config["n_shared_experts"])
        return specs

    return _skeleton(config, layer)


@dataclass(frozen=True)
class Architecture:
    """A float model family: tokenizer family, config and tensor layout."""

    tokenizer_family: str
    make_config: Callable[[TokenizerInfo], dict]
    tensors: Callable[[dict], list[TensorSpec]]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama3", llama_config, llama_tensors),
    "qwen2": Architecture("chatml", qwen2_config, qwen2_tensors),
    "qwen3": Architecture("chatml", qwen3_config, qwen3_tensors),
    "qwen2_moe": Architecture("chatml", qwen2_moe_config, qwen2_moe_tensors),
    "mixtral": Architecture("mistral", mixtral_config, mixtral_tensors),
    "gemma": Architecture("gemma", gemma_config, gemma_tensors),
    "deepseek_v2": Architecture("deepseek", deepseek_v2_config, deepseek_tensors),
    "deepseek_v3": Architecture("deepseek", deepseek_v3_config, deepseek_tensors),
}


def config_for(arch: Architecture, tok: TokenizerInfo, dtype: str) -> dict:
    import transformers

    config = arch.make_config(tok)
    config["vocab_size"] = padded_vocab(tok)
    config["torch_dtype"] = dtype
    config["transformers_version"] = transformers.__version__
    return config
