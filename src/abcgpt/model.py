"""The gated GPT: nanoGPT's GPT-2 decoder with the dial's gates (DESIGN.md §1).

Gated units, each with a frozen specialty (see dial.py):
- residual channels: one gate per channel on everything that writes to the residual stream
  (embedding sum, every attention and MLP output projection) and on the final LayerNorm's output;
- MLP hidden units, after the GELU;
- attention heads, on each head's output before the output projection;
- with gate_norms (the partition method's default), the blocks' LayerNorm outputs, per residual channel.
gates="none" builds an ordinary GPT-2: the baseline every comparison uses.
"""

import math
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from abcgpt.common import DECLARED, DIAL_KEY
from abcgpt.dial import apply_gate, method_for


@dataclass(config=DECLARED)
class GPTConfig:
    """The [model] table of a recipe: each key with its type, its range and its default, checked on creation."""
    vocab_size: int = Field(65, ge=1, le=2**24)  # set from the data
    n_sources: int = Field(2, ge=1, le=4096)  # set from the data
    block_size: int = Field(256, ge=1, le=2**17)
    n_layer: int = Field(6, ge=1, le=1024)
    n_head: int = Field(6, ge=1, le=1024)
    n_embd: int = Field(384, ge=1, le=2**16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False  # biases in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    # "abc": the dial's gates; "none": an ordinary GPT
    gates: Literal["abc", "none"] = Field("abc", json_schema_extra=DIAL_KEY)
    # "partition": one source (or all) per unit; "reference": DESIGN §1's Beta specialties
    method: Literal["partition", "reference"] = Field("partition", json_schema_extra=DIAL_KEY)
    # "soft": plain backward; "routed": each sequence's gradient masked by its source
    routing: Literal["soft", "routed"] = Field("routed", json_schema_extra=DIAL_KEY)
    narrowness: float = Field(1.0, gt=0.0, le=1e6, json_schema_extra=DIAL_KEY)
    # "cos2": the tent of DESIGN §1; "linear": 1 - distance
    gate_shape: Literal["cos2", "linear"] = Field("cos2", json_schema_extra=DIAL_KEY)
    specialty_seed: int = Field(1337, ge=0, le=2**63 - 1, json_schema_extra=DIAL_KEY)
    # reference: Beta/Dirichlet concentration; 0 means 1/n_sources
    specialty_concentration: float = Field(0.0, ge=0.0, le=1e6, json_schema_extra=DIAL_KEY)
    # partition: share of every group of units all sources share
    shared_fraction: float = Field(0.0, ge=0.0, lt=1.0, json_schema_extra=DIAL_KEY)
    # partition: shared units always on, or on in the "middle" and off at corners
    shared_gate: Literal["always", "middle"] = Field("always", json_schema_extra=DIAL_KEY)
    # gate the outputs of the blocks' LayerNorms too (DESIGN §1 does not)
    gate_norms: bool = Field(True, json_schema_extra=DIAL_KEY)
    # LayerNorm statistics: "full" over all n_embd channels, the silenced zeros included; "active" weighted by the
    # residual gates, so a corner is a standard narrow GPT-2 (docs/ablations.md measures both)
    norm: Literal["full", "active"] = Field("full", json_schema_extra=DIAL_KEY)
    # partition: n_embd, n_head (and 4 n_embd MLP units) size the "total" network, split among the sources, or one
    # "corner": each source its own network of that size (shared_fraction of it shared), parameters growing with N
    # (bank.py)
    width: Literal["total", "corner"] = Field("total", json_schema_extra=DIAL_KEY)
    # width = "corner": the shared units learn from every source ("all"), or from the first source's sequences only
    # ("first": a designated general source, FlexOlmo's public anchor; the others read them and never write them)
    shared_from: Literal["all", "first"] = Field("all", json_schema_extra=DIAL_KEY)


class KVCache:
    """Keys and values for incremental decoding, one preallocated (B, heads, max_len, head_dim) pair per key (a
    layer), allocated at its first insert with that layer's shape: a sub-network may keep a different number of
    heads in each layer. pos (the tokens already cached) is moved on by the decoding loop, once per step."""

    def __init__(self, max_len: int):
        self.max_len, self.pos = max_len, 0
        self.kv: dict = {}
        self.scopes: dict = {}

    def insert(self, key, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.kv:
            shape = (*k.shape[:2], self.max_len, k.size(3))
            self.kv[key] = (k.new_zeros(shape), v.new_zeros(shape))
        ck, cv = self.kv[key]
        t0, t1 = self.pos, self.pos + k.size(2)
        ck[:, :, t0:t1], cv[:, :, t0:t1] = k, v
        return ck[:, :, :t1], cv[:, :, :t1]

    def scoped(self, name) -> "KVCache":
        """The cache of one of several networks that decode side by side (rows of one batch), at this one's pos."""
        child = self.scopes.setdefault(name, KVCache(self.max_len))
        child.pos = self.pos
        return child


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, key, dropout_p: float
           ) -> torch.Tensor:
    """Causal attention of q (B, h, T, hd) over k, v and the cache's earlier tokens: (B, h, T, hd)."""
    T = q.size(2)
    if cache is not None:
        k, v = cache.insert(key, k, v)
    if k.size(2) == T:  # no earlier tokens: plain causal attention (flash kernels where available)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if T == 1:  # one new token (decoding) attends to every cached one: no mask
        if q.device.type == "cpu":  # three small ops beat the fused kernel's fixed cost here
            return torch.softmax((q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5, dim=-1) @ v
        return F.scaled_dot_product_attention(q, k, v)
    # new tokens attend to the whole cache and causally among themselves
    mask = torch.ones(T, k.size(2), dtype=torch.bool, device=q.device).tril(diagonal=k.size(2) - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, width: int,
               stat_gate: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of x (..., c) as the full model computes it over its `width` channels, of which x holds the c that
    are not exactly 0 (c < width in a sub-network: the zeros are put back, and weight and bias have `width`
    entries, the last width - c of them 0).
    stat_gate (model.norm = "active"): the mean and variance are weighted by the residual gates instead, so only
    the channels the dial leaves on count, each as much as its gate; at a corner that is a plain LayerNorm of the
    corner's channels, and the corner is a standard narrow GPT-2."""
    c = x.size(-1)
    if stat_gate is None and c == width:
        return F.layer_norm(x, (c,), weight, bias, eps)
    if stat_gate is None:  # (two ops, where computing the statistics by hand takes ten)
        return F.layer_norm(F.pad(x, (0, width - c)), (width,), weight, bias, eps)[..., :c]
    s = stat_gate / stat_gate.sum(-1, keepdim=True)
    xc = x - (x * s).sum(-1, keepdim=True)
    y = xc * torch.rsqrt((xc.square() * s).sum(-1, keepdim=True) + eps)
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, head_gate=None, head_route=None, cache: KVCache | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, cache, self.layer, self.dropout if self.training else 0.0)
        if head_gate is not None:  # (B, H) -> one gate per head's output
            y = apply_gate(y, head_gate[:, :, None, None],
                           None if head_route is None else head_route[:, :, None, None])
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, unit_gate=None, unit_route=None):
        h = self.gelu(self.c_fc(x))
        if unit_gate is not None:  # (B, 4C) -> one gate per hidden unit
            h = apply_gate(h, unit_gate[:, None, :], None if unit_route is None else unit_route[:, None, :])
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.gate_norms = config.gate_norms
        self.active_norm = config.norm == "active"

    def forward(self, x, gates, routes, cache=None):
        res, head, unit = gates
        res_r, head_r, unit_r = routes
        x = x + self._gate(self.attn(self._norm(self.ln_1, x, res, res_r), head, head_r, cache), res, res_r)
        x = x + self._gate(self.mlp(self._norm(self.ln_2, x, res, res_r), unit, unit_r), res, res_r)
        return x

    def _norm(self, ln, x, g, r):
        """LayerNorm, with gate_norms its output gated like the residual channels: a silenced channel is 0 in the
        residual stream, but LayerNorm would turn that 0 into -mean/std * gain, a constant that other units
        read; and (routed) the gain of a channel learns only as its mask allows."""
        y = norm(ln, x, g, self.active_norm)
        return self._gate(y, g, r) if self.gate_norms else y

    @staticmethod
    def _gate(x, g, r):
        if g is None:
            return x
        return apply_gate(x, g[:, None, :], None if r is None else r[:, None, :])


def norm(ln: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor | None, active: bool) -> torch.Tensor:
    """A LayerNorm module of the full-width model: statistics over all channels, or (active) weighted by the
    residual gates g (B, C)."""
    return layer_norm(x, ln.weight, ln.bias, x.size(-1), g[:, None, :] if active and g is not None else None)


class RoutedHead(torch.autograd.Function):
    """logits = x @ W.T, with W's gradient seeing the input through a mask (B, 1, C) (the method's routing), so
    a channel's column of the (tied) LM head learns only from the sequences its mask lets through; x gets its
    ordinary gradient. One matmul forward, two backward, as for a plain Linear."""

    @staticmethod
    def forward(ctx, x, weight, mask):
        ctx.save_for_backward(x, weight, mask)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype)  # dtypes may differ under autocast
        grad_w = grad.flatten(0, -2).T @ (x * mask).to(grad.dtype).flatten(0, -2)
        return grad_x, grad_w.to(weight.dtype), None


def build_model(config: GPTConfig) -> "GPT":
    """The model of a config: a GPT, or with width = "corner" a bank of corner networks (bank.py)."""
    if config.width == "corner" and config.gates == "abc":
        from abcgpt.bank import CornerBank  # (bank.py builds on this module)
        return CornerBank(config)
    return GPT(config)


class GPT(nn.Module):
    has_interior = True  # a network at every dial, between the corners too (gates mode)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.gates == "abc":
            # All specialties in one frozen buffer, one row per unit, in this order:
            # residual channels (C), then per layer its heads (H) and MLP units (4C).
            C, H, L = config.n_embd, config.n_head, config.n_layer
            self.group_sizes = [C] + [H, 4 * C] * L
            self.method = method_for(config)  # the dial's method (dial.py): specialties, gates, routed backward
            self.register_buffer("specialties", self.method.specialties(config, self.group_sizes))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def unit_gates(self, dial: torch.Tensor) -> torch.Tensor:
        """Gate of every unit (B, U) for dials (B, N) or one dial (N,): one small op per forward."""
        if dial.dim() == 1:
            dial = dial[None]
        return self.method.gates(dial.to(self.specialties), self.specialties)

    def network_at(self, dial: torch.Tensor, own_width: bool = True) -> "Sub":
        """The Sub of one dial (N,): the units it leaves on, gates folded in (SubNetwork runs it)."""
        return sub_network(self, self.unit_gates(dial)[0], own_width)

    def _split(self, g: torch.Tensor | None):
        """(B, U) -> residual gate and per layer (residual, head, unit) gates, as views."""
        if g is None:
            return None, [(None, None, None)] * self.config.n_layer
        parts = g.split(self.group_sizes, dim=1)
        return parts[0], [(parts[0], parts[1 + 2 * i], parts[2 + 2 * i]) for i in range(self.config.n_layer)]

    def forward(self, idx: torch.Tensor, dial: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                source: torch.Tensor | None = None, cache: KVCache | None = None, own_width: bool = True):
        """idx (B, T) tokens; dial (B, N) or (N,) (ignored when gates="none"); targets (B, T) for the loss;
        source (B,) sample sources, needed by the routed backward; cache for incremental decoding.

        With targets (training, evaluation), the rows whose dial silences units run through their sub-network at
        its own width (own_width=False: everything at full width, masked by the gates, as the method is written):
        the same losses and gradients, without the work the gates multiply by 0."""
        B, T = idx.size()
        t0 = cache.pos if cache is not None else 0
        assert t0 + T <= self.config.block_size, f"sequence of {t0 + T} exceeds block_size {self.config.block_size}"
        g = r = head = None
        if self.config.gates == "abc":
            if dial is None:
                raise ValueError("a gated model needs a dial")
            dial = dial.to(self.specialties)
            dial = dial if dial.dim() == 2 else dial[None]
            g = self.unit_gates(dial).expand(B, -1)  # one dial for every row: its gates computed once
            dial = dial.expand(B, -1)
            if self.config.routing == "routed" and source is not None and torch.is_grad_enabled():
                # the factor that takes the gate's place in the backward pass, and the LM head's weight mask
                r, head = self.method.routing(g, self.specialties, source)
            if targets is not None and cache is None and own_width:
                groups = self._width_groups(dial, source, g, r, head)
                if groups is not None:
                    return self._forward_by_width(idx, targets, g, r, head, groups)
        logits = self._forward_full(idx, g, r, head, cache, last_only=targets is None)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def _forward_full(self, idx, g, r, head, cache, last_only: bool) -> torch.Tensor:
        """The gated network at full width: every unit computed, each multiplied by its gate."""
        t0 = cache.pos if cache is not None else 0
        g_res, gates = self._split(g)
        r_res, routes = self._split(r)
        head_res, _ = self._split(head)
        pos = torch.arange(t0, t0 + idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        x = self.transformer.drop(Block._gate(x, g_res, r_res))
        for block, gl, rl in zip(self.transformer.h, gates, routes):
            x = block(x, gl, rl, cache)
        x = Block._gate(norm(self.transformer.ln_f, x, g_res, self.config.norm == "active"), g_res, r_res)
        if last_only:
            return self.lm_head(x[:, [-1], :])  # only the last position is needed to sample
        if head_res is None:
            return self.lm_head(x)
        # routed partition: the (tied) LM head's weights learn from a channel only as its mask allows
        return RoutedHead.apply(x, self.lm_head.weight, head_res[:, None, :])

    @torch.compiler.disable  # data-dependent (which rows, which units): torch.compile compiles around it
    def _width_groups(self, dial, source, g, r, head) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
        """The rows grouped by (dial, source): (rows, gates (U,)) for a group that can run at its own width, (rows,
        None) for the rest. None when no group can (then nothing changes). A group runs narrower exactly when its
        gates silence some unit and the backward asks nothing more of the silenced units than the plain gradient
        of x * g: its routing factor r equals g and its head mask is 1 on every channel left on (the partition
        method at a corner of the sample's own source; any method with soft routing)."""
        if not self.config.gate_norms or not bool((g == 0).any()):
            return None
        if isinstance(self.transformer.h[0].ln_1.weight, DTensor):  # FSDP: a block's weights are whole only
            return None                                                 # inside its own forward
        key = dial if source is None else torch.cat([dial, source[:, None].to(dial)], dim=1)
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        groups, narrow = [], False
        for j in range(uniq.size(0)):
            rows = (inverse == j).nonzero().flatten()
            b = rows[0]
            gj = g[b]
            exact = bool((gj == 0).any())
            if exact and r is not None:
                exact = bool((r[rows] == gj).all())
            if exact and head is not None:
                on = g[b, :self.config.n_embd] > 0
                exact = bool((head[rows][:, :self.config.n_embd][:, on] == 1).all())
            groups.append((rows, gj if exact else None))
            narrow |= exact
        return groups if narrow else None

    def _forward_by_width(self, idx, targets, g, r, head, groups):
        """Each group of rows at its own width (the rest together at full width); the loss over all tokens."""
        order, logits = [], []
        full = [rows for rows, gj in groups if gj is None]
        if full:
            rows = torch.cat(full)
            logits.append(self._forward_full(idx[rows], g[rows], None if r is None else r[rows],
                                             None if head is None else head[rows], None, last_only=False))
            order.append(rows)
        for rows, gj in groups:
            if gj is not None:
                sub = sub_network(self, gj)
                logits.append(run_sub_network(sub, idx[rows], None, self.training))
                order.append(rows)
        order, logits = torch.cat(order), torch.cat(logits)
        loss = F.cross_entropy(logits.flatten(0, 1), targets[order].reshape(-1))
        return logits[torch.argsort(order)], loss

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str):
        """AdamW; weight decay on matrices and embeddings (dim >= 2) only, not on biases and LayerNorms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


# ----------------------------------------------------------------------------- a dial's network at its own width
#
# Where a dial's gate is exactly 0, the unit adds nothing: a silenced residual channel is 0 in the residual stream
# and (with gate_norms) in every LayerNorm output, a silenced head or MLP unit reaches nothing. So the model at such
# a dial is a narrower GPT of the units left on, with their gates folded into the weights that read or write them.
# The one thing the narrow network cannot see is the zeros' share of a LayerNorm's statistics over all n_embd
# channels; layer_norm adds it back exactly (norm = "full"), or the statistics leave them out (norm = "active").


class Sub(NamedTuple):
    """The weights of a sub-network (named as the GPT's) and what its forward needs besides."""
    weights: dict[str, torch.Tensor]
    heads: list[int]  # heads kept in each layer
    width: int  # the channels LayerNorm statistics are taken over (the model's n_embd, or the kept ones)
    stat_gate: torch.Tensor | None  # norm = "active" with gates other than 1: the statistics' weights
    config: GPTConfig


def sub_network(model: GPT, gates: torch.Tensor, own_width: bool = True) -> Sub:
    """The network of `model` at one dial's gates (U,): only the units whose gate is not 0 (own_width=False: all
    of them, a full-width fold), each gate folded into the weights after it. Differentiable: built from the
    model's parameters inside a training step, gradients flow back to them."""
    cfg = model.config
    C, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    dtype = model.transformer.wte.weight.dtype
    g_res, layers = model._split(gates[None].to(dtype))

    def kept(g):
        return (g > 0).nonzero().flatten() if own_width else torch.arange(g.numel(), device=g.device)

    # without gated LayerNorms a silenced channel's LayerNorm output is not 0: keep every residual channel
    res = kept(g_res[0]) if cfg.gate_norms else torch.arange(C, device=gates.device)
    gr = g_res[0][res]
    tr = model.transformer
    w = {"transformer.wte.weight": tr.wte.weight.index_select(1, res) * gr,  # tied: also the LM head
         "transformer.wpe.weight": tr.wpe.weight.index_select(1, res) * gr}
    heads = []
    for i, (block, (_, gh, gu)) in enumerate(zip(tr.h, layers)):
        h, u = kept(gh[0]), kept(gu[0])
        dims = (h[:, None] * hd + torch.arange(hd, device=h.device)).flatten()
        qkv = torch.cat([dims, dims + C, dims + 2 * C])
        p = f"transformer.h.{i}."
        for name in ("ln_1", "ln_2"):
            ln = getattr(block, name)
            ln_gate = gr if cfg.gate_norms else 1.0
            w[p + name + ".weight"] = ln.weight[res] * ln_gate
            if ln.bias is not None:
                w[p + name + ".bias"] = ln.bias[res] * ln_gate
        attn, mlp = block.attn, block.mlp
        w[p + "attn.c_attn.weight"] = attn.c_attn.weight.index_select(0, qkv).index_select(1, res)
        w[p + "attn.c_proj.weight"] = (attn.c_proj.weight.index_select(0, res).index_select(1, dims)
                                       * gr[:, None] * gh[0][h].repeat_interleave(hd)[None, :])
        w[p + "mlp.c_fc.weight"] = mlp.c_fc.weight.index_select(0, u).index_select(1, res)
        w[p + "mlp.c_proj.weight"] = (mlp.c_proj.weight.index_select(0, res).index_select(1, u)
                                      * gr[:, None] * gu[0][u][None, :])
        if cfg.bias:
            w[p + "attn.c_attn.bias"] = attn.c_attn.bias[qkv]
            w[p + "attn.c_proj.bias"] = attn.c_proj.bias[res] * gr
            w[p + "mlp.c_fc.bias"] = mlp.c_fc.bias[u]
            w[p + "mlp.c_proj.bias"] = mlp.c_proj.bias[res] * gr
        heads.append(h.numel())
    w["transformer.ln_f.weight"] = tr.ln_f.weight[res]  # its output gate is in the tied weight
    if tr.ln_f.bias is not None:
        w["transformer.ln_f.bias"] = tr.ln_f.bias[res]
    width, stat_gate = C, None
    if cfg.norm == "active":
        if bool((gr == 1).all()):
            width = res.numel()  # a plain LayerNorm of the kept channels
        else:
            stat_gate = gr
    elif res.numel() < C:  # statistics over all C channels: layer_norm puts the zeros back, with zero weights
        for k in [k for k in w if ".ln_" in k]:
            w[k] = F.pad(w[k], (0, C - res.numel()))
    return Sub(w, heads, width, stat_gate, cfg)


def run_sub_network(sub: Sub, idx: torch.Tensor, cache: KVCache | None, training: bool, last_only: bool = False
                    ) -> torch.Tensor:
    """Logits (B, T, V) of a sub-network (the last position only: (B, 1, V))."""
    w, cfg = sub.weights, sub.config
    B, T = idx.shape
    hd, p_drop = cfg.n_embd // cfg.n_head, cfg.dropout if training else 0.0
    t0 = cache.pos if cache is not None else 0
    wte = w["transformer.wte.weight"]

    def ln(x, name):
        return layer_norm(x, w[name + ".weight"], w.get(name + ".bias"), sub.width, sub.stat_gate)

    def drop(x):
        return F.dropout(x, p_drop, training) if p_drop else x

    x = drop(F.embedding(idx, wte) + w["transformer.wpe.weight"][t0:t0 + T])
    for i, h in enumerate(sub.heads):
        p = f"transformer.h.{i}."
        y = F.linear(ln(x, p + "ln_1"), w[p + "attn.c_attn.weight"], w.get(p + "attn.c_attn.bias"))
        if h:  # (a layer may keep no head of a source: its attention then adds only c_proj's bias)
            q, k, v = y.view(B, T, 3, h, hd).permute(2, 0, 3, 1, 4)
            y = attend(q, k, v, cache, i, p_drop).transpose(1, 2).reshape(B, T, h * hd)
        x = x + drop(F.linear(y, w[p + "attn.c_proj.weight"], w.get(p + "attn.c_proj.bias")))
        y = F.gelu(F.linear(ln(x, p + "ln_2"), w[p + "mlp.c_fc.weight"], w.get(p + "mlp.c_fc.bias")))
        x = x + drop(F.linear(y, w[p + "mlp.c_proj.weight"], w.get(p + "mlp.c_proj.bias")))
    x = ln(x[:, [-1]] if last_only else x, "transformer.ln_f")
    return F.linear(x, wte)


class SubNetwork(nn.Module):
    """The gated model at one fixed dial as an ordinary network: the units the dial leaves on, at their own width
    (a corner of the partition method: 1/N of every group, plus the shared units), gates folded into the weights
    (own_width=False: every unit, the full-width fold). Computes what the gated model computes at that dial, for
    what an ungated GPT of its width costs; the engine generates with it and `abcgpt export` writes it."""

    def __init__(self, model: GPT, dial: torch.Tensor, own_width: bool = True):
        super().__init__()
        with torch.no_grad():
            self.sub = model.network_at(dial, own_width)
        self.config = model.config

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """GPT.forward without a dial: the dial is folded into the weights."""
        logits = run_sub_network(self.sub, idx, cache, self.training, last_only=targets is None)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1))

    @property
    def width(self) -> int:
        """Residual channels kept."""
        return self.sub.weights["transformer.wte.weight"].size(1)

    def num_params(self) -> int:
        return sum(t.numel() for t in self.sub.weights.values())
