import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from abcgpt.common import AbcgptError
from abcgpt.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    _balanced_sample,
    load_tokenizer,
    tokenizer_from_json,
    train_tokenizer,
)

DATA = Path(os.environ.get("ABCGPT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


def read(rel: str) -> str:
    p = DATA / rel
    if not p.exists():
        pytest.skip(f"sample corpus {p} not found")
    return p.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return read("shakespeare/input.txt")


@pytest.fixture(scope="module")
def stories() -> str:
    return read("tinystories/valid.txt")


@pytest.fixture(scope="module")
def bpe(shakespeare, stories) -> BPETokenizer:
    return train_tokenizer("bpe", {"shakespeare": shakespeare[:200_000], "stories": stories[:200_000]}, 512)


def random_unicode(n: int, seed: int = 0) -> str:
    # a mix of every plane: control bytes, Latin-1, combining marks, CJK, emoji, private use, astral
    rng = random.Random(seed)
    ranges = [(0, 0x7F), (0x80, 0x2FF), (0x300, 0x36F), (0x4E00, 0x4EFF), (0x1F300, 0x1F64F)]
    ranges += [(0xE000, 0xE0FF), (0x10000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


# ----------------------------------------------------------------------------- char


def test_char_vocab_is_sorted_set_and_round_trips(shakespeare):
    tok = train_tokenizer("char", {"shakespeare": shakespeare})
    assert isinstance(tok, CharTokenizer) and tok.kind == "char"
    assert tok.vocab_size == 65
    assert tok.chars == sorted(set(shakespeare))
    ids = tok.encode(shakespeare)
    assert ids[:20] == [tok.chars.index(c) for c in shakespeare[:20]]
    assert tok.decode(ids) == shakespeare
    arr = tok.encode_array(shakespeare)
    assert arr.dtype == np.uint16 and arr.tolist() == ids


def test_char_vocab_covers_every_source():
    tok = train_tokenizer("char", {"train": "abca", "held_out": "zb\n"}, vocab_size=7)  # vocab_size ignored
    assert tok.chars == ["\n", "a", "b", "c", "z"]
    assert tok.encode("zab\n") == [4, 1, 2, 0]


def test_char_unknown_characters_error(shakespeare):
    tok = train_tokenizer("char", {"shakespeare": shakespeare})
    with pytest.raises(AbcgptError) as e:
        tok.encode("caf\u00e9 \U0001f642 \u00e9 \u00f1\u00fc\u00df\u00f8\u00e5")
    msg = str(e.value)
    assert "65-character vocabulary" in msg and "\n" not in msg
    # the first five unknown characters, each once, in order; the rest left out
    assert msg.endswith("'\u00e9', '\U0001f642', '\u00f1', '\u00fc', '\u00df', ...")
    with pytest.raises(AbcgptError, match="'\u00e9'"):
        tok.encode_array("\u00e9")
    with pytest.raises(AbcgptError, match=re.escape(repr("\U0010ffff"))):  # past the lookup table's end
        tok.encode_array("a\U0010ffff")


def test_char_astral_and_surrogates(tmp_path):
    text = "a\U0001f642b\U0001d518\U0010ffff\x00\ud800\n" * 3
    tok = train_tokenizer("char", {"x": text})
    assert tok.vocab_size == 8
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids
    tok.save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(text) == ids


def test_char_save_load(tmp_path, shakespeare, stories):
    tok = train_tokenizer("char", {"shakespeare": shakespeare, "stories": stories})
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    assert json.loads(path.read_text()) == {"kind": "char", "chars": tok.chars}
    tok2 = load_tokenizer(path)
    assert isinstance(tok2, CharTokenizer) and tok2.chars == tok.chars
    sample = stories[:50_000]
    assert tok2.encode(sample) == tok.encode(sample)
    assert tokenizer_from_json(tok.to_json()).encode(sample) == tok.encode(sample)


# ----------------------------------------------------------------------------- bpe


def test_bpe_vocab(bpe, shakespeare, stories):
    assert bpe.kind == "bpe" and bpe.vocab_size == 512 == bpe.tok.get_vocab_size()
    assert bpe.dtype == np.uint16
    ids = bpe.encode(stories[200_000:300_000])
    assert 0 <= min(ids) and max(ids) < 512
    assert len(ids) < 0.6 * 100_000  # it learned merges
    # training is deterministic
    again = train_tokenizer("bpe", {"shakespeare": shakespeare[:200_000], "stories": stories[:200_000]}, 512)
    assert again.to_json() == bpe.to_json()


def test_bpe_round_trips_any_unicode(bpe):
    text = random_unicode(5000) + " caf\u00e9 \U0001f642\U0001f44d\U0001f3fd \r\n\t\x00\x7f\u00ff e\u0301"
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.encode_array(text).tolist() == ids
    for ch in ["\x00", "\x01", "\x7f", "\u00ff", "\U0001f642"]:  # bytes never seen in training still encode
        assert bpe.decode(bpe.encode(ch)) == ch


def test_bpe_endoftext(bpe, stories):
    assert "<|endoftext|>" in stories
    ids = bpe.encode("The end.\n<|endoftext|>\nOnce")
    assert ids.count(bpe.eot_id) == 1
    assert bpe.decode(ids) == "The end.\n<|endoftext|>\nOnce"


@pytest.mark.slow
def test_bpe_encode_array_matches_encode(bpe, shakespeare, stories):
    text = stories + shakespeare  # about 2 MB: many default-sized chunks
    arr = bpe.encode_array(text)
    assert arr.dtype == np.uint16 and arr.tolist() == bpe.encode(text)
    assert bpe.encode_array("").tolist() == []


def test_bpe_encode_array_cuts_chunks_exactly(shakespeare):
    # Whitespace runs across newlines are single pre-tokens ("\n\n", "\n    "), and code teaches merges of
    # them, so cutting a text at every newline would change its tokens; encode_array must not.
    code = read("python/cpython311_stdlib.txt")
    tricky = "a\n  b\n\n\nc  \nd \n\n e\r\n f\t\n<|endoftext|>\n\ng\n \n" * 50 + "x" * 100 + "\n\n"
    ws = {"tricky": tricky * 50}  # a source that teaches merges of every kind of whitespace run
    tok = train_tokenizer("bpe", {"code": code[:100_000], "shakespeare": shakespeare[:100_000], **ws}, 512)
    text = tricky + code[300_000:400_000] + shakespeare[:20_000]
    whole = tok.encode(text)
    naive = [i for line in text.splitlines(keepends=True) for i in tok.encode(line)]
    assert naive != whole  # so this test can tell a careless cut
    tok.chunk_chars = 1  # cut at every place encode_array thinks safe
    assert tok.encode_array(text).tolist() == whole
    assert tok.decode(whole) == text


def test_bpe_save_load(tmp_path, bpe, stories):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    assert "model" in json.loads(path.read_text())  # a plain Hugging Face tokenizer.json
    sample = stories[-20_000:] + " \U0001f642"
    ids = bpe.encode(sample)
    tok2 = load_tokenizer(path)
    assert isinstance(tok2, BPETokenizer) and tok2.vocab_size == 512
    assert tok2.encode(sample) == ids and tok2.decode(ids) == sample
    assert tok2.encode_array(sample).tolist() == ids
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.encode(sample).ids == ids and hf.decode(ids, skip_special_tokens=False) == sample
    assert tokenizer_from_json(bpe.to_json()).encode(sample) == ids
    wrapped = json.dumps({"kind": "bpe", "tokenizer": bpe.to_json()})
    assert tokenizer_from_json(wrapped).encode(sample) == ids


def test_bpe_file_loads_in_transformers(tmp_path, bpe):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    text = "Once upon a time, \U0001f642 said the King.\n"
    assert fast.encode(text) == bpe.encode(text)


def test_bpe_balances_sources(shakespeare, stories):
    # a big source (20x) and a small one: with balanced sampling the small one still gets its own merges
    big, small = stories[:400_000], shakespeare[:20_000]
    held_out = shakespeare[800_000:900_000]
    balanced = train_tokenizer("bpe", {"big": big, "small": small}, 512)
    pooled = train_tokenizer("bpe", {"all": big + small}, 512)  # one source: no balancing
    assert small.count(" Citizen") >= 20 and " Citizen" not in big
    assert len(balanced.encode(" Citizen")) <= 2 < len(pooled.encode(" Citizen"))
    # and held-out text of the small source compresses clearly better (about 3.5% here)
    assert len(balanced.encode(held_out)) < 0.98 * len(pooled.encode(held_out))


def test_balanced_sample_is_even_and_spread():
    big = "".join(f"{i:07d}\n" for i in range(100_000))  # 800,000 characters, numbered lines
    small = "s" * 50_000
    sample = _balanced_sample({"big": big, "small": small})
    assert sample["small"] == [small]
    pieces = sample["big"]
    assert abs(sum(map(len, pieces)) - 50_000) < 8192 and len(pieces) > 3
    # evenly spaced across the whole text, not just its start
    assert big.startswith(pieces[0]) and big.endswith(pieces[-1])
    starts = [big.index(p) for p in pieces]
    gaps = np.diff(starts)
    assert gaps.min() > 0.9 * gaps.max()
    capped = _balanced_sample({"a": big, "b": big}, cap=100_000)
    assert all(abs(sum(map(len, ps)) - 100_000) < 8192 for ps in capped.values())


# ----------------------------------------------------------------------------- bad input


def test_unknown_kind():
    with pytest.raises(AbcgptError, match="'char'.*'bpe'"):
        train_tokenizer("wordpiece", {"a": "abc"})


@pytest.mark.parametrize("vocab_size", [None, 0, 257, 2**20 + 1])
def test_bpe_vocab_size_bounds(vocab_size):
    with pytest.raises(AbcgptError, match="vocab_size"):
        train_tokenizer("bpe", {"a": "hello world"}, vocab_size)


def test_bpe_smallest_vocab():
    tok = train_tokenizer("bpe", {"a": "hello hello hello"}, 258)  # 256 bytes + <|endoftext|> + one merge
    assert tok.vocab_size == 258
    assert tok.decode(tok.encode("hello \U0001f642")) == "hello \U0001f642"


def test_empty_input():
    with pytest.raises(AbcgptError):
        train_tokenizer("char", {})
    with pytest.raises(AbcgptError):
        train_tokenizer("char", {"a": ""})
    with pytest.raises(AbcgptError, match="'b'"):
        train_tokenizer("bpe", {"a": "abc", "b": ""}, 300)


def test_decode_out_of_range(bpe):
    tok = train_tokenizer("char", {"a": "abc"})
    for t in (tok, bpe):
        with pytest.raises(AbcgptError, match="outside"):
            t.decode([0, t.vocab_size])
        with pytest.raises(AbcgptError, match="outside"):
            t.decode([-1])


def test_bpe_lone_surrogate(bpe):
    with pytest.raises(AbcgptError, match="surrogate"):
        bpe.encode("a\ud800")
    with pytest.raises(AbcgptError, match="surrogate"):
        bpe.encode_array("a\ud800")


@pytest.mark.parametrize(
    "content",
    [
        "not json {",
        "[1, 2]",
        '{"kind": "wordpiece"}',
        '{"hello": 1}',
        '{"kind": "char", "chars": "abc"}',
        '{"kind": "char", "chars": ["a", "a"]}',
        '{"kind": "char", "chars": ["ab"]}',
        '{"model": {"type": "WordPiece", "vocab": {}}}',
        '{"model": {"type": "BPE", "vocab": 3}}',
        '{"kind": "bpe", "tokenizer": "not json"}',
    ],
)
def test_bad_tokenizer_file(tmp_path, content):
    path = tmp_path / "weird.json"
    path.write_text(content)
    with pytest.raises(AbcgptError, match="weird.json"):
        load_tokenizer(path)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(AbcgptError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
