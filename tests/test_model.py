import pytest
import torch
import torch.nn.functional as F
from conftest import noisy

from abcgpt.dial import gate, partition_gate
from abcgpt.engine import generate_tokens
from abcgpt.model import GPT, GPTConfig, SubNetwork


def small(**kw) -> GPTConfig:
    base = dict(vocab_size=50, n_sources=2, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    return GPTConfig(**(base | kw))


def test_ungated_model_equals_hf_gpt2():
    """gates="none" is an ordinary GPT-2: same logits as transformers' GPT2LMHeadModel with the same weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = small(gates="none")
    ours = GPT(cfg).eval()
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu",
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, layer_norm_epsilon=1e-5)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    sd = ours.state_dict()
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    new = {}
    for k, v in hf.state_dict().items():
        if k.endswith("attn.bias") or k.endswith("attn.masked_bias"):
            new[k] = v
            continue
        src = sd[k]
        new[k] = src.t() if k.endswith(conv) else src  # HF's Conv1D stores weights transposed
    hf.load_state_dict(new)
    idx = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        ours_logits, _ = ours(idx, targets=idx)
        hf_logits = hf(idx).logits
    assert torch.allclose(ours_logits, hf_logits, atol=1e-5)


def test_gates_at_one_reduce_to_the_ungated_model(monkeypatch):
    """The gated forward differs from the plain one only by the gates: with every gate 1 they agree."""
    torch.manual_seed(0)
    gated = GPT(small(gates="abc")).eval()
    plain = GPT(small(gates="none")).eval()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "specialties"})
    idx = torch.randint(0, 50, (2, 10))
    monkeypatch.setattr(GPT, "unit_gates", lambda self, dial: torch.ones(1, self.specialties.size(0)))
    with torch.no_grad():
        assert torch.allclose(gated(idx, torch.tensor([0.5, 0.5]), idx)[0], plain(idx, None, idx)[0], atol=1e-6)


def test_gate_silences_units_switched_off():
    """A residual channel gated to 0 at the dial contributes nothing to the logits."""
    torch.manual_seed(0)
    model = GPT(small()).eval()
    C = model.config.n_embd
    dial = torch.tensor([1.0, 0.0])  # source 0's corner
    g = model.unit_gates(dial)[0]
    off = (g[:C] == 0).nonzero().flatten()
    assert off.numel() > 0  # with Beta(0.5, 0.5) about half of the channels are off at a corner
    idx = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        base = model(idx, dial, idx)[0]
        # perturb the LM-head rows' columns of dead channels: the output must not change
        model.lm_head.weight[:, off] += 10.0
        assert torch.allclose(model(idx, dial, idx)[0], base, atol=1e-5)


def test_dial_is_per_sequence():
    torch.manual_seed(0)
    model = GPT(small()).eval()
    idx = torch.randint(0, 50, (2, 10))
    dials = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    with torch.no_grad():
        both = model(idx, dials, idx)[0]
        first = model(idx[:1], dials[0], idx[:1])[0]
        second = model(idx[1:], dials[1], idx[1:])[0]
    assert torch.allclose(both[0], first[0], atol=1e-5)
    assert torch.allclose(both[1], second[0], atol=1e-5)
    assert not torch.allclose(first[0], model(idx[:1], dials[1], idx[:1])[0][0], atol=1e-3)


def test_routed_model_forward_equals_soft_and_masks_gradients():
    torch.manual_seed(0)
    soft = GPT(small(routing="soft"))
    routed = GPT(small(routing="routed"))
    routed.load_state_dict(soft.state_dict())
    idx = torch.randint(0, 50, (2, 10))
    dials = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    source = torch.tensor([0, 1])
    _, ls = soft(idx, dials, idx, source)
    _, lr = routed(idx, dials, idx, source)
    assert torch.equal(ls, lr)
    ls.backward()
    lr.backward()
    # the gradients differ (routing changes the backward pass) ...
    assert not torch.allclose(soft.transformer.h[0].mlp.c_fc.weight.grad, routed.transformer.h[0].mlp.c_fc.weight.grad)
    # ... and a source-0 batch cannot train a unit whose specialty is pure source 1 (m = 1)
    model = GPT(small(routing="routed"))
    with torch.no_grad():
        model.specialties[:] = torch.tensor([0.0, 1.0])  # every unit: m = 1
    _, loss = model(idx, torch.tensor([0.5, 0.5]), idx, torch.tensor([0, 0]))
    loss.backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad.abs().max() == 0
    assert model.transformer.wpe.weight.grad.abs().max() == 0


def test_specialties_are_frozen_buffers():
    model = GPT(small())
    assert "specialties" in dict(model.named_buffers())
    assert all("specialties" not in n for n, _ in model.named_parameters())
    n_units = 16 + 2 * (2 + 4 * 16)
    assert model.specialties.shape == (n_units, 2)
    assert torch.equal(GPT(small()).specialties, model.specialties)  # from the seed, not the torch RNG


@pytest.mark.parametrize("shape", ["cos2", "linear"])
@pytest.mark.parametrize("shared_gate", ["always", "middle"])
@pytest.mark.parametrize("method", ["partition", "reference"])
def test_unit_gates_match_dial_module(method, shared_gate, shape):
    """The model's gates are its method's formula with every knob of the config (partition_gate or gate), and
    not the other method's: on one-hot partition rows the two formulas agree, so shared units (whose gates differ,
    narrowness != 1 included) and a dial off the corners and the centroid are what make this test able to fail."""
    def gates_of(shared):
        model = GPT(small(method=method, narrowness=0.7, gate_shape=shape, shared_fraction=0.25, shared_gate=shared))
        return model.unit_gates(dial[0]), model.specialties

    dial = torch.tensor([[0.3, 0.7]])
    got, m = gates_of(shared_gate)
    formulas = {"partition": partition_gate(dial, m, 0.7, shape, shared_gate), "reference": gate(dial, m, 0.7, shape)}
    assert torch.equal(got, formulas[method])
    assert not torch.allclose(got, formulas[{"partition": "reference", "reference": "partition"}[method]])
    # shared_gate reaches the partition method's shared units (and means nothing to the reference)
    other, _ = gates_of({"always": "middle", "middle": "always"}[shared_gate])
    assert torch.equal(other, got) == (method == "reference")


@pytest.mark.parametrize("gates", ["abc", "none"])
def test_kv_cache_generation_equals_full_recompute(gates):
    torch.manual_seed(0)
    model = GPT(small(gates=gates)).eval()
    prompt = torch.randint(0, 50, (3, 5))
    dial = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.1, 0.9]]) if gates == "abc" else None
    # 60 new tokens run past block_size (32): exercises the cache rebuild too; greedy so both must agree
    # while the context fits, after which the cached path keeps 3/4 of the block instead of sliding by one
    cached = torch.stack(list(generate_tokens(model, prompt, dial, 27, temperature=0, use_cache=True)), 1)
    full = torch.stack(list(generate_tokens(model, prompt, dial, 27, temperature=0, use_cache=False)), 1)
    assert torch.equal(cached, full)
    long = list(generate_tokens(model, prompt, dial, 60, temperature=1.0, seed=0))
    assert len(long) == 60


@pytest.mark.parametrize("method", ["partition", "reference"])
@pytest.mark.parametrize("routing", ["soft", "routed"])
def test_full_width_training_forward_traces_as_one_graph(routing, method):
    """torch.compile can capture the gated forward at full width and the routed backward whole (no graph breaks),
    the method object (model.method, built in the forward) included."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(small(routing=routing, method=method))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx = torch.randint(0, 50, (2, 10))
    dials = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    _, loss = compiled(idx, dials, idx, torch.tensor([0, 1]), own_width=False)
    loss.backward()
    _, eager_loss = model(idx, dials, idx, torch.tensor([0, 1]))
    assert torch.allclose(loss, eager_loss)


def test_compiled_training_forward_at_own_width():
    """Under torch.compile the rows at a corner still run at their own width (the grouping runs eagerly, the
    rest is compiled around it), with the eager losses and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(small())
    compiled = torch.compile(model, backend="eager")
    idx = torch.randint(0, 50, (4, 10))
    source = torch.tensor([0, 1, 1, 0])
    dials = F.one_hot(source, 2).float()
    _, loss = compiled(idx, dials, idx, source)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, eager = model(idx, dials, idx, source, own_width=False)
    eager.backward()
    assert torch.allclose(loss, eager, atol=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("norm", ["full", "active"])
@pytest.mark.parametrize("bias", [False, True])
def test_sub_network_equals_gated_model_at_its_dial(bias, norm):
    """A fixed dial's SubNetwork (gates folded into the weights; at its own width where gates are 0, or at full
    width) has the gated model's logits, at corners and between them, and leaves the model untouched."""
    torch.manual_seed(0)
    model = noisy(GPT(small(bias=bias, norm=norm, shared_fraction=0.25))).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 50, (2, 12))
    C, shared = model.config.n_embd, round(0.25 * model.config.n_embd)
    for dial in (torch.tensor([1.0, 0.0]), torch.tensor([0.3, 0.7]), torch.tensor([0.0, 1.0])):
        corner = bool((dial == 1).any())
        for own_width in (True, False):
            net = SubNetwork(model, dial, own_width)
            assert net.width == ((C - shared) // 2 + shared if corner and own_width else C)
            with torch.no_grad():
                want, _ = model(idx, dial, idx, own_width=False)
                got, _ = net(idx, targets=idx)
                last, _ = net(idx)
            assert torch.allclose(got, want, atol=1e-5)
            assert torch.allclose(last[:, 0], want[:, -1], atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.transformer.wte.weight is model.lm_head.weight


@pytest.mark.parametrize("method, routing, gate_norms, isolated", [
    ("partition", "routed", True, True), ("partition", "soft", True, False), ("partition", "routed", False, False),
    ("reference", "routed", True, False)])
def test_partition_routing_isolates_a_corner(method, routing, gate_norms, isolated):
    """With partition specialties and the routed backward, a step on source-1 text (at any dials) changes
    nothing that source 0's corner computes; soft routing, ungated LayerNorm outputs (whose gains turn silenced
    channels into constants) or the reference's Beta specialties leak into it."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, n_sources=2, block_size=16, n_layer=2, n_head=4, n_embd=32, method=method,
                    routing=routing, gate_norms=gate_norms)
    model = GPT(cfg)
    probe = torch.randint(0, 32, (4, 16))
    before = model(probe, torch.tensor([1.0, 0.0]), probe)[0]
    x = torch.randint(0, 32, (8, 16))
    a = torch.rand(8, 1)
    _, loss = model(x, torch.cat([1 - a, a], dim=1), x, source=torch.ones(8, dtype=torch.long))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 10.0 * p.grad  # a huge step, so any leak shows
    after = model(probe, torch.tensor([1.0, 0.0]), probe)[0]
    assert torch.equal(before, after) == isolated
    assert not torch.equal(model(probe, torch.tensor([0.0, 1.0]))[0], before[:, [-1]])  # source 1 did learn


def test_routed_head_masks_only_the_weight_gradient():
    """RoutedHead: the value and the input's gradient of x @ W.T; W's gradient through the mask."""
    from abcgpt.model import RoutedHead

    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    mask = (torch.rand(3, 1, 8) > 0.5).float()
    g = torch.randn(3, 5, 11)
    y = RoutedHead.apply(x, w, mask)
    (y * g).sum().backward()
    assert torch.allclose(y, x @ w.T, atol=1e-6)
    assert torch.allclose(x.grad, g @ w, atol=1e-5)
    assert torch.allclose(w.grad, g.flatten(0, 1).T @ (x * mask).flatten(0, 1), atol=1e-5)
