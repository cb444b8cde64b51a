"""The dial report's measurements (DESIGN.md §3), each a function of what it needs (engine or model, held-out data,
settings) that returns a small dataclass; `Report` holds them all and is report.json.

Nothing here draws or writes: report_render.py renders a Report, report.py measures a checkpoint. Every number
carries what it rests on (batches, tokens, samples)."""

from dataclasses import dataclass, fields, is_dataclass
from typing import ClassVar

import numpy as np
import pydantic
import torch
from pydantic import Field

from abcgpt.checkpoint import Calibration, Checkpoint
from abcgpt.common import DECLARED
from abcgpt.data import PreparedData
from abcgpt.dial import MODE, corner, dial_path, even, uniform
from abcgpt.dial_spec import format_dial
from abcgpt.engine import MAX_NEW_TOKENS, MAX_ROWS, MAX_SEED, Engine
from abcgpt.heldout import batch_losses, dial_losses
from abcgpt.model import GPT
from abcgpt.neurons import band_response, firing_fractions, specialty_histogram
from abcgpt.sampling import SAMPLING
from abcgpt.style import (
    StyleClassifier,
    apply_calibration,
    calibration_error,
    centroid_style,
    coin_flip_morph,
    corner_scale,
    is_monotone,
    mean_style,
    morph_error,
    sample_shares,
    within_sample,
)


@pydantic.dataclasses.dataclass(config=DECLARED)
class Settings:
    """How much the report measures; each value is checked against its range when created."""
    loss_points: int = Field(21, ge=2, le=1001)  # dial positions on the loss curve
    batches: int = Field(8, ge=1, le=10**5)  # held-out batches per source per position
    style_points: int = Field(11, ge=2, le=1001)  # dial positions on the style curve (two sources)
    edge_points: int = Field(5, ge=2, le=1001)  # positions on each edge of the simplex (more sources)
    samples: int = Field(32, ge=1, le=MAX_ROWS)  # samples per style position
    new_tokens: int = Field(SAMPLING.max_new_tokens, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(SAMPLING.temperature, ge=0.0)
    top_k: int = Field(SAMPLING.top_k, ge=0)
    classifier_chunks: int = Field(1500, ge=10, le=10**6)
    seed: int = Field(1234, ge=0, le=MAX_SEED)
    prompt: str = "\n"  # the same prompt at every position; a newline is common to most corpora
    max_edges: int = Field(12, ge=1, le=10**6)  # edges of the simplex sampled (regret, style, near corners) past it

    @classmethod
    def quick(cls, samples: int = 4) -> "Settings":
        return cls(loss_points=5, batches=2, style_points=3, edge_points=3, samples=samples, new_tokens=48,
                   classifier_chunks=200)


def as_json(x):
    """Dataclasses as dicts, recursively, fields in order; a field a class lists in OPTIONAL is left out when None."""
    if is_dataclass(x):
        omit = getattr(x, "OPTIONAL", ())
        return {f.name: as_json(getattr(x, f.name)) for f in fields(x)
                if not (f.name in omit and getattr(x, f.name) is None)}
    if isinstance(x, dict):
        return {k: as_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [as_json(v) for v in x]
    return x


# ----------------------------------------------------------------------------- where the report looks


def edge_ts(n_sources: int, s: Settings) -> list[float]:
    """Positions along each edge where samples are drawn (the style curve) and the gates read (the neuron view)."""
    return even(s.style_points if n_sources == 2 else s.edge_points)


def edges(n_sources: int, s: Settings) -> list[tuple[int, int]]:
    """The edges (i, j) of the simplex the report looks along: every one, or past s.max_edges (N = 100 has 4,950) a
    fixed sample of s.max_edges of them, drawn uniformly without replacement with s.seed."""
    every = [(i, j) for i in range(n_sources) for j in range(i + 1, n_sources)]
    if len(every) <= s.max_edges:
        return every
    pick = np.random.default_rng(s.seed).choice(len(every), size=s.max_edges, replace=False)
    return [every[k] for k in sorted(pick)]


def regret_grid(n_sources: int, s: Settings) -> list[tuple[str, torch.Tensor]]:
    """The report's grid of dial positions: for two sources the loss curve's points; for more, the inner points of
    every edge of the simplex (of the sampled ones, see edges), and the centroid."""
    if n_sources == 2:
        ts = even(s.loss_points)
        return [(f"{t:.2f}", d) for t, d in zip(ts, dial_path(2, ts))]
    grid, ts = [], even(s.edge_points)[1:-1]
    for i, j in edges(n_sources, s):
        grid += [(f"{i}-{j}@{t:.2f}", d) for t, d in zip(ts, dial_path(n_sources, ts, i, j))]
    return grid + [("uniform", torch.full((n_sources,), 1.0 / n_sources))]


def dial_key(dial: torch.Tensor) -> tuple[float, ...]:
    """A dial position by its weights, rounded: the same point reached along two edges is one position."""
    return tuple(round(x, 6) for x in dial.tolist())


@dataclass
class LossPositions:
    """Every dial position the report needs held-out losses at."""
    corners: list[torch.Tensor]
    middle: torch.Tensor  # the uniform mixture
    t: list[float]  # the loss curve: t along the dial from the first source's corner to the last's
    path: list[torch.Tensor]
    grid: list[tuple[str, torch.Tensor]]  # where dial regret is reported, with labels
    near: dict[tuple[str, str], torch.Tensor]  # (s, t): a tenth of the dial on s, the rest on t

    def distinct(self) -> list[torch.Tensor]:
        """Each position once (the curve and the grid share points), at its rounded weights, in a fixed order."""
        dials = self.corners + [self.middle] + self.path + [d for _, d in self.grid] + list(self.near.values())
        return [torch.tensor(k) for k in dict.fromkeys(dial_key(d) for d in dials)]


def loss_positions(sources: list[str], s: Settings) -> LossPositions:
    """Corners, middle, the loss curve, the regret grid and the near-corner points (where isolation is also
    reported), for these sources and settings."""
    n = len(sources)
    t = even(s.loss_points)
    pairs = [p for i, j in edges(n, s) for p in ((i, j), (j, i))]
    near = {(sources[i], sources[j]): dial_path(n, [0.1], j, i)[0] for i, j in pairs}
    return LossPositions(corners=[corner(i, n) for i in range(n)], middle=uniform(n), t=t,
                         path=dial_path(n, t), grid=regret_grid(n, s), near=near)


# ----------------------------------------------------------------------------- held-out losses


@dataclass
class CI:
    """Mean held-out loss over batches, its 95% bootstrap confidence interval, and (given the baselines) the
    ungated models' loss on the same text."""
    mean: float
    ci95: list[float]
    batches: int
    joint: float | None = None  # the joint model
    vs_joint: float | None = None  # mean - joint
    alone: float | None = None  # a model trained on this source alone (alone_kind says which)
    alone_kind: str | None = None  # ALONE_EQUAL (alone_<s>) or ALONE_NEVER (two sources: without_<other>)
    vs_alone: float | None = None  # mean - alone
    OPTIONAL = ("joint", "vs_joint", "alone", "alone_kind", "vs_alone")


# where a corner's `alone` comes from: alone_<s> (of the same width, the dial model's steps on s), else (two sources)
# without_<other>, the model that never saw the other source (trained for all the dial model's steps)
ALONE_EQUAL, ALONE_NEVER = "alone (equal compute)", "never saw the other"


def mean_ci(x: np.ndarray, n_boot: int = 1000, seed: int = 0) -> CI:
    """Mean and a 95% bootstrap confidence interval over batches."""
    rng = np.random.default_rng(seed)
    boots = rng.choice(x, size=(n_boot, x.size), replace=True).mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return CI(mean=float(x.mean()), ci95=[float(lo), float(hi)], batches=int(x.size))


@dataclass
class HeldoutLosses:
    """Loss (nats) of each of a source's fixed held-out batches at each of a set of dial positions."""
    sources: list[str]
    keys: list[tuple[float, ...]]  # dial_key of each position
    losses: dict[str, np.ndarray]  # source -> (positions, batches)
    tokens_per_cell: int  # held-out tokens behind one source's loss at one position

    def at(self, dial: torch.Tensor) -> dict[str, np.ndarray]:
        i = self.keys.index(dial_key(dial))
        return {src: v[i] for src, v in self.losses.items()}


def measure_losses(engine: Engine, data: PreparedData, dials: list[torch.Tensor], mode: str, batch_size: int,
                   n_batches: int) -> HeldoutLosses:
    """Every source's held-out batches at every dial, in one mode: all positions in one pass over the batches."""
    losses = {src: dial_losses(engine, data.heldout[j], dials, mode, batch_size, n_batches)
              for j, src in enumerate(engine.sources)}
    return HeldoutLosses(engine.sources, [dial_key(d) for d in dials], losses,
                         n_batches * batch_size * engine.model.config.block_size)


def baseline_losses(baselines: dict[str, Checkpoint], data: PreparedData, batch_size: int, n_batches: int
                    ) -> dict[str, dict[str, float]]:
    """{baseline: {source: mean held-out loss}} of the ungated baselines, on the same batches as the dial's."""
    return {name: {src: float(batch_losses(b.model, data.heldout[j], None, batch_size, n_batches).mean())
                   for j, src in enumerate(data.sources)} for name, b in baselines.items()}


@dataclass
class CornerLosses:
    table: dict[str, dict[str, CI]]  # [t][s]: source s with the dial at t's corner
    own: dict[str, CI]  # each source at its own corner, against the baselines
    contrast: dict[str, float]  # how much worse a source is at the best other corner than at its own
    middle: dict[str, CI]  # each source at the uniform mixture, against the joint model


def corner_losses(losses: HeldoutLosses, pos: LossPositions, base: dict[str, dict[str, float]] | None
                  ) -> CornerLosses:
    """The corner table, each source at its own corner and at the middle (against the baselines, given their
    losses: joint, and alone, the equal-compute alone_<s> or else, for two sources, without_<other>), and the
    contrast."""
    sources = losses.sources
    cells = {t: losses.at(d) for t, d in zip(sources, pos.corners)}
    mid = losses.at(pos.middle)
    L = {t: {src: float(v.mean()) for src, v in row.items()} for t, row in cells.items()}
    own = {src: mean_ci(cells[src][src]) for src in sources}
    middle = {src: mean_ci(mid[src]) for src in sources}
    if base is not None:
        joint = base["joint"]
        for src in sources:
            own[src].joint, own[src].vs_joint = joint[src], L[src][src] - joint[src]
            middle[src].joint, middle[src].vs_joint = joint[src], middle[src].mean - joint[src]
            alone, kind = base.get(f"alone_{src}", {}).get(src), ALONE_EQUAL
            if alone is None and len(sources) == 2:  # "never saw the other source" is "trained on this one alone"
                alone, kind = base.get(f"without_{sources[1 - sources.index(src)]}", {}).get(src), ALONE_NEVER
            if alone is not None:
                own[src].alone, own[src].alone_kind, own[src].vs_alone = alone, kind, L[src][src] - alone
    return CornerLosses(
        table={t: {src: mean_ci(v) for src, v in row.items()} for t, row in cells.items()},
        own=own,
        contrast={src: min(L[t][src] for t in sources if t != src) - L[src][src] for src in sources},
        middle=middle,
    )


@dataclass
class LossCurve:
    t: list[float]
    dial: list[str]
    loss: dict[str, list[CI]]  # source -> one per t
    tokens_per_point: int


def loss_curve(losses: HeldoutLosses, pos: LossPositions) -> LossCurve:
    """Each source's held-out loss along the dial from the first source's corner to the last's."""
    return LossCurve(t=pos.t, dial=[format_dial(d, losses.sources) for d in pos.path],
                     loss={src: [mean_ci(losses.at(d)[src]) for d in pos.path] for src in losses.sources},
                     tokens_per_point=losses.tokens_per_cell)


@dataclass
class RegretPoint:
    dial: str
    weights: list[float]
    regret: float


@dataclass
class Regret:
    positions: list[RegretPoint]
    max: float
    argmax: str  # the worst position's label
    tokens_per_point: int


def dial_regret(losses: HeldoutLosses, pos: LossPositions) -> Regret:
    """Regret at a dial a = sum_s a_s (L(a, s) - L(corner s, s)), at each position of the grid."""
    sources = losses.sources
    own = {src: float(losses.at(d)[src].mean()) for src, d in zip(sources, pos.corners)}

    def regret(d: torch.Tensor) -> float:
        at = losses.at(d)
        return float(sum(w * (at[src].mean() - own[src]) for w, src in zip(d.tolist(), sources)))

    points = [RegretPoint(label, d.tolist(), regret(d)) for label, d in pos.grid]
    worst = max(points, key=lambda p: p.regret)
    return Regret(points, worst.regret, worst.dial, losses.tokens_per_cell * len(sources))


@dataclass
class Isolation:
    """(L - joint) / (never - joint) for source s: 0 = as well as the joint model, 1 = as if never trained on s."""
    corner: dict[str, dict[str, float]]  # [s][t]: source s at corner t
    near: dict[str, dict[str, float]]  # [s][t]: source s a tenth of the dial away from corner t, toward s


def isolation(losses: HeldoutLosses, pos: LossPositions, base: dict[str, dict[str, float]] | None
              ) -> Isolation | None:
    """None without a baseline that never saw some source."""
    sources = losses.sources
    if base is None or any(f"without_{src}" not in base for src in sources):
        return None
    joint = base["joint"]

    def iso(d: torch.Tensor, src: str) -> float:
        return (float(losses.at(d)[src].mean()) - joint[src]) / (base[f"without_{src}"][src] - joint[src])

    corners = dict(zip(sources, pos.corners))
    return Isolation(corner={src: {t: iso(corners[t], src) for t in sources if t != src} for src in sources},
                     near={src: {t: iso(pos.near[src, t], src) for t in sources if (src, t) in pos.near}
                           for src in sources})


# ----------------------------------------------------------------------------- style


def fit_classifier(data: PreparedData, s: Settings) -> StyleClassifier:
    """The style classifier, trained on (up to 400k tokens of) each source's held-out text."""
    texts = {src: data.tokenizer.decode(data.heldout[j][:400_000].tolist()) for j, src in enumerate(data.sources)}
    return StyleClassifier.fit(texts, max_chunks=s.classifier_chunks, seed=s.seed)


@dataclass
class StyleSamples:
    share: list[list[float]]  # per dial: mean predicted share of each source
    segment_share: list[list[float] | None]  # per dial: share of segments (lines) classified as each source
    mixing: list[float | None]  # per dial: 0 when every sample is wholly one style, 1 when each is an even blend
    example: list[str]  # per dial: the first sample
    fluency: list[float] | None  # per dial: the judge's mean loss per token of the samples
    # per dial, per sample with a line long enough to classify: the mean over its lines of each source's probability
    # (read by the same classification as mixing); a StyleEdge keeps only its second source's column, sample_style
    line_proba: list[list[list[float]]] | None


def sample_style(engine: Engine, clf: StyleClassifier, dials: list[torch.Tensor], mode: str, s: Settings,
                 judge: Engine | None = None) -> StyleSamples:
    """K samples per dial (same prompt and the same random stream at every position), scored by the classifier,
    and, given a judge (the ungated joint baseline), by the judge's loss per token: how fluent they are."""
    shares, segment, mixing, texts, fluency, line_proba = [], [], [], [], [], []
    for d in dials:
        batch = engine.generate(s.prompt, d, s.new_tokens, s.temperature, s.top_k, s.seed, n=s.samples, mode=mode)
        shares.append(sample_shares(clf, batch).tolist())
        w = within_sample(clf, batch)
        segment.append(w["segment_share"])
        mixing.append(w["mixing"])
        line_proba.append(w["line_proba"])
        texts.append(batch[0])
        if judge is not None:  # the prompt is the first token: every generated token is scored
            fluency.append(float(np.mean([judge.loss(s.prompt + t, "uniform") for t in batch])))
    return StyleSamples(shares, segment, mixing, texts, fluency or None, line_proba)


@dataclass
class StyleEdge(StyleSamples):
    """The style curve along one edge of the simplex (for two sources: the dial): its samples, read, and more."""
    samples_per_point: int
    new_tokens: int
    temperature: float
    top_k: int
    source_from: str
    source_to: str
    t: list[float]
    dial: list[str]
    share_to: list[float]  # the share read as source_to, against t
    calibration_error: float
    monotone: bool
    # morph error (DESIGN.md §3): each sample's own style, the mean over its lines of the probability of source_to
    sample_style: list[list[float]]  # per t, per sample with a classifiable line
    style_scale: list[float | None]  # the corners' mean style: 0 and 1 of morph error's scale (None: no sample)
    morph_error: list[float | None]  # per t: mean over samples of |style on the corners' scale - t|; None: undefined
    morph_samples: list[int]  # per t: the samples morph error rests on
    coin_flip: list[float]  # per t: a coin flip's morph error, 2t(1 - t)
    mean_style: list[float | None]  # per t: the samples' mean style on the corners' scale (None: undefined)
    style_error: float | None  # mean over t of |mean style - t|: calibration on the corners' scale, raw
    fluency_target: list[float] | None = None  # the dial-weighted mean of the two ends' fluency
    fluency_gap: list[float] | None = None  # fluency - fluency_target
    OPTIONAL = ("fluency_target", "fluency_gap", "line_proba")


@dataclass
class Centroid:
    """Samples at the uniform dial (three sources or more), on the corners' scale (style.centroid_style)."""
    samples: int  # with a classifiable line
    mean_position: list[float]  # the samples' mean position, in source order (goal: 1/N each)
    position_error: float  # its total-variation distance from the centroid
    morph_error: float  # mean over samples of each one's distance from the centroid
    coin_flip: float  # 1 - 1/N: each sample one corner's


@dataclass
class StyleCurve:
    edges: list[StyleEdge]
    samples_per_point: int
    new_tokens: int
    prompt: str
    calibration_error: float  # mean over edges
    monotone: bool  # on every edge
    mixing_mid: float  # mean over edges of the mixing at the middle position
    morph_mid: float | None  # mean over edges (where defined) of the morph error at the middle position
    morph_mid_edges: int  # edges with a defined morph error at the middle
    morph_mid_samples: int  # samples at the middle position of those edges
    coin_flip_mid: float  # a coin flip's morph error at the middle position, 2t(1 - t)
    centroid: Centroid | None = None  # three sources or more
    OPTIONAL = ("centroid",)


def style_curve(engine: Engine, clf: StyleClassifier, mode: str, s: Settings, judge: Engine | None = None
                ) -> StyleCurve:
    """Samples along every edge of the simplex (the sampled ones past Settings.max_edges), read by the classifier,
    and (given a judge) their fluency against the dial-weighted mean of the two corners' samples."""
    sources, n, ts = engine.sources, len(engine.sources), edge_ts(len(engine.sources), s)
    out, at_corner = [], {}  # corner k: its samples' styles, from the ends of the edges
    for i, j in edges(n, s):
        dials = dial_path(n, ts, i, j)
        st = sample_style(engine, clf, dials, mode, s, judge)
        at_corner.setdefault(i, st.line_proba[0])
        at_corner.setdefault(j, st.line_proba[-1])
        share_to = [row[j] for row in st.share]
        styles = [[p[j] for p in at] for at in st.line_proba]  # each sample's own style: P(source_to)
        morph = morph_error(ts, styles)
        e = StyleEdge(**(vars(st) | {"line_proba": None}), samples_per_point=s.samples,
                      new_tokens=s.new_tokens, temperature=s.temperature, top_k=s.top_k, source_from=sources[i],
                      source_to=sources[j], t=ts, dial=[format_dial(d, sources) for d in dials],
                      share_to=share_to, calibration_error=calibration_error(ts, share_to),
                      monotone=is_monotone(share_to, tol=0.05), sample_style=styles,
                      style_scale=list(corner_scale(styles)), morph_error=morph or [None] * len(ts),
                      morph_samples=[len(x) for x in styles], coin_flip=coin_flip_morph(ts),
                      mean_style=(mean := mean_style(styles)) or [None] * len(ts),
                      style_error=None if mean is None or None in mean else
                      float(np.mean([abs(m - t) for m, t in zip(mean, ts)])))
        if st.fluency:
            f = st.fluency
            e.fluency_target = [(1 - t) * f[0] + t * f[-1] for t in ts]
            e.fluency_gap = [a - b for a, b in zip(f, e.fluency_target)]
        out.append(e)
    centroid = None
    if n > 2:  # the samples of every corner (the same random numbers on every edge: the same samples) and the centre
        for k in range(n):
            if k not in at_corner:
                at_corner[k] = sample_style(engine, clf, [corner(k, n)], mode, s).line_proba[0]
        c = centroid_style(sample_style(engine, clf, [uniform(n)], mode, s).line_proba[0],
                           [at_corner[k] for k in range(n)])
        centroid = None if c is None else Centroid(**c)
    mid = len(ts) // 2
    morphed = [e for e in out if e.morph_error[mid] is not None]
    return StyleCurve(out, s.samples, s.new_tokens, s.prompt,
                      calibration_error=float(np.mean([e.calibration_error for e in out])),
                      monotone=all(e.monotone for e in out),
                      mixing_mid=float(np.mean([e.mixing[mid] or 0.0 for e in out])),
                      morph_mid=float(np.mean([e.morph_error[mid] for e in morphed])) if morphed else None,
                      morph_mid_edges=len(morphed), morph_mid_samples=sum(e.morph_samples[mid] for e in morphed),
                      coin_flip_mid=coin_flip_morph([ts[mid]])[0], centroid=centroid)


@dataclass
class Fluency:
    judge: str  # the joint baseline's checkpoint
    max_gap: float  # the largest fluency gap over all edges
    heldout: dict[str, float]  # the judge's loss on real held-out text of each source


def fluency_summary(style: StyleCurve, judge: Engine, joint: dict[str, float]) -> Fluency:
    return Fluency(str(judge.path), max(max(e.fluency_gap) for e in style.edges), dict(joint))


@dataclass
class Calibrated:
    """The style curve through a stored calibration: the dial each share asks for, and the share it gives."""
    asked: list[float]
    dial: list[float]
    share: list[float]
    mixing: list[float | None]
    calibration_error: float
    monotone: bool


def calibrated_curve(engine: Engine, clf: StyleClassifier, cal: Calibration, asked: list[float], mode: str, s: Settings
                     ) -> Calibrated:
    dials = [apply_calibration(cal.model_dump(), a) for a in asked]
    st = sample_style(engine, clf, dial_path(len(engine.sources), dials), mode, s)
    share = [row[1] for row in st.share]
    return Calibrated(asked, dials, share, st.mixing, calibration_error(asked, share), is_monotone(share, tol=0.05))


# ----------------------------------------------------------------------------- attribution


@dataclass
class AttributedSample:
    """A style sample (prompt included), each token marked with the source it leans on: Engine.attribute with a
    uniform prior, in mode switch (restarted at each turn, a line or sentence) for a report in mode switch, else
    mixture."""
    dial: str
    mode: str
    final: list[float]  # P(source | the whole text), the mixture's posterior after it
    runs: list[tuple[int, str]]  # Attribution.runs: (source index, text) where the top source changes


def attributed_samples(engine: Engine, style: StyleCurve, mode: str, prompt: str) -> list[AttributedSample]:
    """The first edge's samples at its ends and its middle, attributed (a few, to look at, not to measure)."""
    e, how = style.edges[0], mode if MODE[mode].posterior else "mixture"  # a posterior mode's own, else mixture's
    out = []
    for i in sorted({0, len(e.t) // 2, len(e.t) - 1}):
        a = engine.attribute(prompt + e.example[i], "uniform", how)
        out.append(AttributedSample(e.dial[i], how, a.final, a.runs()))
    return out


# ----------------------------------------------------------------------------- neurons


@dataclass
class NeuronView:
    histogram: dict  # neurons.specialty_histogram
    firing: dict  # neurons.firing_fractions along the first edge
    response: dict  # neurons.band_response
    dial: list[str]  # labels of firing's dials


def neuron_view(model: GPT, data: PreparedData, s: Settings, batch_size: int) -> NeuronView:
    n = len(data.sources)
    path = dial_path(n, edge_ts(n, s))
    return NeuronView(specialty_histogram(model), firing_fractions(model, path),
                      band_response(model, data, batch_size=min(batch_size, 16), n_batches=max(1, s.batches // 4)),
                      [format_dial(d, data.sources) for d in path])


# ----------------------------------------------------------------------------- the report


@dataclass
class Report:
    """Everything measured on one checkpoint in one dial mode; to_dict() is report.json."""
    OPTIONAL: ClassVar[tuple[str, ...]] = ("baselines", "fluency", "calibrated", "neurons", "attribution", "original")
    checkpoint: str
    recipe: str
    step: int
    sources: list[str]
    mode: str
    settings: Settings
    quick: bool
    heldout_tokens_per_cell: int
    corners: CornerLosses
    regret: Regret
    baselines: dict[str, dict[str, float]] | None  # {baseline: {source: held-out loss}}
    isolation: Isolation | None
    loss_curve: LossCurve
    classifier: dict
    style: StyleCurve
    fluency: Fluency | None
    calibrated: Calibrated | None
    neurons: NeuronView | None
    attribution: list[AttributedSample] | None
    original: dict | None  # DESIGN.md §2's numbers, for the reference recipe
    seconds: float

    def to_dict(self) -> dict:
        """report.json: the fields as they are named here, nested as here; a section that was not measured is left
        out (OPTIONAL), except the isolation, which is null."""
        return as_json(self)
