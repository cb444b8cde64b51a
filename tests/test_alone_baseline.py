"""The equal-compute baseline alone_<s> (DESIGN §3): an ungated model trained on s alone for the steps the dial model
spent on s, written by `abcgpt baselines` and read by the report's corner table as `alone` and corner - alone."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_recipe

from abcgpt.checkpoint import load_checkpoint
from abcgpt.common import AbcgptError
from abcgpt.config import load_recipe
from abcgpt.data import alone_steps, heldout_batches, prepared_data
from abcgpt.report import Settings, build_report, check_baseline
from abcgpt.report_metrics import ALONE_EQUAL, ALONE_NEVER, HeldoutLosses, corner_losses, dial_key, loss_positions
from abcgpt.report_render import to_markdown
from abcgpt.train import train, train_baselines

# weights 1 and 3 over 40 steps: the dial model draws alpha a quarter of the time (10 steps), omega 30;
# warm-up 20 is cut to alpha's 10 steps
OVERRIDES = ["train.steps=40", "train.warmup_steps=20", "train.eval_every=20", "train.checkpoint_every=20"]
EXPECTED = {"joint": ([], 40, 20), "without_alpha": (["omega"], 40, 20), "without_omega": (["alpha"], 40, 20),
            "alone_alpha": (["alpha"], 10, 10), "alone_omega": (["omega"], 30, 20)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alone")
    sources = (f'[[data.sources]]\nname = "alpha"\npath = "{tmp / "a.txt"}"\nweight = 1\n\n'
               f'[[data.sources]]\nname = "omega"\npath = "{tmp / "b.txt"}"\nweight = 3\n')
    recipe = load_recipe(str(write_recipe(tmp, sources=sources)), OVERRIDES)
    train(recipe, tmp / "dial", progress=False)
    paths = train_baselines(recipe, tmp / "base", progress=False)
    assert sorted(p.name for p in paths) == sorted(EXPECTED)
    return tmp, recipe


def _meta(run) -> dict:
    return json.loads((run / "last" / "config.json").read_text())


def test_alone_steps_are_the_dial_models_steps_on_the_source():
    assert [alone_steps(40, [1.0, 3.0], i) for i in range(2)] == [10, 30]
    assert [alone_steps(5000, [1.0] * 4, i) for i in range(4)] == [1250] * 4
    assert alone_steps(3, [1.0, 100.0], 0) == 1  # never 0 steps


def test_baselines_write_alone_with_its_steps_and_a_rerun_skips_them(runs, capsys):
    tmp, recipe = runs
    for name, (only, steps, warmup) in EXPECTED.items():
        meta = _meta(tmp / "base" / name)
        t = meta["recipe"]["train"]
        assert (t["only_sources"], t["steps"], t["warmup_steps"], meta["step"]) == (only, steps, warmup, steps), name
        assert meta["recipe"]["model"]["gates"] == "none" and meta["recipe"]["model"]["routing"] == "soft"
    # alone_omega trained on omega alone: every training step drew omega
    log = [json.loads(x) for x in (tmp / "base" / "alone_omega" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "eval"][-1] == 30
    # a rerun trains nothing: every run is complete
    before = {name: (tmp / "base" / name / "last" / "config.json").stat().st_mtime_ns for name in EXPECTED}
    train_baselines(recipe, tmp / "base", progress=True)
    out = capsys.readouterr().out
    assert "alone_alpha: ungated, trained on alpha for 10 steps (the dial model's steps on it" in out
    assert f"{tmp / 'base' / 'alone_alpha'} is complete (10 steps)" in out
    assert f"{tmp / 'base' / 'alone_omega'} is complete (30 steps)" in out
    assert before == {name: (tmp / "base" / name / "last" / "config.json").stat().st_mtime_ns for name in EXPECTED}


def _heldout_loss(run, recipe, source: int, batch_size: int, n_batches: int) -> float:
    """A model's mean held-out loss on one source, by hand: cross-entropy of its logits on the fixed batches."""
    ckpt = load_checkpoint(run / "last", "cpu")
    model = ckpt.model.eval()
    tokens = prepared_data(recipe, progress=False).heldout[source]
    losses = []
    with torch.no_grad():
        for x, y in heldout_batches(tokens, model.config.block_size, batch_size, n_batches):
            logits, _ = model(x, None, y)
            losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item())
    return float(np.mean(losses))


def test_report_reads_alone_and_gives_corner_minus_alone(runs):
    tmp, recipe = runs
    settings = dataclasses.replace(Settings.quick(samples=2), prompt=" ")
    report, _ = build_report(tmp / "dial", tmp / "base", quick=True, settings=settings, progress=False)
    d = report.to_dict()
    assert {"alone_alpha", "alone_omega"} <= set(d["baselines"])
    for j, src in enumerate(["alpha", "omega"]):
        c = d["corners"]["own"][src]
        alone = _heldout_loss(tmp / "base" / f"alone_{src}", recipe, j, recipe.train.batch_size, settings.batches)
        assert c["alone"] == pytest.approx(alone, abs=1e-5)
        assert c["alone_kind"] == ALONE_EQUAL
        assert c["vs_alone"] == pytest.approx(c["mean"] - alone, abs=1e-5)
        # corner - alone is about the alone model, not the one that never saw the other source (trained 40 steps)
        assert c["alone"] != d["baselines"][f"without_{'omega' if src == 'alpha' else 'alpha'}"][src]
    md = to_markdown(report)
    assert "| alone | corner − alone |" in md and "**alone (equal compute)**" in md
    row = next(line for line in md.splitlines() if line.startswith("| alpha | "))
    assert f"{d['corners']['own']['alpha']['vs_alone']:+.3f}" in row


def test_alone_may_differ_in_steps_and_warmup_only(runs):
    tmp, _ = runs
    dial = load_checkpoint(tmp / "dial" / "last", "cpu")
    base = load_checkpoint(tmp / "base" / "alone_alpha" / "last", "cpu")
    check_baseline(dial, base, "alone_alpha")  # 10 steps and warm-up 10 against the dial's 40 and 20: by design
    for key, value, match in [("steps", 12, r"alone_alpha .* train.steps = 12, expected 10, the dial model's steps"),
                              ("warmup_steps", 5, "train.warmup_steps = 5, expected 10"),
                              ("only_sources", ["omega"], r"train.only_sources = \['omega'\], expected \['alpha'\]"),
                              ("lr", 0.5, "differs from the dial model in train.lr: 0.5")]:
        bad = copy.copy(base)
        bad.meta = copy.deepcopy(base.meta)
        bad.meta.recipe.train[key] = value
        with pytest.raises(AbcgptError, match=match):
            check_baseline(dial, bad, "alone_alpha")
    # the joint model may not take alone's steps
    joint = load_checkpoint(tmp / "base" / "joint" / "last", "cpu")
    joint.meta = copy.deepcopy(joint.meta)
    joint.meta.recipe.train["steps"] = 10
    with pytest.raises(AbcgptError, match="baseline joint .* differs from the dial model in train.steps: 10 vs 40"):
        check_baseline(dial, joint, "joint")


def test_alone_falls_back_to_never_saw_the_other_for_two_sources():
    pos = loss_positions(["alpha", "omega"], Settings.quick())
    keys = [dial_key(x) for x in pos.distinct()]
    losses = HeldoutLosses(["alpha", "omega"], keys, {s: np.full((len(keys), 2), 2.0) for s in ("alpha", "omega")}, 1)
    base = {"joint": {"alpha": 1.5, "omega": 1.5}, "without_omega": {"alpha": 1.8, "omega": 4.0},
            "without_alpha": {"alpha": 4.0, "omega": 1.9}, "alone_alpha": {"alpha": 2.5, "omega": 5.0}}
    own = corner_losses(losses, pos, base).own
    assert (own["alpha"].alone, own["alpha"].alone_kind, own["alpha"].vs_alone) == (2.5, ALONE_EQUAL, -0.5)
    assert (own["omega"].alone, own["omega"].alone_kind) == (1.9, ALONE_NEVER)
    assert own["omega"].vs_alone == pytest.approx(0.1)
    assert corner_losses(losses, pos, {"joint": base["joint"]}).own["alpha"].alone is None


def test_only_some_baselines_are_trained(tmp_path, capsys):
    """baselines --only: the runs matching its shell patterns and no other (a 100-source recipe rarely wants every
    without_<s>); a pattern that matches none is one line naming the runs there are."""
    from abcgpt.cli import main

    recipe = write_recipe(tmp_path)
    paths = train_baselines(load_recipe(str(recipe), ["train.steps=2", "train.eval_every=2"]), tmp_path / "b",
                            progress=False, only=["joint", "alone_*"])
    assert sorted(p.name for p in paths) == ["alone_alpha", "alone_omega", "joint"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.is_dir()) == ["alone_alpha", "alone_omega", "joint"]
    assert main(["baselines", "--config", str(recipe), "--out", str(tmp_path / "c"), "--only", "nothing*"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("abcgpt: error: --only nothing* matches no baseline; the runs are joint, without_<source> and "
                   "alone_<source>") and not (tmp_path / "c").exists()
