"""The gated GPT: nanoGPT's GPT-2 decoder with the dial's gates (DESIGN.md §1).

Gated units, each with a frozen specialty (see dial.py):
- residual channels: one gate per channel on everything that writes to the residual stream
  (embedding sum, every attention and MLP output projection) and on the final LayerNorm's output;
- MLP hidden units, after the GELU;
- attention heads, on each head's output before the output projection;
- with gate_norms (the partition method's default), the blocks' LayerNorm outputs, per residual channel.
gates="none" builds an ordinary GPT-2: the baseline every comparison uses.
"""

import dataclasses
import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch.nn import functional as F

from abcgpt.common import DECLARED, DIAL_KEY
from abcgpt.dial import apply_gate, method_for, specialties_for


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


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to max_len."""

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device, dtype):
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, batch, config.n_head, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t0, t1 = self.pos, self.pos + k.size(2)
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]


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
        if cache is not None:
            k, v = cache.insert(self.layer, k, v)
        if k.size(2) == T:  # no earlier tokens: plain causal attention (flash kernels where available)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        else:  # new tokens attend to the whole cache and causally among themselves
            past = k.size(2) - T
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
        return self._gate(ln(x), g, r) if self.gate_norms else ln(x)

    @staticmethod
    def _gate(x, g, r):
        if g is None:
            return x
        return apply_gate(x, g[:, None, :], None if r is None else r[:, None, :])


class RoutedHead(torch.autograd.Function):
    """logits = x @ W.T, with W's gradient seeing the input through a mask (B, 1, C) (the method's head_mask), so
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


class GPT(nn.Module):
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
            self.register_buffer("specialties", specialties_for(config, self.group_sizes))
            self.method = method_for(config)  # the dial's method (dial.py): the gates, and the routed backward

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

    def _split(self, g: torch.Tensor | None):
        """(B, U) -> residual gate and per layer (residual, head, unit) gates, as views."""
        if g is None:
            return None, [(None, None, None)] * self.config.n_layer
        parts = g.split(self.group_sizes, dim=1)
        return parts[0], [(parts[0], parts[1 + 2 * i], parts[2 + 2 * i]) for i in range(self.config.n_layer)]

    def forward(self, idx: torch.Tensor, dial: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                source: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx (B, T) tokens; dial (B, N) or (N,) (ignored when gates="none"); targets (B, T) for the loss;
        source (B,) sample sources, needed by the routed backward; cache for incremental decoding."""
        B, T = idx.size()
        t0 = cache.pos if cache is not None else 0
        assert t0 + T <= self.config.block_size, f"sequence of {t0 + T} exceeds block_size {self.config.block_size}"
        g = r = head = None
        if self.config.gates == "abc":
            if dial is None:
                raise ValueError("a gated model needs a dial")
            g = self.unit_gates(dial).expand(B, -1)
            if self.config.routing == "routed" and source is not None and torch.is_grad_enabled():
                # the factor that takes the gate's place in the backward pass, and the LM head's weight mask
                m = self.specialties
                r, head = self.method.backward_mask(g, m, source), self.method.head_mask(m, source)
        g_res, gates = self._split(g)
        r_res, routes = self._split(r)
        head_res, _ = self._split(head)
        pos = torch.arange(t0, t0 + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        x = self.transformer.drop(Block._gate(x, g_res, r_res))
        for block, gl, rl in zip(self.transformer.h, gates, routes):
            x = block(x, gl, rl, cache)
        if cache is not None:
            cache.pos += T
        x = Block._gate(self.transformer.ln_f(x), g_res, r_res)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # only the last position is needed to sample
        if head_res is None:
            logits = self.lm_head(x)
        else:  # routed partition: the (tied) LM head's weights learn from a channel only as its mask allows
            logits = RoutedHead.apply(x, self.lm_head.weight, head_res[:, None, :])
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def folded(self, dial: torch.Tensor) -> "GPT":
        """An ordinary GPT (gates="none") that computes exactly what this model computes at one fixed dial.

        Every gate multiplies a linear map's input or output, so it moves into the weights: the residual
        gate scales the embedding columns (which also scales the tied LM head, as the final-LayerNorm gate
        asks) and the rows of every output projection; head and MLP-unit gates scale the input columns of
        the projection after them. Generating from it costs what an ungated GPT costs."""
        if self.config.gates == "none":
            return self
        g_res, layers = self._split(self.unit_gates(dial))
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the caller's stream alone
            plain = GPT(dataclasses.replace(self.config, gates="none"))
        plain.load_state_dict({k: v for k, v in self.state_dict().items() if k != "specialties"})
        plain.to(self.transformer.wte.weight.device)
        g_res = g_res[0]
        plain.transformer.wte.weight.mul_(g_res)  # (V, C): tied with lm_head
        plain.transformer.wpe.weight.mul_(g_res)
        hd = self.config.n_embd // self.config.n_head
        for block, (_, g_head, g_unit) in zip(plain.transformer.h, layers):
            if self.config.gate_norms:  # the gated LayerNorm output is the input of c_attn and c_fc
                block.attn.c_attn.weight.mul_(g_res[None, :])
                block.mlp.c_fc.weight.mul_(g_res[None, :])
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.mul_(g_res[:, None])
                if proj.bias is not None:
                    proj.bias.mul_(g_res)
            block.attn.c_proj.weight.mul_(g_head[0].repeat_interleave(hd)[None, :])
            block.mlp.c_proj.weight.mul_(g_unit[0][None, :])
        return plain.eval()

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str):
        """AdamW; weight decay on matrices and embeddings (dim >= 2) only, not on biases and LayerNorms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")
