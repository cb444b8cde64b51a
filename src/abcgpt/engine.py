"""The inference engine: one object that every surface generates and scores through (`abcgpt sample`, the web
server, `abcgpt.load`, the dial report, `abcgpt export`), so the same prompt, dial, mode and seed give the same
text everywhere. It owns what a dial means (its mode, see dial.py), calibration, the empty-prompt default, when to
fold gates into weights, and the checks on sampling arguments.

    engine = Engine(load_checkpoint("runs/demo"))
    engine.generate("Once", dial=0.3, n=4, seed=0)           # 4 samples, about a quarter of them Shakespeare
    engine.generate("Once", dial=0.5, mode="switch")          # a blend: the source may change at each turn
    for piece in engine.stream("ROMEO:", dial=0.9): ...
    engine.loss("To be, or not to be", dial=1.0)

Cost. A fixed dial runs as one ordinary network, its SubNetwork (model.py): the units the dial leaves on, at
their own width, gates folded into the weights. A corner of the partition method is 1/N of every group of units
(plus the shared ones), so it costs well under an ungated GPT of the model's size; any dial in mode gates costs
about what that GPT costs. mixture draws each sample's corner from the posterior given the prompt (its
distribution over texts is exactly the token-by-token posterior mixture's) and then runs that corner alone: a
batch whose samples landed on different corners runs each corner's sub-network on its rows (RowGroups). switch,
tokens and product run every corner with weight > 0 at every step, each on its own width: N corners of 1/N of
the units each, the matrix work of about one full-width forward (small models pay each corner's per-op overhead:
README, Speed and scale).
"""

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
import torch.nn.functional as F

from abcgpt.checkpoint import Calibration, Checkpoint, Meta
from abcgpt.common import AbcgptError, CoreShare, check_integer
from abcgpt.dial import (
    MODE,
    MODES,
    combine_next,
    combine_scores,
    corner,
    next_segment_source,
    systematic_draw,
    turn_ends,
    turn_step,
    update_weights,
)
from abcgpt.dial_spec import DialSpec, parse_dial
from abcgpt.memory import generation_parts, require_memory
from abcgpt.model import GPT, KVCache, SubNetwork
from abcgpt.sampling import SAMPLING
from abcgpt.style import apply_calibration
from abcgpt.tokenizer import Tokenizer

BOUNDARY_CHARS = ".!?"  # a token ending in one of these (or holding a line break) ends a sentence for `switch`
MAX_ROWS = 1024  # sequences in one call (dial positions x n): each holds a KV cache of its own
MAX_NEW_TOKENS = 100_000
GREEDY_BELOW = 1e-4  # a temperature below this is greedy: dividing the logits by less overflows
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; JSON clients and numpy agree on int64
ATTRIBUTION_MODES = tuple(m for m in MODES if MODE[m].posterior)  # corner weights that are a posterior over sources
SCORE_ELEMENTS = 2**24  # windows x tokens x vocabulary scored in one forward when attributing (64 MB of logits)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, gumbel: torch.Tensor | None
                ) -> torch.Tensor:
    """(B, V) logits or log-probs -> (B,) token ids, by the Gumbel-max trick: argmax(logits / T + g) with g (B, V)
    standard Gumbel noise is a draw from softmax(logits / T). Rows given the same g pick the same token wherever
    their distributions nearly agree (CommonNoise). A temperature below 1e-4 means greedy (dividing by less
    overflows)."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return (logits.float() + gumbel).argmax(dim=-1)


class CommonNoise:
    """The random numbers of one generation call, drawn per sample (a row's place among the n samples of its dial
    position), never per row or per dial: with one seed, every dial position gets the same ones (common random
    numbers). So a sweep's text changes only where the dial changes what the corners predict: a mode that draws
    one corner per sample switches voice once along the dial, and a blend changes gradually. The draws come in a
    fixed order whatever the mode and the dial: the corner offset u, the order of the n samples, then Gumbel noise
    for each new token."""

    def __init__(self, gen: torch.Generator, n: int, temperature: float):
        self.gen, self.n, self.greedy = gen, n, temperature < GREEDY_BELOW
        self.u = torch.rand(1, generator=gen, device=gen.device)  # a corner is the dial's inverse CDF at u
        self.order = torch.randperm(n, generator=gen, device=gen.device)  # which of the n draws each sample gets

    def gumbel(self, rows: int, vocab: int) -> torch.Tensor | None:
        """(rows, vocab) Gumbel noise for the next token; row r is sample r % n of its position. None when greedy:
        argmax needs none."""
        if self.greedy:
            return None
        u = torch.rand(self.n, vocab, generator=self.gen, device=self.gen.device).clamp_(min=1e-20)
        return (-torch.log(-torch.log(u))).repeat(rows // self.n, 1)


def _attribution_mode(mode: object) -> str:
    """mode, checked: mixture (also for None) or switch, the modes whose corner weights are a posterior."""
    if mode is None:
        return "mixture"
    if not isinstance(mode, str) or mode not in ATTRIBUTION_MODES:
        raise AbcgptError(f"attribution is the posterior of mode mixture or switch, got mode {mode!r} "
                          "(tokens, product and gates weight the corners by the dial alone)")
    return mode


class RowGroups(torch.nn.Module):
    """Several networks side by side in one batch: the rows `rows` of every (rows, network) pair run that network,
    with a KV cache of its own. Each corner of a batch that mixes corners runs at its own width."""

    def __init__(self, groups: list[tuple[torch.Tensor, torch.nn.Module]], config):
        super().__init__()
        self.groups, self.config = groups, config

    def forward(self, idx: torch.Tensor, targets=None, cache: KVCache | None = None):
        out = None
        for i, (rows, net) in enumerate(self.groups):
            logits, _ = net(idx[rows], cache=None if cache is None else cache.scoped(i))
            if out is None:
                out = logits.new_empty(idx.size(0), *logits.shape[1:])
            out[rows] = logits
        return out, None


@torch.no_grad()
def decode(model: GPT, ids: torch.Tensor, dials: torch.Tensor | None, max_new_tokens: int,
           step: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], use_cache: bool = True
           ) -> Iterator[torch.Tensor]:
    """The decoding loop: model rows ids (R, T0) with dials (R, N) or None; step maps the last logits (R, V) to
    (what to yield, the (R,) tokens to feed back). With the cache each step feeds one token; when the context
    reaches block_size the cache is rebuilt from the last 3/4 of it (learned positions cannot slide). Without it,
    every step re-runs the whole (cropped) context, as nanoGPT does. ids and dials are on the model's device."""
    model.eval()
    block, idx = model.config.block_size, ids
    dial = () if dials is None else (dials,)  # a gated GPT takes its dial; a sub-network has it folded in
    cache, feed = None, idx
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block:], *dial)
        else:
            if cache is None or cache.pos + feed.size(1) > block:
                feed = idx[:, -(3 * block // 4):] if cache is not None else idx[:, -block:]
                cache = KVCache(block)
            logits, _ = model(feed, *dial, cache=cache)
            cache.pos += feed.size(1)
        out, nxt = step(logits[:, -1, :].float())
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        feed = nxt[:, None]
        yield out


def generate_tokens(model: GPT, prompt: torch.Tensor, dial: torch.Tensor | None, max_new_tokens: int,
                    temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                    use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Plain sampling from one network (a bare GPT, gated with dials (B, N) or (N,), or not): (B,) tokens per step.
    The Engine does this for gates mode and the corners; tests and benchmarks call it on bare models."""
    gen = torch.Generator(device=prompt.device)
    gen.manual_seed(seed) if seed is not None else gen.seed()
    return decode(model, prompt, None if dial is None else dial.to(prompt.device), max_new_tokens,
                  plain_step(temperature, top_k, CommonNoise(gen, prompt.size(0), temperature)), use_cache)


def _target_logprobs(model: GPT, x: torch.Tensor, y: torch.Tensor, dial: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) log-probs a network gives the targets y after x."""
    logits, _ = model(x, targets=y) if dial is None else model(x, dial, targets=y)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, y[..., None]).squeeze(-1)


def plain_step(temperature: float, top_k: int | None, noise: CommonNoise):
    """decode's step for one network: sample each row's next token and feed it back."""
    def step(logits):
        t = sample_next(logits, temperature, top_k, noise.gumbel(*logits.shape))
        return t, t

    return step


def stream_text(tokenizer: Tokenizer, tokens: Iterator[torch.Tensor]) -> Iterator[str]:
    """Text pieces of a single sequence as its tokens arrive. Byte-level BPE can end a token mid-character, so a
    piece is only released once it decodes cleanly."""
    ids, shown = [], 0
    for t in tokens:
        ids.append(int(t[0]))
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd") and len(text) > shown:
            yield text[shown:]
            shown = len(text)
    text = tokenizer.decode(ids)
    if len(text) > shown:
        yield text[shown:]


def log_weights_path(token_logp: torch.Tensor, log_a: torch.Tensor, mode: str,
                     boundary: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, K) log-weights of the corners after each token: dial.update_weights applied token by token to each
    corner's log-probs (B, K, T) of the tokens, from the dial's log-weights log_a (B, K). In mixture and switch
    these are the posterior over sources that generation combines the corners with."""
    log_w, out = log_a, []
    for t in range(token_logp.size(-1)):
        log_w = update_weights(log_w, token_logp[..., t], mode, log_a, None if boundary is None else boundary[:, t])
        out.append(log_w)
    return torch.stack(out, dim=1)


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text; joined, the decoded text. Byte-level BPE can split a character over tokens: the
    character goes to the token that completes it, the tokens before it get "" (a character is at most 4 bytes)."""
    pieces, start = [], 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[start:i + 1])
        if text.endswith("\ufffd") and i + 1 - start < 4 and i + 1 < len(ids):
            pieces.append("")
            continue
        pieces.append(text)
        start = i + 1
    return pieces


@dataclass
class Attribution:
    """Which source a text leans on, token by token: the posterior over sources that the mixture computes
    (w_k proportional to a_k * p_k(text so far), the dial a as the prior; switch restarts it from the dial after
    each turn's end). Probabilities are lists in the order of `sources`."""
    sources: list[str]
    dial: list[float]  # the prior
    mode: str  # mixture or switch
    tokens: list[str]  # the text's tokens as text pieces; joined, the text
    posterior: list[list[float]]  # per token, after reading it; the first token's is the dial (nothing predicts it)
    final: list[float]  # P(source | the whole text): the mixture's posterior after the last token, in either mode
    mean: list[float]  # the mean posterior over the tokens after the first (the prior when there is one token)

    @property
    def top(self) -> str:
        """The source the whole text leans on most: the largest final posterior."""
        return self.sources[max(range(len(self.final)), key=self.final.__getitem__)]

    def top_per_token(self) -> list[int]:
        """Each token's most probable source (an index into `sources`)."""
        return [max(range(len(p)), key=p.__getitem__) for p in self.posterior]

    def runs(self) -> list[tuple[int, str]]:
        """The text cut where the most probable source changes: (source index, the text of those tokens)."""
        out: list[tuple[int, str]] = []
        for k, piece in zip(self.top_per_token(), self.tokens):
            if out and out[-1][0] == k:
                out[-1] = (k, out[-1][1] + piece)
            else:
                out.append((k, piece))
        return out

    def to_dict(self, digits: int = 4) -> dict:
        """JSON: probabilities rounded to `digits` decimals (a per-token table of many sources stays small)."""
        r = lambda xs: [round(x, digits) for x in xs]  # noqa: E731
        return {"sources": self.sources, "dial": r(self.dial), "mode": self.mode, "top": self.top,
                "final": r(self.final), "mean": r(self.mean), "tokens": self.tokens,
                "top_per_token": self.top_per_token(), "posterior": [r(p) for p in self.posterior]}


class Engine:
    """A trained dial model, ready to generate and score text at any dial position and mode."""

    def __init__(self, ckpt: Checkpoint):
        if not isinstance(ckpt, Checkpoint):
            raise AbcgptError(f"Engine takes a Checkpoint (checkpoint.load_checkpoint), got {type(ckpt).__name__}; "
                              "abcgpt.load(path) gives an Engine")
        self.checkpoint = ckpt
        self.model: GPT = ckpt.model.eval()
        self.tokenizer: Tokenizer = ckpt.tokenizer
        self.sources: list[str] = list(ckpt.sources)
        self.meta: Meta = ckpt.meta
        self.recipe = ckpt.recipe
        self.path = ckpt.path
        self.device = next(self.model.parameters()).device
        self.cores = CoreShare() if self.device.type == "cpu" else None  # threads fitted at each generation
        self.gated = self.model.config.gates == "abc"
        self._networks: dict[tuple[float, ...], SubNetwork] = {}
        self._boundary: torch.Tensor | None = None
        self._chars: torch.Tensor | None = None

    # ------------------------------------------------------------------ the dial

    @property
    def default_mode(self) -> str:
        """mixture for the partition method, whose corners are separate sub-networks and whose interior was never
        trained; gates for the original method (DESIGN §1), which trains the interior, and for ungated models."""
        return self.model.method.default_mode if self.gated else "gates"

    @property
    def calibration(self) -> Calibration | None:
        """The stored calibration, with its schema's defaults filled in (one stored before modes: mode gates)."""
        return self.meta.calibration

    def mode(self, mode: str | None) -> str:
        if mode is None:
            return self.default_mode
        if not isinstance(mode, str) or mode not in MODES:
            raise AbcgptError(f"unknown dial mode {mode!r}; choose from {', '.join(MODES)}")
        return mode

    def dial_tensor(self, spec: DialSpec, calibrated: bool = False, mode: str | None = None,
                    notes: list[str] | None = None) -> torch.Tensor:
        """(N,) weights of a dial spec (a note is appended to `notes` when weights were normalised).
        calibrated=True reads a number as the wanted share of the last source's style and maps it through the
        stored calibration, which must have been measured in the same mode."""
        mode = self.mode(mode)
        if not isinstance(calibrated, bool):
            raise AbcgptError(f"calibrated must be True or False, got {calibrated!r}")
        if notes is not None and not isinstance(notes, list):
            raise AbcgptError(f"notes must be None or a list (the notes are appended to it), got {notes!r}")
        if not calibrated:
            d, note = parse_dial(spec, self.sources)
            if note and notes is not None:
                notes.append(note)
            if self.gated and not self.model.has_interior and MODE[mode].folds_gates and int((d > 0).sum()) > 1:
                self.model.corners_of(d)  # a bank of corners: its one-line refusal, before any work
            return d
        cal = self.calibration
        if cal is None:
            raise AbcgptError(f"{self.path} has no calibration: run `abcgpt calibrate --ckpt {self.path}` first")
        if len(self.sources) != 2:
            raise AbcgptError(f"calibrated needs two sources, this model has {len(self.sources)}")
        if cal.mode != mode:
            raise AbcgptError(f"the stored calibration was measured in mode {cal.mode}, not {mode}: "
                              f"use that mode, or run `abcgpt calibrate --ckpt {self.path} --mode {mode}`")
        if isinstance(spec, bool) or not isinstance(spec, Real | str):
            raise AbcgptError(f"calibrated takes a number in [0, 1] (the share of {self.sources[-1]}'s style), "
                              f"got {spec!r}")
        try:
            share = float(spec)
        except ValueError:
            raise AbcgptError(f"calibrated takes a number in [0, 1] (the share of {self.sources[-1]}'s style), "
                              f"got {spec!r}") from None
        a = apply_calibration(cal.model_dump(), share)
        return torch.tensor([1.0 - a, a])

    def dial(self, spec: DialSpec, calibrated: bool = False, mode: str | None = None) -> dict[str, float]:
        """The normalised weight of each source (rounded to 6 decimals: the dial is float32)."""
        return {s: round(w, 6) for s, w in zip(self.sources, self.dial_tensor(spec, calibrated, mode).tolist())}

    def _dial_tensors(self, dials: Sequence[DialSpec], calibrated: bool = False, mode: str | None = None
                      ) -> list[torch.Tensor]:
        """dial_tensor of each of a list of dial positions (a sweep's, a scoring's)."""
        if isinstance(dials, str) or not isinstance(dials, Sequence) or not dials:
            raise AbcgptError(f"dials must be a list of one or more dial positions, got {dials!r}")
        return [self.dial_tensor(d, calibrated, mode) for d in dials]

    def _at(self, dial: torch.Tensor) -> GPT | SubNetwork:
        """The ordinary network that computes the gated model at one dial, at its own width (cached: corners are
        asked for often); an ungated model is its own."""
        if not self.gated:
            return self.model
        key = tuple(dial.tolist())
        if key not in self._networks:
            if len(self._networks) >= 8:
                self._networks.pop(next(iter(self._networks)))
            self._networks[key] = SubNetwork(self.model, dial.to(self.device))
        return self._networks[key]

    def network(self, dial: DialSpec, mode: str | None = None) -> GPT | SubNetwork:
        """The one ordinary network that computes this dial in this mode: a corner in any mode, any dial in gates.
        Between corners the other modes combine several corner networks at every token: no single one does."""
        mode = self.mode(mode)
        dial = self.dial_tensor(dial, mode=mode)
        if MODE[mode].folds_gates or not self.gated or int((dial > 0).sum()) == 1:
            return self._at(dial)
        shown = ",".join(f"{s}={w:.3g}" for s, w in zip(self.sources, dial.tolist()) if w > 0)
        raise AbcgptError(f"dial {shown} in mode {mode} combines {int((dial > 0).sum())} corner networks at "
                          f"generation time and is not one GPT-2: give a corner, or mode gates to fold the network's "
                          f"own gates at that dial")

    def _turn_ends(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) which tokens of ids end a turn of `switch` (dial.turn_ends)."""
        return turn_ends(self._boundaries()[ids], self._token_chars()[ids])

    def _token_chars(self) -> torch.Tensor:
        """(V,) each token's length in characters (for a turn's minimum length)."""
        if self._chars is None:
            self._read_vocabulary()
        return self._chars

    def _boundaries(self) -> torch.Tensor:
        """(V,) True for tokens that end a line or a sentence (where a turn of `switch` may end)."""
        if self._boundary is None:
            self._read_vocabulary()
        return self._boundary

    def _read_vocabulary(self) -> None:
        """Each token's text, decoded once, for _boundaries and _token_chars (ids past the tokenizer's: empty)."""
        tok = self.tokenizer
        texts = [tok.decode([i]) if i < tok.vocab_size else "" for i in range(self.model.config.vocab_size)]
        ends = tuple(BOUNDARY_CHARS)
        flags = ["\n" in t or t.rstrip().endswith(ends) or i == tok.eot_id for i, t in enumerate(texts)]
        self._boundary = torch.tensor(flags, device=self.device)
        self._chars = torch.tensor([float(len(t)) for t in texts], device=self.device)

    # ------------------------------------------------------------------ arguments

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a prompt. An empty prompt starts from a line break (else the document separator): the model
        needs one token to start from."""
        if not isinstance(prompt, str):
            raise AbcgptError(f"prompt must be a string, got {type(prompt).__name__}")
        if prompt:
            return list(self.tokenizer.encode(prompt))  # AbcgptError on characters the model does not know
        try:
            ids = list(self.tokenizer.encode("\n"))
        except AbcgptError:
            ids = []
        if not ids and self.tokenizer.eot_id is not None:
            ids = [self.tokenizer.eot_id]
        if not ids:
            raise AbcgptError("give a prompt: this model's vocabulary has no line break to start from")
        return ids

    @staticmethod
    def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, n: int = 1,
                       seed: int | None = None, positions: int = 1) -> None:
        """Every sampling argument in its range, before any work: an AbcgptError naming the argument otherwise."""
        check_integer("n", n, 1, MAX_ROWS)
        check_integer("dial positions", positions, 1, MAX_ROWS)
        if n * positions > MAX_ROWS:
            raise AbcgptError(f"n x dial positions is {n} x {positions} = {n * positions} sequences; at most "
                              f"{MAX_ROWS} in one call")
        check_integer("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
        if isinstance(temperature, bool) or not isinstance(temperature, Real) or not math.isfinite(temperature) \
                or temperature < 0:
            raise AbcgptError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 0):
            raise AbcgptError(f"top_k must be None or an integer >= 0 (0 = off), got {top_k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed <= MAX_SEED):
            raise AbcgptError(f"seed must be None or an integer in [0, 2**63 - 1], got {seed!r}")

    def _generator(self, seed: int | None) -> torch.Generator:
        """A private random stream: a seedless call never touches torch's global RNG."""
        gen = torch.Generator(device=self.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        return gen

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str = "", dial: DialSpec = 0.5, max_new_tokens: int = SAMPLING.max_new_tokens,
                 temperature: float = SAMPLING.temperature, top_k: int | None = SAMPLING.top_k,
                 seed: int | None = SAMPLING.seed, n: int = SAMPLING.n, calibrated: bool = False,
                 mode: str | None = None) -> str | list[str]:
        """The text generated after `prompt` (not repeating it): a str for n == 1, else a list of n samples drawn
        as one batch. seed makes it reproducible."""
        texts = self.sweep(prompt, [dial], max_new_tokens, temperature, top_k, seed, n, calibrated, mode)[0]
        return texts[0] if n == 1 else texts

    def sweep(self, prompt: str, dials: list[DialSpec], max_new_tokens: int = SAMPLING.max_new_tokens,
              temperature: float = SAMPLING.temperature, top_k: int | None = SAMPLING.top_k,
              seed: int | None = SAMPLING.seed, n: int = SAMPLING.n, calibrated: bool = False,
              mode: str | None = None, stop: threading.Event | None = None) -> list[list[str]]:
        """n samples at each of several dial positions, all in one batch: a list of n texts per position.
        Setting `stop` (from another thread) ends the batch after the current token: the texts are then shorter."""
        rows = self._dial_tensors(dials, calibrated, mode)
        self.check_sampling(max_new_tokens, temperature, top_k, n, seed, len(rows))
        if stop is not None and not isinstance(stop, threading.Event):
            raise AbcgptError(f"stop must be None or a threading.Event, got {type(stop).__name__}")
        mode = self.mode(mode)
        rows = torch.stack(rows).repeat_interleave(n, dim=0)
        ids = torch.tensor([self.prompt_ids(prompt)]).expand(rows.size(0), -1)
        tokens = []
        for t in self._tokens(ids, rows, mode, max_new_tokens, temperature, top_k, self._generator(seed), n):
            tokens.append(t)
            if stop is not None and stop.is_set():
                break
        texts = [self.tokenizer.decode(row) for row in torch.stack(tokens, dim=1).tolist()]
        return [texts[i:i + n] for i in range(0, len(texts), n)]

    def stream(self, prompt: str = "", dial: DialSpec = 0.5, max_new_tokens: int = SAMPLING.max_new_tokens,
               temperature: float = SAMPLING.temperature, top_k: int | None = SAMPLING.top_k,
               seed: int | None = SAMPLING.seed, calibrated: bool = False,
               mode: str | None = None) -> Iterator[str]:
        """Pieces of one sample's text as they are generated; joined, they equal generate(...) with the same
        arguments. Arguments are checked here, before the first piece is asked for."""
        self.check_sampling(max_new_tokens, temperature, top_k, seed=seed)
        mode = self.mode(mode)
        d = self.dial_tensor(dial, calibrated, mode)
        ids = torch.tensor([self.prompt_ids(prompt)])
        return stream_text(self.tokenizer, self._tokens(ids, d[None], mode, max_new_tokens, temperature, top_k,
                                                        self._generator(seed), 1))

    def _tokens(self, ids: torch.Tensor, dials: torch.Tensor, mode: str, max_new_tokens: int, temperature: float,
                top_k: int | None, gen: torch.Generator, group: int = 1, use_cache: bool = True
                ) -> Iterator[torch.Tensor]:
        """Yield (B,) new tokens for prompts ids (B, T0) at dials (B, N). Rows come in groups of `group` that share
        a prompt and a dial (mixture draws their corners together, by systematic sampling)."""
        top_k = top_k or None
        ids, dials = ids.to(self.device), dials.to(self.device)
        ids = ids[:, -self.model.config.block_size:]
        if self.cores is not None:
            self.cores.fit()
        parts = generation_parts(self.model.config, ids.size(0), ids.size(1), max_new_tokens, dials, mode,
                                 device=self.device)
        require_memory(sum(parts.values()), "generation", self.device, "n or the number of dial positions", parts)

        noise = CommonNoise(gen, group, temperature)
        corners_only = bool(((dials > 0).sum(dim=1) == 1).all())
        if not self.gated or MODE[mode].folds_gates or corners_only:  # one network a row: all modes agree at a corner
            return self._decode_rows(ids, dials, max_new_tokens, temperature, top_k, noise, use_cache)
        if MODE[mode].draws_corner:
            log_w = self._prompt_log_weights(ids, dials, mode)
            ks = systematic_draw(log_w[::group].exp(), group, noise.u.expand(ids.size(0) // group))
            ks = ks[:, noise.order].flatten()  # so no sample's place in the batch fixes its corner
            rows = F.one_hot(ks, dials.size(1)).to(dials)
            return self._decode_rows(ids, rows, max_new_tokens, temperature, top_k, noise, use_cache)
        return self._decode_combined(ids, dials, mode, max_new_tokens, temperature, top_k, noise, use_cache)

    def _decode_rows(self, ids, dials, max_new_tokens, temperature, top_k, noise, use_cache):
        """One network per row: the dial's sub-network (each dial's on its own rows, side by side in one batch,
        when the rows have several)."""
        return decode(self._by_row(dials), ids, None, max_new_tokens, plain_step(temperature, top_k, noise),
                      use_cache)

    def _by_row(self, dials: torch.Tensor) -> torch.nn.Module:
        """The network of rows with dials (B, N): one sub-network, or one per distinct dial (RowGroups)."""
        if not self.gated:
            return self.model
        uniq, inverse = torch.unique(dials, dim=0, return_inverse=True)
        if uniq.size(0) == 1:
            return self._at(dials[0])
        return RowGroups([((inverse == j).nonzero().flatten(), self._at(d)) for j, d in enumerate(uniq)],
                         self.model.config)

    def _decode_combined(self, ids, dials, mode, max_new_tokens, temperature, top_k, noise, use_cache):
        """switch, tokens, product: every corner with weight > 0 in one batch of B x K rows (row b * K + k runs
        corner k), so any of them can take over at the next token; their next-token distributions are combined
        (tokens, product) or one of them writes (switch)."""
        active = (dials > 0).any(dim=0).nonzero().flatten()
        B, K, N = ids.size(0), active.numel(), dials.size(1)
        a = dials[:, active]
        log_w = self._prompt_log_weights(ids, dials, mode)[:, active]
        rows = F.one_hot(active, N).to(dials).repeat(B, 1)
        boundary, chars, every = self._boundaries(), self._token_chars(), torch.arange(B, device=self.device)
        # switch: the first turn's corner is drawn from the posterior given the prompt (its inverse CDF at u)
        first = systematic_draw(log_w.exp(), 1, noise.u.expand(B)).squeeze(1)
        state = {"writer": first, "turns": torch.zeros(B, K, device=self.device),
                 "chars": torch.zeros(B, device=self.device)}  # (turns written by each corner, the turn's length)

        def step(logits):
            logp = torch.log_softmax(logits, dim=-1).view(B, K, -1)
            g = noise.gumbel(B, logp.size(-1))
            if not MODE[mode].hands_over:
                t = sample_next(combine_next(logp, log_w, mode), temperature, top_k, g)
                return t, t.repeat_interleave(K)
            writer = state["writer"]
            t = sample_next(logp[every, writer], temperature, top_k, g)
            end, state["chars"] = turn_step(state["chars"], boundary[t], chars[t])  # as turn_ends reads a text
            state["turns"][every, writer] += end.float()
            state["writer"] = torch.where(end, next_segment_source(a, state["turns"]), writer)
            return t, t.repeat_interleave(K)

        return decode(self._by_row(rows), ids.repeat_interleave(K, dim=0), None, max_new_tokens, step, use_cache)

    @torch.no_grad()
    def _prompt_log_weights(self, ids: torch.Tensor, dials: torch.Tensor, mode: str) -> torch.Tensor:
        """(B, N) log-weights of the corners after reading the prompt: the posterior for mixture and switch (switch
        restarts at each boundary), the dial itself for tokens and product."""
        log_a = dials.log()
        if not MODE[mode].posterior or ids.size(1) < 2:
            return log_a
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        lp = self._corner_logprobs(x, y, range(dials.size(1)))
        boundary = self._turn_ends(y) if MODE[mode].restarts else None
        return log_weights_path(lp, log_a, mode, boundary)[:, -1]

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def _corner_logprobs(self, x: torch.Tensor, y: torch.Tensor, corners) -> torch.Tensor:
        """(B, K, T): each corner's log-prob of every target token, one corner's sub-network at a time."""
        n = len(self.sources)
        return torch.stack([_target_logprobs(self._at(corner(int(k), n)), x, y) for k in corners], dim=1)

    def _check_ids(self, name: str, t: object, max_len: int | None = None) -> None:
        """t: a non-empty (batch, tokens) tensor of torch.long ids in the model's vocabulary, at most max_len tokens
        a row."""
        V = self.model.config.vocab_size
        ok = (isinstance(t, torch.Tensor) and t.dtype == torch.long and t.dim() == 2 and t.numel() > 0
              and (max_len is None or t.size(1) <= max_len))
        if ok:
            lo, hi = torch.aminmax(t)
            ok = 0 <= int(lo) and int(hi) < V
        if not ok:
            got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            rows = "" if max_len is None else f", 1 to {max_len} tokens a row"
            raise AbcgptError(f"{name} must be a (batch, tokens) tensor of torch.long token ids in [0, {V}){rows}; "
                              f"got {got}")

    def _check_tokens(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x and y: (B, T) tensors of token ids of one shape, 1 <= T <= block_size (see _check_ids)."""
        for name, t in (("x", x), ("y", y)):
            self._check_ids(name, t, self.model.config.block_size)
        if x.shape != y.shape:
            raise AbcgptError(f"x and y must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")

    @torch.no_grad()
    def logprobs(self, x: torch.Tensor, y: torch.Tensor, dials: Sequence[DialSpec], mode: str | None = None
                 ) -> list[torch.Tensor]:
        """(B, T) log-probs of the targets y given x (B, T <= block_size) at each dial, in one mode. The corners'
        log-probs are computed once and shared by every dial of a combining mode. A dial scored once in mode gates
        runs the gated model as it is: a sub-network pays only for a dial that is used again (corners, generation).
        A dial is any dial spec (a tensor of weights too)."""
        mode = self.mode(mode)
        self._check_tokens(x, y)
        x, y = x.to(self.device), y.to(self.device)
        cached, boundary, out = None, None, []
        for d in self._dial_tensors(dials, mode=mode):
            d = d.to(self.device)
            if not self.gated or int((d > 0).sum()) == 1:
                out.append(_target_logprobs(self._at(d), x, y))
            elif MODE[mode].folds_gates:
                out.append(_target_logprobs(self.model, x, y, d))
            elif MODE[mode].whole_distributions:
                active = (d > 0).nonzero().flatten().tolist()
                logp = torch.stack([torch.log_softmax(self._at(corner(k, len(self.sources)))(x, targets=y)[0].float(),
                                                      dim=-1) for k in active], dim=1)
                log_a = d[active].log()[None].expand(x.size(0), -1)
                out.append(combine_next(logp, log_a, mode).gather(-1, y[..., None]).squeeze(-1))
            else:
                if cached is None:  # the corners' log-probs and the turns' ends: once for every dial
                    cached = self._corner_logprobs(x, y, range(len(self.sources)))
                    boundary = self._turn_ends(y) if MODE[mode].restarts else None
                active = (d > 0).nonzero().flatten()
                log_a = d[active].log()[None].expand(x.size(0), -1)
                out.append(combine_scores(cached[:, active], log_a, mode, boundary))
        return out

    def loss(self, text: str, dial: DialSpec = 0.5, mode: str | None = None, calibrated: bool = False) -> float:
        """Mean next-token loss (nats per token) of `text` at a dial: every token after the first is predicted from
        the ones before it. Texts longer than block_size are scored in consecutive windows of block_size
        predictions (each window starts fresh, with no context from the one before)."""
        if not isinstance(text, str):
            raise AbcgptError(f"text must be a string, got {type(text).__name__}")
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise AbcgptError(f"loss needs a text of at least 2 tokens, got {len(ids)}")
        mode = self.mode(mode)
        d = self.dial_tensor(dial, calibrated, mode)
        t = torch.tensor(list(ids), dtype=torch.long)
        block, total = self.model.config.block_size, 0.0
        for s in range(0, len(ids) - 1, block):
            chunk = t[s:s + block + 1]
            total -= float(self.logprobs(chunk[:-1][None], chunk[1:][None], [d], mode)[0].sum())
        return total / (len(ids) - 1)

    # ------------------------------------------------------------------ attribution

    @torch.no_grad()
    def _windowed_corner_logprobs(self, ids: torch.Tensor, corners: list[int]) -> torch.Tensor:
        """(B, K, T - 1): each corner's log-prob of every token of ids (B, T) after the first, predicted in windows
        of block_size predictions as `loss` scores a long text (each window starts fresh). The whole windows of
        every row go through each corner in batches of about SCORE_ELEMENTS logits, then the last, shorter one."""
        cfg, (B, T) = self.model.config, ids.shape
        block, n, K = cfg.block_size, T - 1, len(corners)
        full, parts = n // block, []
        if full:
            x = ids[:, :full * block].reshape(B * full, block)
            y = ids[:, 1:full * block + 1].reshape(B * full, block)
            rows = max(1, SCORE_ELEMENTS // (block * cfg.vocab_size))
            lp = torch.cat([self._corner_logprobs(x[i:i + rows], y[i:i + rows], corners)
                            for i in range(0, B * full, rows)])
            parts.append(lp.view(B, full, K, block).transpose(1, 2).reshape(B, K, full * block))
        if n % block:
            parts.append(self._corner_logprobs(ids[:, full * block:-1], ids[:, full * block + 1:], corners))
        return torch.cat(parts, dim=2)

    @torch.no_grad()
    def posteriors(self, ids: torch.Tensor, dial: DialSpec = "uniform", mode: str | None = "mixture"
                   ) -> torch.Tensor:
        """(B, T, N) the posterior over sources after each token of ids (B, T): the corner weights that mode
        mixture (or switch, restarting after each turn's end) generates with after reading a prompt,
        with the dial as the prior. Row 0 is the dial: nothing predicts a text's first token. A text longer than
        the context is scored in windows as `loss` does, and the posterior carries on across them (it multiplies
        the whole text's likelihoods); within the context it equals the weights generation uses."""
        return self._posteriors(ids, dial, (mode,))[0]

    @torch.no_grad()
    def _posteriors(self, ids: torch.Tensor, dial: DialSpec, modes: tuple[str, ...]) -> list[torch.Tensor]:
        """`posteriors` in each of several modes, from one pass of the corners over the text."""
        if not self.gated:
            raise AbcgptError("attribution needs a dial model: this one is ungated, with no sources to attribute to")
        modes = tuple(_attribution_mode(m) for m in modes)
        self._check_ids("ids", ids)
        d = self.dial_tensor(dial, mode=modes[0]).to(self.device)
        ids = ids.to(self.device)
        active = (d > 0).nonzero().flatten().tolist()  # a corner the dial leaves out keeps posterior 0: not run
        outs = [d.expand(ids.size(0), ids.size(1), -1).clone() for _ in modes]
        if ids.size(1) > 1:
            lp = self._windowed_corner_logprobs(ids, active)
            log_a = d[active].log().expand(ids.size(0), -1)
            for mode, out in zip(modes, outs):
                boundary = self._turn_ends(ids[:, 1:]) if MODE[mode].restarts else None
                out[:, 1:, active] = log_weights_path(lp, log_a, mode, boundary).exp()
        return outs

    def attribute(self, text: str, dial: DialSpec = "uniform", mode: str | None = "mixture") -> Attribution:
        """Which source `text` leans on, token by token (see Attribution and `posteriors`); the prior is the dial,
        uniform unless given. mode switch restarts the posterior from the dial after each turn's end
        (dial.turn_ends)."""
        if not isinstance(text, str):
            raise AbcgptError(f"text must be a string, got {type(text).__name__}")
        mode = _attribution_mode(mode)
        ids = list(self.tokenizer.encode(text))  # AbcgptError on characters the model does not know
        if not ids:
            raise AbcgptError("text is empty: give at least one character to attribute")
        # the whole text's summary is the mixture's in either mode: switch's last posterior says only what the
        # last turn leans on (and is the dial when the text ends with a line break)
        paths = self._posteriors(torch.tensor([ids]), dial, tuple(dict.fromkeys((mode, "mixture"))))
        post, whole = paths[0][0].cpu(), paths[-1][0].cpu()
        evidence = post[1:] if len(ids) > 1 else post
        return Attribution(self.sources, post[0].tolist(), mode, token_pieces(self.tokenizer, ids), post.tolist(),
                           whole[-1].tolist(), evidence.mean(dim=0).tolist())

    # ------------------------------------------------------------------ display

    def num_params(self) -> int:
        return self.model.num_params()

    def __repr__(self) -> str:
        p = self.num_params()
        size = f"{p / 1e6:.1f}M" if p >= 1e6 else f"{p / 1e3:.0f}k"
        cfg = self.model.config
        return (f"Engine(sources={self.sources}, params={size}, recipe={self.recipe.name!r}, "
                f"step={self.meta.step}, layers={cfg.n_layer}, block_size={cfg.block_size}, "
                f"gates={cfg.gates!r}, mode={self.default_mode!r}, device={str(self.device)!r}, "
                f"path={str(self.path)!r})")
