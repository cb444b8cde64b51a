"""N sources: the dial over a simplex. Two sources stay exactly DESIGN §1; more separate after a short run."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import synthetic_text, write_recipe

from abcgpt.checkpoint import load_checkpoint
from abcgpt.config import load_recipe
from abcgpt.data import prepared_data
from abcgpt.dial import draw_specialties, gate, sample_dials
from abcgpt.heldout import loss_table
from abcgpt.report import Settings, build_report, write_report
from abcgpt.train import train

SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&*+-/<=>?@^_~"


def test_two_sources_are_exactly_design_section_1():
    """The simplex form with N = 2 is the published method: same specialties, gates and training draw."""
    m = draw_specialties(5000, 2, seed=7)[:, 1].double()
    assert torch.equal(m, torch.from_numpy(np.random.default_rng(7).beta(0.5, 0.5, 5000)).float().double())
    for a in np.linspace(0, 1, 11):
        scalar = torch.cos(math.pi / 2 * torch.clamp((a - m).abs() / torch.maximum(m, 1 - m), max=1)) ** 2
        scalar = torch.where((a - m).abs() >= torch.maximum(m, 1 - m), 0.0, scalar)
        spec = torch.stack([1 - m, m], 1).float()
        assert torch.allclose(gate(torch.tensor([[1 - a, a]]).float(), spec)[0].double(), scalar, atol=1e-6)
    rng, ref = np.random.default_rng(3), np.random.default_rng(3)
    dials, sources = sample_dials(rng, 1000, 2, 0.5, 0.0, weights=[1.0, 1.0])
    a = ref.beta(0.5, 0.5, 1000)
    u = ref.random((1000, 1))
    assert np.allclose(dials[:, 1], a) and np.array_equal(sources, (u[:, 0] > 1 - a).astype(np.int64))


def test_source_weights_set_how_often_each_source_is_drawn():
    rng = np.random.default_rng(0)
    _, sources = sample_dials(rng, 200_000, 3, 0.5, 0.0, weights=[1.0, 2.0, 5.0])
    assert np.bincount(sources) / sources.size == pytest.approx([1 / 8, 2 / 8, 5 / 8], abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 8, 16])
def test_short_training_separates_n_sources(tmp_path, n):
    """Sources over disjoint 4-letter alphabets: at every corner, that corner's source has the lowest loss."""
    tables = []
    for k in range(n):
        (tmp_path / f"s{k}.txt").write_text(synthetic_text(SYMBOLS[4 * k:4 * k + 4], 12_000, k))
        tables.append(f'[[data.sources]]\nname = "s{k}"\npath = "{tmp_path / f"s{k}.txt"}"\n')
    recipe = load_recipe(str(write_recipe(tmp_path, sources="\n".join(tables))),
                         ["train.steps=300", "train.eval_every=300", "model.n_embd=32", "model.n_head=16",
                          "train.batch_size=16"])
    train(recipe, tmp_path / "run", progress=False)
    model = load_checkpoint(tmp_path / "run" / "last").model
    table = loss_table(model, prepared_data(recipe, progress=False), 8, 2)
    names = [f"s{k}" for k in range(n)]
    for s in names:
        others = [table[s][t] for t in names if t != s]
        assert table[s][s] < min(others), (s, table[s])


@pytest.mark.slow
def test_report_for_three_sources(tmp_path):
    """The report works over a simplex: a 3 x 3 corner table, a style curve along each of the 3 edges."""
    tables = []
    for k in range(3):
        (tmp_path / f"s{k}.txt").write_text(synthetic_text(SYMBOLS[4 * k:4 * k + 4], 30_000, k))
        tables.append(f'[[data.sources]]\nname = "s{k}"\npath = "{tmp_path / f"s{k}.txt"}"\n')
    recipe = load_recipe(str(write_recipe(tmp_path, sources="\n".join(tables))), ["train.steps=150", "model.n_head=4"])
    train(recipe, tmp_path / "run", progress=False)
    settings = dataclasses.replace(Settings.quick(samples=6), prompt=" ")
    report, figures = build_report(tmp_path / "run", None, quick=True, settings=settings, progress=False)
    numbers = report.to_dict()  # as report.json holds them
    assert set(numbers["corners"]["table"]) == {"s0", "s1", "s2"}
    edges = numbers["style"]["edges"]
    assert [(e["source_from"], e["source_to"]) for e in edges] == [("s0", "s1"), ("s0", "s2"), ("s1", "s2")]
    for e in edges:  # along each edge the share of its far end rises from its start
        assert e["share_to"][0] < e["share_to"][-1]
    centroid = numbers["style"]["centroid"]  # three sources: samples at the uniform dial, on the corners' scale
    assert centroid["samples"] > 0 and centroid["coin_flip"] == pytest.approx(2 / 3)
    assert 0 <= centroid["morph_error"] <= 1 and sum(centroid["mean_position"]) == pytest.approx(1)
    assert numbers["style"]["calibration_error"] == pytest.approx(np.mean([e["calibration_error"] for e in edges]))
    assert figures["corners.png"].startswith(b"\x89PNG")
    write_report(report, figures, tmp_path / "report")
    assert "**s1 → s2**" in (tmp_path / "report" / "report.md").read_text()


def test_prepare_100_sources(tmp_path, capsys):
    """A recipe of 100 local sources prepares (in about a second; nothing in it grows faster than N): every source
    gets its shards and its line in the printout."""
    from abcgpt.cli import main
    from abcgpt.data import load_data

    names = [f"s{k:03d}" for k in range(100)]
    tables = []
    for k, name in enumerate(names):
        (tmp_path / f"{name}.txt").write_text(f"source {name}\n" + synthetic_text(SYMBOLS[k % 76:k % 76 + 4], 5_000, k))
        tables.append(f'[[data.sources]]\nname = "{name}"\npath = "{tmp_path / f"{name}.txt"}"\n')
    recipe = str(write_recipe(tmp_path, sources="\n".join(tables)))
    assert main(["prepare", "--config", recipe, "--set", "model.width=corner"]) == 0  # a corner each, or 100 heads
    out = capsys.readouterr().out
    assert [line.split(":")[0].strip() for line in out.splitlines()[:-1]] == names
    assert out.splitlines()[-1].startswith(f"prepared {tmp_path / 'data'}")
    data = load_data(tmp_path / "data")
    assert data.sources == names
    for name, tr, ho in zip(names, data.train, data.heldout):
        assert (tmp_path / "data" / f"{name}.train.bin").is_file() and tr.size > 4_000 and ho.size > 400
    assert main(["prepare", "--config", recipe, "--set", "model.width=corner"]) == 0  # it checks all 100 texts
    assert "up to date" in capsys.readouterr().out
