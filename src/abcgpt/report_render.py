"""The dial report as Markdown, one self-contained HTML page and PNG figures: functions of a Report alone (what it
shows was measured in report_metrics.py)."""

import base64
import io
import tempfile
from pathlib import Path

import numpy as np

from abcgpt.heldout import WIDE_TABLE
from abcgpt.neurons import plot_neuron_view
from abcgpt.report_metrics import ALONE_EQUAL, ALONE_NEVER, Report

# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, plt, ax, legend: int) -> bytes:
    """The common last touches of a chart with a legend, then its PNG bytes."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend)
    fig.tight_layout()
    return _fig_bytes(fig, plt)


def _fig_bytes(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_loss(r: Report) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    curve, sources = r.loss_curve, r.sources
    for i, src in enumerate(sources):
        c = f"C{i}"
        mean = [p.mean for p in curve.loss[src]]
        lo, hi = zip(*[p.ci95 for p in curve.loss[src]])
        ax.plot(curve.t, mean, marker="o", ms=3, color=c, label=f"held-out {src}")
        ax.fill_between(curve.t, lo, hi, color=c, alpha=0.2)
        if r.baselines:
            ax.axhline(r.baselines["joint"][src], color=c, ls="--", lw=1, label=f"joint model on {src}")
            if f"without_{src}" in r.baselines:
                ax.axhline(r.baselines[f"without_{src}"][src], color=c, ls=":", lw=1, label=f"never saw {src}")
    ax.set_xlabel(f"dial  (0 = {sources[0]}, 1 = {sources[-1]})")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title(f"{r.recipe}, step {r.step}: loss across the dial")
    ax.text(0.01, 0.01, f"{curve.tokens_per_point:,} tokens per point; band: 95% bootstrap CI over batches",
            transform=ax.transAxes, fontsize=7, color="gray")
    return _finish(fig, plt, ax, legend=7)


def plot_style(r: Report) -> bytes:
    plt = _plt()
    st = r.style
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls="--", label="ideal (share = dial)")
    for k, e in enumerate(st.edges):
        label = f"share read as {e.source_to}" + (f" ({e.source_from} -> {e.source_to})" if k or
                                                  len(st.edges) > 1 else "")
        ax.plot(e.t, e.share_to, marker="o", color=f"C{k}", label=label)
        ax.plot(e.t, e.mixing, marker="x", ls=":", color=f"C{k}", alpha=0.6,
                label="mixing inside a sample (0 = one style)" if k == 0 else None)
        ax.plot(e.t, [np.nan if m is None else m for m in e.morph_error], marker="^", ls="-.", color=f"C{k}",
                alpha=0.6, label="morph error (mean |sample's style - dial|)" if k == 0 else None)
    e0 = st.edges[0]
    t = np.linspace(0, 1, 101)
    ax.plot(t, 2 * t * (1 - t), color="gray", lw=1, ls=":", label="a coin flip's morph error, 2t(1 - t)")
    if r.calibrated is not None:
        c = r.calibrated
        ax.plot(c.asked, c.share, marker="s", color="k", label="with --calibrated (x = share asked)")
    ax.set_xlabel(f"dial  (0 = {e0.source_from}, 1 = {e0.source_to})" if len(st.edges) == 1
                  else "position along the edge (0 = first source, 1 = second)")
    ax.set_ylabel("share / mixing / morph error")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"style curve: {st.samples_per_point} samples x {st.new_tokens} tokens per point")
    return _finish(fig, plt, ax, legend=7)


def plot_regret_fluency(r: Report) -> bytes:
    """Left: dial regret at each position of the grid. Right: the samples' fluency gap and mixing per position."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    pos, sources = r.regret.positions, r.sources
    if len(sources) == 2:
        ax1.plot([p.weights[1] for p in pos], [p.regret for p in pos], marker="o")
        ax1.set_xlabel(f"dial  (0 = {sources[0]}, 1 = {sources[1]})")
    else:
        ax1.bar(range(len(pos)), [p.regret for p in pos])
        ax1.set_xticks(range(len(pos)), [p.dial for p in pos], rotation=90, fontsize=6)
        ax1.set_xlabel("grid position (edge i-j at t; uniform = centroid)")
    ax1.axhline(0, color="gray", lw=1)
    ax1.set_ylabel("dial regret (nats / token)")
    ax1.set_title(f"mode {r.mode}: regret, max {r.regret.max:+.3f}")
    ax1.grid(alpha=0.3)
    for k, e in enumerate(r.style.edges):
        label = f"{e.source_from} -> {e.source_to}"
        if e.fluency_gap:
            ax2.plot(e.t, e.fluency_gap, marker="o", color=f"C{k}", label=f"fluency gap, {label}")
        ax2.plot(e.t, e.mixing, marker="x", ls=":", color=f"C{k}", alpha=0.7, label=f"mixing, {label}")
    ax2.axhline(0, color="gray", lw=1)
    ax2.set_xlabel("position along the edge")
    ax2.set_ylabel("nats / token (gap); share (mixing)")
    ax2.set_title("samples: judge loss minus the corners' mean; mixing")
    return _finish(fig, plt, ax2, legend=6)


def plot_corners(r: Report) -> bytes:
    """Heatmap of the N x N corner table: rows = dial at a corner, columns = held-out source."""
    plt = _plt()
    sources = r.sources
    m = np.array([[r.corners.table[t][s].mean for s in sources] for t in sources])
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


def plot_neurons(r: Report) -> bytes:
    nv = r.neurons
    with tempfile.TemporaryDirectory() as d:  # neurons.py draws into a file
        p = Path(d) / "fig.png"
        plot_neuron_view(nv.histogram, nv.firing, nv.response, nv.dial, r.sources, p)
        return p.read_bytes()


def figures(r: Report) -> dict[str, bytes]:
    """Every figure of the report, PNG bytes by file name."""
    return {"loss_vs_dial.png": plot_loss(r), "corners.png": plot_corners(r), "style_curve.png": plot_style(r),
            "regret_fluency.png": plot_regret_fluency(r)} | ({"neurons.png": plot_neurons(r)} if r.neurons else {})


# ----------------------------------------------------------------------------- text


def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _signed(x, nd=3) -> str:
    return "–" if x is None else f"{x:+.{nd}f}"


def to_markdown(r: Report) -> str:
    sources, lines = r.sources, []
    lines += [f"# Dial report: {r.recipe}, step {r.step}, mode {r.mode}", "",
              f"Checkpoint `{r.checkpoint}`. Dial mode **{r.mode}** (what the dial does between corners). "
              f"Held-out loss in nats/token, {r.heldout_tokens_per_cell:,} tokens per cell "
              f"({r.settings.batches} batches); 95% bootstrap CIs over batches."
              + (" **Quick report** (few samples): for tests, not for quoting." if r.quick else ""), ""]
    lines += ["## Loss of each source at each corner", "",
              "| dial at | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|"]
    for t in sources:
        row = r.corners.table[t]
        lines.append(f"| {t} corner | " + " | ".join(_f(row[s].mean) for s in sources) + " |")
    lines.append("| middle (uniform) | " + " | ".join(_f(r.corners.middle[s].mean) for s in sources) + " |")
    lines.append("")
    orig = r.original
    head = ("| source | corner loss | joint model | alone | corner − alone | contrast | isolation (worst corner) "
            "| isolation at 0.1 of the dial (worst) | middle vs joint |")
    if orig:
        head += " original: corner / contrast / isolation |"
    lines += ["## Headline metrics (DESIGN.md §3)", "", head, "|---" * (head.count("|") - 1) + "|"]
    for s in sources:
        c = r.corners.own[s]
        iso = None if r.isolation is None else min(r.isolation.corner[s].values())
        near = None if r.isolation is None else min(r.isolation.near[s].values())
        row = (f"| {s} | {_f(c.mean)} [{_f(c.ci95[0])}, {_f(c.ci95[1])}] | {_f(c.joint)} | "
               f"{_f(c.alone)} | {_signed(c.vs_alone)} | {_f(r.corners.contrast[s])} | {_f(iso, 2)} | {_f(near, 2)} | "
               f"{_f(r.corners.middle[s].vs_joint)} |")
        if orig:
            row += (f" {_f(orig['corner_loss'].get(s))} / {_f(orig['contrast'].get(s), 2)} / "
                    f"{_f(orig['isolation'].get(s), 2)} |")
        lines.append(row)
    kinds = {k: [s for s in sources if r.corners.own[s].alone_kind == k] for k in (ALONE_EQUAL, ALONE_NEVER)}
    if any(kinds.values()):
        said = []
        if kinds[ALONE_EQUAL]:
            said.append(f"for {', '.join(kinds[ALONE_EQUAL])}: **{ALONE_EQUAL}**, an ungated model of the same "
                        "recipe trained on the source alone for the steps the dial model spent on it (`alone_<s>`)")
        if kinds[ALONE_NEVER]:
            said.append(f"for {', '.join(kinds[ALONE_NEVER])}: the model that **{ALONE_NEVER}** source "
                        "(`without_<other>`), trained on this one alone for all the dial model's steps, so not equal "
                        "compute")
        lines += ["", "Alone: " + "; ".join(said) + ". Corner − alone below 0: the source gained from the others "
                  "(generality); near 0 with isolation 1: a dedicated model of its source (individuality)."]
    if r.isolation is None:
        lines += ["", "Isolation needs every baseline (the joint comparison and fluency need the joint one): "
                  "`abcgpt baselines`, then `abcgpt eval --baselines DIR`."]
    rg = r.regret
    lines += ["", f"## Dial regret (DESIGN.md §3): max **{rg.max:+.3f}** nats at {rg.argmax}", "",
              "Regret at a dial a = sum_s a_s (L(a, s) − L(corner s, s)): how much worse the dial predicts the text it "
              f"asks for than the corners do ({rg.tokens_per_point:,} held-out tokens per position).", "",
              "| dial | " + " | ".join(sources) + " | regret |", "|---" * (len(sources) + 2) + "|"]
    if len(sources) > WIDE_TABLE:  # a column per source is unreadable: the weights that are not 0, by name
        lines[-2:] = ["| dial | weights | regret |", "|---|---|---|"]
    for pos in rg.positions:
        weights = (" | ".join(f"{w:.2f}" for w in pos.weights) if len(sources) <= WIDE_TABLE else
                   ", ".join(f"{s} {w:.2f}" for s, w in zip(sources, pos.weights) if w > 0))
        lines.append(f"| {pos.dial} | {weights} | {pos.regret:+.3f} |")
    st = r.style
    lines += ["", f"## Style curve ({st.samples_per_point} samples of {st.new_tokens} tokens per position, "
              f"classifier accuracy {r.classifier['accuracy']:.3f} on {r.classifier['n_test']} held-out chunks)"]
    every = len(sources) * (len(sources) - 1) // 2
    if len(st.edges) < every:
        lines += ["", f"{len(st.edges)} of the simplex's {every:,} edges, drawn at random (seed {r.settings.seed}, "
                  f"`max_edges` = {r.settings.max_edges}); the regret grid and the near-corner isolation use the same "
                  "edges, and the corner table is complete."]
    for e in st.edges:
        lo, hi = e.style_scale
        if lo is None or hi is None:
            scale = (f"morph error undefined: no sample at the {e.source_from if lo is None else e.source_to} corner "
                     "had a line long enough to classify")
        elif all(m is None for m in e.morph_error):
            scale = (f"morph error undefined: the two corners' samples read the same, mean P({e.source_to}) "
                     f"{lo:.3f}")
        else:
            scale = (f"morph error's scale: 0 = the {e.source_from} corner's samples, mean P({e.source_to}) {lo:.3f}; "
                     f"1 = the {e.source_to} corner's, {hi:.3f}")
        on_scale = "" if e.style_error is None else f", on the corners' scale {e.style_error:.3f}"
        lines += ["", f"**{e.source_from} → {e.source_to}**: calibration error {e.calibration_error:.3f}{on_scale}, "
                  f"monotone: {'yes' if e.monotone else 'no'}; {scale}", "",
                  f"| dial | share read as {e.source_to} | share of {e.source_to} segments inside samples "
                  "| mixing | mean style (corners' scale) | morph error (samples) | coin flip 2t(1−t) "
                  "| fluency (judge loss) | corners' weighted mean | gap |", "|---" * 10 + "|"]
        j = sources.index(e.source_to)
        none = [None] * len(e.dial)
        for d, sh, seg, mix, ms, m, n, cf, f, ft, g in zip(
                e.dial, e.share, e.segment_share, e.mixing, e.mean_style, e.morph_error, e.morph_samples, e.coin_flip,
                e.fluency or none, e.fluency_target or none, e.fluency_gap or none):
            lines.append(f"| {d} | {sh[j]:.2f} | {_f(seg[j] if seg else None, 2)} | {_f(mix, 2)} | {_f(ms, 2)} | "
                         f"{_f(m, 2)} ({n}) | {cf:.2f} | {_f(f)} | {_f(ft)} | {'–' if g is None else f'{g:+.3f}'} |")
    t_mid, n_edges = st.edges[0].t[len(st.edges[0].t) // 2], len(st.edges)
    if st.morph_mid is None:
        morph = f"Morph error at the middle (t = {t_mid:.2f}): **undefined** on every edge (see above)."
    else:
        over = f" of {st.morph_mid_edges} of {n_edges} edges" if n_edges > 1 else ""
        morph = (f"Morph error at the middle (t = {t_mid:.2f}): **{st.morph_mid:.3f}**, against a coin flip's "
                 f"{st.coin_flip_mid:.3f} ({st.morph_mid_samples} samples{over}, on the scale their corners' samples "
                 "set).")
    if st.centroid is not None:
        c = st.centroid
        where = ", ".join(f"{s} {w:.2f}" for s, w in zip(sources, c.mean_position))
        morph += (f" At the centroid (the uniform dial; {c.samples} samples, each put on the corners' scale by least "
                  f"squares): morph error **{c.morph_error:.3f}** (the mean total-variation distance of a sample from "
                  f"the centroid; a coin flip's {c.coin_flip:.2f}), mean position {where} ({c.position_error:.3f} from "
                  "the centroid).")
    lines += ["", f"Calibration error (mean |share − dial|, mean over edges): **{st.calibration_error:.3f}**; "
              f"monotone (no point 0.05 below an earlier one): **{'yes' if st.monotone else 'no'}**; "
              f"mixing at the middle: **{st.mixing_mid:.2f}**. {morph}",
              "", "Mixing is 0 when every sample is wholly one style (a coin flip), 1 when each sample is an even "
              "blend. "
              "**Morph error** (DESIGN.md §3) is what a person moving the slider feels: each sample's own style (the "
              "mean over its lines of the classifier's probability of the edge's second source), put on the corners' "
              "scale (0 = the first corner's samples' mean, 1 = the second's, clipped), and the mean over samples of "
              "|style − t|. A coin flip between the corners scores 2t(1 − t), 0.5 at the middle; samples that all sit "
              "where the dial is score 0."]
    if r.fluency is not None:
        fl = r.fluency
        lines += ["", f"Fluency: the samples' mean loss per token under the ungated joint baseline (`{fl.judge}`), "
                  "which wrote none of them, against the dial-weighted mean of the two corners' samples; largest gap "
                  f"**{fl.max_gap:+.3f}** nats. The judge's loss on real held-out text: "
                  + ", ".join(f"{src} {v:.3f}" for src, v in fl.heldout.items()) + "."]
    else:
        lines += ["", "Fluency needs the joint baseline as a judge: `abcgpt eval --baselines DIR`."]
    if r.calibrated is not None:
        c = r.calibrated
        lines += ["", f"Through the stored calibration: calibration error **{c.calibration_error:.3f}**, "
                  f"monotone: {'yes' if c.monotone else 'no'}."]
    if r.attribution:
        how = r.attribution[0].mode
        lines += ["", "## Which source each token leans on", "",
                  f"A few style samples (prompt included), each stretch of tokens marked `[source: text]` with the "
                  f"source the {how} posterior puts first after reading it (uniform prior"
                  + (", restarted at each turn, a line or sentence" if how == "switch" else "")
                  + "; `abcgpt attribute`)."]
        for a in r.attribution:
            lines += ["", f"dial {a.dial}, whole text: " + ", ".join(
                f"{src} {p:.2f}" for src, p in zip(sources, a.final) if p >= 0.005), "", "```",
                "".join(f"[{sources[k]}: {text}]" for k, text in a.runs), "```"]
    return "\n".join(lines) + "\n"


# a source's background in the HTML report: matplotlib's default colours (the figures'), light
SOURCE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                 "#17becf")


def attribution_html(r: Report) -> str:
    """The attributed samples with each stretch of tokens on its source's colour, and a legend."""
    import html

    if not r.attribution:
        return ""
    color = lambda k: SOURCE_COLORS[k % len(SOURCE_COLORS)] + "55"  # noqa: E731  (hex alpha: a light tint)
    legend = " ".join(f'<span style="background:{color(k)};padding:0 .4em">{html.escape(src)}</span>'
                      for k, src in enumerate(r.sources))
    samples = "".join(f"<h4>dial {html.escape(a.dial)}</h4><pre>" + "".join(
        f'<span style="background:{color(k)}" title="{html.escape(r.sources[k])}">{html.escape(text)}</span>'
        for k, text in a.runs) + "</pre>" for a in r.attribution)
    return f"<h2>Which source each token leans on, in colour</h2><p>{legend}</p>{samples}"


def to_html(r: Report, md: str, figures: dict[str, bytes]) -> str:
    """One self-contained page: the markdown rendered as HTML (tables included), the figures inline."""
    import html

    import markdown

    body = markdown.markdown(md, extensions=["tables"])
    imgs = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(b).decode()}" alt="{name}">'
                   f"<figcaption>{name}</figcaption></figure>" for name, b in figures.items())
    examples = "".join(f"<h4>{html.escape(e.source_from)} → {html.escape(e.source_to)}, dial "
                       f"{html.escape(d)}</h4><pre>{html.escape(t)}</pre>"
                       for e in r.style.edges for d, t in zip(e.dial, e.example))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>abcgpt dial report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}pre{{background:#f6f6f6;padding:.6em;white-space:pre-wrap}}
img{{max-width:100%}}figure{{margin:1em 0}}</style>
</head><body>{body}{imgs}{attribution_html(r)}<h2>One sample per style position</h2>{examples}
</body></html>"""
