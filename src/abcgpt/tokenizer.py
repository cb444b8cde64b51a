"""Tokenizers: character-level (the reference's) and byte-level BPE (Hugging Face `tokenizers`).

Both share one small interface (encode / encode_array / decode / save) and are saved as ONE JSON file:
char as {"kind": "char", "chars": [...]}, bpe as a plain Hugging Face tokenizer.json, so that
`tokenizers.Tokenizer.from_file` and `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` load it as is.
"""

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from abcgpt.common import AbcgptError

KINDS = ("char", "bpe")
EOT = "<|endoftext|>"  # the one special token of the bpe vocabulary (a document separator)
SPECIAL_TOKENS = [EOT]
MAX_VOCAB = 2**20
BPE_SAMPLE_CHARS = 2_000_000  # per source: bpe merges are learned on at most this many characters of each
_SAMPLE_PIECE = 8192  # sample a source as evenly spaced pieces of about this many characters


class Tokenizer:
    """The interface every tokenizer has. `dtype` is the smallest unsigned dtype that holds every id."""

    kind: str
    vocab_size: int
    eot_id: int | None = None  # id of <|endoftext|>, if the vocabulary has it

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint16 if self.vocab_size <= 65536 else np.uint32

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        # a model whose embedding is padded past the vocabulary could sample such an id; say so clearly
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise AbcgptError(f"token id {bad[0]} is outside the {self.vocab_size}-token vocabulary")
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------- char


def _codepoints(text: str) -> np.ndarray:
    # utf-32 gives one uint32 per character, astral plane included; surrogatepass keeps lone surrogates
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of characters seen (as in nanoGPT)."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        if not self.chars:
            raise AbcgptError("a character vocabulary needs at least one character (is the text empty?)")
        single = all(isinstance(c, str) and len(c) == 1 for c in self.chars)
        if not single or len(set(self.chars)) != len(self.chars):
            raise AbcgptError("a character vocabulary must be a list of distinct single characters")
        self.vocab_size = len(self.chars)
        self._table: np.ndarray | None = None  # codepoint -> id (-1: not in vocabulary), built on first use

    @classmethod
    def train(cls, texts: Sequence[str]) -> "CharTokenizer":
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls(sorted(chars))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        if self._table is None:
            cps = _codepoints("".join(self.chars))
            self._table = np.full(int(cps.max()) + 1, -1, dtype=np.int32)
            self._table[cps] = np.arange(len(cps), dtype=np.int32)
        cps = _codepoints(text)
        ids = self._table[np.minimum(cps, len(self._table) - 1)]
        bad = (cps >= len(self._table)) | (ids < 0)
        if bad.any():
            # the few unknown characters, in order of first appearance
            unknown = list(dict.fromkeys(chr(c) for c in cps[bad][:10_000].tolist()))
            shown = ", ".join(repr(c) for c in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise AbcgptError(
                f"text has characters outside the model's {self.vocab_size}-character vocabulary: {shown}"
            )
        return ids.astype(self.dtype)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in self._check_ids(ids))

    def to_json(self) -> str:
        # ensure_ascii keeps lone surrogates and odd characters safe in any editor / encoding
        return json.dumps({"kind": "char", "chars": self.chars})


# ----------------------------------------------------------------------------- bpe

# A chunk boundary before a "\n" that follows a non-space character is exact for GPT-2-style byte-level
# pre-tokenisation: no piece can hold both a non-space character and a following whitespace, so every
# split of the whole text has a boundary there, and the pattern only looks ahead (never behind). Splitting
# at every "\n" would not be exact: runs like "\n\n" or "\n " are single pieces.
_SAFE_SPLIT = re.compile(r"\S(?=\n)")


def _split_exact(text: str, size: int) -> list[str]:
    """Cut text into chunks of about `size` characters at boundaries where pre-tokenisation is unchanged."""
    chunks, start = [], 0
    while len(text) - start > size:
        m = _SAFE_SPLIT.search(text, start + size - 1)
        if m is None:
            break
        chunks.append(text[start : m.end()])
        start = m.end()
    chunks.append(text[start:])
    return chunks


def _balanced_sample(texts: dict[str, str], cap: int = BPE_SAMPLE_CHARS) -> dict[str, list[str]]:
    """The same number of characters from every source (the smallest one's length, at most `cap`), as evenly
    spaced pieces across each text, so that a big corpus does not take all the merges."""
    n = min(cap, min(len(t) for t in texts.values()))
    out = {}
    for name, t in texts.items():
        if len(t) <= n:
            out[name] = [t]
            continue
        k = max(1, n // _SAMPLE_PIECE)
        size = n // k
        stride = (len(t) - size) / max(1, k - 1)
        out[name] = [t[round(i * stride) : round(i * stride) + size] for i in range(k)]
    return out


def _bad_text(text: object) -> Exception:
    # tokenizers raises a bare TypeError for text that UTF-8 cannot encode (lone surrogates, e.g. from JSON)
    if isinstance(text, str):
        return AbcgptError("text is not valid Unicode: it has a lone surrogate character")
    return TypeError(f"expected str, got {type(text).__name__}")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style): every byte is in the vocabulary, so any text encodes and round-trips."""

    kind = "bpe"
    chunk_chars = 1 << 16  # encode_array splits big texts into chunks of about this size, encoded in parallel

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = tok.token_to_id(EOT)
        # the chunked fast path is exact only for the pipeline we train (checked on files made elsewhere)
        cfg = json.loads(tok.to_str())
        pre = cfg.get("pre_tokenizer") or {}
        self._chunkable = (
            cfg.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space")
            and pre.get("use_regex", True)
        )

    @classmethod
    def train(cls, texts: dict[str, str], vocab_size: int) -> "BPETokenizer":
        tok = HFTokenizer(models.BPE())
        # no prefix space: text is encoded as is, so chunks of a corpus encode like the whole
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
            show_progress=False,
        )
        pieces = [p for ps in _balanced_sample(texts).values() for p in ps]
        tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            raise _bad_text(text) from None

    def encode_array(self, text: str) -> np.ndarray:
        if not self._chunkable:
            return np.array(self.encode(text), dtype=self.dtype)
        chunks = _split_exact(text, self.chunk_chars)
        out = []
        for i in range(0, len(chunks), 256):  # batches bound the memory of the Encoding objects
            try:
                encs = self.tok.encode_batch_fast(chunks[i : i + 256], add_special_tokens=False)
            except TypeError:
                raise _bad_text(text) from None
            out.extend(np.array(e.ids, dtype=self.dtype) for e in encs)
        return np.concatenate(out)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(self._check_ids(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tok.to_str()


# ----------------------------------------------------------------------------- train / load


def train_tokenizer(kind: str, texts: dict[str, str], vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer from {source name: text}. Pass held-out text too: char needs every character.
    vocab_size is required for bpe and ignored for char."""
    if kind not in KINDS:
        raise AbcgptError(f"unknown tokenizer kind {kind!r}; choose one of: {', '.join(map(repr, KINDS))}")
    if not texts:
        raise AbcgptError("no text to build a tokenizer from")
    if kind == "char":
        return CharTokenizer.train(list(texts.values()))
    lo = 256 + len(SPECIAL_TOKENS) + 1  # all bytes, the special tokens, and at least one merge
    if vocab_size is None or not lo <= vocab_size <= MAX_VOCAB:
        raise AbcgptError(f"bpe vocab_size must be between {lo} and {MAX_VOCAB}, got {vocab_size}")
    empty = [name for name, t in texts.items() if not t]
    if empty:
        raise AbcgptError(f"source {empty[0]!r} has no text to learn bpe merges from")
    return BPETokenizer.train(texts, vocab_size)


def tokenizer_from_json(s: str, where: str = "tokenizer JSON") -> Tokenizer:
    """Rebuild a tokenizer from `to_json()` output (or any Hugging Face byte-level BPE tokenizer.json)."""
    try:
        obj = json.loads(s)
    except (json.JSONDecodeError, TypeError) as e:
        raise AbcgptError(f"{where} is not a tokenizer file: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise AbcgptError(f"{where} is not a tokenizer file: expected a JSON object")
    kind = obj.get("kind", "bpe" if "model" in obj else None)  # HF tokenizer.json files have a "model" key
    if kind == "char":
        chars = obj.get("chars")
        if not isinstance(chars, list):
            raise AbcgptError(f"{where} is not a tokenizer file: a char tokenizer needs a 'chars' list")
        try:
            return CharTokenizer(chars)
        except AbcgptError as e:
            raise AbcgptError(f"{where} is not a valid tokenizer file: {e}") from None
    if kind == "bpe":
        hf = obj.get("tokenizer", obj)  # also accept {"kind": "bpe", "tokenizer": <HF JSON string or object>}
        try:
            hf = json.loads(hf) if isinstance(hf, str) else hf
            model = hf.get("model")
        except (json.JSONDecodeError, AttributeError) as e:
            raise AbcgptError(f"{where} is not a valid bpe tokenizer file: {e}") from None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise AbcgptError(f"{where} is not a bpe tokenizer file: its model is not BPE")
        try:
            return BPETokenizer(HFTokenizer.from_str(json.dumps(hf)))
        except Exception as e:  # noqa: BLE001 (the Rust side raises plain Exceptions)
            raise AbcgptError(f"{where} is not a valid bpe tokenizer file: {e}") from None
    raise AbcgptError(f"{where} is not a tokenizer file: kind {kind!r} is not one of {', '.join(KINDS)}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    try:
        s = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AbcgptError(f"cannot read tokenizer file {path}: {e}") from None
    return tokenizer_from_json(s, where=str(path))
