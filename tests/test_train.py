import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, synthetic_text, write_recipe
from safetensors.torch import load_file

import abcgpt.train
from abcgpt.checkpoint import load_checkpoint
from abcgpt.common import AbcgptError
from abcgpt.config import load_recipe
from abcgpt.data import Batcher, load_data, prepare, prepared_data
from abcgpt.heldout import heldout_loss
from abcgpt.model import build_model
from abcgpt.train import train


def test_training_separates_two_sources(tmp_path):
    """A short run on two sources with disjoint alphabets: at each corner, the corner's own source is
    predicted far better than at the other corner, and the run leaves its checkpoints, log and plot."""
    recipe = load_recipe(str(write_recipe(tmp_path)), ["train.steps=150", "train.eval_every=50"])
    table = train(recipe, tmp_path / "run", progress=False)
    assert table["alpha"]["alpha"] < table["omega"]["alpha"] - 0.25
    assert table["omega"]["omega"] < table["alpha"]["omega"] - 0.25
    for f in ("best/model.safetensors", "last/config.json", "metrics.jsonl", "gates_loss_vs_dial.png",
              "gates_loss_vs_dial.json"):
        assert (tmp_path / "run" / f).is_file(), f
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "eval"] == [50, 100, 150]
    train_losses = [r["loss"] for r in log if r["type"] == "train"]
    assert train_losses[-1] < train_losses[0] - 0.3
    ckpt = load_checkpoint(tmp_path / "run" / "last")
    assert ckpt.meta.step == 150 and ckpt.sources == ["alpha", "omega"]
    # the checkpoint reproduces the losses logged at the last evaluation
    data = load_data(recipe.data_dir)
    got = heldout_loss(ckpt.model, data.heldout[0], torch.tensor([1.0, 0.0]), 8, 2)
    assert got == pytest.approx(table["alpha"]["alpha"], abs=1e-5)


def test_heldout_text_is_never_trained_on(tmp_path):
    """Training batches come only from training text: held-out text written in other characters never shows up."""
    (tmp_path / "a_train.txt").write_text("abcd " * 2000)
    (tmp_path / "a_held.txt").write_text("ABCD " * 500)
    (tmp_path / "b_split.txt").write_text(("wxyz " * 20 + "\n") * 90 + ("WXYZ " * 20 + "\n") * 10)  # last 10%: upper
    sources = f"""
[[data.sources]]
name = "a"
path = "{tmp_path / 'a_train.txt'}"
heldout_path = "{tmp_path / 'a_held.txt'}"

[[data.sources]]
name = "b"
path = "{tmp_path / 'b_split.txt'}"
"""
    recipe = load_recipe(str(write_recipe(tmp_path, sources=sources)))
    data = prepared_data(recipe, progress=False)
    tok = data.tokenizer
    upper = set(tok.encode("ABCDWXYZ"))
    assert upper <= set(np.unique(data.heldout[0])) | set(np.unique(data.heldout[1]))
    batcher = Batcher.from_recipe(dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, batch_size=64)),
                                  data, torch.device("cpu"))
    for _ in range(200):
        x, y, dials, sources = batcher.next()
        assert not upper & set(torch.unique(torch.cat([x, y])).tolist())
        # each row comes from the source it was drawn for
        for row, s in zip(x, sources):
            assert set(tok.decode(row.tolist())) <= set("abcd \n" if s == 0 else "wxyz \n")


def test_builtin_heldout_split_is_disjoint(tmp_path, data_dir):
    """Shakespeare: the training shard is the first 90% of the file, the held-out shard the rest."""
    sources = '[[data.sources]]\nname = "shakespeare"\n[[data.sources]]\nname = "tinystories"\nmax_bytes = 100000\n'
    recipe = load_recipe(str(write_recipe(tmp_path, sources=sources)))
    data = load_data(prepare(recipe, progress=False))
    text = (data_dir / "shakespeare" / "input.txt").read_text()
    train_text = data.tokenizer.decode(data.train[0].tolist())
    held_text = data.tokenizer.decode(data.heldout[0].tolist())
    assert train_text + held_text == text
    assert 0.09 < len(held_text) / len(text) < 0.11
    assert data.tokenizer.decode(data.heldout[1].tolist()) == (data_dir / "tinystories" / "valid.txt").read_text()


def test_stale_data_is_noticed(tmp_path):
    recipe = load_recipe(str(write_recipe(tmp_path)))
    prepared_data(recipe, progress=False)
    with pytest.raises(AbcgptError, match="data.tokenizer was 'char'"):
        prepared_data(load_recipe(str(tmp_path / "synthetic.toml"), ["data.tokenizer=bpe"]), progress=False)
    with open(tmp_path / "a.txt", "a") as f:
        f.write("gab fed\n")
    with pytest.raises(AbcgptError, match="text of source 'alpha' changed"):
        prepared_data(recipe, progress=False)


def test_source_shorter_than_context(tmp_path):
    (tmp_path / "short.txt").write_text("abc\n" * 3)
    sources = f"""
[[data.sources]]
name = "short"
path = "{tmp_path / 'short.txt'}"
heldout_path = "{tmp_path / 'short.txt'}"
[[data.sources]]
name = "long"
path = "{tmp_path / 'b.txt'}"
"""
    recipe = load_recipe(str(write_recipe(tmp_path, sources=sources)))
    with pytest.raises(AbcgptError, match="source 'short' has 12 training tokens, fewer than the context"):
        prepared_data(recipe, progress=False)


def test_training_leaves_the_callers_recipe_alone(tmp_path):
    """The Trainer completes its own copy (vocabulary, number of sources); the recipe it was given is unchanged, and
    the saved recipe holds what the data decided."""
    recipe = load_recipe(str(write_recipe(tmp_path)), ["train.steps=4", "train.eval_every=4"])
    before = recipe.to_dict()
    train(recipe, tmp_path / "run", progress=False)
    assert recipe.to_dict() == before
    saved = json.loads((tmp_path / "run" / "last" / "config.json").read_text())["recipe"]["model"]
    assert saved["n_sources"] == 2 and saved["vocab_size"] == load_checkpoint(tmp_path / "run").tokenizer.vocab_size
    assert before["model"]["vocab_size"] != saved["vocab_size"]  # the default (65) was not the data's


def test_every_token_of_a_shard_is_a_target_sometimes():
    """Windows reach the end of a shard: its last token is a target too (it used to be one short)."""
    shards = [np.arange(20, dtype=np.int64), np.arange(100, 120, dtype=np.int64)]
    data = SimpleNamespace(train=shards, sources=["a", "b"])
    batcher = Batcher(data, block_size=4, batch_size=64, device=torch.device("cpu"), seed=0, concentration=0.5,
                      per_batch=False, corner_fraction=1.0, weights=[1.0, 1.0])
    targets = set(torch.cat([batcher.next()[1].flatten() for _ in range(50)]).tolist())
    assert targets == set(range(1, 20)) | set(range(101, 120))


def test_batches_follow_the_dial_draw(tmp_path):
    """Per-sequence sampling: sequences drawn for source 1 came with dials near 1 (E[a | source 1] = 3/4)."""
    recipe = load_recipe(str(write_recipe(tmp_path)), ["train.corner_fraction=0", "train.batch_size=256"])
    data = prepared_data(recipe, progress=False)
    batcher = Batcher.from_recipe(recipe, data, torch.device("cpu"))
    dials, sources = zip(*[batcher.next()[2:] for _ in range(40)])
    a, s = torch.cat(dials)[:, 1], torch.cat(sources)
    assert a[s == 1].mean().item() == pytest.approx(0.75, abs=0.02)
    assert a[s == 0].mean().item() == pytest.approx(0.25, abs=0.02)


def _cli(*args, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen([sys.executable, "-m", "abcgpt", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
    """SIGKILL a run after its first checkpoint; --resume finishes it with the same step count and the same
    weights as a run that was never interrupted (optimizer, RNG and sampler state all restored)."""
    recipe = write_recipe(tmp_path, extra_train="")
    steps, args = "400", ["--set", "train.checkpoint_every=10", "--set", "train.eval_every=100"]
    proc = _cli("train", "--config", str(recipe), "--out", str(tmp_path / "killed"), "--steps", steps, *args)
    cfg = tmp_path / "killed" / "last" / "config.json"
    deadline = time.time() + 120
    while not cfg.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # let it get into the middle of later steps or checkpoint writes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(tmp_path / "killed" / "last").meta.step
    assert 0 < killed_at < 400, "the run should have been killed midway"

    resumed = _cli("train", "--resume", str(tmp_path / "killed"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert load_checkpoint(tmp_path / "killed" / "last").meta.step == 400

    whole = _cli("train", "--config", str(recipe), "--out", str(tmp_path / "whole"), "--steps", steps, *args)
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    a = load_file(str(tmp_path / "killed" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the log reads as one run: every step logged once
    steps_logged = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
                    if json.loads(x)["type"] == "train"]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 400


def test_existing_run_is_not_overwritten(tmp_path):
    recipe = load_recipe(str(write_recipe(tmp_path)), ["train.steps=10"])
    train(recipe, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "last" / "model.safetensors").read_bytes()
    with pytest.raises(AbcgptError, match="already holds a run"):
        train(recipe, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "last" / "model.safetensors").read_bytes() == before


def test_interrupted_checkpoint_swap_is_recovered(tmp_path):
    """A crash between the two renames of a checkpoint swap leaves last.old; loading falls back to it."""
    recipe = load_recipe(str(write_recipe(tmp_path)), ["train.steps=10"])
    train(recipe, tmp_path / "run", progress=False)
    last = tmp_path / "run" / "last"
    last.rename(tmp_path / "run" / "last.old")
    assert load_checkpoint(tmp_path / "run").meta.step == 10  # via best/ ...
    assert load_checkpoint(last).meta.step == 10  # ... and last.old
    assert Path(load_checkpoint(last).path).name == "last.old"


@pytest.mark.slow
@pytest.mark.parametrize("fsdp, width", [(False, "total"), (True, "total"), (False, "corner")])
def test_torchrun_two_processes_match_one(tmp_path, fsdp, width):
    """torchrun with 2 CPU processes (gloo) trains the same model as one process with the same global batch:
    each process takes its half of the same drawn batch; DDP averages the gradients, FSDP reduce-scatters
    them into each process's shard and gathers the whole model for checkpoints. A bank of corners (width corner,
    4 sources, 2 a batch) leaves the sources absent from the whole batch untouched under DDP too."""
    sources = "".join(f'[[data.sources]]\nname = "s{i}"\npath = "{tmp_path / f"s{i}.txt"}"\n\n' for i in range(4))
    for i, alphabet in enumerate(("abcd", "efgh", "ijkl", "mnop")):
        (tmp_path / f"s{i}.txt").write_text(synthetic_text(alphabet, 20_000, i))
    recipe = str(write_recipe(tmp_path, sources=sources if width == "corner" else None))
    args = ["train", "--config", recipe, "--steps", "20", "--set", "train.grad_accum=2", "--set", "train.threads=1",
            "--set", f"model.width={width}", "--set", f"train.sources_per_batch={2 if width == 'corner' else 0}"]
    one = _cli(*args, "--out", str(tmp_path / "one"))
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          "2", "-m", "abcgpt", *args, "--set", f"train.fsdp={str(fsdp).lower()}",
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), (k, (a[k] - b[k]).abs().max())
    # and they moved away from the initial weights: the comparison is not vacuous
    init = load_checkpoint(tmp_path / "one" / "last").model
    torch.manual_seed(0)  # train.seed: the initial weights
    fresh = build_model(init.config).state_dict()
    k = "transformer.h.0.mlp.c_fc.weight" if width == "total" else "own.0.transformer_h_0_mlp_c_fc_weight_0"
    assert not torch.allclose(fresh[k], a[k])


@pytest.mark.slow
def test_fsdp_run_resumes_exactly(tmp_path):
    """Stopped at step 10 and resumed to 20 under torchrun with FSDP, a run ends where the same stop and resume
    in one plain process ends: the sharded optimizer state is saved whole and sharded again on resume."""
    recipe = str(write_recipe(tmp_path))
    first = ["train", "--config", recipe, "--steps", "10", "--set", "train.threads=1", "--set", "train.fsdp=true"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for launcher, out in (([], "one"), (torchrun, "two")):
        resume = ["train", "--resume", str(tmp_path / out), "--steps", "20"]
        for args, step in ((first + ["--out", str(tmp_path / out)], 10), (resume, 20)):
            cmd = [sys.executable] + (launcher[1:] if launcher else []) + ["-m", "abcgpt", *args]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            if run.returncode and "terminate called without an active exception" in run.stderr:
                # a rare abort of a gloo worker at process exit (about 1 run in 10 here), after the work is
                # done: the checkpoint must then be complete
                assert load_checkpoint(tmp_path / out / "last").meta.step == step, run.stderr[-3000:]
                continue
            assert run.returncode == 0, run.stderr[-3000:]
        assert load_checkpoint(tmp_path / out / "last").meta.step == 20
    a = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), (k, (a[k] - b[k]).abs().max())


def test_diverged_training_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """A NaN loss stops training with a message; the last checkpoint on disk is the last finite one."""
    from abcgpt.cli import main

    recipe = str(write_recipe(tmp_path))
    assert main(["train", "--config", recipe, "--out", str(tmp_path / "run"), "--steps", "10",
                 "--set", "train.checkpoint_every=5"]) == 0
    good = (tmp_path / "run" / "last" / "model.safetensors").read_bytes()
    # resume with an absurd learning rate (beyond what a recipe may set): the loss blows up to inf / nan
    monkeypatch.setattr(abcgpt.train, "lr_at", lambda step, t: 1e30)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "40"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar, one line
    assert last.startswith("abcgpt: error: loss became") and "training stopped, the last good checkpoint" in last
    ckpt = load_checkpoint(tmp_path / "run" / "last")
    assert ckpt.meta.step == 10 and (tmp_path / "run" / "last" / "model.safetensors").read_bytes() == good
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())


def test_method_presets_are_files_applied_over_the_recipe(tmp_path):
    """--method reference applies configs/methods/reference.toml (DESIGN §1's knobs) over the recipe, --set goes
    over both; `include` puts a preset under a recipe's own keys; the recipe `reference` is the original method
    end to end; the default is the partition method, whose preset spells out the defaults."""
    path = str(write_recipe(tmp_path))
    ours = load_recipe(path)
    assert (ours.model.method, ours.model.routing, ours.train.dial_sampling) == ("partition", "routed", "per_sequence")
    assert load_recipe(path, method="partition") == ours
    ref = load_recipe(path, method="reference")
    assert (ref.model.method, ref.model.routing, ref.model.gate_shape, ref.model.gate_norms, ref.train.dial_sampling,
            ref.train.corner_fraction) == ("reference", "soft", "cos2", False, "per_batch", 0.0)
    mixed = load_recipe(path, ["model.routing=routed"], method="reference")
    assert mixed.model.routing == "routed" and mixed.train.dial_sampling == "per_batch"
    assert load_recipe(path, ["model.method=reference"]).model.routing == "routed"  # a key is only itself
    included = tmp_path / "inc.toml"
    own = Path(path).read_text().replace("[train]", "[train]\ncorner_fraction = 0.5")
    included.write_text('include = "methods/reference"\n' + own)
    inc = load_recipe(str(included))
    assert (inc.model.method, inc.train.dial_sampling, inc.train.corner_fraction) == ("reference", "per_batch", 0.5)
    assert load_recipe("reference").model.method == "reference"
    assert load_recipe("reference", method="partition").model.method == "partition"
    with pytest.raises(AbcgptError, match="unknown method 'bogus'"):
        load_recipe(path, method="bogus")
    with pytest.raises(AbcgptError, match="model.method = 'abc' is not allowed: input should be 'partition' or"):
        load_recipe(path, ["model.method=abc"])
    with pytest.raises(AbcgptError, match="train.corner_fraction = 1.5 is not allowed"):
        load_recipe(path, ["train.corner_fraction=1.5"])
    with pytest.raises(AbcgptError, match="model.shared_fraction = 1.0 is not allowed"):
        load_recipe(path, ["model.shared_fraction=1.0"])


def test_checkpoint_without_its_method_is_read_from_its_specialties(tmp_path):
    """A config.json without model.method (an older abcgpt's, or edited) is rebuilt with the method its stored
    specialties show, not the default, and computes what it computed; a key whose value the files cannot tell is
    refused by name rather than guessed."""
    recipe = load_recipe(str(write_recipe(tmp_path)), ["train.steps=10"], method="reference")
    train(recipe, tmp_path / "old", progress=False)
    x = torch.randint(0, 8, (2, 16))
    dial = torch.tensor([0.3, 0.7])
    before = load_checkpoint(tmp_path / "old" / "last").model(x, dial, x)[1]
    meta_path = tmp_path / "old" / "last" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["model"] = {k: meta["recipe"]["model"].pop(k) for k in ("vocab_size", "n_sources")}  # stored beside
    del meta["recipe"]["model"]["method"]
    meta_path.write_text(json.dumps(meta))
    old = load_checkpoint(tmp_path / "old" / "last").model
    assert old.config.method == "reference"
    assert torch.equal(old(x, dial, x)[1], before)
    del meta["recipe"]["train"]["own_decay_factor"]  # saved before the key existed: every such run trained at 1
    meta_path.write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path / "old" / "last").recipe.train.own_decay_factor == 1.0
    del meta["recipe"]["model"]["gate_shape"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AbcgptError, match="recipe.model.gate_shape is missing; abcgpt does not guess it"):
        load_checkpoint(tmp_path / "old" / "last")
