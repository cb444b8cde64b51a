"""The routed backward, checked parameter by parameter against a surrogate network written out by hand.

The surrogate is the gated GPT's forward pass spelled out with its own gate, a custom autograd function that
returns x * g and passes r * grad back to x (r: what the method's routed backward puts in the gate's place).
Autograd through it gives every parameter the gradient that rule implies, with no shortcut of the model's own
(apply_gate's detach trick, RoutedHead). The tied embedding / LM head weight W collects two terms:

    embedding, before the first residual gate:  dW[t, c] += sum over positions with token t of r_c * dL/dy_c
    LM head, reading the final gate's output:   dW[v, c] += sum over positions of dL/dlogit_v * g_c * LN(x)_c
                                                           (times mask_c for the partition method: head_mask)

DESIGN §1's straight-through rule replaces the gate by m_s on the gradient passing *through* a gate; the LM head
weight reads the final gate's output (it is after that gate, like c_proj after the MLP units' gates), so its
gradient keeps the forward input g * LN(x). Masking the head by m_s as well (g * m_s * LN(x): the partition
method's head mask with m_s in its place) fails the reference cases below.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from abcgpt.model import GPT, GPTConfig


class Gate(torch.autograd.Function):
    """x * g forward; r * grad backward (r = g: the ordinary gradient)."""

    @staticmethod
    def forward(ctx, x, g, r):
        ctx.save_for_backward(r)
        return x * g

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad * r, None, None


def surrogate_loss(model: GPT, idx, dial, source, routed: bool):
    """The model's loss, written out with Gate and the backward factors of DESIGN §1 / the partition method."""
    c, W = model.config, model.lm_head.weight
    B, T = idx.shape
    C, H = c.n_embd, c.n_head
    m = model.specialties
    g = model.unit_gates(dial).expand(B, -1)
    head_mask = None
    if not routed:
        r = g
    elif c.method == "reference":
        r = m[:, source].T  # m_s in the gate's place
    else:  # the true gradient, 0 for units of other sources; the head's columns likewise
        head_mask = (m > 0).float()[:, source].T
        r = g * head_mask
    gs, rs = g.split(model.group_sizes, 1), r.split(model.group_sizes, 1)

    def gate(x, k, shape):
        return Gate.apply(x, gs[k].reshape(shape), rs[k].reshape(shape))

    res = (B, 1, C)
    x = gate(F.embedding(idx, W) + model.transformer.wpe.weight[:T], 0, res)
    for i, blk in enumerate(model.transformer.h):
        h = gate(blk.ln_1(x), 0, res) if c.gate_norms else blk.ln_1(x)
        q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in blk.attn.c_attn(h).split(C, 2))
        y = gate(F.scaled_dot_product_attention(q, k, v, is_causal=True), 1 + 2 * i, (B, H, 1, 1))
        x = x + gate(blk.attn.c_proj(y.transpose(1, 2).reshape(B, T, C)), 0, res)
        h = gate(blk.ln_2(x), 0, res) if c.gate_norms else blk.ln_2(x)
        h = gate(F.gelu(blk.mlp.c_fc(h)), 2 + 2 * i, (B, 1, 4 * C))
        x = x + gate(blk.mlp.c_proj(h), 0, res)
    x = gate(model.transformer.ln_f(x), 0, res)
    if head_mask is None:
        logits = F.linear(x, W)
    else:  # same value; W sees x * mask, x sees W
        xm = x.detach() * head_mask[:, :C].reshape(res)
        logits = F.linear(x, W.detach()) + (F.linear(xm, W) - F.linear(xm, W.detach()))
    return F.cross_entropy(logits.flatten(0, 1), idx.flatten())


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("gate_norms", [False, True])
@pytest.mark.parametrize("method, routing", [
    ("reference", "routed"), ("partition", "routed"), ("reference", "soft"), ("partition", "soft")])
def test_every_gradient_is_the_surrogates(method, routing, gate_norms):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=13, n_sources=2, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=True,
                    method=method, routing=routing, gate_norms=gate_norms, shared_fraction=0.25)
    model = GPT(cfg)
    idx = torch.randint(0, 13, (2, 8))
    dial, source = torch.tensor([[0.35, 0.65], [0.8, 0.2]]), torch.tensor([0, 1])
    got = grads(model, model(idx, dial, idx, source)[1])
    want = grads(model, surrogate_loss(model, idx, dial, source, routing == "routed"))
    assert got.keys() == want.keys() and "transformer.wte.weight" in got  # W once: tied
    for name in got:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-6), name


def test_reference_head_is_not_masked_by_m_s():
    """The term the rule decides, on its own: rows of W whose tokens are not in the input get only the LM head's
    gradient, dL/dlogits^T (g * LN(x)). The routed reference backward differs from the soft one only in what
    flows back through gates, which the head is after, so those rows are the soft model's bit for bit."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=13, n_sources=2, block_size=8, n_layer=1, n_head=2, n_embd=8, method="reference")
    soft, routed = GPT(dataclasses.replace(cfg, routing="soft")), GPT(dataclasses.replace(cfg, routing="routed"))
    routed.load_state_dict(soft.state_dict())
    idx = torch.randint(0, 6, (2, 8))  # input tokens 0..5 only
    targets = torch.randint(0, 13, (2, 8))
    dial, source = torch.tensor([[0.35, 0.65], [0.8, 0.2]]), torch.tensor([0, 0])
    for model in (soft, routed):
        model(idx, dial, targets, source)[1].backward()
    assert torch.equal(routed.lm_head.weight.grad[6:], soft.lm_head.weight.grad[6:])
    assert not torch.equal(routed.lm_head.weight.grad[:6], soft.lm_head.weight.grad[:6])  # the embedding's share
