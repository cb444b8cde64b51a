"""Property-based tests (hypothesis) of the dial parser and gate, the recipe loader, and the tokenizers."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from abcgpt.common import AbcgptError
from abcgpt.config import Recipe, build_recipe, parse_override, recipe_from_dict
from abcgpt.dial import draw_specialties, gate
from abcgpt.dial_spec import parse_dial
from abcgpt.sources import check_source_name
from abcgpt.tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_json

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------- dial parser


def allowed_name(name: str) -> bool:
    """A name check_source_name accepts: letters alone may still spell a number ("nan", "inf") or a reserved word."""
    try:
        check_source_name(name)
    except AbcgptError:
        return False
    return True


NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(allowed_name)
SOURCES = st.lists(NAME, min_size=2, max_size=6, unique=True)
WEIGHT = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)


def assert_simplex(w: torch.Tensor, n: int) -> None:
    assert isinstance(w, torch.Tensor)
    assert tuple(w.shape) == (n,)
    assert torch.isfinite(w).all(), w
    assert (w >= 0).all(), w
    assert abs(float(w.double().sum()) - 1.0) <= 1e-6, w


def mixture_text(sources: list[str], weights: list[float]) -> str:
    return ",".join(f"{s}={w!r}" for s, w in zip(sources, weights))


@settings(FAST, max_examples=300)  # any text, and text made of the characters a dial is written with
@given(spec=st.text() | st.text(alphabet="0123456789.eE+-=,ab_ uniform", max_size=20), sources=SOURCES)
@example(spec="0.25", sources=["a", "b"])
@example(spec="a=1e39,b=1", sources=["a", "b"])
@example(spec="nan", sources=["a", "b"])
@example(spec="a=inf", sources=["a", "b"])
def test_parse_dial_any_text_gives_simplex_point_or_error(spec, sources):
    try:
        w, note = parse_dial(spec, sources)
    except AbcgptError:
        return
    assert_simplex(w, len(sources))
    assert note is None or isinstance(note, str)


@FAST
@given(a=st.floats(min_value=0.0, max_value=1.0), as_text=st.booleans())
def test_parse_dial_numeric_two_sources(a, as_text):
    w, note = parse_dial(repr(a) if as_text else a, ["left", "right"])
    assert note is None
    assert torch.allclose(w, torch.tensor([1.0 - a, a]), atol=1e-7)


@FAST
@given(a=st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0 + 1e-9), st.just(math.nan)))
def test_parse_dial_numeric_outside_unit_interval_raises(a):
    with pytest.raises(AbcgptError):
        parse_dial(repr(a), ["left", "right"])


@FAST
@given(sources=SOURCES, data=st.data())
def test_parse_dial_mixture_normalises(sources, data):
    weights = data.draw(st.lists(WEIGHT, min_size=len(sources), max_size=len(sources)))
    assume(max(weights) > 0)
    assume(min(w for w in weights if w > 0) > 1e-30)  # below float32's range a weight rounds to 0
    top = max(weights)
    scaled = [x / top for x in weights]  # w / sum(w) without overflow for huge weights
    total = top * math.fsum(scaled)  # may be inf: then it is surely not 1
    w, note = parse_dial(mixture_text(sources, weights), sources)
    assert_simplex(w, len(sources))
    expected = torch.tensor([x / math.fsum(scaled) for x in scaled], dtype=torch.float64)
    assert torch.allclose(w.double(), expected, atol=1e-6), (w, expected)
    # a note says the weights were normalised, exactly when they did not sum to 1
    if abs(total - 1.0) > 1e-5:
        assert note is not None
    elif abs(total - 1.0) < 1e-7:
        assert note is None


@FAST
@given(sources=SOURCES, data=st.data())
def test_parse_dial_mixture_summing_to_one_has_no_note(sources, data):
    k = data.draw(st.integers(0, len(sources) - 1))
    parts = data.draw(st.lists(st.integers(0, 1000), min_size=len(sources), max_size=len(sources)))
    assume(sum(parts) > 0)
    # dyadic weights sum to 1 exactly in binary floating point
    scale = 2 ** math.ceil(math.log2(sum(parts)))
    weights = [p / scale for p in parts]
    weights[k] += 1.0 - math.fsum(weights)
    assert math.fsum(weights) == 1.0
    w, note = parse_dial(mixture_text(sources, weights), sources)
    assert note is None
    assert torch.allclose(w.double(), torch.tensor(weights, dtype=torch.float64), atol=1e-7)


@FAST
@given(sources=SOURCES, unknown=NAME, weight=st.floats(min_value=0.0, max_value=10.0), position=st.integers(0, 6))
def test_parse_dial_unknown_name_raises_listing_known_names(sources, unknown, weight, position):
    assume(unknown not in sources)
    parts = [f"{s}=1" for s in sources]
    parts.insert(min(position, len(parts)), f"{unknown}={weight!r}")
    with pytest.raises(AbcgptError) as err:
        parse_dial(",".join(parts), sources)
    for s in sources:
        assert s in str(err.value)


@FAST
@given(sources=SOURCES, data=st.data())
def test_parse_dial_name_and_uniform(sources, data):
    k = data.draw(st.integers(0, len(sources) - 1))
    w, note = parse_dial(f"  {sources[k]} ", sources)
    assert note is None
    assert w.tolist() == [1.0 if i == k else 0.0 for i in range(len(sources))]
    w, note = parse_dial("uniform", sources)
    assert note is None
    assert_simplex(w, len(sources))
    assert torch.allclose(w, torch.full((len(sources),), 1.0 / len(sources)))


# ----------------------------------------------------------------------------- gate


def simplex_points(n: int, size: int):
    """Random points of the n-simplex, some of them corners, edges or repeated values."""
    coord = st.one_of(st.just(0.0), st.just(1.0), st.floats(min_value=0.0, max_value=1.0))
    row = st.lists(coord, min_size=n, max_size=n).filter(lambda r: sum(r) > 0)
    return st.lists(row, min_size=1, max_size=size).map(
        lambda rows: torch.tensor(rows, dtype=torch.float64).div(torch.tensor(rows, dtype=torch.float64)
                                                                 .sum(-1, keepdim=True)).float())


@FAST
@given(n=st.integers(2, 6), narrowness=st.floats(min_value=0.05, max_value=4.0), data=st.data())
def test_gate_values_in_unit_interval_one_at_specialty_zero_past_span(n, narrowness, data):
    dials = data.draw(simplex_points(n, 6))
    specs = data.draw(simplex_points(n, 6))
    g = gate(dials, specs, narrowness)
    assert g.shape == (dials.shape[0], specs.shape[0])
    assert torch.isfinite(g).all()
    assert ((g >= 0) & (g <= 1)).all(), g
    # exactly 1 where the dial is the specialty
    assert (gate(specs, specs, narrowness).diagonal() == 1.0).all()
    # exactly 0 at (and past) the span, distance and span computed as the module defines them
    d = 0.5 * (dials[:, None, :] - specs[None, :, :]).abs().sum(-1)
    span = (1.0 - specs.min(dim=-1).values) * narrowness
    far = d >= span[None, :]
    assert (g[far] == 0.0).all(), (g, far)


@FAST
@given(m1=st.floats(min_value=0.0, max_value=1.0), narrowness=st.floats(min_value=0.1, max_value=4.0),
       a=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=2, max_size=40))
def test_gate_two_sources_monotone_in_distance(m1, narrowness, a):
    a = sorted(set(a) | {0.0, 1.0, m1})
    dials = torch.tensor([[1.0 - x, x] for x in a])
    spec = torch.tensor([[1.0 - m1, m1]])
    g = gate(dials, spec, narrowness)[:, 0].double()
    dist = (dials[:, 1].double() - spec[0, 1].double()).abs()
    order = torch.argsort(dist, stable=True)
    gs, ds = g[order], dist[order]
    for i in range(len(a) - 1):
        if ds[i + 1] > ds[i] + 1e-6:  # float32 rounding blurs distances closer than this
            assert gs[i + 1] <= gs[i] + 1e-6, (ds[i], gs[i], ds[i + 1], gs[i + 1])
    # distance 0 gives exactly 1
    assert g[dist == 0].eq(1.0).all()


@FAST
@given(n_units=st.integers(1, 64), n=st.integers(2, 8), seed=st.integers(0, 2**32 - 1),
       c=st.floats(min_value=0.05, max_value=5.0))
def test_draw_specialties_on_simplex(n_units, n, seed, c):
    m = draw_specialties(n_units, n, seed, c)
    assert m.shape == (n_units, n)
    assert torch.isfinite(m).all()
    assert (m >= 0).all()
    assert torch.allclose(m.double().sum(-1), torch.ones(n_units, dtype=torch.float64), atol=1e-6)
    g = gate(m, m)
    assert (g.diagonal() == 1.0).all()


# ----------------------------------------------------------------------------- config

TOML_INT = st.integers(-(2**63), 2**63 - 1)
SEED = st.integers(0, 2**63 - 1)
SCALAR = st.one_of(st.booleans(), TOML_INT, st.floats(), st.text(max_size=8))
JSONLIKE = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)

DATA_KEYS = ["dir", "tokenizer", "vocab_size", "heldout_fraction", "sources"]
MODEL_KEYS = ["block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "gates", "routing", "narrowness",
              "specialty_seed", "specialty_concentration", "vocab_size", "n_sources"]
TRAIN_KEYS = ["steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2",
              "grad_clip", "dial_sampling", "dial_concentration", "only_sources", "seed", "device", "dtype",
              "compile", "fsdp", "peak_tflops", "threads", "eval_every", "eval_batches", "log_every", "log_to",
              "checkpoint_every"]
SOURCE_KEYS = ["name", "path", "url", "hf", "hf_config", "hf_data_files", "split", "heldout_split", "text_field",
               "heldout_path", "heldout_url", "max_bytes", "normalize", "weight"]
CHOICE_VALUES = ["char", "bpe", "abc", "none", "soft", "routed", "per_sequence", "per_batch", "auto", "float32",
                 "bfloat16", "tensorboard", "wandb", "shakespeare", "tinystories", "reference", "http://x/y.txt"]

# values that are the right type more often than random JSON would be
VALUE = st.one_of(JSONLIKE, st.sampled_from(CHOICE_VALUES), st.integers(-3, 600), st.floats(-1.0, 2.0),
                  st.lists(st.sampled_from(CHOICE_VALUES), max_size=3))


def table(keys: list[str]):
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=6)), VALUE, max_size=5)


SOURCE = st.one_of(
    st.sampled_from(["shakespeare", "tinystories"]),
    table(SOURCE_KEYS),
    st.fixed_dictionaries({"name": st.sampled_from(["shakespeare", "tinystories"])},
                          optional={k: VALUE for k in SOURCE_KEYS if k != "name"}),
    JSONLIKE,
)
SOURCES_VALUE = st.one_of(
    st.just(["shakespeare", "tinystories"]),
    st.lists(SOURCE, min_size=2, max_size=4),
    VALUE,
)
DATA_TABLE = st.one_of(
    st.fixed_dictionaries({"sources": SOURCES_VALUE}, optional={k: VALUE for k in DATA_KEYS if k != "sources"}),
    table(DATA_KEYS),
)
RAW = st.one_of(
    st.fixed_dictionaries({"data": DATA_TABLE},
                          optional={"model": table(MODEL_KEYS), "train": table(TRAIN_KEYS)}),
    st.dictionaries(st.sampled_from(["data", "model", "train"]) | st.text(max_size=6),
                    st.one_of(table(DATA_KEYS + MODEL_KEYS + TRAIN_KEYS), JSONLIKE), max_size=4),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=RAW)
@example(raw={"data": 0})  # a TOML file with `data = 0` instead of a [data] table
@example(raw={"data": {"sources": [{"name": "shakespeare", "url": "http://["}, "tinystories"]}})
def test_build_recipe_returns_recipe_or_raises_abcgpt_error(raw):
    try:
        r = build_recipe(raw, "prop")
    except AbcgptError:
        return
    assert isinstance(r, Recipe)
    assert len(r.data.sources) >= 2


VALID_RAW = st.fixed_dictionaries(
    {"data": st.fixed_dictionaries(
        {"sources": st.permutations(["shakespeare", "tinystories"]).map(list)},
        optional={"tokenizer": st.sampled_from(["char", "bpe"]), "vocab_size": st.integers(257, 70000),
                  "heldout_fraction": st.floats(0.01, 0.5),
                  "dir": st.text(min_size=1, max_size=10).filter(lambda d: "{" not in d and "}" not in d)})},
    optional={
        "model": st.fixed_dictionaries({"n_head": st.sampled_from([2, 4]), "n_embd": st.sampled_from([8, 64])},
                                       optional={
            "n_layer": st.integers(1, 12),
            "dropout": st.floats(0.0, 0.9), "bias": st.booleans(), "gates": st.sampled_from(["abc", "none"]),
            "routing": st.sampled_from(["soft", "routed"]), "narrowness": st.floats(0.1, 3.0),
            "specialty_seed": SEED, "specialty_concentration": st.floats(0.0, 3.0) | st.integers(0, 3)}),
        "train": st.fixed_dictionaries({}, optional={
            "steps": st.integers(1, 10**6), "lr": st.floats(1e-4, 1.0), "min_lr": st.floats(0.0, 1e-4),
            "dial_sampling": st.sampled_from(["per_sequence", "per_batch"]), "seed": SEED,
            "log_to": st.lists(st.sampled_from(["tensorboard", "wandb"]), max_size=2),
            "dtype": st.sampled_from(["auto", "float32", "bfloat16"]), "compile": st.booleans()}),
    },
)


@FAST
@given(raw=VALID_RAW, name=st.text(min_size=1, max_size=10))
def test_recipe_round_trips_through_to_dict(raw, name):
    r = build_recipe(raw, name)  # every dict VALID_RAW draws is a valid recipe
    d = r.to_dict()
    json.dumps(d)  # a checkpoint's config.json holds it
    again = recipe_from_dict(d)
    assert again.to_dict() == d
    assert again.name == name


@FAST
@given(item=st.text())
@example(item="lr=" + "1" * 5000)  # a TOML integer longer than Python's int-string limit
@example(item="lr=" + "[" * 3000)  # nesting deeper than the recursion limit
@example(item="train.lr=3e-4")
@example(item="gates=none")
def test_parse_override_returns_triple_or_raises_abcgpt_error(item):
    try:
        out = parse_override(item)
    except AbcgptError:
        return
    section, key, _ = out
    assert section in ("data", "model", "train")
    assert isinstance(key, str) and key


@FAST
@given(key=st.sampled_from(["lr", "train.lr", "steps", "model.n_layer", "gates", "data.tokenizer"]),
       value=st.one_of(st.integers(-(2**63), 2**63 - 1), st.booleans(),
                       st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)))
def test_parse_override_reads_values_as_toml(key, value):
    text = str(value).lower() if isinstance(value, bool) else str(value)
    section, name, got = parse_override(f"{key}={text}")
    assert name == key.rpartition(".")[2]
    if isinstance(value, str) and value not in ("true", "false", "inf", "nan"):
        assert got == value
    elif not isinstance(value, str):
        assert got == value and type(got) is type(value)


# ----------------------------------------------------------------------------- tokenizers


@FAST
@given(texts=st.lists(st.text(min_size=1), min_size=1, max_size=4), data=st.data())
def test_char_tokenizer_round_trips_over_its_alphabet(texts, data):
    tok = CharTokenizer.train(texts)
    alphabet = sorted(set("".join(texts)))
    t = data.draw(st.text(alphabet=st.sampled_from(alphabet), max_size=50))
    ids = tok.encode(t)
    assert tok.decode(ids) == t
    arr = tok.encode_array(t)
    assert isinstance(arr, np.ndarray)
    assert arr.tolist() == ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    again = tokenizer_from_json(tok.to_json())
    assert isinstance(again, CharTokenizer)
    assert again.encode(t) == ids
    assert again.chars == tok.chars


@FAST
@given(texts=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3), extra=st.text(min_size=1),
       data=st.data())
def test_char_tokenizer_rejects_characters_outside_its_alphabet(texts, extra, data):
    tok = CharTokenizer.train(texts)
    outside = [c for c in extra if c not in tok.chars]
    assume(outside)
    known = data.draw(st.text(alphabet=st.sampled_from(tok.chars), max_size=10))
    t = known + extra + known
    with pytest.raises(AbcgptError):
        tok.encode(t)
    with pytest.raises(AbcgptError):
        tok.encode_array(t)


_BPE_TEXT = {
    "a": ("It was the best of times, it was the worst of times, it was the age of wisdom. \n"
          "Once upon a time there was a little cat named Tom. He liked to play in the sun.\n") * 30,
    "b": ("def f(x):\n    return x * 2 + 1  # comment\n\nfor i in range(10):\n    print(f(i))\n"
          "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. 東京 ☃ 🙂\n") * 30,
}
BPE = BPETokenizer.train(_BPE_TEXT, 300)
UNICODE = st.text(alphabet=st.characters(exclude_categories=["Cs"]))


@FAST
@given(t=UNICODE)
@example(t="<|endoftext|>")
@example(t="a\n\nb \n c\r\n")
def test_bpe_round_trips_any_text(t):
    ids = BPE.encode(t)
    assert BPE.decode(ids) == t
    assert BPE.encode_array(t).tolist() == ids


@FAST
@given(t=st.text(alphabet=st.characters(exclude_categories=["Cs"]) | st.sampled_from(["\n", " ", "\r", "\t", "a"]),
                 max_size=200),
       chunk=st.integers(1, 16))
def test_bpe_chunked_encode_array_equals_encode(t, chunk):
    """encode_array cuts long text into chunks; with tiny chunks that path runs on short text too."""
    tok = BPETokenizer(BPE.tok)
    tok.chunk_chars = chunk
    assert tok.encode_array(t).tolist() == tok.encode(t)


@SLOW
@given(t=UNICODE)
def test_bpe_json_round_trip_gives_identical_encodings(t):
    again = _BPE_AGAIN
    assert again.encode(t) == BPE.encode(t)


_BPE_AGAIN = tokenizer_from_json(BPE.to_json())


def test_bpe_from_json_is_bpe():
    assert isinstance(_BPE_AGAIN, BPETokenizer)
    assert _BPE_AGAIN.vocab_size == BPE.vocab_size


@FAST
@given(n_units=st.integers(1, 64), n=st.integers(2, 8), seed=st.integers(0, 2**32 - 1))
def test_gate_at_far_corner_is_off(n_units, n, seed):
    """The corner farthest from a specialty is at distance span: the gate there is (numerically) 0.
    For two sources it is exactly 0; for N > 2, float32 rounding of d and span can leave ~1e-14."""
    m = draw_specialties(n_units, n, seed)
    g = gate(torch.eye(n), m)  # (n corners, units)
    far = g[m.argmin(-1), torch.arange(n_units)]
    if n == 2:
        assert (far == 0.0).all(), far
    else:
        assert (far <= 1e-12).all(), far
