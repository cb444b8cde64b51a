"""`abcgpt forget` and `abcgpt add-source` (sources_edit.py): a source taken out, or added, without training the
others again."""

import json

import pytest
import torch
from conftest import noisy, source_tables, synthetic_text, write_recipe
from safetensors.torch import load_file

from abcgpt.bank import CornerBank
from abcgpt.checkpoint import load_checkpoint, read_meta, sha256
from abcgpt.cli import main
from abcgpt.config import load_recipe
from abcgpt.dial import Partition, _shape, corner, partition_gate, partition_specialties
from abcgpt.engine import Engine
from abcgpt.model import GPTConfig, build_model
from abcgpt.report import heldout_data
from abcgpt.sources import SourceSpec
from abcgpt.sources_edit import SHARED, add_source, entry_masks, forget, with_training
from abcgpt.train import Trainer, train

ALPHABETS = {"alpha": "abcdefg", "beta": "hijklmn", "gamma": "tuvwxyz"}
SMALL = ["model.n_head=4", "model.n_embd=16", "train.threads=1"]  # every source a head, channels and MLP units


def trained(tmp, width: str, shared: float, names=tuple(ALPHABETS)):
    """A run of 30 steps on synthetic sources with disjoint alphabets."""
    for name in names:
        (tmp / f"{name}.txt").write_text(synthetic_text(ALPHABETS[name], 30_000, len(name)))
    recipe = write_recipe(tmp, sources=source_tables(**{n: tmp / f"{n}.txt" for n in names}))
    overrides = SMALL + [f"model.width={width}", f"model.shared_fraction={shared}"]
    train(load_recipe(str(recipe), overrides), tmp / "run", progress=False)
    return tmp / "run"


KINDS = [("total", 0.0), ("corner", 0.0), ("total", 0.25), ("corner", 0.25)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {kind: trained(tmp_path_factory.mktemp(f"{kind[0]}{kind[1]}"), *kind) for kind in KINDS}


def files_of(run):
    return {p.relative_to(run): sha256(p) for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def logits_at(model, k: int, n: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, corner(k, n), x)[0]


@pytest.mark.parametrize("kind", KINDS, ids=[f"{w}-shared{s}" for w, s in KINDS])
def test_forget_keeps_every_other_corner_bit_for_bit(runs, kind, tmp_path):
    run = runs[kind]
    before = files_of(run)
    out, _ = forget(run, "beta", tmp_path / "new", progress=False)
    old, new = load_checkpoint(run), load_checkpoint(out)
    assert files_of(run) == before  # the original is untouched
    assert new.sources == ["alpha", "gamma"] and new.model.config.n_sources == 2
    x = torch.randint(0, new.tokenizer.vocab_size, (4, 16))
    for j_old, j_new in ((0, 0), (2, 1)):
        assert torch.equal(logits_at(old.model, j_old, 3, x), logits_at(new.model, j_new, 2, x))
        # and the network the engine generates with and export writes
        a, b = old.model.network_at(corner(j_old, 3)), new.model.network_at(corner(j_new, 2))
        assert a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    edit = new.meta.edits[-1]
    assert edit.removed == "beta" and edit.from_model == old.meta.files["model.safetensors"]
    assert "beta" not in new.meta.metrics.model_dump_json() and new.meta.trainer is None  # no Adam moments of beta
    if isinstance(new.model, CornerBank):
        assert len(new.model.own) == 2
    else:  # beta's units: every weight that reads or writes them is 0, and they are off at every dial
        spec = new.model.specialties
        retired = spec.amax(-1) == 0
        assert int(retired.sum()) == int((old.model.specialties[:, 1] == 1).sum()) > 0
        # the network's own gates between the remaining corners (mode gates) are the same networks too
        with torch.no_grad():
            for own_width in (True, False):
                a = old.model(x, torch.tensor([0.3, 0.0, 0.7]), x, own_width=own_width)[0]
                assert torch.equal(a, new.model(x, torch.tensor([0.3, 0.7]), x, own_width=own_width)[0])
        dials = torch.distributions.Dirichlet(torch.ones(2)).sample((50,))
        assert (new.model.unit_gates(dials)[:, retired] == 0).all()
        old_masks = entry_masks(old.model, lambda o: o == 1, every=False)
        for name, p in new.model.named_parameters():
            assert (p[old_masks[name]] == 0).all(), name
    # the edited model is a checkpoint like any other: its data is in its tokenizer, the engine samples it
    assert heldout_data(new).sources == ["alpha", "gamma"]
    assert Engine(new).generate("\n", "gamma", max_new_tokens=8, seed=0)


def test_a_retired_unit_is_off_at_every_dial_whatever_the_gate():
    m = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    dials = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    for narrowness in (0.5, 1.0, 3.0):
        for shape in ("cos2", "linear"):
            g = partition_gate(dials, m, narrowness, shape)
            assert (g[:, 1] == 0).all() and not g.isnan().any()
    assert (Partition().mask(m, torch.tensor([0, 1]))[:, 1] == 0).all()
    # a model without retired units gets its gates bit for bit as before they existed
    m = partition_specialties([16, 4, 64], 3, 0, 0.25)
    dials = torch.distributions.Dirichlet(torch.ones(3)).sample((20,))
    before = _shape(((1.0 - dials @ (m / m.max(dim=-1, keepdim=True).values).T) / 0.7).clamp(0.0, 1.0), "cos2")
    assert torch.equal(partition_gate(dials, m, 0.7), before)


@pytest.mark.parametrize("own_width", [True, False])
def test_a_sources_gradient_reaches_its_own_and_the_shared_units_only(own_width):
    """What forget relies on: a sequence of source 1 at its corner (training's only draw with the partition preset)
    gives a gradient only to entries whose every unit axis is source 1's or shared, the tied LM head included."""
    torch.manual_seed(0)
    model = noisy(build_model(GPTConfig(vocab_size=11, n_sources=3, block_size=8, n_layer=2, n_head=4, n_embd=16,
                                        shared_fraction=0.25, bias=True)))
    x = torch.randint(0, 11, (4, 8))
    _, loss = model(x, corner(1, 3), x, torch.ones(4, dtype=torch.long), own_width=own_width)
    loss.backward()
    corner_1 = entry_masks(model, lambda o: (o == 1) | (o == SHARED), every=True)
    reached = 0
    for name, p in model.named_parameters():
        assert (p.grad[~corner_1[name]] == 0).all(), name
        reached += int((p.grad != 0).sum())
    assert reached > 0


@pytest.mark.parametrize("kind", [("total", 0.25), ("corner", 0.25)], ids=["total", "corner"])
def test_retrain_shared_trains_the_shared_units_only(runs, kind, tmp_path, capsys):
    run = runs[kind]
    plain, _ = forget(run, "beta", tmp_path / "plain", progress=False)
    assert main(["forget", "--ckpt", str(run), "--source", "beta", "--out", str(tmp_path / "re"),
                 "--retrain-shared", "12", "--set", "train.threads=1", "--set", "train.eval_every=6"]) == 0
    assert "learnt from beta too; retrained for 12 steps" in capsys.readouterr().out
    a, b = load_checkpoint(plain), load_checkpoint(tmp_path / "re")
    assert b.meta.step == 12 and b.meta.edits[-1].steps == 12
    if isinstance(a.model, CornerBank):
        for j in range(2):
            for name, p in a.model.own[j].named_parameters():
                assert torch.equal(p, b.model.own[j].get_parameter(name)), name
        assert not all(torch.equal(p, b.model.shared[k]) for k, p in a.model.shared.items())
    else:
        shared = entry_masks(a.model, lambda o: o == SHARED, every=True)
        moved = False
        for name, p in a.model.named_parameters():
            q = b.model.get_parameter(name)
            assert torch.equal(p[~shared[name]], q[~shared[name]]), name  # own entries (and retired ones) as they were
            moved |= not torch.equal(p[shared[name]], q[shared[name]])
        assert moved
    # a plain `train --resume` would train every unit: refused
    assert main(["train", "--resume", str(tmp_path / "re"), "--steps", "20"]) == 2
    assert "rerun that command to resume it" in capsys.readouterr().err


def test_forget_refuses_bad_input_in_one_line_and_writes_nothing(runs, tmp_path, capsys):
    run = runs[("total", 0.0)]
    (tmp_path / "two").mkdir()
    two = trained(tmp_path / "two", "total", 0.0, ("alpha", "gamma"))
    (tmp_path / "taken").mkdir()
    cases = [
        (["--ckpt", str(run), "--source", "delta"], "has no source 'delta'; its sources are alpha, beta, gamma"),
        (["--ckpt", str(two), "--source", "alpha"], "cannot remove alpha: "),
        (["--ckpt", str(run), "--source", "beta", "--retrain-shared", "5"], "has no shared units"),
    ]
    for args, message in cases:
        assert main(["forget", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
    assert main(["forget", "--ckpt", str(run), "--source", "beta", "--out", str(tmp_path / "taken")]) == 2
    assert f"{tmp_path / 'taken'} exists" in capsys.readouterr().err
    assert not list((tmp_path / "taken").iterdir())
    assert not (tmp_path / "two" / "data-without-alpha").exists()  # no data written for a refused command


def test_add_source_trains_its_corner_and_keeps_every_other_bit_for_bit(runs, tmp_path):
    run = runs[("corner", 0.25)]
    (tmp_path / "delta.txt").write_text(synthetic_text("aehntwz", 30_000, 7))  # characters of the vocabulary
    before = files_of(run)
    out = add_source(run, SourceSpec("delta", path=str(tmp_path / "delta.txt")), 12, tmp_path / "new",
                     overrides=["train.threads=1", "train.eval_every=6"], progress=False)
    old, new = load_checkpoint(run), load_checkpoint(out)
    assert files_of(run) == before
    assert new.sources == ["alpha", "beta", "gamma", "delta"] and new.meta.step == 12
    x = torch.randint(0, new.tokenizer.vocab_size, (4, 16))
    for k in range(3):
        assert torch.equal(logits_at(old.model, k, 3, x), logits_at(new.model, k, 4, x))
    for key, p in old.model.shared.items():
        assert torch.equal(p, new.model.shared[key])
    heldout = new.meta.metrics.heldout
    assert heldout["delta"]["delta"] < min(heldout[s]["delta"] for s in ("alpha", "beta", "gamma"))
    edit = new.meta.edits[-1]
    assert edit.added == "delta" and edit.steps == 12 and "every other parameter frozen" in edit.how


def test_an_edit_never_branches():
    """A recipe's seed phase is for training from scratch: an edit's training starts from trained sources, and
    branching would overwrite their own units with source 0's."""
    recipe = load_recipe("tiny", ["model.width=corner", "train.branch_step=1000"])
    assert with_training(recipe, 50, ["train.lr=1e-4"]).train.branch_step == 0


def test_add_source_refuses_bad_input_in_one_line_and_writes_nothing(runs, tmp_path, capsys):
    (tmp_path / "digits.txt").write_text(synthetic_text("abc0123", 20_000, 3))
    bank, total = runs[("corner", 0.25)], runs[("total", 0.0)]
    common = ["--steps", "4", "--out", str(tmp_path / "out"), "--set", "train.threads=1"]
    cases = [
        (["--ckpt", str(total), "--source", "epsilon", "--path", str(tmp_path / "digits.txt")],
         'add-source needs model.width = "corner"'),
        (["--ckpt", str(bank), "--source", "beta", "--path", str(tmp_path / "digits.txt")],
         "already has a source 'beta'"),
        (["--ckpt", str(bank), "--source", "epsilon", "--path", str(tmp_path / "digits.txt")],
         "source epsilon has 4 character(s) outside the checkpoint's 23-character vocabulary: '1' (2,312x), '0'"),
        (["--ckpt", str(bank), "--source", "epsilon", "--path", str(tmp_path / "digits.txt"), "--replace-unknown",
          "9"],
         "--replace-unknown '9' must be one character of the checkpoint's char vocabulary"),
        (["--ckpt", str(bank), "--source", "epsilon", "--path", str(tmp_path / "digits.txt"), "--set",
          "train.branch_step=2"], "only train.* keys other than branch_step may change here"),
    ]
    for args, message in cases:
        assert main(["add-source", *args, *common]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
        assert not (bank.parent / "data-plus-epsilon").exists()
    # the same characters, written as a space of the vocabulary
    assert main(["add-source", "--ckpt", str(bank), "--source", "epsilon", "--path", str(tmp_path / "digits.txt"),
                 "--replace-unknown", " ", *common]) == 0
    edit = load_checkpoint(tmp_path / "out").meta.edits[-1]
    assert "characters outside the vocabulary ('0123') written as ' '" in edit.how
    assert main(["train", "--resume", str(tmp_path / "out"), "--steps", "8"]) == 2
    assert "rerun that command to resume it" in capsys.readouterr().err


def test_a_stopped_add_source_resumes_exactly(runs, tmp_path, monkeypatch):
    run = runs[("corner", 0.25)]
    (tmp_path / "delta.txt").write_text(synthetic_text("aehntwz", 30_000, 7))
    spec = SourceSpec("zeta", path=str(tmp_path / "delta.txt"))
    args = dict(overrides=["train.threads=1", "train.checkpoint_every=5", "train.eval_every=5"], progress=False)
    add_source(run, spec, 12, tmp_path / "whole", **args)
    step = Trainer.train_step

    def stop_at_7(self):
        if self.step == 7:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", stop_at_7)
    with pytest.raises(Exception, match="interrupted at step 7"):
        add_source(run, spec, 12, tmp_path / "stopped", **args)
    assert read_meta(tmp_path / "stopped" / "last").step == 5
    monkeypatch.setattr(Trainer, "train_step", step)
    add_source(run, spec, 12, tmp_path / "stopped", **args)  # the same command again: resumes at step 5
    a, b = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("whole", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_edit_record_is_checked_and_optional(runs, tmp_path):
    out, _ = forget(runs[("total", 0.0)], "beta", tmp_path / "new", progress=False)
    meta = json.loads((out / "config.json").read_text())
    assert "edits" not in json.loads((runs[("total", 0.0)] / "best" / "config.json").read_text())  # no edit, no key
    meta["edits"][0]["added"] = "delta"  # an edit is one removal or one addition
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="edits.0: an edit names exactly one of removed and added"):
        read_meta(out)
