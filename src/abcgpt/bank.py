"""Each source its own corner-sized network: model.width = "corner" (the partition method at a per-source width).

With model.width = "total" the recipe's n_embd, n_head and 4 * n_embd MLP units are the whole network's, split
among the N sources: every source added makes every corner smaller. With width = "corner" they are one corner's.
Source k's network is an ordinary GPT of that size. In every group of its units (residual channels, each layer's
heads, each layer's MLP units) the first round(shared_fraction * size) are shared by every source, and the rest
are k's own. So a corner costs, per token, one GPT of the recipe's size whatever N is, while the parameters grow
with N: the shared block once, plus N sets of own units.

A weight of a corner network (say an MLP's c_fc: units x channels) splits into the block whose every axis is
shared (trained by every source: generality) and the rest, which reads or writes k's own units (individuality):

    W_k = [[W_ss,   W_so[k]],     W_ss    stored once
           [W_os[k], W_oo[k]]]    W_so[k] and the rows [W_os[k], W_oo[k]] stored once per source

This is the partition method (dial.py) at its corners, stored without the blocks that no corner reads (one source's
units reading another's channels): the network that model.width = "total" would build with n_embd = shared + N *
own, without its N^2 dead blocks. Training draws only corners. Between corners the engine mixes the corners
(mixture, switch, tokens, product); there is no gated network in between ("gates" is refused).

A source absent from a batch gets no gradient (its parameters' .grad stay None), so AdamW skips them: its moments
do not decay, no weight decay is applied, and its own step count (Adam's bias correction) counts only the steps
that trained it. A step costs what the sources in its batch cost, not N.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from abcgpt.common import AbcgptError
from abcgpt.dial import method_for, shared_units
from abcgpt.model import GPT, GPTConfig, KVCache, Sub, run_sub_network

# The unit group of each axis of a corner network's weights; None: an axis no source owns (vocabulary, positions,
# q/k/v). c_attn is viewed as (3, C, C): its q, k and v each have one row per head dimension.
AXES = (
    ("wte.weight", (None, "res")), ("wpe.weight", (None, "res")),
    ("ln_1.weight", ("res",)), ("ln_1.bias", ("res",)), ("ln_2.weight", ("res",)), ("ln_2.bias", ("res",)),
    ("ln_f.weight", ("res",)), ("ln_f.bias", ("res",)),
    ("attn.c_attn.weight", (None, "head", "res")), ("attn.c_attn.bias", (None, "head")),
    ("attn.c_proj.weight", ("res", "head")), ("attn.c_proj.bias", ("res",)),
    ("mlp.c_fc.weight", ("unit", "res")), ("mlp.c_fc.bias", ("unit",)),
    ("mlp.c_proj.weight", ("res", "unit")), ("mlp.c_proj.bias", ("res",)),
)


def corner_config(config: GPTConfig) -> GPTConfig:
    """The ungated GPT of one corner's size: what a corner computes, and the equal-compute baselines' model."""
    return GPTConfig(vocab_size=config.vocab_size, n_sources=config.n_sources, block_size=config.block_size,
                     n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout,
                     bias=config.bias, gates="none")


def shared_counts(config: GPTConfig) -> dict[str | None, int]:
    """How many leading units of each group of a corner are shared (the rest are the source's own)."""
    C, H, f = config.n_embd, config.n_head, config.shared_fraction
    return {"res": shared_units(C, f), "head": shared_units(H, f) * (C // H), "unit": shared_units(4 * C, f)}


def piece_view(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple]:
    """A corner weight's shape as the bank views it ((3, C, ...) for c_attn: q, k, v apart) and the unit group of
    each axis (None: not a unit axis)."""
    groups = next(axes for suffix, axes in AXES if name.endswith(suffix))
    return (shape if len(groups) == len(shape) else (3, shape[0] // 3, *shape[1:])), groups


class Piece:
    """How one corner weight is stored: its shape (as the bank views it) and the leading shared count of each axis.
    The shared block is w[:c0, :c1, ...]; the own pieces, one per axis i whose shared count is below its size, are
    w[:c0, ..., :c_{i-1}, c_i:, ...]: the L-shaped rest, disjoint, in axis order."""

    def __init__(self, name: str, shape: tuple[int, ...], counts: dict):
        self.view, groups = piece_view(name, shape)
        self.name, self.shape = name, shape
        self.counts = tuple(self.view[i] if g is None else counts[g] for i, g in enumerate(groups))

    def split(self, w: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        w, c = w.reshape(self.view), self.counts
        own = [w[tuple(slice(0, cj) for cj in c[:i]) + (slice(ci, None),)]
               for i, ci in enumerate(c) if ci < self.view[i]]
        return w[tuple(slice(0, ci) for ci in c)], own

    def join(self, shared: torch.Tensor, own: list[torch.Tensor]) -> torch.Tensor:
        x, pieces = shared, list(own)
        for i in reversed(range(len(self.view))):
            if self.counts[i] < self.view[i]:
                x = torch.cat([x, pieces.pop()], dim=i)
        return x.reshape(self.shape)


def _key(name: str) -> str:
    return name.replace(".", "_")


class CornerBank(nn.Module):
    """N corner networks of one size that share their shared units (see the module's docstring)."""

    has_interior = False  # a network at the corners only

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.gates != "abc" or config.method != "partition":
            raise AbcgptError('model.width = "corner" is the partition method\'s (model.method = "partition", '
                              'model.gates = "abc"): the reference method has no corners to size')
        self.config, self.method = config, method_for(config)
        counts = shared_counts(config)
        template = GPT(corner_config(config))  # one corner's shapes, names and initialisation
        self.pieces = [Piece(n, tuple(p.shape), counts) for n, p in template.named_parameters()]
        shared, _ = self._split(template)
        self.shared = nn.ParameterDict({k: nn.Parameter(v) for k, v in shared.items() if v.numel()})
        own = []
        for _ in range(config.n_sources):  # each source's own units start as a fresh GPT's would
            _, pieces = self._split(GPT(corner_config(config)))
            own.append(nn.ParameterDict({k: nn.Parameter(v) for k, v in pieces.items()}))
        self.own = nn.ModuleList(own)

    def _split(self, gpt: GPT) -> tuple[dict, dict]:
        params, shared, own = dict(gpt.named_parameters()), {}, {}
        for piece in self.pieces:
            s, o = piece.split(params[piece.name].detach())
            shared[_key(piece.name)] = s.clone()
            own |= {f"{_key(piece.name)}_{i}": t.clone() for i, t in enumerate(o)}
        return shared, own

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def corner_params(self) -> int:
        """Parameters of one corner's network: what a token costs, whatever N is."""
        return sum(torch.Size(piece.shape).numel() for piece in self.pieces)

    def corner_weights(self, k: int) -> dict[str, torch.Tensor]:
        """Source k's network as an ordinary GPT's weights (named as GPT's), built from the shared block and k's own
        pieces; differentiable."""
        own, w = self.own[k], {}
        learns = self.config.shared_from == "all" or k == 0  # shared_from = "first": only source 0 writes them
        for piece in self.pieces:
            key = _key(piece.name)
            shared = None
            if key in self.shared:
                shared = self.shared[key] if learns else self.shared[key].detach()
            pieces = [own[f"{key}_{i}"] for i in range(sum(c < v for c, v in zip(piece.counts, piece.view)))]
            if shared is None:  # no shared unit in this weight: an empty block of the right shape
                ref = pieces[0]
                shared = ref.new_empty(piece.counts)
            w[piece.name] = piece.join(shared, pieces)
        return w

    def corner(self, k: int) -> Sub:
        cfg = self.config
        return Sub(self.corner_weights(k), [cfg.n_head] * cfg.n_layer, cfg.n_embd, None, cfg)

    def corners_of(self, dial: torch.Tensor) -> torch.Tensor:
        """(B,) the corner of each row's dial (B, N); an error for a dial between corners."""
        dial = dial if dial.dim() == 2 else dial[None]
        at_corner = (dial == 1).sum(-1) == 1
        if not bool(at_corner.all()):
            d = dial[~at_corner][0]
            raise AbcgptError(f"dial {', '.join(f'{w:.3g}' for w in d.tolist())} lies between corners: with "
                              'model.width = "corner" each source has a network of its own and there is none in '
                              "between; choose a mode that mixes the corners (mixture, switch, tokens, product)")
        return dial.argmax(-1)

    def network_at(self, dial: torch.Tensor, own_width: bool = True) -> Sub:
        """The Sub of a corner's dial (N,) or (1, N) (a corner is always at its own width)."""
        return self.corner(int(self.corners_of(dial)[0]))

    def forward(self, idx: torch.Tensor, dial: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                source: torch.Tensor | None = None, cache: KVCache | None = None):
        """As GPT.forward, at corners only: each corner's rows run through that corner's network, the loss over all
        tokens. source is not needed (a corner's network is its source's)."""
        if dial is None:
            raise ValueError("a gated model needs a dial")
        ks = self.corners_of(dial.to(idx.device)).expand(idx.size(0))
        order, logits = [], []
        for k in torch.unique(ks).tolist():
            rows = (ks == k).nonzero().flatten()
            sub_cache = None if cache is None else cache.scoped(k)
            logits.append(run_sub_network(self.corner(k), idx[rows], sub_cache, self.training,
                                          last_only=targets is None))
            order.append(rows)
        order, logits = torch.cat(order), torch.cat(logits)
        logits = logits[torch.argsort(order)]
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1))

    def branch(self, optimizer: torch.optim.Optimizer) -> None:
        """Every source's own units, and their AdamW state, become copies of source 0's (train.branch_step: source
        0's network has trained on every source until now)."""
        with torch.no_grad():
            for own in self.own[1:]:
                for first, p in zip(self.own[0].parameters(), own.parameters()):
                    p.copy_(first)
                    optimizer.state[p] = {k: v.clone() for k, v in optimizer.state[first].items()}

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str,
                            own_decay_factor: float = 1.0):
        """AdamW, weight decay on the pieces of matrices and embeddings only (as GPT.configure_optimizer); the
        sources' own pieces at own_decay_factor times it (train.own_decay_factor), in a group of their own unless 1."""
        matrix = {_key(p.name) for p in self.pieces if len(p.shape) >= 2}
        shared = [p for k, p in self.shared.items() if k in matrix]
        own = [p for o in self.own for k, p in o.items() if k.rsplit("_", 1)[0] in matrix]
        ids = {id(p) for p in shared + own}
        rest = [p for p in self.parameters() if id(p) not in ids]
        decay = [{"params": shared + own, "weight_decay": weight_decay}] if own_decay_factor == 1.0 else [
            {"params": shared, "weight_decay": weight_decay},
            {"params": own, "weight_decay": weight_decay * own_decay_factor}]
        groups = decay + [{"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")
