"""Prepared data: per-source token shards on disk, their manifest, and the (dial, source) batch sampler.

A data directory holds, for each source s, `s.train.bin` and `s.heldout.bin` (flat uint16/uint32 token ids,
memory-mapped when read), the tokenizer (`tokenizer.json`) and `manifest.json`, which records what the shards
were made from (source specs, tokenizer, sha256 of the input text) so that a changed recipe or corpus is
noticed instead of silently trained on.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from abcgpt.common import AbcgptError, atomic_dir, check_output, check_writable, existing_dir, output_lock
from abcgpt.config import Recipe
from abcgpt.dial import sample_dials
from abcgpt.sources import load_source
from abcgpt.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

MANIFEST_VERSION = 1


def data_key(recipe: Recipe) -> dict:
    """What the shards depend on, besides the input text itself."""
    d = recipe.data
    return {  # a source's weight only changes how often it is drawn, not its shards
        "sources": [{k: v for k, v in s.to_dict().items() if k != "weight"} for s in d.sources],
        "tokenizer": d.tokenizer,
        "vocab_size": d.vocab_size if d.tokenizer == "bpe" else None,
        "heldout_fraction": d.heldout_fraction,
    }


def prepare(recipe: Recipe, out: Path | None = None, progress: bool = True, if_missing: bool = False) -> Path:
    """Load every source, train the tokenizer, write the shards and the manifest (atomically, as one folder).
    One process at a time per folder: another waits (output_lock). if_missing: a folder that holds prepared data by
    then (perhaps another process's, written while this one waited) is left as it is. A folder that holds anything
    but prepared data is never replaced."""
    out = check_writable(check_output(Path(out or recipe.data_dir), "data", prepared_files))
    with output_lock(out):
        if not (if_missing and (out / "manifest.json").is_file()):
            _prepare(recipe, out, progress)
    return out


def _prepare(recipe: Recipe, out: Path, progress: bool) -> None:
    t0 = time.time()
    texts = [load_source(s, recipe.data.heldout_fraction, progress) for s in recipe.data.sources]
    if recipe.data.tokenizer == "char":  # the alphabet must cover held-out text too
        tok = train_tokenizer("char", {t.name: t.train + t.heldout for t in texts})
    else:  # BPE merges are learnt from training text only
        tok = train_tokenizer("bpe", {t.name: t.train for t in texts}, recipe.data.vocab_size)
    write_prepared(out, recipe, tok, texts, progress, lock=False)
    if progress:
        print(f"prepared {out} in {time.time() - t0:.1f}s: {recipe.data.tokenizer} tokenizer, "
              f"vocab {tok.vocab_size}")


def write_prepared(out: Path, recipe: Recipe, tok: Tokenizer, texts: list, progress: bool, lock: bool = True,
                   **extra) -> None:
    """Every text's shards in tok, the tokenizer and the manifest (with `extra` keys), written as one folder."""
    with atomic_dir(out, "data", prepared_files, lock=lock) as tmp:
        tok.save(tmp / "tokenizer.json")
        entries = []
        for t in texts:
            entry = {"name": t.name, "origin": t.origin, "sha256": t.sha256}
            for split in ("train", "heldout"):
                ids = tok.encode_array(getattr(t, split))
                ids.tofile(tmp / f"{t.name}.{split}.bin")
                entry[f"{split}_tokens"] = int(ids.size)
                entry[f"{split}_chars"] = len(getattr(t, split))
            entries.append(entry)
            if progress:
                print(f"  {t.name}: {entry['train_tokens']:,} train / {entry['heldout_tokens']:,} held-out tokens"
                      f"  ({t.origin})")
        manifest = {"version": MANIFEST_VERSION, "key": data_key(recipe),
                    "dtype": np.dtype(token_dtype(tok.vocab_size)).name, "vocab_size": tok.vocab_size,
                    "sources": entries} | extra
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def prepared_files(folder: Path) -> set[str] | None:
    """The files of data prepared before outputs were marked: those its manifest.json names."""
    try:
        sources = json.loads((folder / "manifest.json").read_text())["sources"]
        names = [s["name"] for s in sources]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"manifest.json", "tokenizer.json"} | {f"{n}.{split}.bin" for n in names if isinstance(n, str)
                                                 for split in ("train", "heldout")}


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 2**16 else np.uint32


@dataclass
class PreparedData:
    dir: Path
    manifest: dict
    tokenizer: Tokenizer
    train: list[np.ndarray]  # one memory-mapped token array per source, in the recipe's order
    heldout: list[np.ndarray]

    @property
    def sources(self) -> list[str]:
        return [s["name"] for s in self.manifest["sources"]]


def load_data(path: Path) -> PreparedData:
    path = existing_dir(Path(path))
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise AbcgptError(f"no prepared data in {path} (manifest.json missing): run `abcgpt prepare`")
    try:
        manifest = json.loads(mpath.read_text())
        dtype = np.dtype(manifest["dtype"])
        names = [s["name"] for s in manifest["sources"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AbcgptError(f"{mpath} is corrupted ({e}): run `abcgpt prepare --force`") from None
    arrays = {}
    for split in ("train", "heldout"):
        arrays[split] = []
        for s in manifest["sources"]:
            f = path / f"{s['name']}.{split}.bin"
            if not f.is_file() or f.stat().st_size != s[f"{split}_tokens"] * dtype.itemsize:
                raise AbcgptError(f"{f} is missing or has the wrong size: run `abcgpt prepare --force`")
            arrays[split].append(np.memmap(f, dtype=dtype, mode="r"))
    tok = load_tokenizer(path / "tokenizer.json")
    if len(names) < 2:
        raise AbcgptError(f"{path} holds {len(names)} source(s); a dial needs at least two")
    return PreparedData(path, manifest, tok, arrays["train"], arrays["heldout"])


def stale_reason(recipe: Recipe, manifest: dict) -> str | None:
    """Why prepared data does not match the recipe and the current input text, or None if it does."""
    if manifest.get("version") != MANIFEST_VERSION:
        return "it was written by another version of abcgpt"
    want, have = data_key(recipe), manifest.get("key", {})
    for k in want:
        if want[k] != have.get(k):
            return f"data.{k} was {have.get(k)!r} when prepared, the recipe now says {want[k]!r}"
    for spec, entry in zip(recipe.data.sources, manifest["sources"]):
        text = load_source(spec, recipe.data.heldout_fraction, progress=False)
        if text.sha256 != entry["sha256"]:
            return f"the text of source {spec.name!r} changed since it was prepared ({text.origin})"
    return None


def prepared_data(recipe: Recipe, progress: bool = True) -> PreparedData:
    """The recipe's prepared data: prepared now if absent; an error if it no longer matches the recipe."""
    path = existing_dir(recipe.data_dir)
    if not (path / "manifest.json").is_file():  # two runs may start on the same data: one prepares it
        path = prepare(recipe, recipe.data_dir, progress, if_missing=True)
    data = load_data(path)
    reason = stale_reason(recipe, data.manifest)
    if reason:
        raise AbcgptError(f"prepared data in {path} is stale: {reason}. "
                          f"Run `abcgpt prepare --config {recipe.name} --force` to rebuild it")
    check_lengths(data, recipe.model.block_size)
    return data


def check_lengths(data: PreparedData, block_size: int) -> None:
    for name, tr, ho in zip(data.sources, data.train, data.heldout):
        for split, arr in (("training", tr), ("held-out", ho)):
            if arr.size < block_size + 2:
                raise AbcgptError(f"source {name!r} has {arr.size} {split} tokens, fewer than the context "
                                  f"(model.block_size = {block_size}) needs: give it more text or lower block_size")


def dial_draw(recipe: Recipe) -> dict:
    """The recipe's training draw, as keyword arguments of dial.sample_dials."""
    t = recipe.train
    return dict(concentration=t.dial_concentration, corner_fraction=t.corner_fraction,
                per_batch=t.dial_sampling == "per_batch", weights=[s.weight for s in recipe.data.sources],
                sources_per_batch=t.sources_per_batch)


def alone_steps(steps: int, weights: list[float], i: int) -> int:
    """The steps a dial model trained for `steps` spends on source i, its sources drawn in proportion to `weights`:
    what the equal-compute baseline `alone_<s>` trains for (at least 1)."""
    return max(1, round(steps * weights[i] / sum(weights)))


class Batcher:
    """Training batches: per sequence a dial ~ Beta/Dirichlet (or, a corner_fraction of the time, a corner), a
    source ~ Categorical(dial), a random window.
    An ungated baseline has no dial: its sources are drawn from `only` in proportion to their weights (the
    marginal of the dial's draw).

    All randomness comes from one numpy Generator whose state goes into checkpoints, so a resumed run draws
    exactly the batches the uninterrupted run would have drawn. Under torchrun every process draws the same
    global batch and keeps its rows of it."""

    def __init__(self, data: PreparedData, *, block_size: int, batch_size: int, device: torch.device, seed: int,
                 concentration: float, per_batch: bool, corner_fraction: float, weights: list[float],
                 sources_per_batch: int = 0, only: list[int] | None = None, rank: int = 0, world: int = 1):
        self.data, self.T, self.B, self.device = data, block_size, batch_size, device
        self.rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)  # this process's share
        self.concentration, self.per_batch, self.corner_fraction = concentration, per_batch, corner_fraction
        self.weights, self.only = np.asarray(weights, dtype=np.float64), only
        self.sources_per_batch = sources_per_batch
        self.rng = np.random.default_rng(seed)
        self.window = np.arange(block_size + 1)

    @classmethod
    def from_recipe(cls, recipe: Recipe, data: PreparedData, device: torch.device, rank: int = 0,
                    world: int = 1) -> "Batcher":
        """The batches a recipe trains on: its dial draw, its sources' weights, and for an ungated baseline the
        sources it is trained on (train.only_sources, else all)."""
        t, m = recipe.train, recipe.model
        only = None if m.gates == "abc" else [data.sources.index(s) for s in t.only_sources or data.sources]
        return cls(data, block_size=m.block_size, batch_size=t.batch_size, device=device, seed=t.seed,
                   **dial_draw(recipe), only=only, rank=rank, world=world)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, y (B, T) int64; dials (B, N) float32; sources (B,) int64."""
        n = len(self.data.train)
        if self.only is None:
            dials, sources = sample_dials(self.rng, self.B, n, self.concentration, self.corner_fraction,
                                          self.per_batch, self.weights, self.sources_per_batch)
        else:
            w = self.weights[self.only]
            sources = self.rng.choice(np.asarray(self.only), size=self.B, p=w / w.sum())
            dials = np.eye(n, dtype=np.float32)[sources]
        xy = np.empty((self.B, self.T + 1), dtype=np.int64)
        for s in np.unique(sources):
            rows = np.flatnonzero(sources == s)
            tokens = self.data.train[s]
            starts = self.rng.integers(0, tokens.size - self.T, size=rows.size)  # the last token is a target too
            xy[rows] = tokens[starts[:, None] + self.window]
        return self._to_device(xy[self.rows], dials[self.rows], sources[self.rows])

    def _to_device(self, xy, dials, sources):
        tensors = [torch.from_numpy(xy[:, :-1]), torch.from_numpy(xy[:, 1:]),
                   torch.from_numpy(dials), torch.from_numpy(sources)]
        if self.device.type == "cuda":
            return tuple(t.contiguous().pin_memory().to(self.device, non_blocking=True) for t in tensors)
        return tuple(t.contiguous().to(self.device) for t in tensors)

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def heldout_batches(tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int):
    """Fixed, evenly spaced held-out windows, so every evaluation scores the same text."""
    count = batch_size * n_batches
    starts = np.linspace(0, tokens.size - block_size - 1, count).astype(np.int64)
    xy = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    for i in range(n_batches):
        chunk = torch.from_numpy(xy[i * batch_size:(i + 1) * batch_size])
        yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
