"""The dial report: DESIGN.md §3's metrics for a checkpoint, as report.json, report.md, report.html and PNGs.

build_report loads a checkpoint (and its baselines and held-out data) and composes the measurements of
report_metrics.py into one Report; report_render.py renders it; write_report writes every file at once.
`quick=True` runs the same code with fewer batches, points and samples, for tests."""

import copy
import functools
import json
import time
from pathlib import Path

import torch

from abcgpt.checkpoint import Checkpoint, load_checkpoint
from abcgpt.common import AbcgptError, atomic_dir, existing_dir
from abcgpt.config import Recipe, keys_a_baseline_may_change, load_recipe
from abcgpt.data import PreparedData, alone_steps, data_key, prepared_data
from abcgpt.engine import Engine
from abcgpt.report_metrics import (
    Report,
    Settings,
    attributed_samples,
    baseline_losses,
    calibrated_curve,
    corner_losses,
    dial_regret,
    edge_ts,
    fit_classifier,
    fluency_summary,
    isolation,
    loss_curve,
    loss_positions,
    measure_losses,
    neuron_view,
    style_curve,
)
from abcgpt.report_render import figures as render_figures
from abcgpt.report_render import to_html, to_markdown

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


def is_original(recipe: Recipe) -> bool:
    """A run of the original implementation's setting, which ORIGINAL's numbers were measured at: its method and
    its data (the sources, their text and order, the tokenizer), whatever the recipe file is called."""
    return (recipe.model.method, data_key(recipe)) == _original_setting()


@functools.cache
def _original_setting() -> tuple[str, dict]:
    original = load_recipe("original")
    return original.model.method, data_key(original)


# ----------------------------------------------------------------------------- what the report measures


def baseline_keys(dial: Checkpoint, name: str) -> dict[str, object]:
    """The [train] keys the baseline `name` sets otherwise than the dial model, as `abcgpt baselines` trains it: the
    sources it trains on, and for alone_<s> the steps the dial model spent on s and a warm-up no longer than them."""
    sources, t = dial.sources, dial.recipe.train
    if name == "joint":
        return {"only_sources": []}
    for src in sources:
        if name == f"without_{src}":
            return {"only_sources": [x for x in sources if x != src]}
        if name == f"alone_{src}":
            steps = alone_steps(t.steps, [s.weight for s in dial.recipe.data.sources], sources.index(src))
            return {"only_sources": [src], "steps": steps, "warmup_steps": min(t.warmup_steps, steps)}
    return {}


def check_baseline(dial: Checkpoint, base: Checkpoint, name: str) -> None:
    """Refuse a baseline trained with another tokenizer or recipe, naming the difference. It matches the dial model
    in every key but the dial's own and how a run executes, except the [train] keys baseline_keys gives for its name
    (alone_<s> trains for fewer steps, by design), which must be as given there."""
    if base.tokenizer.to_json() != dial.tokenizer.to_json():
        raise AbcgptError(f"baseline {name} ({base.path}) has another tokenizer than the dial model")
    a, b, free = dial.meta.recipe.model_dump(), base.meta.recipe.model_dump(), keys_a_baseline_may_change()
    own = baseline_keys(dial, name)

    def same(key, x, y) -> bool:  # the sources trained on, in any order
        return sorted(x) == sorted(y) if key == "only_sources" and isinstance(x, list) else x == y

    for key, want in own.items():
        got = b["train"].get(key)
        if not same(key, got, want):
            why = ", the dial model's steps on that source" if key != "only_sources" else ""
            raise AbcgptError(f"baseline {name} ({base.path}) has train.{key} = {got!r}, expected {want!r}{why}")
    for section in ("data", "model", "train"):
        for key in sorted(set(a[section]) | set(b[section])):
            if key in free.get(section, ()) or (section == "train" and key in own):  # own: checked above
                continue
            if a[section].get(key) != b[section].get(key):
                raise AbcgptError(f"baseline {name} ({base.path}) differs from the dial model in {section}.{key}: "
                                  f"{b[section].get(key)!r} vs {a[section].get(key)!r}")


def load_baselines(path: Path, dial: Checkpoint, device) -> dict[str, Checkpoint]:
    """joint, and without_<s> and alone_<s> for the sources that have a finished one, from a folder written by
    `abcgpt baselines`. The joint model is required (the comparisons and the fluency judge); isolation needs every
    without_<s>; corner - alone (equal compute) needs alone_<s>."""
    path = Path(path)
    found = {}
    for name in ["joint"] + [f"{kind}_{s}" for kind in ("without", "alone") for s in dial.sources]:
        run = path / name
        if not (existing_dir(run / "last") / "config.json").is_file():
            if name != "joint":
                continue
            raise AbcgptError(f"baseline {name} not found in {path} (expected {run}/last): run "
                              f"`abcgpt baselines --config ... --out {path}`")
        ckpt = load_checkpoint(existing_dir(run / "last"), device)
        if ckpt.meta.step < ckpt.recipe.train.steps:  # still training, or stopped: not the recipe's model
            if name != "joint":
                continue
            raise AbcgptError(f"baseline joint ({ckpt.path}) is unfinished: step {ckpt.meta.step} of "
                              f"{ckpt.recipe.train.steps}; resume it with `abcgpt baselines` (same arguments)")
        if ckpt.model.config.gates != "none":
            raise AbcgptError(f"baseline {name} ({ckpt.path}) is a gated model; baselines are ungated")
        check_baseline(dial, ckpt, name)
        found[name] = ckpt
    return found


def heldout_data(ckpt: Checkpoint) -> PreparedData:
    """The checkpoint's held-out text, from its prepared data (prepared again from the sources if absent)."""
    recipe = copy.deepcopy(ckpt.recipe)
    data = prepared_data(recipe, progress=False)
    if data.sources != ckpt.sources:
        raise AbcgptError(f"prepared data in {data.dir} holds sources {data.sources}, the checkpoint {ckpt.sources}")
    if data.tokenizer.to_json() != ckpt.tokenizer.to_json():
        raise AbcgptError(f"prepared data in {data.dir} has another tokenizer than {ckpt.path}")
    return data


# ----------------------------------------------------------------------------- the report


def build_report(ckpt_path: Path, baselines: Path | None = None, quick: bool = False, settings: Settings | None = None,
                 device: str | torch.device = "cpu", progress: bool = True, mode: str | None = None
                 ) -> tuple[Report, dict[str, bytes]]:
    """All numbers of the report and its figures (PNG bytes by file name), for the dial in one mode (the
    engine's default unless given)."""
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

    def say(msg):
        if progress:
            print(f"[{time.time() - t0:5.1f}s] {msg}")

    # every position the losses are needed at, scored once: corners, middle, loss curve, regret grid, near corners
    pos = loss_positions(sources, s)
    dials = pos.distinct()
    say(f"held-out loss at {len(dials)} dial positions (mode {mode})")
    losses = measure_losses(engine, data, dials, mode, bs, s.batches)

    # baselines: joint, never saw s, s alone; the joint model also judges the samples' fluency
    base, judge = None, None
    if baselines is not None:
        say("baselines")
        found = load_baselines(baselines, ckpt, device)
        base, judge = baseline_losses(found, data, bs, s.batches), Engine(found["joint"])
        missing = [f"without_{src}" for src in sources if f"without_{src}" not in base]
        if missing:
            say(f"no isolation: baselines {', '.join(missing)} are missing")
        missing = [f"alone_{src}" for src in sources if f"alone_{src}" not in base]
        if missing:
            say(f"no equal-compute corner - alone for {', '.join(missing)} (missing or unfinished)")

    # style curve along every edge of the simplex (for two sources: the dial), scored by a classifier trained on
    # held-out text, and the samples' fluency under the judge
    say("style classifier")
    clf = fit_classifier(data, s)
    say(f"style curve: {s.samples} samples x {len(edge_ts(n, s))} positions x {n * (n - 1) // 2} edge(s)"
        + (", judged by the joint baseline" if judge else ""))
    style = style_curve(engine, clf, mode, s, judge)
    calibrated = None
    cal = engine.calibration
    if cal is not None and cal.mode == mode:
        say("style curve through the stored calibration")
        calibrated = calibrated_curve(engine, clf, cal, style.edges[0].t, mode, s)

    say("which source each token of a few samples leans on")
    attribution = attributed_samples(engine, style, mode, s.prompt)
    neurons = None  # a bank of corners (model.width = "corner") has no specialties to look at
    if model.has_interior:
        say("neuron view")
        neurons = neuron_view(model, data, s, bs)
    report = Report(
        checkpoint=str(ckpt.path), recipe=ckpt.recipe.name, step=ckpt.meta.step, sources=sources, mode=mode,
        settings=s, quick=quick, heldout_tokens_per_cell=losses.tokens_per_cell,
        corners=corner_losses(losses, pos, base), regret=dial_regret(losses, pos), baselines=base,
        isolation=isolation(losses, pos, base), loss_curve=loss_curve(losses, pos), classifier=clf.to_dict(),
        style=style, fluency=None if judge is None else fluency_summary(style, judge, base["joint"]),
        calibrated=calibrated, neurons=neurons, attribution=attribution,
        original=ORIGINAL if is_original(ckpt.recipe) else None,
        seconds=round(time.time() - t0, 1),
    )
    figures = render_figures(report)
    say("done")
    return report, figures


def report_files(folder: Path) -> set[str] | None:
    """The files of a report written before outputs were marked: the report itself and its figures."""
    if not (folder / "report.json").is_file():
        return None
    return {"report.json", "report.md", "report.html"} | {p.name for p in folder.glob("*.png")}


def write_report(report: Report, figures: dict[str, bytes], out: Path) -> None:
    """All files at once: an interrupted report never replaces a complete one."""
    md = to_markdown(report)
    with atomic_dir(out, "report", report_files) as tmp:
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
        (tmp / "report.md").write_text(md)
        (tmp / "report.html").write_text(to_html(report, md, figures))
        for name, data in figures.items():
            (tmp / name).write_bytes(data)
