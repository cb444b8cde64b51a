"""The dial report: DESIGN.md §3's metrics for a checkpoint, as report.json, report.md, report.html and PNGs.

Every number carries what it rests on (batches, tokens, samples). `quick=True` runs the same code with fewer
batches, points and samples, for tests."""

import base64
import copy
import json
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from pydantic.dataclasses import dataclass

from abcgpt.checkpoint import Checkpoint, load_checkpoint
from abcgpt.common import DECLARED, AbcgptError, atomic_dir, atomic_write_text, check_writable, existing_dir, run_lock
from abcgpt.config import keys_a_baseline_may_change
from abcgpt.data import PreparedData, prepared_data
from abcgpt.dial import corner
from abcgpt.dial_spec import format_dial
from abcgpt.engine import MAX_NEW_TOKENS, MAX_ROWS, MAX_SEED, Engine
from abcgpt.evaluate import batch_losses, dial_losses
from abcgpt.neurons import band_response, firing_fractions, plot_neuron_view, specialty_histogram
from abcgpt.style import (
    StyleClassifier,
    apply_calibration,
    calibration_error,
    fit_calibration,
    is_monotone,
    sample_shares,
    within_sample,
)

# DESIGN.md §2: the original implementation at the reference recipe (one H100, held-out data), sources in the
# reference's order (tinystories = dial 0, shakespeare = dial 1).
ORIGINAL = {
    "corner_loss": {"tinystories": 0.961, "shakespeare": 1.435},
    "other_corner_loss": {"tinystories": 1.346, "shakespeare": 1.731},
    "contrast": {"tinystories": 0.39, "shakespeare": 0.30},
    "isolation": {"tinystories": 0.13, "shakespeare": 0.11},
    "joint": {"tinystories": 0.736, "shakespeare": 1.377},
    "style_share": {"dial": [0, 0.25, 0.5, 0.75, 1], "shakespeare": [0, 0.13, 0.5, 1, 1]},
}


@dataclass(config=DECLARED)
class Settings:
    """How much the report measures; each value is checked against its range when created."""
    loss_points: int = Field(21, ge=2, le=1001)  # dial positions on the loss curve
    batches: int = Field(8, ge=1, le=10**5)  # held-out batches per source per position
    style_points: int = Field(11, ge=2, le=1001)  # dial positions on the style curve (two sources)
    edge_points: int = Field(5, ge=2, le=1001)  # positions on each edge of the simplex (more sources)
    samples: int = Field(32, ge=1, le=MAX_ROWS)  # samples per style position
    new_tokens: int = Field(200, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.8, ge=0.0)
    top_k: int = Field(40, ge=0)
    classifier_chunks: int = Field(1500, ge=10, le=10**6)
    seed: int = Field(1234, ge=0, le=MAX_SEED)
    prompt: str = "\n"  # the same prompt at every position; a newline is common to most corpora

    @classmethod
    def quick(cls, samples: int = 4) -> "Settings":
        return cls(loss_points=5, batches=2, style_points=3, edge_points=3, samples=samples, new_tokens=48,
                   classifier_chunks=200)


# ----------------------------------------------------------------------------- losses


def mean_ci(x: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean and a 95% bootstrap confidence interval over batches."""
    rng = np.random.default_rng(seed)
    boots = rng.choice(x, size=(n_boot, x.size), replace=True).mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"mean": float(x.mean()), "ci95": [float(lo), float(hi)], "batches": int(x.size)}


def dial_path(n_sources: int, points: int) -> tuple[list[float], list[torch.Tensor]]:
    """Points from the first source's corner to the last's; for two sources this is the dial a in [0, 1]."""
    ts = np.linspace(0.0, 1.0, points)
    first, last = corner(0, n_sources), corner(n_sources - 1, n_sources)
    return ts.tolist(), [(1 - float(t)) * first + float(t) * last for t in ts]


# ----------------------------------------------------------------------------- baselines


def check_baseline(dial: Checkpoint, base: Checkpoint, name: str) -> None:
    """Refuse a baseline trained with another tokenizer or recipe, naming the difference."""
    if base.tokenizer.to_json() != dial.tokenizer.to_json():
        raise AbcgptError(f"baseline {name} ({base.path}) has another tokenizer than the dial model")
    a, b, free = dial.meta["recipe"], base.meta["recipe"], keys_a_baseline_may_change()
    for section in ("data", "model", "train"):
        for key in sorted(set(a[section]) | set(b[section])):
            if key in free.get(section, ()):
                continue
            if a[section].get(key) != b[section].get(key):
                raise AbcgptError(f"baseline {name} ({base.path}) differs from the dial model in {section}.{key}: "
                                  f"{b[section].get(key)!r} vs {a[section].get(key)!r}")


def load_baselines(path: Path, dial: Checkpoint, device) -> dict[str, Checkpoint]:
    """joint, and without_<s> for the sources that have a finished one, from a folder written by `abcgpt baselines`.
    The joint model is required (the comparisons and the fluency judge); isolation needs every without_<s>."""
    path = Path(path)
    found = {}
    for name in ["joint"] + [f"without_{s}" for s in dial.sources]:
        run = path / name
        if not (existing_dir(run / "last") / "config.json").is_file():
            if name != "joint":
                continue
            raise AbcgptError(f"baseline {name} not found in {path} (expected {run}/last): run "
                              f"`abcgpt baselines --config ... --out {path}`")
        ckpt = load_checkpoint(existing_dir(run / "last"), device)
        if ckpt.meta["step"] < ckpt.recipe.train.steps:  # still training, or stopped: not the recipe's model
            if name != "joint":
                continue
            raise AbcgptError(f"baseline joint ({ckpt.path}) is unfinished: step {ckpt.meta['step']} of "
                              f"{ckpt.recipe.train.steps}; resume it with `abcgpt baselines` (same arguments)")
        if ckpt.model.config.gates != "none":
            raise AbcgptError(f"baseline {name} ({ckpt.path}) is a gated model; baselines are ungated")
        check_baseline(dial, ckpt, name)
        found[name] = ckpt
    return found


# ----------------------------------------------------------------------------- style


def style_at(engine: Engine, clf: StyleClassifier, dials: list[torch.Tensor], mode: str, s: Settings,
             judge: Engine | None = None) -> dict:
    """K samples per dial (same prompt and the same random stream at every position), scored by the classifier,
    and, given a judge (the ungated joint baseline), by the judge's loss per token: how fluent they are."""
    shares, segment, mixing, texts, fluency = [], [], [], [], []
    for d in dials:
        batch = engine.generate(s.prompt, d, s.new_tokens, s.temperature, s.top_k, s.seed, n=s.samples, mode=mode)
        shares.append(sample_shares(clf, batch).tolist())
        w = within_sample(clf, batch)
        segment.append(w["segment_share"])
        mixing.append(w["mixing"])
        texts.append(batch[0])
        if judge is not None:  # the prompt is the first token: every generated token is scored
            fluency.append(float(np.mean([judge.loss(s.prompt + t, "uniform") for t in batch])))
    return {"share": shares, "segment_share": segment, "mixing": mixing, "example": texts,
            "fluency": fluency or None, "samples_per_point": s.samples, "new_tokens": s.new_tokens,
            "temperature": s.temperature, "top_k": s.top_k}


# ----------------------------------------------------------------------------- the report


def regret_grid(n_sources: int, s: Settings) -> list[tuple[str, torch.Tensor]]:
    """The report's grid of dial positions: for two sources the loss curve's points; for more, the points of every
    edge of the simplex, and the centroid."""
    if n_sources == 2:
        return [(f"{t:.2f}", d) for t, d in zip(*dial_path(2, s.loss_points))]
    grid = []
    for i in range(n_sources):
        for j in range(i + 1, n_sources):
            for t in np.linspace(0.0, 1.0, s.edge_points)[1:-1]:
                grid.append((f"{i}-{j}@{t:.2f}", (1 - t) * corner(i, n_sources) + t * corner(j, n_sources)))
    return grid + [("uniform", torch.full((n_sources,), 1.0 / n_sources))]


def build_report(ckpt_path: Path, baselines: Path | None = None, quick: bool = False, settings: Settings | None = None,
                 device: str | torch.device = "cpu", progress: bool = True, mode: str | None = None
                 ) -> tuple[dict, dict[str, bytes]]:
    """All numbers of the report (a JSON-able dict) and its figures (PNG bytes by file name), for the dial in one
    mode (the engine's default unless given)."""
    t0 = time.time()
    s = settings or (Settings.quick() if quick else Settings())
    ckpt = load_checkpoint(ckpt_path, device)
    engine = Engine(ckpt)
    model, sources, mode = engine.model, engine.sources, engine.mode(mode)
    if model.config.gates != "abc":
        raise AbcgptError(f"{ckpt.path} is an ungated model: the report is for dial models")
    engine.prompt_ids(s.prompt)  # the checks first, then minutes of work
    data = heldout_data(ckpt)
    n, bs = len(sources), ckpt.recipe.train.batch_size
    tokens_per_cell = s.batches * bs * model.config.block_size

    def say(msg):
        if progress:
            print(f"[{time.time() - t0:5.1f}s] {msg}")

    # every dial position the losses are needed at, scored once: corners, middle, the loss curve, the regret grid,
    # and the near-corner points (a tenth of the dial on a source) where isolation is also reported
    corners = [corner(i, n) for i in range(n)]
    middle_dial = torch.full((n,), 1.0 / n)
    ts, path = dial_path(n, s.loss_points)
    grid = regret_grid(n, s)
    near = {(src, t): 0.9 * corners[j] + 0.1 * corners[i] for i, src in enumerate(sources)
            for j, t in enumerate(sources) if i != j}
    dials = corners + [middle_dial] + path + [d for _, d in grid] + list(near.values())
    keys = list(dict.fromkeys(tuple(round(x, 6) for x in d.tolist()) for d in dials))
    say(f"held-out loss at {len(keys)} dial positions (mode {mode})")
    per_source = {src: dial_losses(engine, data.heldout[j], [torch.tensor(k) for k in keys], mode, bs, s.batches)
                  for j, src in enumerate(sources)}

    def losses(d: torch.Tensor) -> dict[str, np.ndarray]:
        i = keys.index(tuple(round(x, 6) for x in d.tolist()))
        return {src: per_source[src][i] for src in sources}

    cells = {t: losses(corners[i]) for i, t in enumerate(sources)}
    middle = losses(middle_dial)
    L = {t: {src: float(v.mean()) for src, v in row.items()} for t, row in cells.items()}

    def regret(d: torch.Tensor) -> float:
        at = losses(d)
        return float(sum(w * (at[src].mean() - L[src][src]) for w, src in zip(d.tolist(), sources)))

    positions = [{"dial": label, "weights": d.tolist(), "regret": regret(d)} for label, d in grid]
    worst = max(positions, key=lambda p: p["regret"])
    report = {
        "checkpoint": str(ckpt.path), "recipe": ckpt.recipe.name, "step": ckpt.meta["step"], "sources": sources,
        "mode": mode, "settings": asdict(s), "quick": quick,
        "heldout_tokens_per_cell": tokens_per_cell,
        "corner_table": {t: {src: mean_ci(v) for src, v in row.items()} for t, row in cells.items()},
        "corner_loss": {src: mean_ci(cells[src][src]) for src in sources},
        "contrast": {src: min(L[t][src] for t in sources if t != src) - L[src][src] for src in sources},
        "middle": {src: mean_ci(middle[src]) for src in sources},
        "regret": {"positions": positions, "max": worst["regret"], "argmax": worst["dial"],
                   "tokens_per_point": tokens_per_cell * n},
    }

    # baselines: joint, and never saw s; the joint model also judges the samples' fluency
    base_loss, judge = {}, None
    if baselines is not None:
        say("baselines")
        for name, b in load_baselines(baselines, ckpt, device).items():
            base_loss[name] = {src: float(batch_losses(b.model, data.heldout[j], None, bs, s.batches).mean())
                               for j, src in enumerate(sources)}
            if name == "joint":
                judge = Engine(b)
        joint = base_loss["joint"]
        report["baselines"] = base_loss

        def isolation(loss: float, src: str) -> float:
            return (loss - joint[src]) / (base_loss[f"without_{src}"][src] - joint[src])

        missing = [src for src in sources if f"without_{src}" not in base_loss]
        if missing:
            say(f"no isolation: baselines {', '.join('without_' + m for m in missing)} are missing")
            report["isolation"] = report["isolation_near"] = None
        else:
            report["isolation"] = {src: {t: isolation(L[t][src], src) for t in sources if t != src}
                                   for src in sources}
            report["isolation_near"] = {src: {t: isolation(float(losses(near[src, t])[src].mean()), src)
                                              for t in sources if t != src} for src in sources}
        for src in sources:
            report["corner_loss"][src]["joint"] = joint[src]
            report["corner_loss"][src]["vs_joint"] = L[src][src] - joint[src]
            report["middle"][src]["joint"] = joint[src]
            report["middle"][src]["vs_joint"] = report["middle"][src]["mean"] - joint[src]
            other = sources[1 - sources.index(src)] if n == 2 else None
            if f"without_{other}" in base_loss:  # with two sources, "never saw the other" is "trained on s alone"
                report["corner_loss"][src]["alone"] = base_loss[f"without_{other}"][src]
    else:
        report["isolation"] = report["isolation_near"] = None

    curve = {src: [mean_ci(losses(d)[src]) for d in path] for src in sources}
    report["loss_curve"] = {"t": ts, "dial": [format_dial(d, sources) for d in path], "loss": curve,
                            "tokens_per_point": tokens_per_cell}

    # style curve along every edge of the simplex (for two sources: the dial), scored by a classifier
    # trained on held-out text, and the samples' fluency under the judge
    say("style classifier")
    clf = fit_classifier(data, s)
    report["classifier"] = clf.to_dict()
    edges = [(i, j) for i in range(n) for j in range(i + 1, n)]
    points = s.style_points if n == 2 else s.edge_points
    say(f"style curve: {s.samples} samples x {points} positions x {len(edges)} edge(s)"
        + (", judged by the joint baseline" if judge else ""))
    curves = []
    for i, j in edges:
        ets = np.linspace(0.0, 1.0, points).tolist()
        edials = [(1 - t) * corners[i] + t * corners[j] for t in ets]
        st = style_at(engine, clf, edials, mode, s, judge)
        share_to = [row[j] for row in st["share"]]
        st.update(source_from=sources[i], source_to=sources[j], t=ets, dial=[format_dial(d, sources) for d in edials],
                  share_to=share_to, calibration_error=calibration_error(ets, share_to),
                  monotone=is_monotone(share_to, tol=0.05))
        if st["fluency"]:  # against the dial-weighted mean of the two corners' samples
            f = st["fluency"]
            st["fluency_target"] = [(1 - t) * f[0] + t * f[-1] for t in ets]
            st["fluency_gap"] = [a - b for a, b in zip(f, st["fluency_target"])]
        curves.append(st)
    report["style_curve"] = {"edges": curves, "samples_per_point": s.samples, "new_tokens": s.new_tokens,
                             "prompt": s.prompt}
    report["calibration_error"] = float(np.mean([c["calibration_error"] for c in curves]))
    report["monotone"] = all(c["monotone"] for c in curves)
    report["mixing_mid"] = float(np.mean([c["mixing"][len(c["t"]) // 2] or 0.0 for c in curves]))
    if judge is not None:
        report["fluency"] = {"judge": str(judge.path), "max_gap": max(max(c["fluency_gap"]) for c in curves),
                             "heldout": {src: base_loss["joint"][src] for src in sources}}
    cal = ckpt.meta.get("calibration")
    if cal is not None and cal.get("mode", "gates") == mode:
        say("style curve through the stored calibration")
        asked = curves[0]["t"]
        cdials = [apply_calibration(cal, a) for a in asked]
        cpath = [(1 - d) * corners[0] + d * corners[n - 1] for d in cdials]
        cstyle = style_at(engine, clf, cpath, mode, s)
        cshare = [row[1] for row in cstyle["share"]]
        report["calibrated"] = {"asked": asked, "dial": cdials, "share": cshare, "mixing": cstyle["mixing"],
                                "calibration_error": calibration_error(asked, cshare),
                                "monotone": is_monotone(cshare, tol=0.05)}

    # neuron view
    say("neuron view")
    _, npath = dial_path(n, points)
    report["neurons"] = {
        "histogram": specialty_histogram(model),
        "firing": firing_fractions(model, npath),
        "response": band_response(model, data, batch_size=min(bs, 16), n_batches=max(1, s.batches // 4)),
    }
    if ckpt.recipe.name == "reference" and sources == ["tinystories", "shakespeare"]:
        report["original"] = ORIGINAL
    report["seconds"] = round(time.time() - t0, 1)
    figures = {
        "loss_vs_dial.png": plot_loss(report),
        "corners.png": plot_corners(report),
        "style_curve.png": plot_style(report),
        "regret_fluency.png": plot_regret_fluency(report),
        "neurons.png": _png(lambda p: plot_neuron_view(report["neurons"]["histogram"], report["neurons"]["firing"],
                                                       report["neurons"]["response"],
                                                       [format_dial(d, sources) for d in npath], sources, p)),
    }
    say("done")
    return report, figures


def fit_classifier(data: PreparedData, s: Settings) -> StyleClassifier:
    """The style classifier, trained on (up to 400k tokens of) each source's held-out text."""
    texts = {src: data.tokenizer.decode(data.heldout[j][:400_000].tolist()) for j, src in enumerate(data.sources)}
    return StyleClassifier.fit(texts, max_chunks=s.classifier_chunks, seed=s.seed)


def heldout_data(ckpt: Checkpoint) -> PreparedData:
    """The checkpoint's held-out text, from its prepared data (prepared again from the sources if absent)."""
    recipe = copy.deepcopy(ckpt.recipe)
    data = prepared_data(recipe, progress=False)
    if data.sources != ckpt.sources:
        raise AbcgptError(f"prepared data in {data.dir} holds sources {data.sources}, the checkpoint {ckpt.sources}")
    if data.tokenizer.to_json() != ckpt.tokenizer.to_json():
        raise AbcgptError(f"prepared data in {data.dir} has another tokenizer than {ckpt.path}")
    return data


# ----------------------------------------------------------------------------- figures


def _png(draw) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fig.png"
        draw(p)
        return p.read_bytes()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(r: dict) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    curve, sources = r["loss_curve"], r["sources"]
    for i, src in enumerate(sources):
        c = f"C{i}"
        mean = [p["mean"] for p in curve["loss"][src]]
        lo, hi = zip(*[p["ci95"] for p in curve["loss"][src]])
        ax.plot(curve["t"], mean, marker="o", ms=3, color=c, label=f"held-out {src}")
        ax.fill_between(curve["t"], lo, hi, color=c, alpha=0.2)
        if r.get("baselines"):
            ax.axhline(r["baselines"]["joint"][src], color=c, ls="--", lw=1, label=f"joint model on {src}")
            if f"without_{src}" in r["baselines"]:
                ax.axhline(r["baselines"][f"without_{src}"][src], color=c, ls=":", lw=1,
                           label=f"never saw {src}")
    ax.set_xlabel(f"dial  (0 = {sources[0]}, 1 = {sources[-1]})")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title(f"{r['recipe']}, step {r['step']}: loss across the dial")
    ax.text(0.01, 0.01, f"{curve['tokens_per_point']:,} tokens per point; band: 95% bootstrap CI over batches",
            transform=ax.transAxes, fontsize=7, color="gray")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _fig_bytes(fig, plt)


def plot_style(r: dict) -> bytes:
    plt = _plt()
    st = r["style_curve"]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls="--", label="ideal (share = dial)")
    for k, e in enumerate(st["edges"]):
        label = f"share read as {e['source_to']}" + (f" ({e['source_from']} -> {e['source_to']})" if k or
                                                      len(st["edges"]) > 1 else "")
        ax.plot(e["t"], e["share_to"], marker="o", color=f"C{k}", label=label)
        ax.plot(e["t"], e["mixing"], marker="x", ls=":", color=f"C{k}", alpha=0.6,
                label="mixing inside a sample (0 = one style)" if k == 0 else None)
    if "calibrated" in r:
        c = r["calibrated"]
        ax.plot(c["asked"], c["share"], marker="s", color="k", label="with --calibrated (x = share asked)")
    e0 = st["edges"][0]
    ax.set_xlabel(f"dial  (0 = {e0['source_from']}, 1 = {e0['source_to']})" if len(st["edges"]) == 1
                  else "position along the edge (0 = first source, 1 = second)")
    ax.set_ylabel("share")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"style curve: {st['samples_per_point']} samples x {st['new_tokens']} tokens per point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _fig_bytes(fig, plt)


def plot_regret_fluency(r: dict) -> bytes:
    """Left: dial regret at each position of the grid. Right: the samples' fluency gap and mixing per position."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    pos, sources = r["regret"]["positions"], r["sources"]
    if len(sources) == 2:
        ax1.plot([p["weights"][1] for p in pos], [p["regret"] for p in pos], marker="o")
        ax1.set_xlabel(f"dial  (0 = {sources[0]}, 1 = {sources[1]})")
    else:
        ax1.bar(range(len(pos)), [p["regret"] for p in pos])
        ax1.set_xticks(range(len(pos)), [p["dial"] for p in pos], rotation=90, fontsize=6)
        ax1.set_xlabel("grid position (edge i-j at t; uniform = centroid)")
    ax1.axhline(0, color="gray", lw=1)
    ax1.set_ylabel("dial regret (nats / token)")
    ax1.set_title(f"mode {r['mode']}: regret, max {r['regret']['max']:+.3f}")
    ax1.grid(alpha=0.3)
    for k, e in enumerate(r["style_curve"]["edges"]):
        label = f"{e['source_from']} -> {e['source_to']}"
        if e.get("fluency_gap"):
            ax2.plot(e["t"], e["fluency_gap"], marker="o", color=f"C{k}", label=f"fluency gap, {label}")
        ax2.plot(e["t"], e["mixing"], marker="x", ls=":", color=f"C{k}", alpha=0.7, label=f"mixing, {label}")
    ax2.axhline(0, color="gray", lw=1)
    ax2.set_xlabel("position along the edge")
    ax2.set_ylabel("nats / token (gap); share (mixing)")
    ax2.set_title("samples: judge loss minus the corners' mean; mixing")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    return _fig_bytes(fig, plt)


def plot_corners(r: dict) -> bytes:
    """Heatmap of the N x N corner table: rows = dial at a corner, columns = held-out source."""
    plt = _plt()
    sources = r["sources"]
    m = np.array([[r["corner_table"][t][s]["mean"] for s in sources] for t in sources])
    size = 2.2 + 0.9 * len(sources)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=110)
    im = ax.imshow(m, cmap="viridis_r")
    ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
    ax.set_yticks(range(len(sources)), [f"{t} corner" for t in sources])
    for i in range(len(sources)):
        for j in range(len(sources)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w" if m[i, j] > m.mean() else "k",
                    fontsize=8, fontweight="bold" if i == j else None)
    ax.set_xlabel("held-out source")
    ax.set_title("held-out loss at each corner (nats/token)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return _fig_bytes(fig, plt)


def _fig_bytes(fig, plt) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------- writing


def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def to_markdown(r: dict) -> str:
    sources, lines = r["sources"], []
    cell = r["heldout_tokens_per_cell"]
    lines += [f"# Dial report: {r['recipe']}, step {r['step']}, mode {r['mode']}", "",
              f"Checkpoint `{r['checkpoint']}`. Dial mode **{r['mode']}** (what the dial does between corners). "
              f"Held-out loss in nats/token, {cell:,} tokens per cell "
              f"({r['settings']['batches']} batches); 95% bootstrap CIs over batches."
              + (" **Quick report** (few samples): for tests, not for quoting." if r["quick"] else ""), ""]
    lines += ["## Loss of each source at each corner", "",
              "| dial at | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|"]
    for t in sources:
        row = r["corner_table"][t]
        lines.append(f"| {t} corner | " + " | ".join(_f(row[s]["mean"]) for s in sources) + " |")
    lines.append("| middle (uniform) | " + " | ".join(_f(r["middle"][s]["mean"]) for s in sources) + " |")
    lines.append("")
    orig = r.get("original")
    head = ("| source | corner loss | joint model | alone | contrast | isolation (worst corner) "
            "| isolation at 0.1 of the dial (worst) | middle vs joint |")
    if orig:
        head += " original: corner / contrast / isolation |"
    lines += ["## Headline metrics (DESIGN.md §3)", "", head, "|---" * (head.count("|") - 1) + "|"]
    for s in sources:
        c = r["corner_loss"][s]
        iso = min(r["isolation"][s].values()) if r.get("isolation") else None
        near = min(r["isolation_near"][s].values()) if r.get("isolation_near") else None
        mid = r["middle"][s].get("vs_joint")
        row = (f"| {s} | {_f(c['mean'])} [{_f(c['ci95'][0])}, {_f(c['ci95'][1])}] | {_f(c.get('joint'))} | "
               f"{_f(c.get('alone'))} | {_f(r['contrast'][s])} | {_f(iso, 2)} | {_f(near, 2)} | {_f(mid)} |")
        if orig:
            row += (f" {_f(orig['corner_loss'].get(s))} / {_f(orig['contrast'].get(s), 2)} / "
                    f"{_f(orig['isolation'].get(s), 2)} |")
        lines.append(row)
    if not r.get("isolation"):
        lines += ["", "Isolation needs every baseline (the joint comparison and fluency need the joint one): "
                  "`abcgpt baselines`, then `abcgpt eval --baselines DIR`."]
    rg = r["regret"]
    lines += ["", f"## Dial regret (DESIGN.md §3): max **{rg['max']:+.3f}** nats at {rg['argmax']}", "",
              "Regret at a dial a = sum_s a_s (L(a, s) − L(corner s, s)): how much worse the dial predicts the text it "
              f"asks for than the corners do ({rg['tokens_per_point']:,} held-out tokens per position).", "",
              "| dial | " + " | ".join(sources) + " | regret |", "|---" * (len(sources) + 2) + "|"]
    for pos in rg["positions"]:
        lines.append(f"| {pos['dial']} | " + " | ".join(f"{w:.2f}" for w in pos["weights"])
                     + f" | {pos['regret']:+.3f} |")
    st = r["style_curve"]
    lines += ["", f"## Style curve ({st['samples_per_point']} samples of {st['new_tokens']} tokens per position, "
              f"classifier accuracy {r['classifier']['accuracy']:.3f} on {r['classifier']['n_test']} held-out "
              "chunks)"]
    for e in st["edges"]:
        lines += ["", f"**{e['source_from']} → {e['source_to']}**: calibration error {e['calibration_error']:.3f}, "
                  f"monotone: {'yes' if e['monotone'] else 'no'}", "",
                  f"| dial | share read as {e['source_to']} | share of {e['source_to']} segments inside samples "
                  "| mixing | fluency (judge loss) | corners' weighted mean | gap |", "|---|---|---|---|---|---|---|"]
        j = sources.index(e["source_to"])
        flu = e["fluency"] or [None] * len(e["dial"])
        target = e.get("fluency_target") or [None] * len(e["dial"])
        gap = e.get("fluency_gap") or [None] * len(e["dial"])
        for d, sh, seg, mix, f, ft, g in zip(e["dial"], e["share"], e["segment_share"], e["mixing"], flu, target, gap):
            lines.append(f"| {d} | {sh[j]:.2f} | {_f(seg[j] if seg else None, 2)} | {_f(mix, 2)} | {_f(f)} | "
                         f"{_f(ft)} | {'–' if g is None else f'{g:+.3f}'} |")
    lines += ["", f"Calibration error (mean |share − dial|, mean over edges): **{r['calibration_error']:.3f}**; "
              f"monotone (no point 0.05 below an earlier one): **{'yes' if r['monotone'] else 'no'}**. "
              "Mixing is 0 when every sample is wholly one style (a coin flip), 1 when each sample is an even blend."]
    if r.get("fluency"):
        fl = r["fluency"]
        lines += ["", f"Fluency: the samples' mean loss per token under the ungated joint baseline (`{fl['judge']}`), "
                  "which wrote none of them, against the dial-weighted mean of the two corners' samples; largest gap "
                  f"**{fl['max_gap']:+.3f}** nats. The judge's loss on real held-out text: "
                  + ", ".join(f"{src} {v:.3f}" for src, v in fl["heldout"].items()) + "."]
    else:
        lines += ["", "Fluency needs the joint baseline as a judge: `abcgpt eval --baselines DIR`."]
    if "calibrated" in r:
        c = r["calibrated"]
        lines += ["", f"Through the stored calibration: calibration error **{c['calibration_error']:.3f}**, "
                  f"monotone: {'yes' if c['monotone'] else 'no'}."]
    return "\n".join(lines) + "\n"


def to_html(r: dict, md: str, figures: dict[str, bytes]) -> str:
    """One self-contained page: the markdown rendered as HTML (tables included), the figures inline."""
    import html

    import markdown

    body = markdown.markdown(md, extensions=["tables"])
    imgs = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(b).decode()}" alt="{name}">'
                   f"<figcaption>{name}</figcaption></figure>" for name, b in figures.items())
    examples = "".join(f"<h4>{html.escape(e['source_from'])} → {html.escape(e['source_to'])}, dial "
                       f"{html.escape(d)}</h4><pre>{html.escape(t)}</pre>"
                       for e in r["style_curve"]["edges"] for d, t in zip(e["dial"], e["example"]))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>abcgpt dial report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}pre{{background:#f6f6f6;padding:.6em;white-space:pre-wrap}}
img{{max-width:100%}}figure{{margin:1em 0}}</style>
</head><body>{body}{imgs}<h2>One sample per style position</h2>{examples}
</body></html>"""


def write_report(report: dict, figures: dict[str, bytes], out: Path) -> None:
    """All files at once: an interrupted report never replaces a complete one."""
    md = to_markdown(report)
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(md)
        (tmp / "report.html").write_text(to_html(report, md, figures))
        for name, data in figures.items():
            (tmp / name).write_bytes(data)


# ----------------------------------------------------------------------------- calibration


def calibrate(ckpt_path: Path, settings: Settings | None = None, device="cpu", progress: bool = True,
              mode: str | None = None) -> dict:
    """Measure the style curve in one mode, fit share -> dial, and store it (with its mode) in the checkpoint's
    config.json."""
    s = settings or Settings()
    ckpt = load_checkpoint(ckpt_path, device)
    engine = Engine(ckpt)
    mode = engine.mode(mode)
    if len(ckpt.sources) != 2:
        raise AbcgptError("calibration maps a share of the second source to a dial position: it needs two sources")
    engine.prompt_ids(s.prompt)  # the checks first, then minutes of work
    check_writable(ckpt.path)
    # a run's checkpoint is rewritten by its trainer: hold the run (no trainer starts) until ours is written
    in_run = ckpt.path.name in ("best", "last")
    with run_lock(ckpt.path.parent) if in_run else nullcontext():
        data = heldout_data(ckpt)
        clf = fit_classifier(data, s)
        ts, path = dial_path(2, s.style_points)
        if progress:
            print(f"measuring the style curve: {s.samples} samples x {s.style_points} positions")
        style = style_at(engine, clf, path, mode, s)
        shares = [row[-1] for row in style["share"]]
        cal = fit_calibration(ts, shares) | {"mode": mode, "curve": {"dial": ts, "share": shares},
                                             "samples_per_point": s.samples,
                                             "new_tokens": s.new_tokens, "classifier_accuracy": clf.accuracy}
        atomic_write_text(ckpt.path / "config.json", json.dumps(dict(ckpt.meta, calibration=cal), indent=2))
    return cal
