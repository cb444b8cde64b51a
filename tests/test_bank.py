"""model.width = "corner": each source its own network of the recipe's size, plus shared units (bank.py)."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import noisy, source_tables, synthetic_text, write_recipe

from abcgpt.bank import CornerBank, corner_config, shared_counts
from abcgpt.checkpoint import load_checkpoint
from abcgpt.common import AbcgptError
from abcgpt.config import load_recipe
from abcgpt.dial import corner, sample_dials
from abcgpt.engine import Engine
from abcgpt.export import export_gpt2
from abcgpt.model import GPT, GPTConfig, build_model
from abcgpt.report import Settings, build_report
from abcgpt.report_metrics import edges
from abcgpt.report_render import to_markdown
from abcgpt.train import train


def bank(n=3, shared=0.25, bias=True, seed=0) -> CornerBank:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=23, n_sources=n, block_size=12, n_layer=2, n_head=4, n_embd=16, width="corner",
                    shared_fraction=shared, bias=bias)
    return noisy(build_model(cfg))


def as_gpt(model: CornerBank, k: int) -> GPT:
    """An ordinary ungated GPT of one corner's size holding corner k's weights."""
    g = GPT(corner_config(model.config))
    w = {n: t.detach() for n, t in model.corner_weights(k).items()}
    g.load_state_dict(w | {"lm_head.weight": w["transformer.wte.weight"]})
    return g


@pytest.mark.parametrize("shared", [0.0, 0.25, 0.5])
def test_a_corner_is_an_ordinary_gpt_of_the_recipes_size(shared):
    m = bank(shared=shared)
    x = torch.randint(0, 23, (5, 12))
    for k in range(3):
        logits, loss = m(x, corner(k, 3), x)
        ref, ref_loss = as_gpt(m, k)(x, None, x)
        assert torch.allclose(logits, ref, atol=1e-5) and torch.allclose(loss, ref_loss, atol=1e-6)
    # the parameters: one shared block, and N own sets; a corner's count does not depend on N
    one = sum(p.numel() for p in GPT(corner_config(m.config)).parameters())
    assert m.corner_params() == one
    for n in (2, 5):
        other = bank(n=n, shared=shared)
        assert other.corner_params() == one
        assert other.num_params() == sum(p.numel() for p in other.shared.parameters()) + n * sum(
            p.numel() for p in other.own[0].parameters())


def test_corners_share_exactly_the_shared_block():
    """Corner weights agree on the entries whose every axis is a shared unit, and differ elsewhere."""
    m = bank(shared=0.5)
    c = shared_counts(m.config)
    a, b = m.corner_weights(0), m.corner_weights(1)
    fc = "transformer.h.1.mlp.c_fc.weight"  # (MLP units, channels)
    assert torch.equal(a[fc][:c["unit"], :c["res"]], b[fc][:c["unit"], :c["res"]])
    assert not torch.equal(a[fc][c["unit"]:], b[fc][c["unit"]:])
    assert not torch.equal(a[fc][:c["unit"], c["res"]:], b[fc][:c["unit"], c["res"]:])
    q = "transformer.h.0.attn.c_attn.weight"  # q, k, v rows of the shared heads, over the shared channels
    for part in range(3):
        rows = slice(part * 16, part * 16 + c["head"])
        assert torch.equal(a[q][rows, :c["res"]], b[q][rows, :c["res"]])
    assert c == {"res": 8, "head": 8, "unit": 32}


def test_a_batch_trains_only_its_sources_and_the_shared_units():
    m = bank(n=4, shared=0.25)
    x = torch.randint(0, 23, (6, 12))
    dials = torch.stack([corner(k, 4) for k in (1, 3, 1, 1, 3, 3)])
    _, loss = m(x, dials, x)
    loss.backward()
    touched = [k for k in range(4) if any(p.grad is not None for p in m.own[k].parameters())]
    assert touched == [1, 3]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.shared.parameters())


def test_without_shared_units_training_one_source_leaves_every_other_corner_bit_for_bit():
    """The optimizer skips an absent source: its weights and its AdamW moments do not move (no decay either)."""
    m = bank(n=3, shared=0.0)
    opt = m.configure_optimizer(0.1, 1e-2, (0.9, 0.99), "cpu")
    x = torch.randint(0, 23, (4, 12))
    for k in (0, 2, 0):  # sources 0 and 2 train, 1 never
        _, loss = m(x, corner(k, 3), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    before = {n: t.clone() for n, t in m.corner_weights(1).items()}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in m.own[0].parameters()}
    _, loss = m(x, corner(2, 3), x)
    loss.backward()
    opt.step()
    after = m.corner_weights(1)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(len(opt.state[p]) == 0 for p in m.own[1].parameters())  # never stepped
    for p in m.own[0].parameters():  # source 0 was absent from the last step: its moments and step count stay
        assert all(torch.equal(moments[id(p)][k], v) for k, v in opt.state[p].items())


@pytest.mark.parametrize("factor", [1.0, 10.0])
def test_own_decay_factor_decays_the_own_matrices_that_many_times_harder(factor):
    """train.own_decay_factor: with a zero gradient AdamW's step is its decay alone (p -> p * (1 - lr * decay)), so
    after one step each matrix piece shows the decay it got: the shared ones weight_decay, the own ones factor times
    that; vectors none. At 1 the groups are the two they always were (old runs' optimizer state still loads)."""
    m, lr, wd = bank(n=2, shared=0.5), 1e-2, 0.1
    opt = m.configure_optimizer(wd, lr, (0.9, 0.99), "cpu", own_decay_factor=factor)
    assert len(opt.param_groups) == (2 if factor == 1.0 else 3)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in m.named_parameters():
        decay = 0.0 if p.dim() < 2 else wd * (factor if n.startswith("own.") else 1.0)
        assert torch.allclose(p.detach(), before[n] * (1 - lr * decay), rtol=0, atol=1e-7), n
    assert any(n.startswith("own.") and p.dim() >= 2 for n, p in m.named_parameters())


def test_branch_copies_the_first_sources_units_and_their_adam_state():
    m = bank(n=3, shared=0.25)
    opt = m.configure_optimizer(0.1, 1e-2, (0.9, 0.99), "cpu")
    x = torch.randint(0, 23, (4, 12))
    _, loss = m(x, corner(0, 3), x)
    loss.backward()
    opt.step()
    m.branch(opt)
    for k in (1, 2):
        for first, p in zip(m.own[0].parameters(), m.own[k].parameters()):
            assert torch.equal(first, p) and first is not p
            assert all(torch.equal(opt.state[first][a], v) and opt.state[first][a] is not v
                       for a, v in opt.state[p].items())
    assert torch.allclose(m(x, corner(2, 3), x)[0], m(x, corner(0, 3), x)[0])  # one network, three copies


@pytest.mark.slow
def test_branch_step_seeds_every_source_from_one_network_and_resumes(tmp_path, monkeypatch):
    """train.branch_step: until it, every sequence trains source 0's network and the others' own units stay as
    initialised; then they branch, once; a run stopped before it and resumed ends where an unbroken run does."""
    keys = ["model.width=corner", "model.shared_fraction=0.5", "train.warmup_steps=0",
            "train.lr=1e-3", "train.min_lr=1e-3"]  # one lr throughout: a 2-step run is the start of a 5-step one
    branched, real = [], CornerBank.branch
    monkeypatch.setattr(CornerBank, "branch", lambda self, opt: (branched.append(1), real(self, opt)))

    def run(name, steps, branch_step=3, resume=False):
        recipe = load_recipe(str(write_recipe(tmp_path)), keys + [f"train.steps={steps}",
                                                                  f"train.branch_step={branch_step}"])
        train(recipe, tmp_path / name, resume=resume, progress=False)
        return load_checkpoint(tmp_path / name / "last").model

    whole = run("whole", 5)
    assert branched == [1]
    early = run("early", 2)
    torch.manual_seed(0)  # train.seed: the initial weights
    init = build_model(early.config)

    def same(a, b, k):
        return all(torch.equal(x, y) for x, y in zip(a.own[k].parameters(), b.own[k].parameters()))
    assert same(init, early, 1) and not same(init, early, 0)  # seeding: source 1 drawn, yet only 0's units moved
    assert not same(init, run("plain", 2, branch_step=0), 1)  # (without it, source 1's units move in two steps)
    resumed = run("early", 5, resume=True)
    assert all(torch.equal(x, y) for x, y in zip(whole.parameters(), resumed.parameters()))


def test_a_dial_between_corners_is_refused_with_one_line():
    m = bank()
    with pytest.raises(AbcgptError, match="between corners"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.tensor([0.5, 0.5, 0.0]))


def test_recipe_checks():
    base = ["model.width=corner"]
    with pytest.raises(AbcgptError, match="model.method"):
        load_recipe("tiny", base, "reference")
    with pytest.raises(AbcgptError, match="train.corner_fraction"):
        load_recipe("tiny", base + ["train.corner_fraction=0.5"])
    with pytest.raises(AbcgptError, match="corner_fraction = 1"):
        load_recipe("tiny", ["train.sources_per_batch=2", "train.corner_fraction=0.5"])
    load_recipe("tiny", base + ["model.gates=none"])  # a baseline of one corner's size: the keys are the same
    with pytest.raises(AbcgptError, match='own_decay_factor is for a bank of corners'):
        load_recipe("tiny", ["train.own_decay_factor=10"])  # width = "total": no source has units of its own
    load_recipe("tiny", base + ["model.gates=none", "train.own_decay_factor=10"])  # its baselines keep the recipe
    with pytest.raises(AbcgptError, match="branch_step is for a bank of corners"):
        load_recipe("tiny", ["train.branch_step=10"])


def test_sources_per_batch_keeps_each_sources_share():
    rng, w = np.random.default_rng(0), [1.0, 2.0, 3.0, 4.0, 10.0]
    counts, per_batch = np.zeros(5), []
    for _ in range(4000):
        dials, sources = sample_dials(rng, 16, 5, 0.5, 1.0, weights=w, sources_per_batch=2)
        assert np.array_equal(dials, np.eye(5, dtype=np.float32)[sources])
        counts += np.bincount(sources, minlength=5)
        per_batch.append(len(set(sources.tolist())))
    assert max(per_batch) == 2
    assert np.allclose(counts / counts.sum(), np.array(w) / sum(w), atol=0.01)


def test_a_bank_trains_resumes_samples_and_mixes(tmp_path, capsys):
    keys = ["model.width=corner", "model.shared_fraction=0.5", "train.own_decay_factor=4"]
    recipe = load_recipe(str(write_recipe(tmp_path)), keys + ["train.steps=20"])
    train(recipe, tmp_path / "run", progress=False)
    recipe = load_recipe(str(write_recipe(tmp_path)), keys + ["train.steps=30"])
    train(recipe, tmp_path / "run", resume=True, progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last")
    assert isinstance(ckpt.model, CornerBank) and ckpt.meta.step == 30
    # the recipe's decay reached the optimizer, resumed with its three groups: shared, own (4 x), vectors
    assert [g.weight_decay for g in ckpt.meta.trainer.optimizer.param_groups] == [0.1, pytest.approx(0.4), 0.0]
    assert set(ckpt.meta.metrics.heldout) == {"alpha", "omega"}  # corners only: nothing in between
    engine = Engine(ckpt)
    assert engine.default_mode == "switch"
    texts = engine.generate("a", dial=0.5, n=4, max_new_tokens=8, seed=0)
    assert len(texts) == 4
    with pytest.raises(AbcgptError, match="between corners"):
        engine.generate("a", dial=0.5, mode="gates", max_new_tokens=4)
    table = ckpt.meta.metrics.heldout
    assert table["alpha"]["alpha"] < table["omega"]["alpha"] and table["omega"]["omega"] < table["alpha"]["omega"]


@pytest.mark.slow
def test_a_hundred_sources_train_and_sample(tmp_path):
    symbols = [chr(c) for c in range(0x100, 0x100 + 300)]
    paths = {}
    for i in range(100):
        p = tmp_path / f"s{i}.txt"
        p.write_text(synthetic_text("".join(symbols[3 * i:3 * i + 3]), 2_000, i))
        paths[f"s{i}"] = p
    recipe_path = write_recipe(tmp_path, sources=source_tables(**paths))
    recipe = load_recipe(str(recipe_path), ["model.width=corner", "model.n_embd=8", "model.n_head=2",
                                            "train.sources_per_batch=2", "train.steps=10", "train.eval_every=10"])
    train(recipe, tmp_path / "run", progress=False)
    engine = Engine(load_checkpoint(tmp_path / "run" / "last"))
    one = sum(p.numel() for p in GPT(corner_config(engine.model.config)).parameters())
    assert engine.model.corner_params() == one
    assert engine.model.num_params() == 100 * one  # no shared units: N corners, nothing that grows with N^2
    text = engine.generate("", dial="s7", max_new_tokens=20, seed=0, temperature=0.0)[0]
    assert text


def test_the_report_samples_edges_at_many_sources(tmp_path):
    """Past Settings.max_edges the report looks along a fixed random sample of edges (style curve, regret grid,
    near-corner points), says so, and still scores every source at every corner."""
    alphabets = ("abcd", "efgh", "ijkl", "mnop", "qrst", "uvwx")
    for i, a in enumerate(alphabets):
        (tmp_path / f"s{i}.txt").write_text(synthetic_text(a, 20_000, i))
    sources = source_tables(**{f"s{i}": tmp_path / f"s{i}.txt" for i in range(6)})
    recipe = load_recipe(str(write_recipe(tmp_path, sources=sources)), ["model.width=corner", "train.steps=10"])
    train(recipe, tmp_path / "run", progress=False)
    settings = dataclasses.replace(Settings.quick(samples=2), max_edges=3, new_tokens=8, prompt=" ")
    report, _ = build_report(tmp_path / "run", None, quick=True, settings=settings, progress=False)
    picked = [(e.source_from, e.source_to) for e in report.style.edges]
    assert len(picked) == 3 and picked == [(f"s{i}", f"s{j}") for i, j in edges(6, settings)]
    assert len([p for p in report.regret.positions if p.dial != "uniform"]) == 3 * (settings.edge_points - 2)
    assert all(len(row) == 6 for row in report.corners.table.values())  # the corner table is whole
    assert "3 of the simplex's 15 edges" in to_markdown(report)


def test_a_banks_corner_exports_as_a_gpt2_of_the_recipes_size(tmp_path):
    transformers = pytest.importorskip("transformers")
    recipe = load_recipe(str(write_recipe(tmp_path)), ["model.width=corner", "model.shared_fraction=0.5",
                                                       "train.steps=10"])
    train(recipe, tmp_path / "run", progress=False)
    export_gpt2(tmp_path / "run", "omega", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (hf.config.n_embd, hf.config.n_head) == (16, 2)  # the recipe's size, not N times it
    ckpt = load_checkpoint(tmp_path / "run" / "last")
    x = torch.randint(0, ckpt.tokenizer.vocab_size, (2, 16))
    ours, _ = ckpt.model.eval()(x, corner(1, 2), x)
    with torch.no_grad():
        theirs = hf(x).logits[..., :ours.size(-1)]
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_absent_sources_step_gives_plain_adamw(tmp_path):
    """train.absent_sources = "step": every source's parameters step each time (zero gradient when absent), so an
    absent source's weights decay; with "skip" (the default) they stay bit for bit."""
    own = {}
    for mode in ("skip", "step"):
        recipe = load_recipe(str(write_recipe(tmp_path)), [
            "model.width=corner", "train.steps=1", "train.warmup_steps=0", "train.sources_per_batch=1",
            f"train.absent_sources={mode}", "train.weight_decay=0.5"])
        train(recipe, tmp_path / mode, progress=False)
        ckpt = load_checkpoint(tmp_path / mode / "last")
        torch.manual_seed(0)  # train.seed: the initial weights
        init = build_model(ckpt.model.config)
        own[mode] = [[torch.equal(a, b) for a, b in zip(init.own[k].parameters(), ckpt.model.own[k].parameters())
                      if a.numel() and a.dim() >= 2] for k in range(2)]
    # one step, one source: under skip the other source is untouched; under step every matrix of it moved (weight
    # decay; a zero gradient leaves Adam's moments at 0, so vectors without decay stay)
    assert sorted(all(same) for same in own["skip"]) == [False, True]
    assert not any(any(same) for same in own["step"])


def test_shared_units_from_the_first_source_only():
    """model.shared_from = "first": the other sources read the shared units but never change them, so every source
    but the first is isolated from the others exactly (the anchor's knowledge is the one that is shared)."""
    m = bank(n=3, shared=0.5)
    m.config.shared_from = "first"
    x = torch.randint(0, 23, (4, 12))
    _, loss = m(x, corner(2, 3), x)
    loss.backward()
    assert all(p.grad is None for p in m.shared.parameters())
    _, loss = m(x, corner(0, 3), x)
    loss.backward()
    assert all(p.grad is not None for p in m.shared.parameters())
    with pytest.raises(AbcgptError, match="shared_from"):
        load_recipe("tiny", ["model.shared_from=first"])


def test_the_server_serves_a_bank(tmp_path):
    from fastapi.testclient import TestClient

    from abcgpt.serve import create_app

    recipe = load_recipe(str(write_recipe(tmp_path)), ["model.width=corner", "train.steps=5"])
    train(recipe, tmp_path / "run", progress=False)
    client = TestClient(create_app(tmp_path / "run", max_concurrent=1, max_new_tokens=50, max_prompt_chars=50))
    info = client.get("/api/info").json()
    assert info["model"]["width"] == "corner" and info["mode"] == "switch"
    ok = client.post("/api/generate", json={"prompt": "a", "dial": 0.5, "max_new_tokens": 5, "seed": 0})
    assert ok.status_code == 200, ok.text
    refused = client.post("/api/generate", json={"prompt": "a", "dial": 0.5, "mode": "gates", "max_new_tokens": 5})
    assert refused.status_code in (400, 422) and "between corners" in refused.text
