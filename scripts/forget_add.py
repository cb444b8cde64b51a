"""The measurements of docs/forget_add.md: a source taken out of a trained model (`abcgpt forget`) and one added to
it (`abcgpt add-source`), against the ungated baselines.

    python scripts/forget_add.py --out runs/forget_add [--steps 600] [--retrain 200] [--threads 1]

forget: the `tiny` recipe's model with KJV as a third source (`three`: TinyStories, Shakespeare and KJV, 1.5 MB each
at most), default method and width, with no shared units and with a quarter shared; Shakespeare is removed, then
(shared units) retrained. Shakespeare's held-out loss at each remaining corner and at the remaining sources' even
mix (mode switch, the default, and mixture) is compared with the baselines `joint` and `without_shakespeare`:
isolation = (loss - joint) / (without - joint), 1 = as if never trained on it.

forget-bank: the same with `three` as a bank of corners (a quarter shared), against banks of the other two sources
that never saw Shakespeare (a corner has the same size whatever the number of sources): what the shared units keep.

add-source: the `tiny` recipe as a bank of corners (`model.width = "corner"`, a quarter shared) gets KJV for half the
steps (what each of its two sources got), against `alone_kjv` (an ungated GPT of the corner's width, the same steps
and batches, KJV alone) and a bank trained from scratch on all three for 1.5x the steps (each source the same rows).

Every run goes into OUT; finished ones are reused, so a killed measurement resumes. OUT/results-forget.json,
results-forget-bank.json and results-add.json have the numbers (the parts may run side by side: --only PART).
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from abcgpt.checkpoint import load_checkpoint, read_recipe
from abcgpt.cli import main
from abcgpt.config import load_recipe
from abcgpt.data import load_data
from abcgpt.dial import corner, uniform
from abcgpt.engine import Engine
from abcgpt.heldout import dial_losses, heldout_loss
from abcgpt.train import train, train_baselines

FORGET = "shakespeare"
THREE = """include = "tiny"
[data]
dir = "{out}/data/{{recipe}}"
[[data.sources]]
name = "tinystories"
max_bytes = 1_500_000
[[data.sources]]
name = "shakespeare"
[[data.sources]]
name = "kjv"
max_bytes = 1_500_000
"""
TWO = """include = "tiny"
[data]
dir = "{out}/data/{{recipe}}"
"""


def cli(*args: str) -> None:
    print("$ abcgpt " + " ".join(args), flush=True)
    if main(list(args)):
        raise SystemExit(f"abcgpt {args[0]} failed")


def done(run: Path) -> bool:
    last = run / "last" / "config.json"
    return last.is_file() and json.loads(last.read_text())["step"] >= read_recipe(run / "last").train.steps


def trained(recipe: Path, out: Path, steps: int, threads: int, *sets: str) -> Path:
    if not done(out):
        args = ["train", "--config", str(recipe), "--out", str(out), "--steps", str(steps),
                "--set", f"train.threads={threads}", *[x for s in sets for x in ("--set", s)]]
        if (out / "last").exists():
            args = ["train", "--resume", str(out), "--steps", str(steps)]
        cli(*args)
    return out


def loss(model, tokens, dial, batches: int) -> float:
    return heldout_loss(model, tokens, dial, 32, batches)


def forget_part(out: Path, steps: int, retrain: int, threads: int, batches: int) -> dict:
    recipe = out / "three.toml"
    recipe.write_text(THREE.format(out=out))
    runs = {"no shared units": trained(recipe, out / "three_s0", steps, threads),
            "a quarter shared": trained(recipe, out / "three_s25", steps, threads, "model.shared_fraction=0.25")}
    base = out / "three_baselines"
    r = load_recipe(str(recipe), [f"train.steps={steps}", f"train.threads={threads}"])
    train_baselines(r, base, only=["joint", f"without_{FORGET}"])
    data = load_data(r.data_dir)
    tokens = dict(zip(data.sources, data.heldout))
    joint = loss(load_checkpoint(base / "joint").model, tokens[FORGET], None, batches)
    never = loss(load_checkpoint(base / f"without_{FORGET}").model, tokens[FORGET], None, batches)
    edited = {}
    for name, run in runs.items():
        new = out / f"{run.name}_without_{FORGET}"
        if not new.exists():
            cli("forget", "--ckpt", str(run), "--source", FORGET, "--out", str(new))
        edited[name] = new
    retrained = out / f"three_s25_without_{FORGET}_retrained"
    if not done(retrained):
        cli("forget", "--ckpt", str(runs["a quarter shared"]), "--source", FORGET, "--out", str(retrained),
            "--retrain-shared", str(retrain), "--set", f"train.threads={threads}")
    edited[f"a quarter shared, retrained {retrain} steps"] = retrained

    def iso(x: float) -> float:
        return (x - joint) / (never - joint)

    rows = {}
    for name, path in [(f"{k}, before", v) for k, v in runs.items()] + [(f"{k}, after", v) for k, v in edited.items()]:
        ckpt = load_checkpoint(path)
        engine, sources = Engine(ckpt), ckpt.sources
        others = [s for s in sources if s != FORGET]
        n = len(sources)
        dials = [corner(sources.index(s), n) for s in others]
        row = {f"{FORGET} at {s}": iso(loss(ckpt.model, tokens[FORGET], d, batches)) for s, d in zip(others, dials)}
        if FORGET not in sources:  # the remaining sources' even mix, in the default mode and mixture
            for mode in ("switch", "mixture"):
                x = float(dial_losses(engine, tokens[FORGET], [uniform(n)], mode, 32, batches).mean())
                row[f"{FORGET} at the even mix ({mode})"] = iso(x)
        row |= {f"{s} at its corner": loss(ckpt.model, tokens[s], corner(sources.index(s), n), batches)
                for s in others}
        rows[name] = row
    return {"joint": joint, f"without_{FORGET}": never, "isolation and losses": rows}


def forget_bank_part(out: Path, steps: int, retrain: int, threads: int, batches: int) -> dict:
    """What the shared units keep of the removed source, measured where a model that never saw it has corners of
    the same size: a bank of corners (each corner the recipe's size whatever N is). `three_bank` (three sources,
    a quarter shared, `steps` steps) without Shakespeare, then retrained, against banks of the other two that never
    saw it, trained for 2/3 of the steps (each source the same rows) and for the same steps (the shared units the
    same steps), in the same tokenizer (forget's data)."""
    recipe = out / "three.toml"
    recipe.write_text(THREE.format(out=out))
    bank = trained(recipe, out / "three_bank", steps, threads, "model.width=corner", "model.shared_fraction=0.25")
    without, retrained = out / f"three_bank_without_{FORGET}", out / f"three_bank_without_{FORGET}_retrained"
    if not without.exists():
        cli("forget", "--ckpt", str(bank), "--source", FORGET, "--out", str(without))
    if not done(retrained):
        cli("forget", "--ckpt", str(bank), "--source", FORGET, "--out", str(retrained), "--retrain-shared",
            str(retrain), "--set", f"train.threads={threads}")
    nevers = {}
    for n_steps, what in ((steps * 2 // 3, "each source the same rows"), (steps, "the same steps")):
        never = nevers[f"never saw {FORGET}: a bank of the other two, {n_steps} steps ({what})"] = (
            out / f"three_bank_never_{FORGET}_{n_steps}")
        if not done(never):  # the forgotten model's recipe: the other two sources, in the three's tokenizer
            r = read_recipe(without)
            t = dataclasses.replace(r.train, steps=n_steps, threads=threads)
            train(dataclasses.replace(r, train=t), never, resume=(never / "last").exists())
    base = out / "three_baselines"  # (ungated, n_embd 128: a corner's size)
    data = load_data(load_recipe(str(recipe)).data_dir)
    tokens = dict(zip(data.sources, data.heldout))
    joint = loss(load_checkpoint(base / "joint").model, tokens[FORGET], None, batches)
    nvr = loss(load_checkpoint(base / f"without_{FORGET}").model, tokens[FORGET], None, batches)
    rows = {}
    for name, path in (("three sources, before", bank), ("after forget", without),
                       (f"after forget, shared units retrained {retrain} steps", retrained), *nevers.items()):
        ckpt = load_checkpoint(path)
        sources, n = ckpt.sources, len(ckpt.sources)
        others = [s for s in sources if s != FORGET]
        row = {}
        for s in others:
            x = loss(ckpt.model, tokens[FORGET], corner(sources.index(s), n), batches)
            row[f"{FORGET} at {s}: loss"], row[f"{FORGET} at {s}: isolation"] = x, (x - joint) / (nvr - joint)
        row |= {f"{s} at its corner": loss(ckpt.model, tokens[s], corner(sources.index(s), n), batches)
                for s in others}
        rows[name] = row
    return {"joint": joint, f"without_{FORGET}": nvr, "isolation and losses": rows}


def add_part(out: Path, steps: int, threads: int, batches: int) -> dict:
    recipe = out / "two.toml"
    recipe.write_text(TWO.format(out=out))
    bank = trained(recipe, out / "tiny_bank", steps, threads, "model.width=corner", "model.shared_fraction=0.25")
    added, n_add = out / "tiny_bank_plus_kjv", steps // 2
    if not done(added):
        cli("add-source", "--ckpt", str(bank), "--source", "kjv", "--max-bytes", "1500000", "--steps", str(n_add),
            "--replace-unknown", " ", "--out", str(added), "--set", f"train.threads={threads}")
    three = read_recipe(added / "last")  # its data: the bank's tokenizer, KJV's unknown characters as spaces
    three = dataclasses.replace(three, train=dataclasses.replace(three.train, threads=threads))
    alone = dataclasses.replace(three, train=dataclasses.replace(three.train, steps=3 * n_add))
    train_baselines(alone, out / "plus_kjv_baselines", only=["alone_kjv"])  # 3 n_add * 1/3: n_add steps
    scratch = out / "scratch_bank3"
    if not done(scratch):  # (the same recipe, so the same data: its name places it)
        t = dataclasses.replace(three.train, steps=steps * 3 // 2, warmup_steps=load_recipe("tiny").train.warmup_steps)
        train(dataclasses.replace(three, train=t), scratch, resume=(scratch / "last").exists())
    data = load_data(three.data_dir)
    tokens = dict(zip(data.sources, data.heldout))
    rows = {}
    for name, path in (("added (kjv: its own units, the rest frozen)", added),
                       ("from scratch on all three", scratch)):
        m = load_checkpoint(path).model
        rows[name] = {s: loss(m, tokens[s], corner(k, 3), batches) for k, s in enumerate(data.sources)}
    rows["original two-source bank"] = {s: loss(load_checkpoint(bank).model, tokens[s], corner(k, 2), batches)
                                        for k, s in enumerate(data.sources[:2])}
    rows["alone_kjv (ungated, corner width)"] = {"kjv": loss(load_checkpoint(out / "plus_kjv_baselines" / "alone_kjv")
                                                             .model, tokens["kjv"], None, batches)}
    return {"steps": {"bank": steps, "add-source": n_add, "alone": n_add, "scratch": steps * 3 // 2},
            "own-corner loss": rows}


def table(results: dict) -> str:
    lines = []
    for part in results:
        section = results[part]
        rows = section["own-corner loss"] if part == "add" else section["isolation and losses"]
        cols = list(dict.fromkeys(k for row in rows.values() for k in row))
        lines += ["", "| | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
        lines += [f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in cols) + " |"
                  for name, row in rows.items()]
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/forget_add"))
    p.add_argument("--steps", type=int, default=600, help="the dial models' steps (and the baselines')")
    p.add_argument("--retrain", type=int, default=200, help="--retrain-shared steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=16, help="held-out batches of 32 x 128 tokens per number")
    p.add_argument("--only", choices=("forget", "forget-bank", "add"), help="one of the measurements")
    return p.parse_args()


if __name__ == "__main__":
    args = parse()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    if args.only in (None, "forget"):
        found = forget_part(args.out, args.steps, args.retrain, args.threads, args.batches)
        (args.out / "results-forget.json").write_text(json.dumps(found, indent=2))
    if args.only in (None, "forget-bank"):
        found = forget_bank_part(args.out, args.steps, args.retrain, args.threads, args.batches)
        (args.out / "results-forget-bank.json").write_text(json.dumps(found, indent=2))
    if args.only in (None, "add"):
        found = add_part(args.out, args.steps, args.threads, args.batches)
        (args.out / "results-add.json").write_text(json.dumps(found, indent=2))
    results = {part: json.loads((args.out / f"results-{part}.json").read_text())
               for part in ("forget", "forget-bank", "add")
               if (args.out / f"results-{part}.json").is_file()}
    print(json.dumps(results, indent=2))
    print(table(results))
