import math
import re

import numpy as np
import pytest
import torch

from abcgpt.common import AbcgptError
from abcgpt.dial import (
    Partition,
    Reference,
    apply_gate,
    draw_specialties,
    gate,
    method_for,
    partition_gate,
    partition_specialties,
    sample_dials,
)
from abcgpt.dial_spec import parse_dial
from abcgpt.model import GPTConfig


def two(a: float) -> torch.Tensor:
    return torch.tensor([[1.0 - a, a]])


def spec(m: float) -> torch.Tensor:
    return torch.tensor([[1.0 - m, m]])


@pytest.mark.parametrize(
    "a, m, narrowness, expected",
    [
        # DESIGN §1 by hand: span = max(m, 1-m) * narrowness, gate = cos^2(pi/2 * min(1, |a-m|/span))
        (0.3, 0.3, 1.0, 1.0),  # at a = m the unit fires fully
        (0.0, 0.2, 1.0, math.cos(math.pi / 2 * 0.2 / 0.8) ** 2),  # 0.8535533...
        (1.0, 0.2, 1.0, 0.0),  # far end: |1 - 0.2| / 0.8 = 1
        (0.5, 0.9, 1.0, math.cos(math.pi / 2 * 0.4 / 0.9) ** 2),  # 0.5868240...
        (0.6, 0.5, 1.0, math.cos(math.pi / 2 * 0.1 / 0.5) ** 2),  # 0.9045085
        (0.5, 0.2, 0.5, math.cos(math.pi / 2 * 0.3 / 0.4) ** 2),  # narrower tent: span 0.4
        (0.8, 0.2, 0.5, 0.0),  # 0.6 / 0.4 > 1: off
    ],
)
def test_gate_matches_hand_computed_values(a, m, narrowness, expected):
    got = gate(two(a), spec(m), narrowness).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_hand_values_are_the_numbers_we_think():
    # pin a few to literal numbers, so a wrong formula on both sides cannot pass
    assert gate(two(0.0), spec(0.2)).item() == pytest.approx(0.853553, abs=1e-5)
    assert gate(two(0.5), spec(0.9)).item() == pytest.approx(0.586824, abs=1e-5)


def test_far_end_is_exactly_zero():
    m = torch.linspace(0, 1, 101)
    s = torch.stack([1 - m, m], 1)
    # units of the first half are off at a = 1, of the second half at a = 0; the edge m = 0.5 at both
    g1 = gate(two(1.0), s)[0]
    g0 = gate(two(0.0), s)[0]
    assert torch.all(g1[m <= 0.5] == 0.0)
    assert torch.all(g0[m >= 0.5] == 0.0)
    assert torch.all(g1[m > 0.5] > 0) and torch.all(g0[m < 0.5] > 0)


def test_gate_shapes_and_per_sequence_dials():
    s = draw_specialties(50, 2, seed=0)
    dials = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    g = gate(dials, s)
    assert g.shape == (3, 50)
    for i in range(3):
        assert torch.equal(g[i], gate(dials[i : i + 1], s)[0])


def test_specialties_are_beta_half_half_and_seeded():
    s = draw_specialties(20000, 2, seed=1)
    assert torch.equal(s, draw_specialties(20000, 2, seed=1))
    assert not torch.equal(s, draw_specialties(20000, 2, seed=2))
    m = s[:, 1].numpy()
    assert np.allclose(s.sum(1).numpy(), 1.0)
    # Beta(0.5, 0.5) is U-shaped: mean 1/2, variance 1/8, 29.5% of mass below 0.2 (arcsine law: 2/pi asin(sqrt x))
    assert m.mean() == pytest.approx(0.5, abs=0.01)
    assert m.var() == pytest.approx(0.125, abs=0.005)
    assert (m < 0.2).mean() == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.2)), abs=0.01)
    # exactly numpy's Beta draw from that seed
    assert np.allclose(m, np.random.default_rng(1).beta(0.5, 0.5, 20000), atol=1e-7)


def test_routed_gradient_equals_the_stated_mask():
    torch.manual_seed(0)
    s = draw_specialties(16, 2, seed=3)
    x = torch.randn(2, 16, requires_grad=True)
    dials = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    source = torch.tensor([0, 1])
    g = gate(dials, s)
    r, _ = Reference().routing(g, s, source)
    y = apply_gate(x, g, r)
    assert torch.equal(y, x * g)  # the forward pass is the smooth gate, bit for bit
    w = torch.randn(2, 16)
    (y * w).sum().backward()
    m = s[:, 1]
    # source 0 -> (1 - m), source 1 -> m, in place of the gate
    assert torch.allclose(x.grad[0], w[0] * (1 - m))
    assert torch.allclose(x.grad[1], w[1] * m)


def test_soft_gradient_is_the_gate():
    s = draw_specialties(16, 2, seed=3)
    x = torch.randn(1, 16, requires_grad=True)
    g = gate(two(0.4), s)
    apply_gate(x, g).sum().backward()
    assert torch.allclose(x.grad, g)


def test_sample_dials_follow_the_method():
    rng = np.random.default_rng(0)
    dials, sources = sample_dials(rng, 200000, 2, 0.5, 0.0)
    a = dials[:, 1]
    assert np.allclose(dials.sum(1), 1.0)
    assert a.mean() == pytest.approx(0.5, abs=0.01) and a.var() == pytest.approx(0.125, abs=0.003)
    # source ~ Bernoulli(a): P(source = 1 | a) = a, so E[a | source 1] = E[a^2] / E[a] = 3/4
    assert sources.mean() == pytest.approx(0.5, abs=0.01)
    assert a[sources == 1].mean() == pytest.approx(0.75, abs=0.01)
    assert a[sources == 0].mean() == pytest.approx(0.25, abs=0.01)


def test_sample_dials_per_batch_is_one_dial_one_source():
    rng = np.random.default_rng(0)
    for _ in range(20):
        dials, sources = sample_dials(rng, 8, 2, 0.5, 0.0, per_batch=True)
        assert (dials == dials[0]).all() and (sources == sources[0]).all()


def test_parse_dial():
    src = ["tinystories", "shakespeare"]
    assert parse_dial("0.25", src)[0].tolist() == [0.75, 0.25]
    assert parse_dial("shakespeare", src)[0].tolist() == [0.0, 1.0]
    assert parse_dial("uniform", src)[0].tolist() == [0.5, 0.5]
    d, note = parse_dial("shakespeare=0.3,tinystories=0.7", src)
    assert torch.allclose(d, torch.tensor([0.7, 0.3])) and note is None
    d, note = parse_dial("shakespeare=1,tinystories=3", src)
    assert torch.allclose(d, torch.tensor([0.75, 0.25])) and "normalised" in note


@pytest.mark.parametrize(
    "text, msg",
    [
        ("1.5", "outside [0, 1]"),
        ("-0.1", "outside [0, 1]"),
        ("nan", "outside [0, 1]"),
        ("poetry=1", "unknown source 'poetry'"),
        ("shakespeare=-1", ">= 0"),
        ("shakespeare=0,tinystories=0", "all weights zero"),
        ("shakespeare=x", "not a number"),
        ("bogus", "cannot read dial"),
    ],
)
def test_parse_dial_errors(text, msg):
    with pytest.raises(AbcgptError, match=re.escape(msg)):
        parse_dial(text, ["tinystories", "shakespeare"])


def test_numeric_dial_needs_two_sources():
    with pytest.raises(AbcgptError, match="needs two sources"):
        parse_dial("0.5", ["a", "b", "c"])


# ----------------------------------------------------------------------------- the partition method


def test_partition_specialties_split_every_group_evenly():
    m = partition_specialties([8, 4, 32], 2, seed=0, shared_fraction=0.25)
    assert m.shape == (44, 2)
    for lo, hi in ((0, 8), (8, 12), (12, 44)):
        g = m[lo:hi]
        shared = (g == 0.5).all(dim=1)
        assert int(shared.sum()) == round(0.25 * (hi - lo))
        owners = g[~shared].argmax(dim=1)
        assert (g[~shared].max(dim=1).values == 1.0).all()  # one-hot rows, nothing in between
        assert abs(int((owners == 0).sum()) - int((owners == 1).sum())) <= 1
    assert torch.equal(m, partition_specialties([8, 4, 32], 2, seed=0, shared_fraction=0.25))
    assert not torch.equal(m, partition_specialties([8, 4, 32], 2, seed=1, shared_fraction=0.25))


def test_partition_gate_by_hand():
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # a unit of source 0, of source 1, a shared one
    for a in (0.0, 0.3, 0.5, 1.0):
        g = partition_gate(two(a), m)[0]
        assert g[0].item() == pytest.approx(math.sin(math.pi / 2 * (1 - a)) ** 2, abs=1e-6)
        assert g[1].item() == pytest.approx(math.sin(math.pi / 2 * a) ** 2, abs=1e-6)
        assert g[2].item() == pytest.approx(1.0, abs=1e-6)
    assert partition_gate(two(0.0), m)[0, 1].item() == 0.0  # the other source's unit is exactly off
    assert partition_gate(two(0.3), m, shape="linear")[0].tolist() == pytest.approx([0.7, 0.3, 1.0], abs=1e-6)
    # narrowness 0.5: off once the dial's weight on the unit's source falls to 1/2
    assert partition_gate(two(0.5), m, narrowness=0.5)[0, :2].tolist() == [0.0, 0.0]
    # a unit shared by two of three sources fires fully at either corner and is off at the third
    m3 = torch.tensor([[0.5, 0.5, 0.0]])
    assert partition_gate(torch.eye(3), m3)[:, 0].tolist() == pytest.approx([1.0, 1.0, 0.0], abs=1e-6)


def test_partition_route_mask_is_exact():
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    source = torch.tensor([0, 1])
    part = Partition()
    assert part.mask(m, source).tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    g = torch.tensor([[0.9, 0.2, 1.0], [0.4, 0.7, 1.0]])
    r, head = part.routing(g, m, source)
    assert torch.equal(r, g * part.mask(m, source))  # the true gradient, masked
    assert torch.equal(head, part.mask(m, source))
    ref = Reference()  # the reference mask: m_s itself, in the gate's place; the LM head is not masked
    r, head = ref.routing(g, m, source)
    assert r.tolist() == [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]
    assert head is None


@pytest.mark.parametrize("method", ["reference", "partition"])
def test_method_for_takes_the_config_knobs(method):
    cfg = GPTConfig(method=method, narrowness=0.7, gate_shape="linear", shared_gate="middle", shared_fraction=0.25)
    obj = method_for(cfg)
    m = obj.specialties(cfg, [8, 2, 32])
    assert type(obj) is {"reference": Reference, "partition": Partition}[method]
    assert (obj.narrowness, obj.shape) == (0.7, "linear")
    dial = two(0.3)
    if method == "partition":
        assert obj.shared == "middle"
        assert torch.equal(obj.gates(dial, m), partition_gate(dial, m, 0.7, "linear", "middle"))
        assert torch.equal(m, partition_specialties([8, 2, 32], 2, cfg.specialty_seed, 0.25))
    else:
        assert torch.equal(obj.gates(dial, m), gate(dial, m, 0.7, "linear"))
        assert torch.equal(m, draw_specialties(42, 2, cfg.specialty_seed, 0.5))  # 1/N = 0.5: DESIGN §1's Beta


def test_corner_fraction_puts_draws_at_exact_corners():
    rng = np.random.default_rng(0)
    dials, sources = sample_dials(rng, 20000, 3, 0.5, corner_fraction=0.4, weights=[1.0, 1.0, 2.0])
    at_corner = dials.max(axis=1) == 1.0
    assert at_corner.mean() == pytest.approx(0.4, abs=0.02)
    assert (dials[at_corner].argmax(axis=1) == sources[at_corner]).all()  # a corner draws its own source
    assert np.bincount(sources[at_corner], minlength=3) / at_corner.sum() == pytest.approx([0.25, 0.25, 0.5],
                                                                                              abs=0.03)
    # 0 draws nothing extra: the stream of a run without corners is the plain Beta draw's
    dials, _ = sample_dials(np.random.default_rng(1), 64, 2, 0.5, corner_fraction=0.0)
    assert np.array_equal(dials[:, 1], np.random.default_rng(1).beta(0.5, 0.5, size=64).astype(np.float32))
    all_corners, _ = sample_dials(np.random.default_rng(2), 100, 2, 0.5, corner_fraction=1.0)
    assert (all_corners.max(axis=1) == 1.0).all()


def test_partition_middle_units_are_off_at_corners():
    m = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    g = partition_gate(torch.cat([torch.eye(3), torch.full((1, 3), 1 / 3)]), m, shared="middle")
    assert g[:3, 1].tolist() == [0.0, 0.0, 0.0]  # the shared unit is exactly off at every corner
    assert g[3, 1].item() == pytest.approx(1.0, abs=1e-6)  # and fully on at the even mix
    assert g[:, 0].tolist() == pytest.approx(partition_gate(torch.cat([torch.eye(3), torch.full((1, 3), 1 / 3)]),
                                                            m[:1])[:, 0].tolist())  # specialists unchanged
    half = partition_gate(torch.tensor([[2 / 3, 1 / 3, 0.0]]), m, shared="middle")[0, 1].item()
    assert half == pytest.approx(math.cos(math.pi / 2 * (1 / 3) / (2 / 3)) ** 2, abs=1e-6)  # TV 1/3 of span 2/3
