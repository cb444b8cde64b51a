"""Take a source out of a trained model, or add one, without training the others again (`abcgpt forget`,
`abcgpt add-source`; docs/forget_add.md measures both).

forget S: the partition method gives each unit one source (or, model.shared_fraction of them, all), and with every
training draw at a corner (train.corner_fraction = 1, the method's preset) S's gradients reach only S's own units
and the shared ones. Removing S's own units therefore leaves every other corner bit for bit as it was:
- width = "total": S's units stay in the matrices (a GPT's width is one number) but are retired: their weights are
  zeroed and their specialty row becomes all zeros, which dial.partition_gate keeps off at every dial;
- width = "corner": S's own pieces (bank.py) are dropped; the shared block is kept.
What S taught the shared units stays in them; `retrain_shared` trains them on the remaining sources with every
per-source unit frozen.

add-source K (width = "corner" only): a new set of own pieces, initialised like a fresh model's, trained on K alone
with every other parameter frozen (shared block included), so every old corner stays bit for bit as it was.

Both keep the checkpoint's tokenizer (a new one would change every corner) and write the edited recipe's data with
it. Training runs through train.Trainer (resumable, locked, atomic checkpoints) from a step-0 checkpoint of the
edited model, with a `freeze` hook that says what trains.
"""

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from abcgpt.bank import CornerBank, piece_view
from abcgpt.checkpoint import Checkpoint, Meta, load_checkpoint, read_meta, save_checkpoint
from abcgpt.common import AbcgptError, declared, existing_dir, output_lock, run_lock
from abcgpt.config import Recipe, parse_override, validate
from abcgpt.data import load_data, stale_reason, write_prepared
from abcgpt.model import GPT, build_model
from abcgpt.sources import SourceSpec, load_source
from abcgpt.tokenizer import Tokenizer
from abcgpt.train import Trainer, optimizer_for

SHARED, RETIRED = -1, -2  # owners of units that are not one source's


# ----------------------------------------------------------------------------- who owns each weight


def unit_owners(m: torch.Tensor) -> torch.Tensor:
    """(U,) owner of each unit from partition specialties (U, N): its source, SHARED or RETIRED."""
    owner = m.argmax(dim=-1)
    owner = torch.where(m.min(dim=-1).values > 0, SHARED, owner)
    return torch.where(m.amax(dim=-1) == 0, RETIRED, owner)


def entry_masks(model: GPT, test: Callable[[torch.Tensor], torch.Tensor], every: bool) -> dict[str, torch.Tensor]:
    """For each parameter of a total-width partition GPT, a bool mask (its shape) of the entries whose unit axes
    pass `test(owners)`: any of them (every=False) or all of them (every=True)."""
    cfg = model.config
    parts = unit_owners(model.specialties.detach().cpu()).split(model.group_sizes)
    hd = cfg.n_embd // cfg.n_head
    res = parts[0]
    layers = [(parts[1 + 2 * i].repeat_interleave(hd), parts[2 + 2 * i]) for i in range(cfg.n_layer)]
    masks = {}
    for name, p in model.named_parameters():
        view, groups = piece_view(name, tuple(p.shape))
        layer = int(name.split(".h.")[1].split(".")[0]) if ".h." in name else None
        owners = {"res": res, "head": layers[layer][0] if layer is not None else None,
                  "unit": layers[layer][1] if layer is not None else None}
        mask = torch.full(view, every)
        for i, g in enumerate(groups):
            if g is None:
                continue
            hit = test(owners[g]).reshape([-1 if j == i else 1 for j in range(len(view))])
            mask = mask & hit if every else mask | hit
        masks[name] = mask.reshape(p.shape)
    return masks


# ----------------------------------------------------------------------------- the edited models


def without_source(model: GPT | CornerBank, k: int) -> GPT | CornerBank:
    """The model without source k: its own units retired (total width) or dropped (corner width)."""
    cfg = dataclasses.replace(model.config, n_sources=model.config.n_sources - 1)
    keep = [j for j in range(model.config.n_sources) if j != k]
    new = build_model(cfg)
    if isinstance(model, CornerBank):
        state = {n: t for n, t in model.state_dict().items() if n.startswith("shared.")}
        for j, old in enumerate(keep):
            state |= {f"own.{j}.{n}": t for n, t in model.own[old].state_dict().items()}
        new.load_state_dict(state)
        return new
    m = model.specialties
    spec = m[:, keep].clone()  # S's one-hot rows become zeros: retired
    spec[m.min(dim=-1).values > 0] = 1.0 / len(keep)  # shared units: the centroid of the sources left
    new.load_state_dict(model.state_dict() | {"specialties": spec})
    with torch.no_grad():  # S's weights go: every entry that reads or writes one of its units
        for name, mask in entry_masks(model, lambda o: o == k, every=False).items():
            new.get_parameter(name).masked_fill_(mask, 0.0)
    return new


def with_new_source(model: CornerBank, seed: int) -> CornerBank:
    """The bank with one more source, whose own pieces start as a fresh model's (seeded), the rest as they are."""
    torch.manual_seed(seed)
    new = build_model(dataclasses.replace(model.config, n_sources=model.config.n_sources + 1))
    new.load_state_dict(new.state_dict() | model.state_dict())
    return new


def same_corners(old: GPT | CornerBank, new: GPT | CornerBank, keep: list[int]) -> bool:
    """Whether each kept source's corner runs on the same units with the same gates after the edit (a bank's
    corners always do; a total-width model's unless model.narrowness > 1 let S's units into other corners)."""
    if isinstance(old, CornerBank):
        return True
    n_old, n_new = old.config.n_sources, new.config.n_sources
    eye_old, eye_new = torch.eye(n_old), torch.eye(n_new)
    return all(torch.equal(old.unit_gates(eye_old[k]), new.unit_gates(eye_new[j])) for j, k in enumerate(keep))


# ----------------------------------------------------------------------------- what trains


def train_own(k: int) -> Callable[[Trainer], None]:
    """Trainer hook: only source k's own pieces of a bank train, on batches of k alone (the Batcher's `only`, as
    an ungated baseline's); frozen parameters get no gradient, so AdamW leaves them (and their decay) alone."""
    def freeze(trainer: Trainer) -> None:
        trainer.model.requires_grad_(False)
        trainer.model.own[k].requires_grad_(True)
        trainer.batcher.only = [k]
    return freeze


def train_shared(trainer: Trainer) -> None:
    """Trainer hook: only the shared units train (every source's own units frozen). A bank's shared block is
    parameters of its own; in a total-width GPT the shared block is entries of larger matrices, so their gradient
    is masked and, after each step, the other entries are put back (AdamW's weight decay would shrink them)."""
    model = trainer.model
    if isinstance(model, CornerBank):
        model.own.requires_grad_(False)
        return
    masks = entry_masks(model, lambda o: o == SHARED, every=True)
    kept = {}
    for name, mask in masks.items():
        p = model.get_parameter(name)
        mask = mask.to(p.device)
        p.register_hook(lambda g, mask=mask: g * mask)
        kept[name] = (p, mask, p.detach().clone())

    def restore(optimizer, args, kwargs) -> None:
        with torch.no_grad():
            for p, mask, frozen in kept.values():
                p.copy_(torch.where(mask, p, frozen))
    trainer.optimizer.register_step_post_hook(restore)


# ----------------------------------------------------------------------------- data in the checkpoint's tokenizer


def unknown_characters(tokenizer: Tokenizer, text: str) -> Counter:
    """Characters of text a char tokenizer cannot encode, with their counts (none for byte-level BPE)."""
    if tokenizer.kind != "char":
        return Counter()
    vocab = set(tokenizer.chars)
    return Counter({c: n for c, n in Counter(text).items() if c not in vocab})


def check_vocabulary(tokenizer: Tokenizer, name: str, text: str, replace: str | None) -> Counter:
    """The characters of a source the checkpoint's char vocabulary lacks: refused naming them, unless `replace`
    (a character of the vocabulary) is to be written in their place. A vocabulary cannot grow: new rows of the
    tied LM head would change every corner's softmax."""
    unknown = unknown_characters(tokenizer, text)
    if replace is not None and (tokenizer.kind != "char" or len(replace) != 1 or replace not in tokenizer.chars):
        raise AbcgptError(f"--replace-unknown {replace!r} must be one character of the checkpoint's char vocabulary"
                          + (" (this checkpoint's bpe tokenizer encodes any text)" if tokenizer.kind != "char" else ""))
    if unknown and replace is None:
        shown = ", ".join(f"{c!r} ({n:,}x)" for c, n in unknown.most_common(8)) + (", ..." if len(unknown) > 8 else "")
        raise AbcgptError(f"source {name} has {len(unknown)} character(s) outside the checkpoint's "
                          f"{tokenizer.vocab_size}-character vocabulary: {shown}; a char vocabulary cannot grow "
                          "without changing every corner, so give --replace-unknown CHAR to write a character of "
                          "the vocabulary (e.g. ' ') in their place (nothing was written)")
    return unknown


def edited_data(recipe: Recipe, tokenizer: Tokenizer, replace: str | None = None, progress: bool = True) -> Path:
    """The recipe's prepared data (recipe.data_dir) in the checkpoint's tokenizer, written like data.prepare's
    (one atomic folder) but without training a tokenizer; reused when it is already there, in that tokenizer."""
    out = existing_dir(recipe.data_dir)
    if (out / "manifest.json").is_file():
        data = load_data(out)
        if (data.tokenizer.to_json() == tokenizer.to_json() and data.manifest.get("replace_unknown") == replace
                and stale_reason(recipe, data.manifest) is None):
            return out
        raise AbcgptError(f"{out} holds other prepared data (another tokenizer, another text or other sources): move "
                          "it away and run the command again (nothing was written)")
    texts = [load_source(s, recipe.data.heldout_fraction, progress) for s in recipe.data.sources]
    for t in texts:
        unknown = check_vocabulary(tokenizer, t.name, t.train + t.heldout, replace)
        if unknown:
            table = str.maketrans({c: replace for c in unknown})
            t.train, t.heldout = t.train.translate(table), t.heldout.translate(table)
            t.origin += f" ({sum(unknown.values()):,} characters outside the vocabulary written as {replace!r})"
    write_prepared(recipe.data_dir, recipe, tokenizer, texts, progress, replace_unknown=replace)
    if progress:
        print(f"prepared {recipe.data_dir} in the checkpoint's tokenizer")
    return recipe.data_dir


# ----------------------------------------------------------------------------- recipes and runs


def edited_recipe(recipe: Recipe, sources: list[SourceSpec], suffix: str) -> Recipe:
    """The recipe with other sources, a name of its own and data of its own (data.dir gets the suffix unless
    it names the recipe)."""
    data_dir = recipe.data.dir if "{recipe}" in recipe.data.dir else f"{recipe.data.dir.rstrip('/')}-{suffix}"
    data = dataclasses.replace(recipe.data, sources=sources, dir=data_dir)
    model = dataclasses.replace(recipe.model, n_sources=len(sources))
    new = dataclasses.replace(recipe, name=f"{recipe.name}-{suffix}", data=data, model=model)
    validate(new)
    return new


def with_training(recipe: Recipe, steps: int, overrides: list[str]) -> Recipe:
    """The recipe for an edit's training: `steps` steps (warm-up no longer than them), then --set train.* keys. No
    seed phase (train.branch_step): it would overwrite every trained source's own units with source 0's."""
    with declared("train."):
        t = dataclasses.replace(recipe.train, steps=steps, warmup_steps=min(recipe.train.warmup_steps, steps),
                                branch_step=0)
        for item in overrides:
            section, key, value = parse_override(item)
            if section != "train" or key == "branch_step":
                raise AbcgptError(f"--set {item}: only train.* keys other than branch_step may change here (the "
                                  "model and data are the checkpoint's, its sources trained)")
            t = dataclasses.replace(t, **{key: value})
    return dataclasses.replace(recipe, train=t)


def _check_new_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise AbcgptError(f"{out} exists: the edited model is written to a new folder, so choose another --out "
                          "(nothing was written)")


def _resuming(out: Path, edit: dict) -> bool:
    """Whether `out` holds this edit's unfinished run (resume it), or nothing (start it); anything else is
    refused, naming it."""
    if not out.exists() and not out.is_symlink():
        return False
    if out.is_dir() and not out.is_symlink():
        last = existing_dir(out / "last")
        if (last / "config.json").is_file():
            prev = (read_meta(last).edits or [None])[-1]
            if prev is not None and all(getattr(prev, k) == edit.get(k) for k in ("removed", "added", "from_model")):
                return True
        elif {p.name for p in out.iterdir()} <= {".lock"}:  # a start that stopped before its first checkpoint
            return False
    raise AbcgptError(f"{out} exists and is not this edit's unfinished run: choose another --out (nothing was "
                      "written)")


def _train_edit(out: Path, ckpt: Checkpoint, model, recipe: Recipe, edits: list[dict],
                freeze: Callable[[Trainer], None], resume: bool, progress: bool) -> Path:
    """Train the edited model in the run folder out through train.Trainer, from a step-0 checkpoint of it (fresh
    optimizer, the recipe's first batches); a run that was stopped (resume, as _resuming said) resumes from its last
    checkpoint. The recipe's data must be prepared (edited_data)."""
    with run_lock(out):
        if not resume:
            t = recipe.train
            torch.manual_seed(t.seed)
            optimizer = optimizer_for(model, t, "cpu")
            state = {"batcher": np.random.default_rng(t.seed).bit_generator.state, "best": math.inf}
            save_checkpoint(out / "last", model, recipe, ckpt.tokenizer, [s.name for s in recipe.data.sources], 0,
                            {}, optimizer, state, edits)
        Trainer(recipe, out, resume=True, progress=progress, freeze=freeze).train()
    return out


def _metrics_without(meta: Meta, source: str) -> dict:
    """The stored held-out losses, less the removed source and the middle (the kept corners are unchanged)."""
    heldout = meta.metrics and meta.metrics.heldout
    if not heldout:
        return {}
    rows = {pos: {s: v for s, v in row.items() if s != source} for pos, row in heldout.items()
            if pos not in (source, "middle")}
    own = [rows[s][s] for s in rows if s in rows[s]]
    return {"heldout": rows, "corner_own": sum(own) / len(own)} if own else {}


def _editable(ckpt: Checkpoint, what: str) -> None:
    cfg = ckpt.model.config
    if cfg.gates != "abc" or cfg.method != "partition":
        raise AbcgptError(f"{ckpt.path} is {'an ungated model' if cfg.gates != 'abc' else 'the reference method'}: "
                          f"{what} needs the partition method, where each unit belongs to one source (with the "
                          "reference method every unit learnt from every source)")


# ----------------------------------------------------------------------------- the two commands


def forget(ckpt_path: Path, source: str, out: Path, retrain_shared: int = 0, overrides: list[str] = (),
           progress: bool = True) -> tuple[Path, list[str]]:
    """Write `out`: the checkpoint without `source` (a checkpoint folder; a run folder when the shared units are
    retrained for `retrain_shared` steps). The original is not touched. Returns out and notes for the user."""
    out = Path(out)
    ckpt = load_checkpoint(ckpt_path)
    _editable(ckpt, "forget")
    sources, cfg = ckpt.sources, ckpt.model.config
    if source not in sources:
        raise AbcgptError(f"{ckpt.path} has no source {source!r}; its sources are {', '.join(sources)}")
    if len(sources) < 3:
        raise AbcgptError(f"cannot remove {source}: {ckpt.path} has {len(sources)} sources and a dial needs two "
                          "(nothing was written)")
    if retrain_shared < 0:
        raise AbcgptError(f"--retrain-shared must be a number of steps (0: none), got {retrain_shared}")
    if retrain_shared and not cfg.shared_fraction:
        raise AbcgptError(f"--retrain-shared: {ckpt.path} has no shared units (model.shared_fraction = 0), so "
                          f"nothing of {source} is left in the other corners to retrain (nothing was written)")
    if retrain_shared and cfg.shared_from == "first" and sources.index(source) != 0:
        raise AbcgptError(f"--retrain-shared: only {sources[0]} trained the shared units (model.shared_from = "
                          f"\"first\"), so {source} left nothing in them (nothing was written)")
    if not retrain_shared:
        _check_new_out(out)
    k = sources.index(source)
    model = without_source(ckpt.model.cpu(), k)
    keep = [j for j in range(len(sources)) if j != k]
    notes = []
    if not same_corners(ckpt.model, model, keep):
        notes.append(f"model.narrowness = {cfg.narrowness} put {source}'s units into other corners: those corners "
                     "change without them")
    if ckpt.recipe.train.corner_fraction < 1:
        notes.append(f"train.corner_fraction = {ckpt.recipe.train.corner_fraction}: {source}'s sequences drawn "
                     "between corners also trained weights of the other corners, which stay")
    if cfg.shared_fraction and not (cfg.shared_from == "first" and k != 0):
        notes.append(f"the shared units ({cfg.shared_fraction:.0%} of each group) learnt from {source} too"
                     + (f"; retrained for {retrain_shared} steps on the others" if retrain_shared else
                        ": --retrain-shared STEPS trains them on the others"))
    how = ("its own units deleted: " + ("its own pieces dropped" if isinstance(model, CornerBank) else
                                        "their weights zeroed and their gates off at every dial")
           + ("; " + "; ".join(notes) if notes else "; every other corner bit for bit as it was"))
    edits = [*(ckpt.meta.edits or []), {"removed": source, "how": how, "steps": retrain_shared or None,
                                        "from_model": ckpt.meta.files["model.safetensors"]}]
    specs = [s for s in ckpt.recipe.data.sources if s.name != source]
    recipe = edited_recipe(ckpt.recipe, specs, f"without-{source}")
    if retrain_shared:
        recipe = with_training(recipe, retrain_shared, list(overrides))
        resume = _resuming(out, edits[-1])  # (refuses a folder that is not this edit's run, before any work)
        edited_data(recipe, ckpt.tokenizer, None, progress)
        _train_edit(out, ckpt, model, recipe, edits, train_shared, resume, progress)
        return out, notes
    with output_lock(out, wait=False):
        _check_new_out(out)
        edited_data(recipe, ckpt.tokenizer, None, progress)
        save_checkpoint(out, model, recipe, ckpt.tokenizer, [s.name for s in specs], ckpt.meta.step,
                        _metrics_without(ckpt.meta, source), edits=edits)
    return out, notes


def add_source(ckpt_path: Path, spec: SourceSpec, steps: int, out: Path, replace: str | None = None,
               overrides: list[str] = (), progress: bool = True) -> Path:
    """Train `spec` into a bank of corners as a new source: its own pieces for `steps` steps on it alone, every
    other parameter frozen; written as a run folder `out` (rerun to resume it)."""
    out = Path(out)
    ckpt = load_checkpoint(ckpt_path)
    _editable(ckpt, "add-source")
    if not isinstance(ckpt.model, CornerBank):
        raise AbcgptError('add-source needs model.width = "corner": in a total-width partition model the sources '
                          "split one fixed width, so a new source has no units of its own to train")
    if spec.name in ckpt.sources:
        raise AbcgptError(f"{ckpt.path} already has a source {spec.name!r}; choose another --source name "
                          "(nothing was written)")
    if steps < 1:
        raise AbcgptError(f"--steps must be at least 1, got {steps}")
    edits = [*(ckpt.meta.edits or []), {"added": spec.name, "how": "", "steps": steps,
                                        "from_model": ckpt.meta.files["model.safetensors"]}]
    resume = _resuming(out, edits[-1])  # (refuses a folder that is not this edit's run, before any work)
    recipe = edited_recipe(ckpt.recipe, [*ckpt.recipe.data.sources, spec], f"plus-{spec.name}")
    recipe = with_training(recipe, steps, list(overrides))
    text = load_source(spec, recipe.data.heldout_fraction, progress)
    unknown = check_vocabulary(ckpt.tokenizer, spec.name, text.train + text.heldout, replace)
    edits[-1]["how"] = (f"its own units trained for {steps} steps on {spec.name} alone, every other parameter "
                        "frozen (the other corners bit for bit as they were)"
                        + (f"; {sum(unknown.values()):,} characters outside the vocabulary "
                           f"({''.join(sorted(unknown))!r}) written as {replace!r}" if unknown else ""))
    edited_data(recipe, ckpt.tokenizer, replace, progress)
    model = with_new_source(ckpt.model.cpu(), recipe.train.seed)
    return _train_edit(out, ckpt, model, recipe, edits, train_own(len(ckpt.sources)), resume, progress)
