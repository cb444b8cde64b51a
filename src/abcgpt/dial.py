"""The dial maths of DESIGN.md §1 (and its N-source form, §4), in one place.

Notation. N sources; a dial is a point of the simplex, a (..., N) tensor of weights that sum to 1.
With two sources the scalar dial a in [0, 1] is the point (1 - a, a): 0 is the first source, 1 the second.
Every gated unit has a frozen specialty m, also a point of the simplex; for two sources m = (1 - m1, m1)
with m1 ~ Beta(c, c), c = 0.5 by default.

    d(a, m)    = 0.5 * sum_k |a_k - m_k|              total-variation distance; = |a - m1| for N = 2
    span(m)    = (1 - min_k m_k) * narrowness          largest distance from m to a corner; = max(m1, 1 - m1)
    gate(a, m) = cos^2((pi / 2) * min(1, d / span))   1 at a = m, exactly 0 at (and past) the far end

Training draws a ~ Beta(c, c) (Dirichlet for N > 2), then the source ~ Categorical(a) (Bernoulli(a1) for two).

The partition method (this project's default; docs/ablations.md measures why) keeps the shape of the gate but
quantises the specialties: each unit belongs to exactly one source (m = e_k), or, for a reserved share of units,
to all of them (m = the centroid). The dial's weight on a unit's sources sets its gate:

    u(a, m)    = (sum_k a_k m_k) / max_k m_k               a_k for a unit of source k; 1 for a shared unit
    gate(a, m) = cos^2((pi / 2) * min(1, (1 - u) / narrowness))

gate_shape="linear" replaces cos^2((pi / 2) t) by 1 - t in either method. shared_gate="middle" puts the shared
units on a tent around the centroid instead (on in the middle of the dial, off at the corners).

Each method is one small object (Reference, Partition; method_for picks it from a model config, the one place
that does) that the model asks for its specialties, its gates and, when routing="routed", for the factor r that
takes the gate's place in the backward pass (apply_gate: value x * g, gradient to x r * grad) with the mask, if
any, of the tied LM head's weight gradient; the engine asks it for the default mode between corners.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch


def draw_specialties(n_units: int, n_sources: int, seed: int, concentration: float = 0.5) -> torch.Tensor:
    """(n_units, n_sources) frozen specialties. For two sources m1 ~ Beta(c, c) exactly as in DESIGN §1."""
    rng = np.random.default_rng(seed)
    if n_sources == 2:
        m1 = rng.beta(concentration, concentration, size=n_units)
        m = np.stack([1.0 - m1, m1], axis=1)
    else:
        m = rng.dirichlet([concentration] * n_sources, size=n_units)
    return torch.from_numpy(m).float()


def shared_units(size: int, shared_fraction: float) -> int:
    """How many units of a group of `size` every source shares (the partition method; bank.py's corners alike)."""
    return int(round(shared_fraction * size))


def fewest_own_units(size: int, n_sources: int, shared_fraction: float) -> int:
    """The fewest units of a group of `size` that one source owns: partition_specialties deals the units that are
    not shared round-robin, so each source gets this many or one more."""
    return (size - shared_units(size, shared_fraction)) // n_sources


def partition_specialties(group_sizes: list[int], n_sources: int, seed: int, shared_fraction: float = 0.0
                           ) -> torch.Tensor:
    """(sum(group_sizes), n_sources) quantised specialties: in every group (residual channels, one layer's heads,
    one layer's MLP units) round(shared_fraction * size) units are shared (the centroid) and the rest are split
    evenly among the sources (one-hot rows), at random places fixed by the seed."""
    rng = np.random.default_rng(seed)
    eye, rows = np.eye(n_sources), []
    for size in group_sizes:
        shared = shared_units(size, shared_fraction)
        owner = rng.permutation(n_sources)[np.arange(size - shared) % n_sources]  # the odd units to random sources
        m = np.concatenate([eye[owner], np.full((shared, n_sources), 1.0 / n_sources)])
        rows.append(m[rng.permutation(size)])
    return torch.from_numpy(np.concatenate(rows)).float()


def _shape(t: torch.Tensor, shape: str) -> torch.Tensor:
    """Gate from the clamped distance fraction t in [0, 1]: 1 at t = 0, exactly 0 at t = 1."""
    if shape == "linear":
        return 1.0 - t
    # cos(pi/2) is not exactly 0 in floating point; the far end must switch the unit off exactly
    return torch.where(t < 1.0, torch.cos(0.5 * math.pi * t) ** 2, torch.zeros_like(t))


def gate(dial: torch.Tensor, specialties: torch.Tensor, narrowness: float = 1.0, shape: str = "cos2") -> torch.Tensor:
    """Reference gate values (B, U) for dials (B, N) and specialties (U, N)."""
    d = 0.5 * (dial[:, None, :] - specialties[None, :, :]).abs().sum(-1)
    span = (1.0 - specialties.min(dim=-1).values) * narrowness
    return _shape((d / span).clamp(max=1.0), shape)


def partition_gate(dial: torch.Tensor, specialties: torch.Tensor, narrowness: float = 1.0, shape: str = "cos2",
                   shared: str = "always") -> torch.Tensor:
    """Partition gate values (B, U): the dial's weight u on each unit's sources, through the same tent.
    shared="middle" gates the units shared by all sources (m = the centroid) with the reference tent around
    the centroid instead: fully on at the even mix, exactly off at every corner, so corners stay pure."""
    u = dial @ owned_share(specialties).T
    g = _shape(((1.0 - u) / narrowness).clamp(0.0, 1.0), shape)
    g = torch.where(specialties.amax(dim=-1) > 0, g, 0.0)  # a retired unit is off at every dial, any narrowness
    if shared == "middle":
        n = specialties.size(-1)
        is_shared = specialties.min(dim=-1).values > 1.0 / n - 1e-6
        t = 0.5 * (dial - 1.0 / n).abs().sum(-1, keepdim=True) / (1.0 - 1.0 / n)
        t = torch.where(t > 1.0 - 1e-6, 1.0, t)  # a corner must be exactly off; 1/n rounds, so allow for it
        centre = _shape(t, shape)
        g = torch.where(is_shared, centre, g)
    return g


def owned_share(m: torch.Tensor) -> torch.Tensor:
    """m / max_k m_k: 1 for a unit's own source(s), else 0. A row of zeros is a retired unit, whose source
    `abcgpt forget` removed (sources_edit.py): it stays 0, owned by no source, never on and never trained."""
    top = m.max(dim=-1, keepdim=True).values
    return m / torch.where(top > 0, top, 1.0)


def apply_gate(x: torch.Tensor, g: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
    """x * g, with g broadcast over x. With a routing mask r (same shape as g), the value is still x * g
    but the gradient to x is r * grad: z - z.detach() is exactly 0 forward and carries r in backward."""
    y = x * g
    if r is None:
        return y
    z = x * r
    return y.detach() + (z - z.detach())


@dataclass(frozen=True)
class Reference:
    """DESIGN §1: specialties m ~ Beta(c, c) (Dirichlet for N > 2); the routed backward is straight-through, the
    gate g replaced by m_s, the unit's weight on the sample's source s (m1 for source 1, 1 - m1 for source 0):

        gates(a)            = gate(a, m)
        routing(g, s)       = (m_s, None)    the gradient through a gate is m_s * grad instead of g * grad; the LM
                                             head reads the final gate's output, so like every weight after a gate
                                             its gradient is the ordinary one (its input is g * LN(x)); m_s reaches
                                             the tied weight through the embedding, which is before the first gate
    Between corners the default mode is the network's own gates: this method trains its interior.
    """
    narrowness: float = 1.0
    shape: str = "cos2"
    default_mode: ClassVar[str] = "gates"

    @staticmethod
    def specialties(config, group_sizes: list[int]) -> torch.Tensor:
        # 1/N keeps DESIGN §1 (0.5) for two sources; for more it puts each unit near a few corners, so a single
        # source still lights up a fair share of units (0.5 leaves a corner a sliver at N = 16)
        concentration = config.specialty_concentration or 1.0 / config.n_sources
        return draw_specialties(sum(group_sizes), config.n_sources, config.specialty_seed, concentration)

    def gates(self, dial: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return gate(dial, m, self.narrowness, self.shape)

    def routing(self, gates: torch.Tensor, m: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, None]:
        return m[:, source].T, None


@dataclass(frozen=True)
class Partition:
    """Partition specialties (m = e_k, or the centroid for shared units); the routed backward is the true gradient
    cut to exactly 0 for sequences of other sources (a straight-through 1 on a unit whose gate is small overstates
    its effect by 1/g, and through the layers that wrecks training: docs/ablations.md, the routed rows):

        gates(a)            = partition_gate(a, m)
        mask(s)             = m_s / max_k m_k    1 for the unit's own source(s), else exactly 0
        routing(g, s)       = (g * mask(s), mask(s))    the true gradient, masked; the tied LM head's column of a
                                                 residual channel learns only from that channel's sources too (else
                                                 it leaks into the other corners)
    Its corners are separate sub-networks and its interior is never trained: between corners the default mode
    mixes the corners.
    """
    narrowness: float = 1.0
    shape: str = "cos2"
    shared: str = "always"
    default_mode: ClassVar[str] = "switch"

    @staticmethod
    def specialties(config, group_sizes: list[int]) -> torch.Tensor:
        return partition_specialties(group_sizes, config.n_sources, config.specialty_seed, config.shared_fraction)

    def gates(self, dial: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return partition_gate(dial, m, self.narrowness, self.shape, self.shared)

    def mask(self, m: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return owned_share(m)[:, source].T

    def routing(self, gates: torch.Tensor, m: torch.Tensor, source: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.mask(m, source)
        return gates * mask, mask


def method_for(config) -> Reference | Partition:
    """The method object of a model config (GPTConfig: method, narrowness, gate_shape, shared_gate). It holds the
    knobs only; the specialties it draws (specialties(config, group_sizes)) are the model's buffer, passed in to
    the rest (they move with the model)."""
    if config.method == "partition":
        return Partition(config.narrowness, config.gate_shape, config.shared_gate)
    return Reference(config.narrowness, config.gate_shape)


def sample_dials(
    rng: np.random.Generator, batch: int, n_sources: int, concentration: float, corner_fraction: float,
    per_batch: bool = False, weights: list[float] | None = None, sources_per_batch: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Training draw: dials (B, N) ~ Beta/Dirichlet(alpha), then sources (B,) ~ Categorical(dial).

    alpha_k = c * N * w_k / sum(w): equal source weights give Dirichlet(c, ..., c) (Beta(c, c) for two, the
    method of DESIGN §1); unequal weights shift the dial, and with it how often each source is drawn
    (E[dial_k] = w_k / sum(w)). With probability corner_fraction a draw is instead an exact corner e_k, k drawn
    in proportion to the weights. per_batch=True reproduces the reference: one dial and one source per step.
    sources_per_batch=K (every draw a corner): K sources drawn in proportion to the weights, and each sequence one of
    those K at random; each sequence's source is still distributed as the weights, and a batch holds at most K."""
    n = 1 if per_batch else batch
    w = np.ones(n_sources) if weights is None else np.asarray(weights, dtype=np.float64)
    if sources_per_batch:
        pool = rng.choice(n_sources, size=sources_per_batch, p=w / w.sum())
        sources = pool[rng.integers(0, sources_per_batch, size=batch)]
        return np.eye(n_sources, dtype=np.float32)[sources], sources.astype(np.int64)
    alpha = concentration * n_sources * w / w.sum()
    if n_sources == 2:
        a = rng.beta(alpha[1], alpha[0], size=n)
        dials = np.stack([1.0 - a, a], axis=1)
    else:
        dials = rng.dirichlet(alpha, size=n)
    if corner_fraction > 0:  # (no draw at 0, so runs without corners keep their random stream)
        at_corner = rng.random(size=n) < corner_fraction
        dials[at_corner] = np.eye(n_sources)[rng.choice(n_sources, size=int(at_corner.sum()), p=w / w.sum())]
    # inverse-CDF draw of the source, vectorised over the batch
    u = rng.random(size=(n, 1))
    sources = (dials.cumsum(axis=1) < u).sum(axis=1).clip(max=n_sources - 1)
    if per_batch:
        dials, sources = dials.repeat(batch, axis=0), sources.repeat(batch)
    return dials.astype(np.float32), sources.astype(np.int64)


def corner(k: int, n_sources: int) -> torch.Tensor:
    """The one-hot dial e_k: source k alone."""
    return torch.nn.functional.one_hot(torch.tensor(k), n_sources).float()


def uniform(n_sources: int) -> torch.Tensor:
    """The even mix of every source: the middle of the simplex."""
    return torch.full((n_sources,), 1.0 / n_sources)


def even(points: int) -> list[float]:
    """points evenly spaced positions in [0, 1], both ends included."""
    return np.linspace(0.0, 1.0, points).tolist()


def dial_path(n_sources: int, ts: list[float], start: int = 0, end: int | None = None) -> list[torch.Tensor]:
    """The dial at each t of ts on the edge of the simplex from source start's corner (t = 0) to source end's
    (t = 1; the last source's unless given). For two sources this is the dial a = t itself."""
    first, last = corner(start, n_sources), corner(n_sources - 1 if end is None else end, n_sources)
    return [(1 - float(t)) * first + float(t) * last for t in ts]


# ----------------------------------------------------------------------------- between the corners
#
# A dial's `mode` says what the network does between corners. At a corner every mode is that corner's network.
# K corners with log-softmax next-token distributions logp_k, combined with log-weights log_w (B, K):
#   mixture  the posterior mixture of the corners (Branch-Train-Merge's ensemble): sum_k w_k p_k with
#            w_k proportional to a_k * p_k(text so far). Its distribution over whole texts is sum_k a_k p_k(text),
#            so each sample is one corner's text, and the corner is drawn with probability a_k (given the prompt).
#   switch   a blend of turns: one corner writes each turn, a line or sentence of at least MIN_TURN_CHARS characters
#            (turn_ends). It scores text as the posterior mixture restarted from the dial at every turn's end (each
#            turn's corner drawn with the dial's odds); it generates by dealing the turns in the dial's shares: the
#            next turn goes to the corner furthest below its share after it (next_segment_source).
#   tokens   a fixed per-token mixture sum_k a_k p_k: every token from a fresh draw of the corner.
#   product  a product of experts (logit interpolation): p proportional to prod_k p_k ** a_k.
#   gates    the network's own gates at the dial (model.unit_gates), folded into one ordinary network (SubNetwork).

class Mode:
    """What one mode does, as the engine, the server and the memory estimate ask it: how its corners' next-token
    distributions combine (combine), how their weights follow the text (update), and what runs (the flags, which
    fix the batch's shape and so the cost). A mode is one subclass and its entry in MODE."""
    name: ClassVar[str]
    folds_gates: ClassVar[bool] = False  # the network's own gates at the dial: one ordinary network (gates)
    draws_corner: ClassVar[bool] = False  # each sample one corner's network, drawn from the posterior (mixture)
    posterior: ClassVar[bool] = False  # the corners' weights follow the text by Bayes' rule (mixture, switch)
    restarts: ClassVar[bool] = False  # ... restarted from the dial after each turn's end (switch)
    hands_over: ClassVar[bool] = False  # one corner writes each turn, dealt in the dial's shares (switch)
    whole_distributions: ClassVar[bool] = False  # combine needs the corners' whole next-token distributions, not
    # only their log-probs of the text (product renormalises): scoring runs each corner on the text itself

    def runs(self, samples: int, corners: int) -> tuple[int, int]:
        """(networks, rows) that generating `samples` samples at one dial between `corners` corners runs: every
        corner on a row of its own for each sample (switch, tokens, product); what it costs, for the server's limits
        and the memory estimate."""
        return corners, samples * corners

    def combine(self, logp: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
        """(B, ..., V) next-token log-probs from the corners' (B, K, ..., V) and their log-weights (B, K, 1...): the
        mixture sum_k w_k p_k."""
        return torch.logsumexp(log_w + logp, dim=1)

    def update(self, log_w: torch.Tensor, token_logp: torch.Tensor, log_a: torch.Tensor,
               boundary: torch.Tensor | None) -> torch.Tensor:
        """The log-weights (B, K) for the next token, given each corner's log-prob (B, K) of the token just seen:
        the dial's own, fixed."""
        return log_w


def bayes(log_w: torch.Tensor, token_logp: torch.Tensor) -> torch.Tensor:
    """The corners' log-weights (B, K) after a token each gave log-prob token_logp (B, K): Bayes' rule."""
    joint = log_w + token_logp
    return joint - torch.logsumexp(joint, dim=1, keepdim=True)


class Mixture(Mode):
    name, draws_corner, posterior = "mixture", True, True

    def runs(self, samples, corners):  # a corner drawn for each sample: at most one network per sample
        return min(samples, corners), samples

    def update(self, log_w, token_logp, log_a, boundary):
        return bayes(log_w, token_logp)


class Switch(Mode):
    name, posterior, restarts, hands_over = "switch", True, True, True

    def update(self, log_w, token_logp, log_a, boundary):
        log_w = bayes(log_w, token_logp)
        return log_w if boundary is None else torch.where(boundary[:, None], log_a, log_w)


class Tokens(Mode):
    name = "tokens"


class Product(Mode):
    name, whole_distributions = "product", True

    def combine(self, logp, log_w):  # prod_k p_k ** a_k, renormalised
        return torch.log_softmax((log_w.exp() * logp).sum(1), dim=-1)


class Gates(Mode):
    name, folds_gates = "gates", True

    def runs(self, samples, corners):  # the dial's own network, folded, at full width
        return 1, samples


MODE: dict[str, Mode] = {m.name: m for m in (Mixture(), Switch(), Tokens(), Product(), Gates())}
MODES = tuple(MODE)


def combine_next(logp: torch.Tensor, log_w: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, ..., V) next-token log-probs of the dial from the corners' (B, K, ..., V) log-probs and their log-weights
    (B, K), in a mode; `...` is any number of positions."""
    return MODE[mode].combine(logp, log_w.reshape(*log_w.shape, *[1] * (logp.dim() - log_w.dim())))


def update_weights(log_w: torch.Tensor, token_logp: torch.Tensor, mode: str, log_a: torch.Tensor,
                   boundary: torch.Tensor | None = None) -> torch.Tensor:
    """Log-weights (B, K) for the next token, given each corner's log-prob (B, K) of the token just seen:
    Bayes' rule for mixture and switch (switch restarts from the dial after a boundary token), the dial itself
    for tokens and product."""
    return MODE[mode].update(log_w, token_logp, log_a, boundary)


def combine_scores(token_logp: torch.Tensor, log_a: torch.Tensor, mode: str,
                   boundary: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) log-probs of a text under the dial (mixture, switch or tokens) from each corner's log-probs of its
    tokens (B, K, T), the dial's log-weights (B, K) and which tokens end a turn (B, T). For the
    mixture this telescopes to log sum_k a_k p_k(text): its regret at a source s is at most -log(a_s) per text."""
    log_w, out = log_a, []
    for t in range(token_logp.size(-1)):
        lp = token_logp[..., t]
        out.append(torch.logsumexp(log_w + lp, dim=1))
        log_w = update_weights(log_w, lp, mode, log_a, None if boundary is None else boundary[:, t])
    return torch.stack(out, dim=1)


# A line or sentence shorter than this (a heading, a speaker's name, a blank line) is no turn of its own: it stays
# with what follows it. Measured on `tiny` (docs/ablations.md): without it a speaker's name alone was a turn, and a
# story's sentence written after it read as the play's.
MIN_TURN_CHARS = 20


def turn_step(run: torch.Tensor, boundary: torch.Tensor, chars: torch.Tensor, min_chars: int = MIN_TURN_CHARS
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of switch's turns, for B texts: whether it ends its turn (B,) and the turn's length after it (B,),
    given the turn's length before it (run, characters since the start or the last turn's end), whether it is a
    boundary (a line or sentence end) and its characters. A boundary ends a turn once the turn holds min_chars."""
    run = run + chars
    end = boundary & (run >= min_chars)
    return end, torch.where(end, 0.0, run)


def turn_ends(boundary: torch.Tensor, chars: torch.Tensor, min_chars: int = MIN_TURN_CHARS) -> torch.Tensor:
    """(B, T) which tokens of B texts end a turn of switch (turn_step, token by token), from which are boundaries
    (B, T) and their characters (B, T)."""
    out, run = torch.zeros_like(boundary), torch.zeros(boundary.size(0), device=chars.device)
    for t in range(boundary.size(1)):
        out[:, t], run = turn_step(run, boundary[:, t], chars[:, t], min_chars)
    return out


def next_segment_source(dial: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """switch, when generating: the corner (B,) that writes the next turn is the one furthest below its share after
    it, dial_k * (total + 1) - turns_k (turns written by each corner, (B, K)), never a corner the dial leaves out.
    So a sample's turns follow the dial's shares, and a small share waits for its turn: counted before the next turn
    (dial_k * total), any corner with weight would take the second turn. Turns, not tokens, are what a reader (and
    the style classifier, line by line) counts: a corner with longer sentences does not write fewer of them."""
    deficit = dial * (turns.sum(dim=1, keepdim=True) + 1) - turns
    return deficit.masked_fill(dial == 0, float("-inf")).argmax(dim=1)


def systematic_draw(weights: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
    """(G, n) corner indices: n draws from each of G categorical distributions (G, K), by systematic sampling with
    offsets u (G,) ~ U[0, 1): the i-th draw is the inverse CDF at (i + u) / n. Together the n draws hold corner k
    n * w_k times (within one), so a batch of samples shows the dial's shares rather than a coin's luck; the draws
    come out sorted, so the caller shuffles them to make each one alone distributed as the weights."""
    points = (torch.arange(n, device=weights.device) + u[:, None]) / n
    points = points.clamp(max=1.0 - 1e-6)  # in float32 (n - 1 + u) / n can round to 1: past a zero last weight
    cdf = weights.cumsum(dim=1)
    idx = torch.searchsorted(cdf / cdf[:, -1:], points.contiguous(), right=True)  # right: never a zero weight
    return idx.clamp(max=weights.size(1) - 1)
