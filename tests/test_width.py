"""Each dial at its own width: the rows of a batch whose dial silences units run through their sub-network (only
the units left on, gates folded into the weights), and must compute exactly what the masked full-width network
computes: the same logits, loss and gradient of every parameter."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import noisy

import abcgpt.model as model_module
from abcgpt.dial import corner, sample_dials
from abcgpt.engine import RowGroups, generate_tokens
from abcgpt.model import GPT, GPTConfig, SubNetwork, layer_norm


def config(**kw) -> GPTConfig:
    base = dict(vocab_size=40, n_sources=2, block_size=16, n_layer=2, n_head=8, n_embd=48, bias=True,
                shared_fraction=0.25)
    return GPTConfig(**(base | kw))


def both_ways(model: GPT, idx, dials, source):
    """(logits, loss, gradients) at own width and at full width."""
    out = []
    for own_width in (True, False):
        model.zero_grad()
        logits, loss = model(idx, dials, idx, source, own_width=own_width)
        loss.backward()
        out.append((logits.detach(), loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    return out


class Spy:
    """Counts the sub-networks built in a forward (monkeypatched over model.sub_network)."""

    def __init__(self, monkeypatch):
        self.widths = []
        real = model_module.sub_network

        def spy(model, gates, own_width=True):
            sub = real(model, gates, own_width)
            self.widths.append(sub.weights["transformer.wte.weight"].size(1))
            return sub

        monkeypatch.setattr(model_module, "sub_network", spy)


@pytest.mark.parametrize("norm", ["full", "active"])
@pytest.mark.parametrize("n_sources", [2, 3, 8])
def test_own_width_training_equals_masked_full_width(n_sources, norm, monkeypatch):
    """The training distribution of the default (every row at its source's corner), plus rows between corners
    (which run at full width beside them): losses, logits and every parameter's gradient within 1e-5."""
    torch.manual_seed(0)
    model = noisy(GPT(config(n_sources=n_sources, norm=norm)))
    rng = np.random.default_rng(n_sources)
    d, s = sample_dials(rng, 24, n_sources, 0.5, 0.75)
    dials, source = torch.from_numpy(d), torch.from_numpy(s)
    idx = torch.randint(0, 40, (24, 16))
    spy = Spy(monkeypatch)
    (lo, lo_loss, lo_g), (full, full_loss, full_g) = both_ways(model, idx, dials, source)
    corners = {int(k) for k, row in zip(source, dials) if row.max() == 1}
    assert len(spy.widths) == len(corners) >= 2  # one sub-network per corner in the batch
    C, shared = 48, round(0.25 * 48)
    assert all(w == (C - shared) // n_sources + shared or w == (C - shared) // n_sources + shared + 1
               for w in spy.widths)
    assert (lo_loss - full_loss).abs() <= 1e-5
    assert (lo - full).abs().max() <= 1e-5
    for k in full_g:
        assert (lo_g[k] - full_g[k]).abs().max() <= 1e-5, k


@pytest.mark.parametrize("method, routing, narrowed", [
    ("partition", "routed", True), ("partition", "soft", True), ("reference", "soft", True),
    ("reference", "routed", False)])
def test_a_group_runs_narrower_only_where_the_backward_allows(method, routing, narrowed, monkeypatch):
    """At a corner, the reference's routed backward sends m_s * grad into units whose gate is 0: those rows must
    stay at full width. A partition row at a corner that is not its own source's (only a hand-made batch has one)
    has r = 0 on the corner's units, so it stays at full width too. Either way the result is the masked one."""
    torch.manual_seed(0)
    model = noisy(GPT(config(method=method, routing=routing, shared_fraction=0.0)))
    idx = torch.randint(0, 40, (6, 16))
    source = torch.tensor([0, 0, 1, 1, 1, 0])
    dials = F.one_hot(torch.tensor([0, 0, 1, 1, 0, 1]), 2).float()  # the last two: a corner not their source's
    spy = Spy(monkeypatch)
    (lo, lo_loss, lo_g), (full, full_loss, full_g) = both_ways(model, idx, dials, source)
    if method == "partition" and routing == "routed":
        assert len(spy.widths) == 2  # the two groups at their own source's corner
    else:
        assert len(spy.widths) == (4 if narrowed else 0)
    assert (lo_loss - full_loss).abs() <= 1e-5 and (lo - full).abs().max() <= 1e-5
    assert all((lo_g[k] - full_g[k]).abs().max() <= 1e-5 for k in full_g)


def test_without_gated_norms_training_stays_at_full_width(monkeypatch):
    """gate_norms = false: a silenced channel's LayerNorm output is a constant other units read, so no row can
    leave its channels out."""
    model = GPT(config(gate_norms=False))
    spy = Spy(monkeypatch)
    idx = torch.randint(0, 40, (4, 16))
    model(idx, F.one_hot(torch.tensor([0, 1, 0, 1]), 2).float(), idx, torch.tensor([0, 1, 0, 1]))
    assert spy.widths == []


def test_a_layer_with_no_head_of_a_source():
    """Eight sources on four heads: some corners keep no head in a layer; their attention adds only c_proj's
    bias there, as the gated model's does."""
    torch.manual_seed(0)
    model = noisy(GPT(config(n_sources=8, n_head=4, n_embd=32, shared_fraction=0.0))).eval()
    idx = torch.randint(0, 40, (2, 16))
    empty = 0
    for k in range(8):
        net = SubNetwork(model, corner(k, 8))
        empty += net.sub.heads.count(0)
        with torch.no_grad():
            want, _ = model(idx, corner(k, 8), idx, own_width=False)
            got, _ = net(idx, targets=idx)
        assert (got - want).abs().max() <= 1e-5
    assert empty > 0


@pytest.mark.parametrize("norm", ["full", "active"])
def test_sub_network_decodes_with_the_kv_cache_like_the_gated_model(norm):
    """Greedy decoding past block_size (the cache is rebuilt): a corner's sub-network writes the gated model's
    tokens; RowGroups (two corners side by side, each with its own cache) writes each row's own."""
    torch.manual_seed(0)
    model = noisy(GPT(config(norm=norm))).eval()
    prompt = torch.randint(0, 40, (4, 3))
    dials = F.one_hot(torch.tensor([0, 1, 1, 0]), 2).float()
    want = torch.stack(list(generate_tokens(model, prompt, dials, 30, temperature=0)), 1)
    rows = RowGroups([(torch.tensor([0, 3]), SubNetwork(model, corner(0, 2))),
                      (torch.tensor([1, 2]), SubNetwork(model, corner(1, 2)))], model.config)
    got = torch.stack(list(generate_tokens(rows, prompt, None, 30, temperature=0)), 1)
    assert torch.equal(got, want)
    one = torch.stack(list(generate_tokens(SubNetwork(model, corner(1, 2)), prompt, None, 30, temperature=0)), 1)
    assert torch.equal(one[1:3], want[1:3])


def test_active_norm_is_a_plain_layer_norm_of_the_channels_left_on():
    """norm = "active": the statistics weighted by the residual gates. Gates all 1: the ordinary LayerNorm; gates
    0 or 1: the ordinary LayerNorm of the channels left on, so a corner is a standard narrow GPT-2. norm = "full"
    in a sub-network: the statistics of all channels, the silenced zeros put back."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 12), torch.randn(12), torch.randn(12)
    on = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert torch.allclose(layer_norm(x, w, b, 12, torch.ones(12)), F.layer_norm(x, (12,), w, b), atol=1e-5)
    got = layer_norm(x * on, w, b, 12, on.float())[..., on]
    assert torch.allclose(got, F.layer_norm(x[..., on], (8,), w[on], b[on]), atol=1e-5)
    pad = torch.zeros(4)  # a sub-network of 8 channels, statistics over 12: weight and bias padded with zeros
    narrow = layer_norm(x[..., on], torch.cat([w[on], pad]), torch.cat([b[on], pad]), 12)
    assert torch.allclose(narrow, F.layer_norm(x * on, (12,), w, b)[..., on], atol=1e-5)

    model = noisy(GPT(config(norm="active")))
    net = SubNetwork(model, corner(0, 2))
    assert net.sub.stat_gate is None and net.sub.width == net.width < 48  # a plain LayerNorm at its own width
    assert SubNetwork(model, corner(0, 2), own_width=False).sub.stat_gate is not None  # zeros kept: weighted


def test_export_pads_uneven_layers_to_a_standard_gpt2():
    """A corner whose layers keep different numbers of heads and MLP units (here made by hand) is still a GPT-2:
    each layer is padded with silent heads and units. transformers computes the same logits."""
    transformers = pytest.importorskip("transformers")
    from abcgpt.export import gpt2_weights, not_standard

    torch.manual_seed(0)
    model = noisy(GPT(config(norm="active", n_head=4, n_embd=32, shared_fraction=0.0))).eval()
    m = model.specialties.clone()
    C, H = 32, 4
    heads0 = C  # layer 0's heads start after the residual channels
    first = int(m[heads0:heads0 + H, 0].argmax())
    m[heads0 + first] = torch.tensor([0.0, 1.0])  # layer 0: one head of source 0 goes to source 1
    units1 = C + (H + 4 * C) + H  # layer 1's MLP units
    m[units1:units1 + 16] = torch.tensor([0.0, 1.0])  # layer 1: some MLP units move too
    model.specialties.copy_(m)
    net = SubNetwork(model, corner(0, 2))
    assert net.sub.heads[0] < net.sub.heads[1] and not_standard(net) is None
    weights, n_head, n_inner = gpt2_weights(net)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=net.width, n_layer=2, n_head=n_head, n_inner=n_inner,
        activation_function="gelu", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, layer_norm_epsilon=1e-5)).eval()
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {k: (weights[k].t() if k.endswith(conv) else weights[k]) if k in weights else v
             for k, v in hf.state_dict().items()}
    hf.load_state_dict(state)
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        want, _ = model(idx, corner(0, 2), idx, own_width=False)
        got = hf(idx).logits
    assert (got - want).abs().max() <= 1e-4
