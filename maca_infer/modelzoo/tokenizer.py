"""Small byte-level BPE tokenizers for the tiny models, trained offline.

No tokenizer can be downloaded here, and the real vocabularies that PyPI
packages ship (Qwen's 151k tiktoken ranks, a 32k Llama SentencePiece model)
would make every embedding matrix tens of MB. So one byte-level BPE (the
GPT-2 / Qwen / Llama-3 scheme: regex pre-split, bytes mapped to printable
characters, so any UTF-8 text, Chinese included, round-trips) is trained once
on text that ships with Python itself (module and function docstrings) plus a
short Chinese passage, and cached. Each model family then gets that BPE with
its own special tokens, ``add_bos`` behaviour and chat template, saved as
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``:
the files ``transformers.AutoTokenizer`` (and LMDeploy's and SGLang's
tokenizer loaders, which call it) read.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Ids 0..BASE_VOCAB_SIZE-1 are the learned BPE; each family's special tokens
# follow. Embedding tables are then padded to a multiple of 64.
BASE_VOCAB_SIZE = 4032

# Modules whose docstrings make the training text: plain English prose plus
# code snippets, present in every CPython 3.10+.
_CORPUS_MODULES = (
    "builtins", "os", "re", "json", "collections", "itertools", "functools",
    "argparse", "pathlib", "string", "textwrap", "typing", "dataclasses",
    "random", "math", "statistics", "subprocess", "threading", "asyncio",
    "logging", "unittest", "inspect", "email", "http.client", "urllib.parse",
    "csv", "sqlite3", "decimal", "fractions", "datetime", "calendar", "heapq",
    "bisect", "shutil", "tempfile", "zipfile", "tarfile", "pickle", "copy",
    "enum", "abc", "contextlib", "io", "socket", "struct", "hashlib", "difflib",
    "pprint", "doctest", "glob", "fnmatch", "locale", "gettext", "codecs",
    "operator", "weakref", "types", "traceback", "warnings", "html",
    "configparser", "queue", "sched", "secrets", "uuid", "base64", "binascii",
    "zlib", "gzip", "bz2", "lzma",
)

# Written for this project so that common Chinese characters get merges of
# their own (byte-level BPE round-trips any text; merges only make it shorter).
_CHINESE_TEXT = """\
人工智能是计算机科学的一个分支，它试图理解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。
大语言模型通过在海量文本上训练，学习预测下一个词。推理时，模型每次生成一个词，再把它加入上下文，继续生成。
我们的项目让深度学习框架在国产图形处理器上运行。测试在没有加速卡的机器上进行，用中央处理器模拟设备。
今天天气很好，我们去公园散步吧。你好，世界！请问你叫什么名字？我是一个小模型，权重是随机的。
中国的首都是北京。上海是一个国际化的大城市。长江是中国最长的河流，黄河是中华文明的摇篮。
学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？
"""


def _training_text() -> str:
    """Docstrings of a fixed list of stdlib modules, then the Chinese passage."""
    texts: list[str] = []
    with warnings.catch_warnings():
        # typing.io / typing.re and friends warn when touched
        warnings.simplefilter("ignore")
        for module_name in _CORPUS_MODULES:
            module = importlib.import_module(module_name)
            if module.__doc__:
                texts.append(module.__doc__)
            for name, obj in sorted(vars(module).items()):
                doc = getattr(obj, "__doc__", None)
                if not name.startswith("_") and isinstance(doc, str):
                    texts.append(doc)
    # repeated so its character pairs are frequent enough to be merged
    texts.extend([_CHINESE_TEXT] * 20)
    return "\n\n".join(texts)


def _train_base_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_training_text()], trainer)
    return tokenizer


def _base_cache_path(cache_root: Path) -> Path:
    import tokenizers

    # The corpus comes from this Python's stdlib, so its version is in the key.
    key = "|".join(
        [
            Path(__file__).read_text(),
            tokenizers.__version__,
            f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root / "_tokenizers" / f"byte-bpe-{BASE_VOCAB_SIZE}-{digest}.json"


def base_tokenizer_json(cache_root: Path) -> str:
    """The trained base BPE as tokenizer.json text, trained at most once per cache.

    Written with an atomic rename, so processes racing here each train and the
    last rename wins with identical content (training is deterministic).
    """
    path = _base_cache_path(cache_root)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    text = _train_base_bpe().to_str()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return text


@dataclass(frozen=True)
class TokenizerFamily:
    """Special tokens and chat format of one model family.

    ``specials`` are appended after the BPE in this order; ``bos``/``eos``/
    ``pad`` name entries of it; ``stop`` lists the extra end-of-turn tokens
    that generation_config.json lists as eos beside ``eos``.
    """

    name: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    add_bos: bool
    chat_template: str
    stop: tuple[str, ...] = field(default=())


_CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_MISTRAL = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
)

_GEMMA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_DEEPSEEK = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

FAMILIES: dict[str, TokenizerFamily] = {
    f.name: f
    for f in (
        TokenizerFamily(
            "chatml",
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
            chat_template=_CHATML, stop=("<|endoftext|>",),
        ),
        TokenizerFamily(
            "llama3",
            ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
            bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
            add_bos=True, chat_template=_LLAMA3, stop=("<|end_of_text|>",),
        ),
        TokenizerFamily(
            "mistral",
            ("<unk>", "<s>", "</s>"),
            bos="<s>", eos="</s>", pad="<unk>", add_bos=True, chat_template=_MISTRAL,
        ),
        TokenizerFamily(
            "gemma",
            ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True,
            chat_template=_GEMMA, stop=("<end_of_turn>",),
        ),
        TokenizerFamily(
            "deepseek",
            ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"),
            bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
            pad="<｜end▁of▁sentence｜>", add_bos=True, chat_template=_DEEPSEEK,
        ),
    )
}


@dataclass(frozen=True)
class TokenizerInfo:
    """Ids a model config needs from its tokenizer."""

    size: int  # BPE plus specials: the number of ids the tokenizer can emit
    special_ids: dict[str, int]
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]  # eos first, then the family's other end tokens


def family_info(family: TokenizerFamily) -> TokenizerInfo:
    special_ids = {tok: BASE_VOCAB_SIZE + i for i, tok in enumerate(family.specials)}
    eos_id = special_ids[family.eos]
    return TokenizerInfo(
        size=BASE_VOCAB_SIZE + len(family.specials),
        special_ids=special_ids,
        bos_id=special_ids[family.bos] if family.bos else None,
        eos_id=eos_id,
        pad_id=special_ids[family.pad],
        stop_ids=(eos_id, *(special_ids[t] for t in family.stop)),
    )


def write_tokenizer(family: TokenizerFamily, out_dir: Path, cache_root: Path) -> TokenizerInfo:
    """Write the family's tokenizer files into ``out_dir``; return its ids."""
    from tokenizers import AddedToken, Tokenizer, processors

    tokenizer = Tokenizer.from_str(base_tokenizer_json(cache_root))
    if tokenizer.get_vocab_size() != BASE_VOCAB_SIZE:
        raise RuntimeError(
            f"the trained BPE has {tokenizer.get_vocab_size()} ids, expected {BASE_VOCAB_SIZE}: "
            "the training text is too small for the requested vocabulary"
        )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.specials])
    info = family_info(family)
    if family.add_bos:
        bos = family.bos
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, info.bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    added_tokens_decoder = {
        str(info.special_ids[t]): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in family.specials
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": family.add_bos,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": family.bos,
        "eos_token": family.eos,
        "pad_token": family.pad,
        "unk_token": None,
        "chat_template": family.chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"eos_token": family.eos, "pad_token": family.pad}
    if family.bos:
        special_map["bos_token"] = family.bos
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
    return info
