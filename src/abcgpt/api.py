"""A small Python API for notebooks and scripts.

    import abcgpt
    m = abcgpt.load("runs/demo")            # a run directory (its best checkpoint, else its last) or a checkpoint
    m.sources                               # ['tinystories', 'shakespeare']
    m.generate("Once upon", dial=0.2)       # the new text (the prompt is not repeated)
    for piece in m.stream("ROMEO:", dial=1.0): print(piece, end="")
    m.loss("To be, or not to be", dial=1.0) # mean next-token loss in nats per token

A dial is a number a in [0, 1] (two sources: 0 is the first source, 1 the second), a source name, "uniform",
"name=w,name=w", a dict {name: weight}, or a sequence of N weights; weights are normalised to sum to 1.
Generation folds the dial into the weights (GPT.folded), so it costs what an ordinary GPT costs; the folded
model of the last dial used is kept, so regenerating at the same dial (a notebook slider) does not refold.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path

import torch

from abcgpt.checkpoint import load_checkpoint
from abcgpt.common import AbcgptError, pick_device
from abcgpt.dial import parse_dial
from abcgpt.generate import generate_ids, generate_tokens, stream_text
from abcgpt.model import GPT
from abcgpt.style import apply_calibration

Dial = float | str | Mapping[str, float] | Sequence[float]


def load(run_dir: str | Path, device: str = "auto") -> "DialModel":
    """Load a run directory (its best checkpoint, else its last) or a checkpoint directory.
    device: "auto" (cuda, then mps, then cpu), or any torch device name."""
    try:
        dev = pick_device(device)
    except RuntimeError as e:
        raise AbcgptError(f"unknown device {device!r}: {e}") from None
    return DialModel(load_checkpoint(Path(run_dir), dev))


class DialModel:
    """A trained dial model: generate, stream and score text at any dial position."""

    def __init__(self, ckpt):
        self.checkpoint = ckpt
        self.path: Path = ckpt.path
        self.model: GPT = ckpt.model.eval()
        self.tokenizer = ckpt.tokenizer
        self.meta: dict = ckpt.meta
        self.recipe = ckpt.recipe
        self.device = next(self.model.parameters()).device
        self._folded: tuple[tuple[float, ...], GPT] | None = None

    # ------------------------------------------------------------------ dial

    @property
    def sources(self) -> list[str]:
        return list(self.checkpoint.sources)

    @property
    def calibration(self) -> dict | None:
        return self.meta.get("calibration")

    def _dial_tensor(self, spec: Dial, calibrated: bool = False) -> torch.Tensor:
        sources = self.sources
        if isinstance(spec, bool) or spec is None:
            raise AbcgptError(f"dial must be a number, a source name, 'uniform', 'name=w,...' or a dict, got {spec!r}")
        if calibrated:
            if self.calibration is None:
                raise AbcgptError(f"{self.path} has no calibration: run `abcgpt calibrate --ckpt {self.path}` first")
            if len(sources) != 2:
                raise AbcgptError(f"calibrated needs two sources, this model has {len(sources)}")
            try:
                share = float(spec)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise AbcgptError(f"calibrated takes a number in [0, 1] (the share of {sources[-1]}'s style), "
                                  f"got {spec!r}") from None
            a = apply_calibration(self.calibration, share)
            return torch.tensor([1.0 - a, a])
        if isinstance(spec, torch.Tensor):
            spec = spec.tolist()
        if isinstance(spec, Mapping):
            if not spec:
                raise AbcgptError("dial dict is empty: give {name: weight} with names from " + ", ".join(sources))
            parts = []
            for name, w in spec.items():
                if not isinstance(w, Real) or isinstance(w, bool):
                    raise AbcgptError(f"weight of {name!r} in dial is not a number: {w!r}")
                if "," in str(name) or "=" in str(name):
                    raise AbcgptError(f"unknown source {name!r} in dial; known sources: {', '.join(sources)}")
                parts.append(f"{name}={float(w)!r}")
            spec = ",".join(parts)
        elif isinstance(spec, Sequence) and not isinstance(spec, str):
            try:
                w = [float(x) for x in spec]
            except (TypeError, ValueError):
                raise AbcgptError(f"a dial of weights must be numbers, got {spec!r}") from None
            if len(w) != len(sources):
                raise AbcgptError(f"a dial of weights needs {len(sources)} numbers (one per source: "
                                  f"{', '.join(sources)}), got {len(w)}")
            spec = ",".join(f"{s}={x!r}" for s, x in zip(sources, w))
        elif isinstance(spec, Real):
            spec = repr(float(spec))
        elif not isinstance(spec, str):
            raise AbcgptError(f"dial must be a number, a source name, 'uniform', 'name=w,...' or a dict, got {spec!r}")
        d, _ = parse_dial(spec, sources)
        return d

    def dial(self, spec: Dial, calibrated: bool = False) -> dict[str, float]:
        """The normalised weight of each source for a dial spec (rounded to 6 decimals: the dial is float32)."""
        return {s: round(w, 6) for s, w in zip(self.sources, self._dial_tensor(spec, calibrated).tolist())}

    def _folded_model(self, d: torch.Tensor) -> GPT:
        key = tuple(d.tolist())
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, self.model.folded(d.to(self.device)))
        return self._folded[1]

    # ------------------------------------------------------------------ generation

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise AbcgptError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt:  # the model needs one token to start from: a line break, as the CLI uses
            try:
                ids = self.tokenizer.encode("\n")
            except AbcgptError:
                ids = []
            if not ids and self.tokenizer.eot_id is not None:
                ids = [self.tokenizer.eot_id]
            if not ids:
                raise AbcgptError("give a prompt: this model's vocabulary has no line break to start from")
        else:
            ids = self.tokenizer.encode(prompt)  # AbcgptError on characters the model does not know
        return torch.tensor([list(ids)], dtype=torch.long)

    @staticmethod
    def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, n: int = 1) -> None:
        if not isinstance(n, Integral) or n < 1:
            raise AbcgptError(f"n must be an integer >= 1, got {n!r}")
        if not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
            raise AbcgptError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(temperature, Real) or not math.isfinite(temperature) or temperature < 0:
            raise AbcgptError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, Integral) or top_k < 0):
            raise AbcgptError(f"top_k must be None or an integer >= 1, got {top_k!r}")

    def generate(self, prompt: str = "", dial: Dial = 0.5, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 40, seed: int | None = None, n: int = 1,
                 calibrated: bool = False) -> str | list[str]:
        """The text generated after `prompt` (not repeating it): a str for n == 1, else a list of n samples,
        drawn as one batch. seed makes it reproducible. calibrated=True reads a numeric dial as the wanted
        share of the second source's style (needs `abcgpt calibrate`)."""
        self._check_sampling(max_new_tokens, temperature, top_k, n)
        model = self._folded_model(self._dial_tensor(dial, calibrated))
        ids = self._prompt_ids(prompt).expand(n, -1)
        texts = generate_ids(model, self.tokenizer, ids, None, max_new_tokens, float(temperature), top_k or None, seed)
        return texts[0] if n == 1 else texts

    def stream(self, prompt: str = "", dial: Dial = 0.5, max_new_tokens: int = 200, temperature: float = 0.8,
               top_k: int | None = 40, seed: int | None = None, calibrated: bool = False) -> Iterator[str]:
        """Pieces of one sample's text as they are generated; joined, they equal generate(...) with the same
        arguments and seed. Arguments are checked at the call, before the first piece is asked for."""
        self._check_sampling(max_new_tokens, temperature, top_k)
        model = self._folded_model(self._dial_tensor(dial, calibrated))
        ids = self._prompt_ids(prompt)
        return stream_text(self.tokenizer,
                           generate_tokens(model, ids, None, max_new_tokens, float(temperature), top_k or None, seed))

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def loss(self, text: str, dial: Dial = 0.5, calibrated: bool = False) -> float:
        """Mean next-token loss (nats per token) of `text` at a dial: every token after the first is predicted
        from the ones before it. Texts longer than block_size are scored in consecutive windows of block_size
        predictions (each window starts fresh, with no context from the one before)."""
        if not isinstance(text, str):
            raise AbcgptError(f"text must be a string, got {type(text).__name__}")
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise AbcgptError(f"loss needs a text of at least 2 tokens, got {len(ids)}")
        d = self._dial_tensor(dial, calibrated).to(self.device)
        gated = self.model.config.gates == "abc"
        ids_t = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        block = self.model.config.block_size
        total, count = 0.0, 0
        for s in range(0, len(ids) - 1, block):
            chunk = ids_t[s:s + block + 1]
            x, y = chunk[:-1][None], chunk[1:][None]
            _, loss = self.model(x, d if gated else None, targets=y)
            total += float(loss) * y.numel()
            count += y.numel()
        return total / count

    # ------------------------------------------------------------------ display

    def num_params(self) -> int:
        return self.model.num_params()

    def __repr__(self) -> str:
        p = self.num_params()
        size = f"{p / 1e6:.1f}M" if p >= 1e6 else f"{p / 1e3:.0f}k"
        cfg = self.model.config
        return (f"DialModel(sources={self.sources}, params={size}, recipe={self.recipe.name!r}, "
                f"step={self.meta.get('step')}, layers={cfg.n_layer}, block_size={cfg.block_size}, "
                f"gates={cfg.gates!r}, device={str(self.device)!r}, path={str(self.path)!r})")
