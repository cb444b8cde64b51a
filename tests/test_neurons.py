import json
import math

import numpy as np
import pytest
import torch

from abcgpt.data import PreparedData
from abcgpt.dial import corner, gate
from abcgpt.model import GPT, GPTConfig
from abcgpt.neurons import (
    UNIT_KINDS,
    band_response,
    firing_fractions,
    plot_neuron_view,
    specialty_histogram,
    unit_kinds,
)

TOKENS_PER_SOURCE = 4  # source k writes token ids 4k .. 4k+3 only


def small(n_sources=2, n_layer=2, n_head=2, n_embd=16, method="reference", **kw) -> GPT:
    """Most views here are checked against DESIGN's Beta specialties: the reference method by default."""
    kw.setdefault("gate_norms", method == "partition")  # the reference method does not gate LayerNorm outputs
    cfg = GPTConfig(method=method, vocab_size=TOKENS_PER_SOURCE * n_sources, n_sources=n_sources, block_size=8,
                    n_layer=n_layer, n_head=n_head, n_embd=n_embd, **kw)
    return GPT(cfg)


def two(a: float) -> torch.Tensor:
    return torch.tensor([1.0 - a, a])


def fake_data(tmp_path, n_sources: int) -> PreparedData:
    """Held-out text where each source uses its own tokens, so a unit can tell the sources apart."""
    from abcgpt.tokenizer import CharTokenizer

    rng = np.random.default_rng(0)
    names = ["alpha", "beta", "gamma", "delta"][:n_sources]
    held = [(TOKENS_PER_SOURCE * k + rng.integers(0, TOKENS_PER_SOURCE, 200)).astype(np.uint16)
            for k in range(n_sources)]
    chars = "abcdefghijklmnopqrstuvwx"[:TOKENS_PER_SOURCE * n_sources]
    return PreparedData(tmp_path, {"sources": [{"name": s} for s in names]}, CharTokenizer(chars), held, held)


def wire(model: GPT, lean: torch.Tensor) -> None:
    """Hand-set weights so that MLP unit u responds (large positive pre-activation) only to source lean[u].

    Source k's tokens embed as the one-hot channel k; positions, attention and MLP outputs write nothing, so
    every layer's MLP sees LayerNorm(gated one-hot k): channel k strongly positive, the others slightly
    negative. Unit u reads channel lean[u] only."""
    C = model.config.n_embd
    with torch.no_grad():
        for k in range(model.config.n_sources):
            model.transformer.wte.weight[TOKENS_PER_SOURCE * k:TOKENS_PER_SOURCE * (k + 1)] = \
                torch.nn.functional.one_hot(torch.tensor(k), C).float()
        model.transformer.wpe.weight.zero_()
        for i, block in enumerate(model.transformer.h):
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
            rows = lean[i * 4 * C:(i + 1) * 4 * C]
            block.mlp.c_fc.weight.copy_(2.0 * torch.nn.functional.one_hot(rows, C).float())


def test_unit_kinds_partition_rows_in_model_order():
    C, H, L = 16, 2, 3
    model = small(n_layer=L, n_head=H, n_embd=C)
    kinds = unit_kinds(model)
    assert tuple(kinds) == UNIT_KINDS
    assert [len(kinds[k]) for k in UNIT_KINDS] == [C, L * H, L * 4 * C]
    U = model.specialties.size(0)
    assert torch.equal(torch.cat(list(kinds.values())).sort().values, torch.arange(U))
    # order: C residual rows, then per layer H head rows and 4C MLP rows
    per_layer = H + 4 * C
    heads = torch.cat([C + i * per_layer + torch.arange(H) for i in range(L)])
    mlps = torch.cat([C + i * per_layer + H + torch.arange(4 * C) for i in range(L)])
    assert torch.equal(kinds["residual"], torch.arange(C))
    assert torch.equal(kinds["head"], heads)
    assert torch.equal(kinds["mlp"], mlps)


def test_ungated_model_is_refused():
    with pytest.raises(ValueError, match="ungated"):
        unit_kinds(small(gates="none"))


def test_specialty_histogram_two_sources_is_u_shaped():
    model = small(n_layer=1, n_embd=128)
    hist = specialty_histogram(model, bins=10)
    json.dumps(hist)
    assert hist["quantity"] == "m" and hist["bins"][0] == 0.0 and hist["bins"][-1] == 1.0
    m = model.specialties[:, 1].numpy()
    for kind, idx in unit_kinds(model).items():
        assert sum(hist["counts"][kind]) == len(idx)
        assert hist["counts"][kind] == np.histogram(m[idx.numpy()], bins=np.linspace(0, 1, 11))[0].tolist()
        assert hist["lean"][kind] == [int((m[idx] <= 0.5).sum()), int((m[idx] > 0.5).sum())]
    for kind in ("residual", "mlp"):  # Beta(0.5, 0.5): ~20% of units in each outer bin, ~6% in the middle ones
        c = hist["counts"][kind]
        assert c[0] + c[-1] > 2 * (c[4] + c[5])


def test_firing_fractions_two_sources():
    model = small(n_layer=1, n_embd=64)
    kinds = unit_kinds(model)
    spec = model.specialties.clone()
    m = spec[:, 1]
    dials = [two(0.0), two(0.5), two(1.0)]
    f = firing_fractions(model, dials)
    json.dumps(f)
    res = kinds["residual"]
    direct = (gate(two(0.0)[None], spec[res])[0] > 0.5).float().mean().item()
    assert f["fraction"]["residual"][0] == pytest.approx(direct)
    # by the formula, a unit is above 0.5 at a = 0 iff m < 1/3 and at a = 1 iff m > 2/3 (mirror images)
    for kind, idx in kinds.items():
        assert f["fraction"][kind][0] == pytest.approx((m[idx] < 1 / 3).float().mean().item())
        assert f["fraction"][kind][2] == pytest.approx((m[idx] > 2 / 3).float().mean().item())
    assert f["fraction"]["all"][2] == pytest.approx((m > 2 / 3).float().mean().item())
    # gates at the far end are exactly 0, so "> 0" counts exactly the units with m on the near side
    f0 = firing_fractions(model, dials, threshold=0.0)
    assert f0["fraction"]["all"][0] == pytest.approx((m < 0.5).float().mean().item())
    # mirrored specialties swap the corners exactly
    with torch.no_grad():
        model.specialties.copy_(spec.flip(1))
    g = firing_fractions(model, dials)
    for kind in f["fraction"]:
        assert g["fraction"][kind][0] == pytest.approx(f["fraction"][kind][2])
        assert g["mean_gate"][kind][2] == pytest.approx(f["mean_gate"][kind][0])
    for kind in ("residual", "mlp", "all"):  # not heads: two units only
        assert f["mean_gate"][kind][1] > max(f["mean_gate"][kind][0], f["mean_gate"][kind][2])


def test_partition_firing_at_corners_and_middle():
    """Partition specialties: at a corner exactly the units of that source (and the shared ones) fire, with gate
    1; at the even mix of three a specialist is at cos^2(pi/3) = 1/4, a shared unit at 1."""
    model = small(n_sources=3, n_layer=2, n_head=3, n_embd=24, method="partition", shared_fraction=0.25)
    spec = model.specialties
    shared = (spec.max(dim=1).values < 1.0)
    f = firing_fractions(model, [corner(k, 3) for k in range(3)], threshold=0.99)
    for k in range(3):
        assert f["fraction"]["all"][k] == pytest.approx(((spec[:, k] == 1.0) | shared).float().mean().item())
    g = model.unit_gates(torch.full((3,), 1 / 3))[0]
    assert torch.allclose(g[shared], torch.ones(int(shared.sum())), atol=1e-6)
    assert torch.allclose(g[~shared], torch.full((int((~shared).sum()),), math.cos(math.pi / 3) ** 2),
                          atol=1e-6)


def test_mean_gates_match_design_numbers():
    model = small(n_layer=4, n_embd=256)  # ~4,400 units
    f = firing_fractions(model, [two(0.0), two(1.0), two(0.5)])
    corner_mean = (f["mean_gate"]["all"][0] + f["mean_gate"]["all"][1]) / 2
    assert corner_mean == pytest.approx(0.38, abs=0.03)  # DESIGN §4, N = 2
    assert f["mean_gate"]["all"][2] == pytest.approx(0.68, abs=0.03)


def test_band_response_finds_hand_wired_specialists(tmp_path):
    model = small()
    mlp = unit_kinds(model)["mlp"]
    m = model.specialties[mlp, 1]
    wire(model, (m > 0.5).long())  # units with m > 0.5 read source 1's channel, the others source 0's
    model.train()
    data = fake_data(tmp_path, 2)
    r = band_response(model, data, batch_size=4, n_batches=2, bands=10)
    json.dumps(r)
    assert model.training  # mode restored
    assert all(not b.mlp.gelu._forward_hooks for b in model.transformer.h)  # hooks removed
    assert r["bands"][0] == "0.00-0.10" and r["bands"][-1] == "0.90-1.00" and len(r["bands"]) == 10
    assert r["units"] == np.histogram(m.numpy(), bins=np.linspace(0, 1, 11))[0].tolist()
    assert sum(r["units"]) == len(mlp) == 2 * 4 * 16
    assert r["tokens_per_source"] == 4 * 2 * 8
    assert set(r["response"]) == set(r["preference"]) == {"alpha", "beta"}
    for b in range(10):
        if r["units"][b] == 0:
            assert r["response"]["alpha"][b] is None and r["preference"]["beta"][b] is None
            continue
        own, other = ("beta", "alpha") if b >= 5 else ("alpha", "beta")
        # own source: every unit's pre-activation is 2 * LayerNorm(one-hot)_k = 2 * sqrt(C - 1) at every token
        assert r["response"][own][b] == pytest.approx(2 * 15**0.5, rel=0.01)
        # other source: small negative pre-activation, GELU slightly negative, |.| small but positive
        assert 0 < r["response"][other][b] < r["response"][own][b] / 20
        assert r["preference"][own][b] > 1.9  # ~2: nearly all of the band's response is to its own source
        assert r["preference"][own][b] + r["preference"][other][b] == pytest.approx(2.0)


def test_band_response_removes_hooks_on_error(tmp_path):
    model = small()
    data = fake_data(tmp_path, 2)
    data.heldout[1] = data.heldout[1][:5]  # shorter than one window: heldout_batches fails mid-way
    with pytest.raises(IndexError):
        band_response(model, data, batch_size=2, n_batches=1)
    assert all(not b.mlp.gelu._forward_hooks for b in model.transformer.h)
    assert model.training


def test_three_sources(tmp_path):
    model = small(n_sources=3)
    kinds = unit_kinds(model)
    spec = model.specialties
    hist = specialty_histogram(model, bins=8)
    json.dumps(hist)
    assert hist["quantity"] == "max_m" and hist["bins"][0] == pytest.approx(1 / 3)
    for kind, idx in kinds.items():
        assert sum(hist["counts"][kind]) == len(idx)
        assert hist["lean"][kind] == torch.bincount(spec[idx].argmax(1), minlength=3).tolist()
    dials = [corner(k, 3) for k in range(3)] + [torch.full((3,), 1 / 3)]
    f = firing_fractions(model, dials)
    assert len(f["fraction"]["mlp"]) == 4
    for kind in ("residual", "mlp", "all"):
        assert f["mean_gate"][kind][3] > max(f["mean_gate"][kind][:3])
    lean = spec[kinds["mlp"]].argmax(1)
    wire(model, lean)
    data = fake_data(tmp_path, 3)
    r = band_response(model, data, batch_size=2, n_batches=1)
    assert r["bands"] == data.sources and r["units"] == torch.bincount(lean, minlength=3).tolist()
    for b, own in enumerate(data.sources):
        others = [s for s in data.sources if s != own]
        assert all(r["response"][own][b] > 20 * r["response"][s][b] for s in others)
        assert r["preference"][own][b] > 2.5  # ~3 when only the own source gets a response
    plot_neuron_view(hist, f, r, ["alpha", "beta", "gamma", "uniform"], data.sources, tmp_path / "n3.png")
    assert (tmp_path / "n3.png").stat().st_size > 1000


def test_plot_neuron_view_writes_png(tmp_path):
    model = small()
    data = fake_data(tmp_path, 2)
    dials = [two(a) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    path = tmp_path / "neurons.png"
    plot_neuron_view(specialty_histogram(model), firing_fractions(model, dials),
                     band_response(model, data, batch_size=2, n_batches=1), ["0", ".25", ".5", ".75", "1"],
                     data.sources, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
