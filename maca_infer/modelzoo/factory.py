"""Build tiny Hugging Face checkpoints (``build``) and cache them (``get``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from maca_infer.common import envs
from maca_infer.common.log import get_logger
from maca_infer.modelzoo.architectures import ARCHITECTURES, config_for, padded_vocab
from maca_infer.modelzoo.quantize import QuantScheme, quantize_linear
from maca_infer.modelzoo import real
from maca_infer.modelzoo.real import REAL_KINDS
from maca_infer.modelzoo.tokenizer import FAMILIES, write_tokenizer

logger = get_logger(__name__)

GROUP_SIZE = 32  # int4 group along in_features; 128 would leave one group per row here
DEQUANT_SUFFIX = "-dequant"
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class KindSpec:
    architecture: str
    quant: QuantScheme | None = None
    dequantized: bool = False  # float checkpoint holding the quantized kind's W'

    @property
    def default_dtype(self) -> str:
        # AWQ/GPTQ checkpoints are fp16 (their scales are fp16); so is the
        # float reference of one, so that both start from the same numbers.
        # compressed-tensors INT8 checkpoints keep the model's bf16 (as
        # llm-compressor writes them); their reference is float32, the dtype
        # that holds W' = q * scale exactly.
        if self.quant is None:
            return "bfloat16"
        if self.quant.method == "compressed-tensors":
            return "float32" if self.dequantized else "bfloat16"
        return "float16"

    @property
    def quantized_dtype(self) -> str:
        """The float dtype of the quantized kind's other tensors, which its -dequant reference reproduces."""
        return KindSpec(self.architecture, self.quant).default_dtype


_AWQ = QuantScheme("awq", GROUP_SIZE, sym=False)
_GPTQ_SYM = QuantScheme("gptq", GROUP_SIZE, sym=True)
_GPTQ_ASYM = QuantScheme("gptq", GROUP_SIZE, sym=False)
_SMOOTH_QUANT = QuantScheme("smooth_quant", 0, sym=True)  # LMDeploy's INT8 W8A8 (lmdeploy lite smooth_quant)
_CT_W8A8 = QuantScheme("compressed-tensors", 0, sym=True)  # INT8 W8A8 (llm-compressor; SGLang w8a8_int8)

_KIND_SPECS: dict[str, KindSpec] = {
    "llama": KindSpec("llama"),
    "qwen2": KindSpec("qwen2"),
    "qwen3": KindSpec("qwen3"),
    "qwen2_moe": KindSpec("qwen2_moe"),
    "mixtral": KindSpec("mixtral"),
    "gemma": KindSpec("gemma"),
    "deepseek_v2": KindSpec("deepseek_v2"),
    "deepseek_v3": KindSpec("deepseek_v3"),
    "llama-awq": KindSpec("llama", _AWQ),
    "llama-gptq": KindSpec("llama", _GPTQ_SYM),
    "llama-gptq-asym": KindSpec("llama", _GPTQ_ASYM),
    "qwen2_moe-awq": KindSpec("qwen2_moe", _AWQ),
    "mixtral-gptq": KindSpec("mixtral", _GPTQ_SYM),
    "llama-w8a8-smoothquant": KindSpec("llama", _SMOOTH_QUANT),
    "mixtral-w8a8-smoothquant": KindSpec("mixtral", _SMOOTH_QUANT),
    "llama-w8a8": KindSpec("llama", _CT_W8A8),
    "deepseek-w8a8": KindSpec("deepseek_v3", _CT_W8A8),  # DeepSeek-R1-W8A8's shape: MLA + MoE, all in int8
}

KINDS: tuple[str, ...] = tuple(_KIND_SPECS)
QUANTIZED_KINDS: tuple[str, ...] = tuple(k for k, s in _KIND_SPECS.items() if s.quant is not None)
DEQUANT_KINDS: tuple[str, ...] = tuple(k + DEQUANT_SUFFIX for k in QUANTIZED_KINDS)

for _kind in QUANTIZED_KINDS:
    _q = _KIND_SPECS[_kind]
    _KIND_SPECS[_kind + DEQUANT_SUFFIX] = KindSpec(_q.architecture, _q.quant, dequantized=True)

# written into every checkpoint: what it is and how to make it again
MANIFEST = "maca_infer_modelzoo.json"


def dequant_kind(kind: str) -> str:
    """Name of the float checkpoint that holds ``kind``'s dequantized weights."""
    if kind not in QUANTIZED_KINDS:
        raise ValueError(f"kind={kind!r} is not a quantized kind; quantized kinds: {', '.join(QUANTIZED_KINDS)}")
    return kind + DEQUANT_SUFFIX


def _spec(kind: str) -> KindSpec:
    if kind not in _KIND_SPECS:
        raise ValueError(
            f"kind={kind!r} is not a tiny model kind; use one of: {', '.join(KINDS)} "
            f"(or a quantized kind + {DEQUANT_SUFFIX!r}: {', '.join(DEQUANT_KINDS)})"
        )
    return _KIND_SPECS[kind]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    return seed


def _check_dtype(dtype: str | None, spec: KindSpec) -> str:
    if dtype is None:
        return spec.default_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of: {', '.join(DTYPES)}")
    return dtype


def build(kind: str, out_dir: str | Path, *, seed: int = 0, dtype: str | None = None) -> Path:
    """Write a tiny random checkpoint of ``kind`` into ``out_dir`` and return it.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json and maca_infer_modelzoo.json
    (kind, seed, dtype, token ids). dtype: "bfloat16", "float16" or "float32"
    for the float tensors; None picks bfloat16, or float16 for quantized kinds
    and their -dequant references. Same (kind, seed, dtype): identical bytes.
    A real model kind (``REAL_KINDS``: ``smollm2``) is converted from its GGUF
    wheel instead (``modelzoo/real.py``; seed does not apply).
    """
    if kind in REAL_KINDS:  # a trained model converted from its GGUF wheel (seed does not apply)
        return real.build(kind, out_dir, dtype=dtype)
    import torch
    from safetensors.torch import save_file

    spec = _spec(kind)
    seed = _check_seed(seed)
    dtype = _check_dtype(dtype, spec)
    torch_dtype = getattr(torch, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = ARCHITECTURES[spec.architecture]
    tok = write_tokenizer(FAMILIES[arch.tokenizer_family], out, Path(envs.model_cache_dir()))

    config = config_for(arch, tok, dtype)
    vocab = config["vocab_size"]
    # special tokens and padding rows must never be the greedy choice
    quiet_rows = sorted(set(tok.special_ids.values()) | set(range(tok.size, vocab)))

    from maca_infer.modelzoo.weights import init_tensor

    tensor_specs = arch.tensors(config)
    state: dict[str, torch.Tensor] = {}
    for t in tensor_specs:
        is_head = t.init in ("lm_head", "tied_embed")
        value = init_tensor(t, seed, quiet_rows if is_head else ())
        if spec.quant is not None and t.quantizable:
            packed, dequantized = quantize_linear(value, spec.quant)
            if spec.dequantized:
                state[t.name] = dequantized.to(torch_dtype)
            else:
                module = t.name.removesuffix(".weight")
                for suffix, tensor in packed.items():
                    state[f"{module}.{suffix}"] = tensor
            continue
        # DeepSeek-V3 keeps its routing bias in float32, as its checkpoints do
        if t.init == "score_bias":
            state[t.name] = value
            continue
        if spec.dequantized:  # the quantized kind's float tensors, whatever dtype this copy is stored in
            value = value.to(getattr(torch, spec.quantized_dtype))
        state[t.name] = value.to(torch_dtype)

    if spec.quant is not None and not spec.dequantized:
        not_converted = None
        if spec.quant.method in ("awq", "compressed-tensors"):
            # full module names: SGLang tests `entry in prefix`, LMDeploy
            # `prefix in entry`; an exact name satisfies both
            not_converted = ["lm_head"] + sorted(
                t.name.removesuffix(".weight") for t in tensor_specs if t.init == "router"
            )
        config["quantization_config"] = spec.quant.config(not_converted)

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": list(tok.stop_ids) if len(tok.stop_ids) > 1 else tok.eos_id,
        "pad_token_id": tok.pad_id,
        "do_sample": False,
        "transformers_version": config["transformers_version"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    manifest = {
        "kind": kind,
        "seed": seed,
        "dtype": dtype,
        "architecture": spec.architecture,
        "tokenizer_family": arch.tokenizer_family,
        "tokenizer_size": tok.size,
        "vocab_size": padded_vocab(tok),
        "special_token_ids": tok.special_ids,
        "quantization": None
        if spec.quant is None
        else {"method": spec.quant.method, "group_size": spec.quant.group_size, "sym": spec.quant.sym,
              "dequantized_reference": spec.dequantized},
        "factory_hash": factory_hash(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return out


def factory_hash() -> str:
    """12 hex digits over this package's source and the versions that shape its output."""
    from importlib import metadata

    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    h.update(f"python={sys.version_info[:3]}".encode())  # the tokenizer corpus
    return h.hexdigest()[:12]


def cache_path(kind: str, *, seed: int = 0, dtype: str | None = None) -> Path:
    """Where ``get`` keeps (kind, seed, dtype); does not build."""
    if kind in REAL_KINDS:
        return real.cache_path(kind, dtype=dtype)
    spec = _spec(kind)
    seed = _check_seed(seed)
    dtype = _check_dtype(dtype, spec)
    dtype_tag = "" if dtype == spec.default_dtype else f"-{dtype}"
    return Path(envs.model_cache_dir()) / f"{kind}-s{seed}{dtype_tag}-{factory_hash()}"


def get(kind: str, *, seed: int = 0, dtype: str | None = None) -> Path:
    """Cached checkpoint of ``kind``: built on first use, then reused.

    The folder name carries kind, seed and a hash of the factory source and
    library versions, so a changed factory never serves a stale model. The
    build goes to a temporary folder beside the final one and is renamed into
    place; a rename onto an existing (complete) folder fails, so when two
    processes race, the loser drops its copy and both return the winner's.
    """
    if kind in REAL_KINDS:
        return real.get(kind, dtype=dtype)
    final = cache_path(kind, seed=seed, dtype=dtype)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        logger.info("building tiny model %s (seed %d) into %s", kind, seed, final)
        build(kind, tmp, seed=seed, dtype=dtype)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # another process finished first: its copy is identical
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _prune_stale(final)
    return final


STALE_AFTER_S = 24 * 3600


def _prune_stale(current: Path) -> None:
    """Drop this kind/seed/dtype's builds from older factory versions.

    Only ones untouched for a day: a process running older code may still be
    reading a recent one.
    """
    stem = current.name[: -len(factory_hash())]
    now = time.time()
    for sibling in current.parent.glob(f"{stem}*"):
        suffix = sibling.name[len(stem):]
        is_build = len(suffix) == 12 and all(c in "0123456789abcdef" for c in suffix)
        if is_build and sibling != current and now - sibling.stat().st_mtime > STALE_AFTER_S:
            logger.info("removing stale tiny model %s", sibling)
            shutil.rmtree(sibling, ignore_errors=True)
