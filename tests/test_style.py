import json
import re

import numpy as np
import pytest
from conftest import shared_data

from abcgpt.common import AbcgptError
from abcgpt.style import (
    StyleClassifier,
    apply_calibration,
    calibration_error,
    centroid_style,
    coin_flip_morph,
    corners_position,
    fit_calibration,
    is_monotone,
    morph_error,
    sample_shares,
    within_sample,
)

DATA = shared_data()
TRAIN = 200_000  # characters of each corpus the classifiers are fit on; test text comes from after it


def corpus(rel: str) -> str:
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"corpus {path} not found: set ABCGPT_DATA_DIR")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    return {"shakespeare": corpus("shakespeare/input.txt"), "tinystories": corpus("tinystories/valid.txt")}


@pytest.fixture(scope="module")
def clf(texts) -> StyleClassifier:
    return StyleClassifier.fit({k: t[:TRAIN] for k, t in texts.items()})


def passages(text: str, n: int, chars: int = 400, start: int = TRAIN + 50_000) -> list[str]:
    """n passages of whole lines, ~chars long, from text the classifiers never saw."""
    out, pos = [], start
    for _ in range(n):
        a = text.index("\n", pos) + 1
        b = text.index("\n", a + chars)
        out.append(text[a:b])
        pos = b + 5_000
    return out


def shakespeare_lines(text: str) -> list[str]:
    # verse and prose lines long enough to be a segment of their own (speaker names are short and skipped)
    return [x for x in text[TRAIN + 50_000:].splitlines() if len(x.strip()) >= 30]


def story_sentences(text: str) -> list[str]:
    body = text[TRAIN + 50_000:].replace("<|endoftext|>", "\n")
    return [x.strip() for x in re.split(r"(?<=[.!?])\s+", body) if len(x.strip()) >= 30]


def test_classifier_separates_sources(clf, texts):
    assert clf.sources == ["shakespeare", "tinystories"]
    assert clf.accuracy > 0.95
    assert clf.n_train > 3 * clf.n_test > 0 and clf.chunk_chars == 200
    p = clf.predict_proba([passages(texts["shakespeare"], 1)[0], passages(texts["tinystories"], 1)[0]])
    assert p.shape == (2, 2) and np.allclose(p.sum(1), 1)
    assert p[0, 0] > 0.9 and p[1, 1] > 0.9
    d = clf.to_dict()
    json.dumps(d)
    assert d["sources"] == clf.sources and d["accuracy"] == clf.accuracy and "char" in d["features"]


def test_fit_rejects_bad_input(texts):
    with pytest.raises(AbcgptError):
        StyleClassifier.fit({"shakespeare": texts["shakespeare"][:TRAIN]})
    with pytest.raises(AbcgptError, match="tinystories"):
        StyleClassifier.fit({"shakespeare": texts["shakespeare"][:TRAIN], "tinystories": "Once upon a time."})


def test_sample_shares_are_mean_probabilities(clf, texts):
    samples = passages(texts["shakespeare"], 10) + passages(texts["tinystories"], 30)
    s = sample_shares(clf, samples)
    assert s.shape == (2,) and s.sum() == pytest.approx(1)
    assert s[0] == pytest.approx(0.25, abs=0.05)


def test_within_sample_tells_coin_flip_from_blend(clf, texts):
    # a coin flip: half the samples wholly Shakespeare, half wholly TinyStories
    pure = passages(texts["shakespeare"], 10, 600) + passages(texts["tinystories"], 10, 600)
    flip = within_sample(clf, pure)
    assert flip["mixing"] < 0.15
    assert flip["segment_share"] == pytest.approx([0.5, 0.5], abs=0.1)
    assert flip["samples_used"] == 20 and flip["segments"] > 20

    # a blend: every sample alternates a TinyStories sentence with as many characters of Shakespeare lines
    lines, sents = iter(shakespeare_lines(texts["shakespeare"])), iter(story_sentences(texts["tinystories"]))
    blends = []
    for _ in range(20):
        out = []
        for _ in range(5):
            sent = next(sents)
            out.append(sent)
            n = 0
            while n < len(sent):
                out.append(next(lines))
                n += len(out[-1])
        blends.append("\n".join(out))
    blend = within_sample(clf, blends)
    assert blend["mixing"] > 0.6
    assert blend["segment_share"][0] == pytest.approx(0.5, abs=0.1)
    # both have about the same mean share: only mixing tells them apart
    assert sample_shares(clf, pure)[0] == pytest.approx(0.5, abs=0.1)


def test_within_sample_segments():
    class Fixed:  # classifies a segment by its first letter, to check the segmenting and weighting exactly
        sources = ["a", "b"]

        def predict_proba(self, texts):
            return np.array([[1.0, 0.0] if t[0] == "a" else [0.0, 1.0] for t in texts])

    a30, b10, b20 = "a" * 30, "b" * 10, "b" * 20
    # lines: a30 | b10 + b20 merged (>= 30 after the join's space) | trailing b10 dropped
    r = within_sample(Fixed(), [f"{a30}\n\n{b10}\n{b20}\n{b10}"], min_chars=30)
    assert r["segments"] == 2 and r["samples_used"] == 1
    assert r["segment_share"] == pytest.approx([30 / 61, 31 / 61])
    assert r["mixing"] == pytest.approx(2 * 30 / 61)
    assert r["line_proba"] == [[0.5, 0.5]]  # a sample's own style: the plain mean over its segments
    r = within_sample(Fixed(), [a30, "b" * 40, "short"], min_chars=30)
    assert r["samples_used"] == 2 and r["mixing"] == 0 and r["segment_share"] == [0.5, 0.5]
    assert r["line_proba"] == [[1.0, 0.0], [0.0, 1.0]]  # one row per sample used ("short" is not)
    assert within_sample(Fixed(), ["too short"])["mixing"] is None
    assert within_sample(Fixed(), ["too short"])["line_proba"] == []


def test_morph_error():
    t = [0.0, 0.25, 0.5, 0.75, 1.0]
    # corners read 0.1 and 0.9: a coin flip between them (half the samples at each) scores 2t(1 - t)
    lo, hi = [0.1] * 4, [0.9] * 4
    flip = [lo, lo * 3 + hi, lo + hi, lo + hi * 3, hi]
    assert morph_error(t, flip) == pytest.approx(coin_flip_morph(t))
    assert morph_error(t, flip)[2] == pytest.approx(0.5) and coin_flip_morph([0.5]) == [0.5]
    # samples that sit where the dial is (on the corners' scale) score 0
    assert morph_error(t, [[0.1, 0.1], [0.3], [0.5, 0.5, 0.5], [0.7], [0.9]]) == pytest.approx([0] * 5)
    # the scale: corners at their means; styles beyond a corner are clipped to it
    m = morph_error([0, 0.5, 1], [[0.0, 0.2], [0.95, -0.5], [0.8, 1.0]])  # scale 0.1 .. 0.9
    assert m == pytest.approx([(0 + 0.125) / 2, 0.5, (0.125 + 0) / 2])
    assert morph_error([0, 0.5, 1], [[0.9], [0.5, 1.0], [0.1]]) == pytest.approx([0, 0.25, 0])  # a falling curve
    # undefined: the two corners read the same, or a corner has no sample; a position with no sample is None
    assert morph_error(t, [[0.4, 0.6], [0.2], [0.9], [0.3], [0.5, 0.5]]) is None
    assert morph_error([0, 1], [[], [0.9]]) is None
    assert morph_error([0, 0.5, 1], [[0.1], [], [0.9]]) == [0.0, None, 0.0]
    with pytest.raises(AbcgptError):
        morph_error([0, 1], [[0.1]])


def test_calibration_error_and_monotone():
    assert calibration_error([0, 0.5, 1], [0.1, 0.5, 0.7]) == pytest.approx(0.4 / 3)
    assert calibration_error([0, 1], [0, 1]) == 0
    with pytest.raises(AbcgptError):
        calibration_error([0, 1], [0.5])
    assert is_monotone([0, 0.2, 0.2, 0.9])
    assert not is_monotone([0, 0.3, 0.25, 1])
    assert is_monotone([0, 0.3, 0.25, 1], tol=0.05)
    assert not is_monotone([0, 0.3, 0.25, 1], tol=0.04)
    assert not is_monotone([0, 0.5, 0.47, 0.44, 0.41, 1], tol=0.05)  # each step small, the slide is not
    assert is_monotone([0.4])


def s_curve(d):
    return d**3 / (d**3 + (1 - d) ** 3)


def test_fit_calibration_inverts_s_curve():
    dials = np.linspace(0, 1, 21)
    cal = fit_calibration(dials.tolist(), s_curve(dials).tolist())
    json.dumps(cal)
    assert np.all(np.diff(cal["share"]) > 0)
    for s in np.linspace(0.1, 0.9, 33):
        d = apply_calibration(cal, float(s))
        assert abs(s_curve(d) - s) < 0.03, (s, d)
    out = [apply_calibration(cal, float(s)) for s in np.linspace(0, 1, 101)]
    assert is_monotone(out) and out[0] == 0 and out[-1] == 1


def test_fit_calibration_pools_and_clips():
    # 0.4 then 0.3 at dials 0.25, 0.5: pooled to 0.35, one knot at their mean dial
    cal = fit_calibration([0, 0.25, 0.5, 0.75, 1], [0.1, 0.4, 0.3, 0.6, 0.9])
    assert cal["share"] == pytest.approx([0.1, 0.35, 0.6, 0.9])
    assert cal["dial"] == pytest.approx([0, 0.375, 0.75, 1])
    assert apply_calibration(cal, 0.0) == 0 and apply_calibration(cal, 1.0) == 1  # outside the fitted range
    assert apply_calibration(cal, 0.475) == pytest.approx(0.5625)
    with pytest.raises(AbcgptError):
        apply_calibration(cal, 1.5)


def test_fit_calibration_flat_or_noisy():
    dials = np.linspace(0, 1, 11)
    with pytest.raises(AbcgptError, match="flat"):
        fit_calibration(dials, 0.4 + 0.02 * np.sin(7 * dials))
    with pytest.raises(AbcgptError):
        fit_calibration(dials, 1 - dials)  # falling: the isotonic fit is flat
    rng = np.random.default_rng(0)
    noisy = dials + rng.normal(0, 0.08, size=dials.shape)
    assert not is_monotone(noisy)
    cal = fit_calibration(dials, noisy)
    assert np.all(np.diff(cal["share"]) > 0) and np.all(np.diff(cal["dial"]) > 0)
    out = [apply_calibration(cal, float(s)) for s in np.linspace(0, 1, 51)]
    assert is_monotone(out)
    assert np.abs(np.array(out[10:41]) - np.linspace(0.2, 0.8, 31)).max() < 0.2


def test_three_sources(texts):
    kjv = corpus("kjv/kjv.txt")
    three = {"tinystories": texts["tinystories"], "kjv": kjv, "shakespeare": texts["shakespeare"]}
    clf3 = StyleClassifier.fit({k: t[:TRAIN] for k, t in three.items()})
    assert clf3.sources == ["tinystories", "kjv", "shakespeare"]  # columns follow the given order, not sorted
    assert clf3.accuracy > 0.95 and clf3.n_test % 3 == 0  # the same number of chunks from each source
    held = {k: passages(t, 10) for k, t in three.items()}
    p = clf3.predict_proba([x for k in clf3.sources for x in held[k]])
    assert p.shape == (30, 3)
    assert (p.argmax(1) == np.repeat([0, 1, 2], 10)).all()
    s = sample_shares(clf3, held["kjv"] + held["shakespeare"])
    assert s.shape == (3,) and s[0] < 0.1 and s[1] == pytest.approx(0.5, abs=0.1)
    # short Shakespeare lines pass for KJV ("And thou shalt tell the process of their death."): longer segments
    flip = within_sample(clf3, held["kjv"] + held["shakespeare"], min_chars=80)
    assert flip["mixing"] < 0.15 and len(flip["segment_share"]) == 3
    # every sample an even three-way mix of passages: mixing near 1 (N / (N - 1) scaling)
    blend = within_sample(clf3, ["\n".join(held[k][i] for k in clf3.sources) for i in range(10)])
    assert blend["mixing"] > 0.8


def test_corners_position_reads_a_sample_as_a_mix_of_the_corners():
    """A style that is a mix of the corners' mean styles is read back as that mix, on the simplex; a style beyond a
    corner is clipped to it."""
    corners = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    mixes = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(corners_position(mixes @ corners, corners), mixes, atol=1e-3)
    beyond = corners_position(np.array([[1.0, 0.0, 0.0]]), corners)  # more first-corner than the corner itself
    assert beyond[0, 0] == pytest.approx(1.0, abs=1e-6) and (beyond >= 0).all()


def test_centroid_style_of_a_blend_and_of_a_coin_flip():
    """At the centroid: samples that each blend the corners evenly score morph error 0 and sit at the centroid;
    samples that are each one corner's (a coin flip, in the dial's shares) sit at the centroid on average but score
    1 - 1/N each."""
    corners = [[[0.9, 0.05, 0.05]] * 4, [[0.05, 0.9, 0.05]] * 4, [[0.05, 0.05, 0.9]] * 4]
    c_means = np.array([c[0] for c in corners])
    blend = centroid_style([list(np.full(3, 1 / 3) @ c_means)] * 6, corners)
    assert blend["morph_error"] == pytest.approx(0.0, abs=1e-3)
    assert blend["position_error"] == pytest.approx(0.0, abs=1e-3)
    flip = centroid_style([c[0] for c in corners] * 2, corners)
    assert flip["morph_error"] == pytest.approx(2 / 3, abs=1e-3) == flip["coin_flip"]
    assert flip["position_error"] == pytest.approx(0.0, abs=1e-3) and flip["samples"] == 6
    lean = centroid_style([corners[0][0]] * 6, corners)  # every sample the first corner's
    assert lean["mean_position"] == pytest.approx([1, 0, 0], abs=1e-3)
    assert lean["position_error"] == pytest.approx(2 / 3, abs=1e-3)
    assert centroid_style([], corners) is None and centroid_style([corners[0][0]], [[], [], []]) is None
