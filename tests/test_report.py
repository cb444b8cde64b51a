import dataclasses
import json
import math
import shutil

import pytest
from conftest import write_recipe

from abcgpt.cli import main
from abcgpt.common import AbcgptError
from abcgpt.config import load_recipe
from abcgpt.dial import dial_path
from abcgpt.report import Settings, build_report, write_report
from abcgpt.report_metrics import Report
from abcgpt.train import train, train_baselines

STEPS = ["train.steps=200", "train.eval_every=100"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A small dial model and its three baselines on two synthetic sources (alpha: a-g, omega: t-z)."""
    tmp = tmp_path_factory.mktemp("report")
    recipe = load_recipe(str(write_recipe(tmp)), STEPS)
    train(recipe, tmp / "dial", progress=False)
    train_baselines(recipe, tmp / "base", progress=False)
    return tmp


def test_dial_path_runs_along_an_edge_of_the_simplex():
    """One path for every place the report looks between corners: for two sources the dial a = t itself."""
    assert [d.tolist() for d in dial_path(2, [0.0, 0.25, 1.0])] == [[1.0, 0.0], [0.75, 0.25], [0.0, 1.0]]
    assert [d.tolist() for d in dial_path(3, [0.5], 2, 1)] == [[0.0, 0.5, 0.5]]
    assert [d.tolist() for d in dial_path(3, [1.0])] == [[0.0, 0.0, 1.0]]  # to the last source by default


def test_baselines_are_ungated_and_trained_on_the_right_sources(runs):
    for name, only, steps in [("joint", [], 200), ("without_alpha", ["omega"], 200), ("without_omega", ["alpha"], 200),
                              ("alone_alpha", ["alpha"], 100), ("alone_omega", ["omega"], 100)]:
        cfg = json.loads((runs / "base" / name / "last" / "config.json").read_text())
        assert cfg["recipe"]["model"]["gates"] == "none" and cfg["recipe"]["train"]["only_sources"] == only
        assert cfg["step"] == cfg["recipe"]["train"]["steps"] == steps  # alone: the dial model's steps on it
    # a model that never saw alpha predicts it far worse than the joint model
    rows = [json.loads(x) for x in (runs / "base" / "without_alpha" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["type"] == "eval"][-1]["heldout"]["alpha"]
    joint = [json.loads(x) for x in (runs / "base" / "joint" / "metrics.jsonl").read_text().splitlines()]
    assert final["alpha"] > [r for r in joint if r["type"] == "eval"][-1]["heldout"]["alpha"]["alpha"] + 0.3


def test_quick_report_numbers_follow_their_definitions(runs):
    # prompt " ": after a lone newline at position 0 these seconds-long models have learnt little (2% of windows)
    settings = dataclasses.replace(Settings.quick(samples=8), prompt=" ")
    # in mode mixture, whose regret has a bound to check (test_eval_cli_writes_every_file scores the default)
    measured, figures = build_report(runs / "dial", runs / "base", quick=True, settings=settings, progress=False,
                                     mode="mixture")
    report = measured.to_dict()  # the numbers as report.json has them
    s = ["alpha", "omega"]
    table = {t: {x: report["corners"]["table"][t][x]["mean"] for x in s} for t in s}
    contrast = report["corners"]["contrast"]
    assert contrast["alpha"] == pytest.approx(table["omega"]["alpha"] - table["alpha"]["alpha"])
    assert contrast["omega"] == pytest.approx(table["alpha"]["omega"] - table["omega"]["omega"])
    joint, never = report["baselines"]["joint"], report["baselines"]["without_alpha"]
    assert report["isolation"]["corner"]["alpha"]["omega"] == pytest.approx(
        (table["omega"]["alpha"] - joint["alpha"]) / (never["alpha"] - joint["alpha"]))
    own = report["corners"]["own"]["alpha"]  # alone: the equal-compute alone_alpha
    assert own["alone"] == report["baselines"]["alone_alpha"]["alpha"] and own["alone_kind"] == "alone (equal compute)"
    assert own["vs_alone"] == pytest.approx(own["mean"] - own["alone"])
    ci = own["ci95"]
    assert ci[0] <= own["mean"] <= ci[1]
    # report.json's keys are the Report dataclass's fields, nested as they are there
    names = [f.name for f in dataclasses.fields(Report)]
    assert list(report) == [x for x in names if x in report] and set(names) - set(Report.OPTIONAL) <= set(report)
    assert list(report["corners"]) == ["table", "own", "contrast", "middle"]
    assert report["style"]["samples_per_point"] == 8 and "calibration_error" in report["style"]
    (st,) = report["style"]["edges"]  # two sources: one edge, the dial
    assert len(st["share"]) == 3 and (st["source_from"], st["source_to"]) == ("alpha", "omega")
    # the style curve goes the right way on sources told apart by their letters
    assert st["share"][0][1] < 0.5 < st["share"][-1][1]
    assert report["style"]["calibration_error"] == pytest.approx(
        sum(abs(sh[1] - t) for sh, t in zip(st["share"], st["t"])) / 3)
    assert set(figures) == {"loss_vs_dial.png", "corners.png", "style_curve.png", "regret_fluency.png", "neurons.png"}
    assert all(b.startswith(b"\x89PNG") for b in figures.values())

    # dial regret at every grid position (two sources: the loss curve's points), as DESIGN §3 defines it
    assert report["mode"] == "mixture"
    curve, corner = report["loss_curve"]["loss"], report["corners"]["own"]
    for i, pos in enumerate(report["regret"]["positions"]):
        a = pos["weights"]
        assert pos["regret"] == pytest.approx(sum(w * (curve[x][i]["mean"] - corner[x]["mean"]) for w, x in zip(a, s)))
        # the posterior mixture loses at most -log(a_s) per scored window of block_size tokens
        entropy = -sum(w * math.log(w) for w in a if w > 0)
        assert pos["regret"] <= entropy / 16 + 1e-6
    assert report["regret"]["max"] == max(p["regret"] for p in report["regret"]["positions"])
    # fluency: the joint baseline judges the samples, against the dial-weighted mean of the corners' samples
    assert len(st["fluency"]) == 3 and all(f > 0 for f in st["fluency"])
    assert st["fluency_target"][0] == st["fluency"][0] and st["fluency_target"][-1] == st["fluency"][-1]
    assert st["fluency_gap"][1] == pytest.approx(st["fluency"][1] - (st["fluency"][0] + st["fluency"][-1]) / 2)
    assert report["fluency"]["max_gap"] == max(st["fluency_gap"])
    # near-corner isolation: a tenth of the dial on a source
    assert set(report["isolation"]["near"]["alpha"]) == {"omega"}
    # morph error at every position: each sample's own style on the corners' scale, against the dial
    for e in report["style"]["edges"]:
        assert len(e["morph_error"]) == len(e["t"]) == len(e["sample_style"]) == len(e["coin_flip"])
        assert all(m is not None and 0 <= m <= 1 for m in e["morph_error"])
        assert e["morph_samples"] == [len(x) for x in e["sample_style"]] and all(0 < n <= 8 for n in e["morph_samples"])
        lo, hi = (sum(x) / len(x) for x in (e["sample_style"][0], e["sample_style"][-1]))
        assert e["style_scale"] == pytest.approx([lo, hi]) and lo < hi  # alpha's samples read less omega
        x, t = e["sample_style"][1], e["t"][1]
        assert e["morph_error"][1] == pytest.approx(
            sum(abs(min(1, max(0, (v - lo) / (hi - lo))) - t) for v in x) / len(x))
        assert e["coin_flip"][1] == 2 * t * (1 - t) == 0.5
        assert "line_proba" not in e  # the edge keeps only its second source's column, as sample_style
    style = report["style"]
    assert style["morph_mid"] == st["morph_error"][1] and style["morph_mid_samples"] == st["morph_samples"][1]
    assert style["coin_flip_mid"] == 0.5


def test_eval_cli_writes_every_file(runs, capsys):
    out = runs / "out"
    assert main(["eval", "--ckpt", str(runs / "dial"), "--baselines", str(runs / "base"), "--out", str(out),
                 "--quick"]) == 0
    for f in ("report.html", "report.json", "report.md", "loss_vs_dial.png", "corners.png", "style_curve.png",
              "regret_fluency.png", "neurons.png"):
        assert (out / f).stat().st_size > 0, f
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<img src=\"http" not in html  # opens from disk
    assert "<table>" in html and "<td>alpha</td>" in html and "| alpha |" not in html  # tables as HTML
    md = (out / "report.md").read_text()
    assert "| alpha |" in md and "Calibration error" in md
    assert "morph error (samples)" in md and "Morph error at the middle (t = 0.50): **" in md
    assert "report.html" in capsys.readouterr().out
    # the default mode, switch, and its samples' mean style on the corners' scale beside their morph error
    report = json.loads((out / "report.json").read_text())
    (edge,) = report["style"]["edges"]
    assert report["mode"] == "switch" and "mean style (corners' scale)" in md
    assert edge["mean_style"][0] < 0.2 < 0.8 < edge["mean_style"][-1]  # the corners set the scale
    assert edge["style_error"] == pytest.approx(sum(abs(m - t) for m, t in zip(edge["mean_style"], edge["t"])) / 3)
    assert all(m >= abs(s - t) - 1e-9 for m, s, t in zip(edge["morph_error"], edge["mean_style"], edge["t"]))


def test_interrupted_report_keeps_the_complete_one(runs, monkeypatch):
    out = runs / "keep"
    report, figures = build_report(runs / "dial", None, quick=True, progress=False)
    write_report(report, figures, out)
    before = (out / "report.json").read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("abcgpt.report.to_html", boom)
    with pytest.raises(KeyboardInterrupt):
        write_report(dataclasses.replace(report, step=-1), figures, out)
    assert (out / "report.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".abcgpt-output", "report.json", "report.md", "report.html", "loss_vs_dial.png", "corners.png",
         "style_curve.png", "regret_fluency.png", "neurons.png"])


def test_baselines_with_another_recipe_are_refused(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs / "base", other)
    cfg_path = other / "joint" / "last" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["recipe"]["train"]["lr"] = 0.5
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AbcgptError, match=r"baseline joint .* differs from the dial model in train.lr: 0.5"):
        build_report(runs / "dial", other, quick=True, progress=False)
    shutil.copy(runs / "base" / "joint" / "last" / "config.json", cfg_path)
    # a baseline that never saw one source is optional: without it there is no isolation, the rest stands
    shutil.rmtree(other / "without_omega")
    report, _ = build_report(runs / "dial", other, quick=True, progress=False)
    assert report.isolation is None and report.baselines["joint"] and report.fluency.max_gap is not None
    # an unfinished joint baseline is refused, naming its step
    cfg["recipe"]["train"]["lr"] = json.loads((runs / "base" / "joint" / "last" / "config.json").read_text())[
        "recipe"]["train"]["lr"]
    cfg["step"] = 100
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AbcgptError, match="baseline joint .* is unfinished: step 100 of 200"):
        build_report(runs / "dial", other, quick=True, progress=False)
    shutil.rmtree(other / "joint")
    with pytest.raises(AbcgptError, match="baseline joint not found"):
        build_report(runs / "dial", other, quick=True, progress=False)


def test_missing_heldout_text_names_the_source(runs, tmp_path):
    recipe = json.loads((runs / "dial" / "best" / "config.json").read_text())["recipe"]
    data_dir = recipe["data"]["dir"]
    shutil.move(data_dir, str(tmp_path / "moved"))
    src = recipe["data"]["sources"][0]["path"]
    shutil.move(src, str(tmp_path / "moved_a.txt"))
    try:
        with pytest.raises(AbcgptError, match=f"source 'alpha': no such file or folder: {src}"):
            build_report(runs / "dial", None, quick=True, progress=False)
    finally:
        shutil.move(str(tmp_path / "moved"), data_dir)
        shutil.move(str(tmp_path / "moved_a.txt"), src)


def test_calibrate_then_sample_calibrated(runs, capsys, tmp_path):
    run = tmp_path / "dial"
    shutil.copytree(runs / "dial", run)
    assert "has no calibration" in _err(capsys, ["sample", "--ckpt", str(run), "--calibrated", "--dial", "0.5"])
    shutil.rmtree(run / "last")
    shutil.copytree(run / "best", run / "last")  # a run whose last checkpoint is its best
    assert main(["calibrate", "--ckpt", str(run), "--samples", "6", "--prompt", " "]) == 0
    best, last = (json.loads((run / d / "config.json").read_text()) for d in ("best", "last"))
    cal = best["calibration"]
    assert cal["share"] == sorted(cal["share"]) and len(cal["dial"]) == len(cal["share"])
    assert last["calibration"] == cal  # the same weights: last/ keeps it when a resumed run replaces best/
    assert cal["mode"] == "switch"  # measured in the default mode; another mode refuses it
    assert "measured in mode switch" in _err(capsys, ["sample", "--ckpt", str(run), "--calibrated", "--dial", "0.5",
                                                       "--mode", "gates"])
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--calibrated", "--dial", "0.5", "--max-new-tokens", "5",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    from abcgpt.style import apply_calibration

    assert row["weights"]["omega"] == pytest.approx(apply_calibration(cal, 0.5), abs=1e-6)
    # the checkpoint still loads: config.json is not among the hashed files
    report, _ = build_report(run, None, quick=True, progress=False)
    assert report.calibrated is not None and len(report.calibrated.share) == 3


def _err(capsys, args) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_the_original_comparison_is_keyed_on_method_and_data(capsys):
    """The original implementation's numbers sit beside a run of its method on its data, whatever the recipe file is
    called; the recipe's old name still loads, with a note."""
    from abcgpt.config import load_recipe
    from abcgpt.report import is_original

    assert is_original(load_recipe("original"))
    assert is_original(load_recipe("reference")) and "now called 'original'" in capsys.readouterr().err
    assert not is_original(load_recipe("tiny", method="reference"))  # the method on other data
    assert not is_original(load_recipe("original", method="partition"))  # the data with another method
