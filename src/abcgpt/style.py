"""Style metrics of DESIGN.md §3: which source does the model's output resemble, and does the dial control it.

A StyleClassifier is trained on held-out text of each source (never on model samples) and scores samples:
    sample_shares   mean predicted share of each source over K samples (one point of the style curve)
    within_sample   per-line classification, to tell a blend (every sample mixes styles) from a coin flip
                    (each sample wholly one style, in the right proportion): both give the same mean share
    calibration_error, is_monotone   summaries of a style curve
    morph_error     per dial position, how far each sample's own style sits from where the dial is
    fit_calibration, apply_calibration   invert a measured curve: the dial position that gives a wanted share
For two sources the "share" of a style curve is the share of the second source (sources[1]), matching the
scalar dial, where a = 0 is the first source.
"""

from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from abcgpt.common import AbcgptError
from abcgpt.tokenizer import EOT

NGRAMS = (1, 4)
MIN_CHUNKS = 5  # per source: enough for an 80/20 split with test chunks of every class


def _clean(text: str) -> str:
    # the document separator is not style; a classifier keyed on it would score any sample containing it
    return text.replace(EOT, "\n")


def _chunks(text: str, chunk_chars: int, n: int) -> list[str]:
    """n chunks of <= chunk_chars characters, one from each of n equal windows across the text, so they never
    overlap and cover the whole text. Each starts at a line start (else a word start) near its window's start
    and ends at a line end (else a word end) in its second half, so few chunks hold cut words."""
    bounds = np.linspace(0, len(text), n + 1).astype(int)
    out = []
    for w0, w1 in zip(bounds[:-1], bounds[1:]):
        s = int(w0)
        if s > 0:
            nl, sp = text.find("\n", s, s + chunk_chars // 4), text.find(" ", s, s + chunk_chars // 4)
            s = nl + 1 if nl >= 0 else sp + 1 if sp >= 0 else s
        e = min(s + chunk_chars, int(w1))
        if e < len(text):
            mid = s + (e - s) // 2
            nl, sp = text.rfind("\n", mid, e), text.rfind(" ", mid, e)
            e = nl if nl >= 0 else sp if sp >= 0 else e
        chunk = text[s:e].strip()
        if chunk:
            out.append(chunk)
    return out


class StyleClassifier:
    """Source classifier trained on held-out text of each source (never on model samples)."""

    def __init__(self, sources: list[str], vectorizer: TfidfVectorizer, model: LogisticRegression,
                 accuracy: float, n_train: int, n_test: int, chunk_chars: int):
        self.sources, self.vectorizer, self.model = sources, vectorizer, model
        self.accuracy, self.n_train, self.n_test, self.chunk_chars = accuracy, n_train, n_test, chunk_chars

    @classmethod
    def fit(cls, texts: dict[str, str], chunk_chars: int = 200, max_chunks: int = 1500,
            seed: int = 0) -> "StyleClassifier":
        """texts: source name -> held-out text, in the dial's source order. Cuts the same number of chunks from
        each source (balanced classes), keeps a random 20% of each source's chunks out to measure accuracy."""
        if len(texts) < 2:
            raise AbcgptError(f"a style classifier needs at least 2 sources, got {len(texts)}")
        if chunk_chars < 20 or max_chunks < MIN_CHUNKS:
            raise AbcgptError(f"chunk_chars must be >= 20 and max_chunks >= {MIN_CHUNKS}")
        sources = list(texts)
        clean = {s: _clean(t) for s, t in texts.items()}
        # windows 1.25x the chunk leave room to start and end chunks on line breaks
        n = min(max_chunks, *(len(t) * 4 // (5 * chunk_chars) for t in clean.values()))
        if n < MIN_CHUNKS:
            short = min(clean, key=lambda s: len(clean[s]))
            raise AbcgptError(f"source {short!r} has {len(clean[short])} characters of held-out text: "
                              f"the style classifier needs at least {MIN_CHUNKS * chunk_chars * 5 // 4}")
        rng = np.random.default_rng(seed)
        train_x, train_y, test_x, test_y = [], [], [], []
        for k, s in enumerate(sources):
            chunks = _chunks(clean[s], chunk_chars, n)
            order = rng.permutation(len(chunks))
            n_test = max(1, round(0.2 * len(chunks)))
            test_x += [chunks[i] for i in order[:n_test]]
            train_x += [chunks[i] for i in order[n_test:]]
            test_y += [k] * n_test
            train_y += [k] * (len(chunks) - n_test)
        # sublinear tf: a chunk's style shows in which n-grams occur more than in how often one repeats
        vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=NGRAMS, sublinear_tf=True, min_df=2,
                                     max_features=100_000, dtype=np.float32)
        model = LogisticRegression(max_iter=1000, C=10.0)
        model.fit(vectorizer.fit_transform(train_x), np.array(train_y))  # labels 0..N-1: columns in source order
        accuracy = float((model.predict(vectorizer.transform(test_x)) == np.array(test_y)).mean())
        return cls(sources, vectorizer, model, accuracy, len(train_x), len(test_x), chunk_chars)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(n, N) probabilities, columns in self.sources order."""
        if not texts:
            return np.zeros((0, len(self.sources)))
        return self.model.predict_proba(self.vectorizer.transform([_clean(t) for t in texts]))

    def to_dict(self) -> dict:
        return {"sources": self.sources, "accuracy": self.accuracy, "n_train": self.n_train, "n_test": self.n_test,
                "chunk_chars": self.chunk_chars,
                "features": f"tf-idf char_wb {NGRAMS[0]}-{NGRAMS[1]}-grams ({len(self.vectorizer.vocabulary_)}) "
                            f"+ logistic regression"}


def sample_shares(clf: StyleClassifier, samples: list[str]) -> np.ndarray:
    """(N,) mean predicted probability of each source over the samples ("mean predicted share")."""
    if not samples:
        raise AbcgptError("no samples to score")
    return clf.predict_proba(samples).mean(axis=0)


def _segments(sample: str, min_chars: int) -> list[str]:
    """A sample's lines, short ones merged with the next until >= min_chars; a short trailing fragment is dropped
    (too little text to classify)."""
    out, cur = [], ""
    for line in _clean(sample).splitlines():
        line = line.strip()
        if line:
            cur = f"{cur} {line}" if cur else line
            if len(cur) >= min_chars:
                out.append(cur)
                cur = ""
    return out


def within_sample(clf: StyleClassifier, samples: list[str], min_chars: int = 30) -> dict:
    """Tell a blend from a coin flip: classify each segment of each sample, and measure how mixed samples are.
    mixing = mean over samples of (1 - max_k share_k) * N / (N - 1), share_k the length-weighted share of
    segments classified as source k: 0 when every sample is wholly one style, 1 when each is an even mix.
    line_proba: per sample used, the mean over its segments of the classifier's probability of each source (the
    sample's own style, for morph_error). Samples with no segment of min_chars are not used; with none used the
    two means are None and line_proba is empty."""
    n = len(clf.sources)
    segs = [_segments(s, min_chars) for s in samples]
    used = [g for g in segs if g]
    if not used:
        return {"segment_share": None, "mixing": None, "line_proba": [], "samples_used": 0, "segments": 0}
    flat = [x for g in used for x in g]
    proba = np.asarray(clf.predict_proba(flat), dtype=float)
    pred = proba.argmax(axis=1)
    shares, line_proba, i = [], [], 0
    for g in used:
        w = np.array([len(x) for x in g], dtype=float)
        shares.append(np.bincount(pred[i:i + len(g)], weights=w, minlength=n) / w.sum())
        line_proba.append(proba[i:i + len(g)].mean(axis=0).tolist())
        i += len(g)
    shares = np.array(shares)
    mixing = (1.0 - shares.max(axis=1)) * n / (n - 1)
    return {"segment_share": shares.mean(axis=0).tolist(), "mixing": float(mixing.mean()), "line_proba": line_proba,
            "samples_used": len(used), "segments": len(flat)}


def corner_scale(styles: Sequence[Sequence[float]]) -> tuple[float | None, float | None]:
    """The mean style of the first position's samples and of the last's (the two corners of an edge); None for a
    corner with no sample."""
    return tuple(float(np.mean(x)) if len(x) else None for x in (styles[0], styles[-1]))


def morph_error(ts: Sequence[float], styles: Sequence[Sequence[float]]) -> list[float | None] | None:
    """DESIGN.md §3's morph error along an edge, at each position t of ts (0 = the first corner, 1 = the second).
    styles[i]: each of position i's samples' own style (the mean over its lines of the classifier's probability of
    the edge's second source). A style is put on the corners' scale, 0 = the mean style of the first position's
    samples, 1 = the last's, and clipped to [0, 1]; the morph error at t is the mean over samples of |style - t|.
    A coin flip between the corners scores 2t(1 - t); samples that all sit where the dial is score 0.
    None (undefined) when a corner has no sample or the two corner means are equal; None at a position with no
    sample."""
    t = np.asarray(ts, dtype=float)
    if t.ndim != 1 or len(t) < 2 or len(t) != len(styles):
        raise AbcgptError(f"morph error needs >= 2 positions and one list of styles per position, got {len(t)} "
                          f"positions and {len(styles)} lists")
    scaled = on_corner_scale(styles)
    if scaled is None:
        return None
    return [float(np.abs(x - ti).mean()) if x.size else None for ti, x in zip(t, scaled)]


def on_corner_scale(styles: Sequence[Sequence[float]]) -> list[np.ndarray] | None:
    """Each position's sample styles on the corners' scale (0 = the first position's mean style, 1 = the last's),
    clipped to [0, 1]; None when a corner has no sample or the two corners read the same."""
    lo, hi = corner_scale(styles)
    if lo is None or hi is None or abs(hi - lo) < 1e-12:
        return None
    return [np.clip((np.asarray(x, dtype=float) - lo) / (hi - lo), 0.0, 1.0) for x in styles]


def mean_style(styles: Sequence[Sequence[float]]) -> list[float | None] | None:
    """Per position of an edge, the mean of its samples' styles on the corners' scale, clipped as morph_error clips
    them: the raw calibration of a mode (the diagonal is mean style = t). The morph error at t is at least
    |mean style - t|; the rest is the samples' spread. None where morph_error is undefined."""
    scaled = on_corner_scale(styles)
    return None if scaled is None else [float(x.mean()) if x.size else None for x in scaled]


def corners_position(proba: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """(S, N) each sample's position on the corners' scale, for any number of sources: the point w of the simplex
    whose mix of the corners' mean styles (corners (N, N), row k: the mean style of corner k's samples) is nearest
    the sample's style (proba (S, N)): least squares with the weights held to sum 1, then clipped to the simplex
    and renormalised. With two sources and styles on one line this is on_corner_scale's position."""
    n = corners.shape[0]
    lhs = np.vstack([corners.T, np.full((1, n), 10.0)])  # the last row, weighted, holds sum(w) = 1
    rhs = np.hstack([np.asarray(proba, dtype=float), np.full((len(proba), 1), 10.0)])
    w = np.clip(np.linalg.lstsq(lhs, rhs.T, rcond=None)[0].T, 0.0, None)
    total = w.sum(axis=1, keepdims=True)
    return np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / n)


def centroid_style(proba: Sequence[Sequence[float]], corners: Sequence[Sequence[Sequence[float]]]) -> dict | None:
    """Where the samples of the uniform dial sit, on the corners' scale (corners_position): their mean position and
    its total-variation distance from the centroid (the raw calibration there), and the morph error at the centroid,
    the mean over samples of each one's total-variation distance from it: 0 when every sample sits at the centroid,
    1 - 1/N for a coin flip (each sample one corner's). proba: each sample's style (its lines' mean probability of
    each source); corners[k]: corner k's samples' styles. None without samples at the centroid or at a corner."""
    if not len(proba) or any(not len(c) for c in corners):
        return None
    n = len(corners)
    w = corners_position(np.asarray(proba, dtype=float), np.array([np.mean(c, axis=0) for c in corners]))
    centre, mean = np.full(n, 1.0 / n), w.mean(axis=0)
    return {"mean_position": mean.tolist(), "position_error": float(0.5 * np.abs(mean - centre).sum()),
            "morph_error": float(0.5 * np.abs(w - centre).sum(axis=1).mean()), "coin_flip": 1.0 - 1.0 / n,
            "samples": len(w)}


def coin_flip_morph(ts: Sequence[float]) -> list[float]:
    """The morph error of a coin flip between the corners (each sample wholly one corner's style, with the dial's
    odds), for reference: 2t(1 - t)."""
    return [2.0 * t * (1.0 - t) for t in ts]


def _curve(dials: Sequence[float], shares: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    d, s = np.asarray(dials, dtype=float), np.asarray(shares, dtype=float)
    if d.ndim != 1 or d.shape != s.shape or len(d) == 0:
        raise AbcgptError(f"a style curve needs equal non-empty lists of dials and shares, got {d.shape}, {s.shape}")
    if not (np.isfinite(d).all() and np.isfinite(s).all()):
        raise AbcgptError("a style curve has non-finite dials or shares")
    return d, s


def calibration_error(dials: Sequence[float], shares: Sequence[float]) -> float:
    """Mean over the grid of |share - dial|."""
    d, s = _curve(dials, shares)
    return float(np.abs(s - d).mean())


def is_monotone(shares: Sequence[float], tol: float = 0.0) -> bool:
    """True if no share (in dial order) falls more than tol below any share before it: a slow slide counts."""
    x = np.asarray(shares, dtype=float)
    return bool((x >= np.maximum.accumulate(x) - tol).all())


def fit_calibration(dials: Sequence[float], shares: Sequence[float]) -> dict:
    """Knots {"share": [...], "dial": [...]} of a monotone map from a wanted share to the dial that gives it,
    from shares measured at dial positions. The isotonic fit makes share(dial) non-decreasing (noise in the
    measurement must not make the inverse fold back); each flat run of it, where sampling noise was pooled,
    becomes one knot at the mean dial of the run: for a locally straight curve that is where the share equals
    the pooled mean."""
    d, s = _curve(dials, shares)
    x = np.unique(d)
    fitted = IsotonicRegression(increasing=True).fit(d, s).predict(x)
    rise = float(fitted[-1] - fitted[0])
    if rise < 0.05:
        raise AbcgptError(f"the style curve is flat or falling (share rises by {rise:.3f} over the dial): "
                          f"the dial cannot be calibrated")
    run = np.concatenate([[0], np.cumsum(np.diff(fitted) > 1e-12)])  # run id of each dial position
    knots_share = [float(fitted[run == r][0]) for r in range(run[-1] + 1)]
    knots_dial = [float(x[run == r].mean()) for r in range(run[-1] + 1)]
    return {"share": knots_share, "dial": knots_dial}


def apply_calibration(cal: dict, share: float) -> float:
    """The dial position for a wanted share in [0, 1]; shares outside the fitted range map to the end knots."""
    if not 0.0 <= share <= 1.0:
        raise AbcgptError(f"a share must be in [0, 1], got {share}")
    return float(np.interp(share, cal["share"], cal["dial"]))
