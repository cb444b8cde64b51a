"""abcgpt.memory's estimates against the memory real runs take, on this machine's CPU.

    python benchmarks/memory_estimate.py                 # every size: a few training steps, then generation
    python benchmarks/memory_estimate.py --only tiny,bank6
    python benchmarks/memory_estimate.py --json out.json

Each size trains for a few steps (abcgpt.train.train, evaluation and checkpoint included) in a fresh subprocess,
then generates from that checkpoint in another one. A process's peak is its resident set's high-water mark (Linux
VmHWM, reset through /proc/self/clear_refs once the imports are done and the data is loaded or the checkpoint read;
elsewhere a thread samples the RSS), less the RSS at that point. The sources are synthetic (each its own
alphabet), so the number of sources and the vocabulary are whatever a size asks for. Prints estimate, measured and
their ratio per size, and whether every ratio is within 2x."""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

SIZES = {
    # name: (model/train overrides, sources, characters per source alphabet, generation: rows, dial, mode)
    "small": (["model.gates=none", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.block_size=64",
               "train.batch_size=16"], 2, 8, (128, "0", None)),
    "tiny": (["model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.block_size=128",
              "train.batch_size=32"], 2, 8, (256, "0.5", None)),
    "bank6": (["model.width=corner", "model.shared_fraction=0.25", "model.n_layer=4", "model.n_embd=128",
               "model.n_head=4", "model.block_size=128", "train.batch_size=16"], 6, 8, (128, "uniform", "tokens")),
    "vocab4k": (["model.gates=none", "model.n_layer=2", "model.n_embd=128", "model.n_head=4",
                 "model.block_size=128", "train.batch_size=16"], 2, 2000, (128, "0", None)),
    "interior": (["train.corner_fraction=0.5", "model.dropout=0.1", "model.n_layer=4",
                  "model.n_embd=128", "model.n_head=4", "model.block_size=128", "train.batch_size=32"], 2, 8,
                 (64, "0.5", "gates")),
    "bf16": (["train.dtype=bfloat16", "model.n_layer=4", "model.n_embd=128", "model.n_head=4",
              "model.block_size=128", "train.batch_size=16"], 2, 8, (128, "1", None)),
    "long": (["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.block_size=1024",
              "train.batch_size=8"], 2, 8, (64, "1", None)),
    "wide": (["model.n_layer=6", "model.n_embd=384", "model.n_head=6", "model.block_size=128",
              "train.batch_size=8"], 4, 8, (64, "uniform", "mixture")),
}
STEPS = ["train.steps=3", "train.warmup_steps=1", "train.eval_every=3", "train.eval_batches=1",
         "train.checkpoint_every=3", "train.log_every=1", "train.threads=1"]
NEW_TOKENS = 32


# ----------------------------------------------------------------------------- peak memory of one process


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_increase(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak RSS while fn runs less the RSS before it, fn's result)."""
    import psutil

    proc = psutil.Process()
    try:  # Linux: reset the high-water mark to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        exact = _status("VmHWM") is not None
    except OSError:
        exact = False
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():  # elsewhere: sample the RSS (misses peaks shorter than a millisecond)
        while not done.wait(0.001):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = None if exact else threading.Thread(target=sample, daemon=True)
    if sampler:
        sampler.start()
    try:
        out = fn()
    finally:
        done.set()
        if sampler:
            sampler.join()
    top = _status("VmHWM") if exact else max(peak[0], proc.memory_info().rss)
    return top - base, out


# ----------------------------------------------------------------------------- the child processes


def write_recipe(folder: Path, n_sources: int, alphabet: int) -> Path:
    """n synthetic sources of words over disjoint alphabets of `alphabet` CJK characters each (the vocabulary is
    n x alphabet, plus space and line break)."""
    rng, sources = random.Random(0), []
    for k in range(n_sources):
        chars = [chr(0x4E00 + k * alphabet + i) for i in range(alphabet)]
        words = [" ".join("".join(rng.choice(chars) for _ in range(rng.randint(2, 6))) for _ in range(8))
                 for _ in range(3000)]
        (folder / f"s{k}.txt").write_text("\n".join(words) + "\n")
        sources.append(f'[[data.sources]]\nname = "s{k}"\npath = "{folder / f"s{k}.txt"}"\n')
    path = folder / "recipe.toml"
    path.write_text(f'[data]\ndir = "{folder / "data"}"\ntokenizer = "char"\n\n' + "\n".join(sources))
    return path


def child_train(size: str, folder: Path) -> dict:
    import dataclasses

    import matplotlib.pyplot  # noqa: F401 (imported by the run's plot: part of the baseline, not the model)
    import torch

    from abcgpt.config import load_recipe
    from abcgpt.data import prepared_data
    from abcgpt.memory import training_parts
    from abcgpt.train import train

    overrides, n, alphabet, _ = SIZES[size]
    recipe = load_recipe(str(write_recipe(folder, n, alphabet)), overrides + STEPS)
    data = prepared_data(recipe, progress=False)
    cfg = dataclasses.replace(recipe.model, vocab_size=data.tokenizer.vocab_size, n_sources=len(data.sources))
    parts = training_parts(cfg, recipe.train, torch.device("cpu"))
    measured, _ = peak_increase(lambda: train(recipe, folder / "run", progress=False))
    return {"estimate": sum(parts.values()), "measured": measured, "parts": parts, "vocab": cfg.vocab_size}


def child_generate(size: str, folder: Path) -> dict:
    from abcgpt.checkpoint import load_checkpoint
    from abcgpt.dial_spec import parse_dial
    from abcgpt.engine import Engine
    from abcgpt.memory import generation_parts

    rows, dial, mode = SIZES[size][3]
    engine = Engine(load_checkpoint(folder / "run" / "last"))
    prompt = engine.tokenizer.decode([1, 2, 3, 4, 5, 6, 7, 8])
    d, _ = parse_dial(dial, engine.sources)
    ids = engine.prompt_ids(prompt)
    mode_ = engine.mode(mode)
    parts = generation_parts(engine.model.config, rows, len(ids), NEW_TOKENS,
                             d[None].expand(rows, -1) if engine.gated else None, mode_)
    measured, _ = peak_increase(lambda: engine.generate(prompt, dial, NEW_TOKENS, n=rows, seed=0, mode=mode))
    return {"estimate": sum(parts.values()), "measured": measured, "parts": parts}


def run_child(kind: str, size: str, folder: Path) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", kind, size, str(folder)], capture_output=True,
                         text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{kind} {size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(size: str) -> dict:
    """Training and generation of one size, each in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        train = run_child("train", size, Path(tmp))
        gen = run_child("generate", size, Path(tmp))
    return {"size": size, "train": train, "generate": gen, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated sizes: " + ",".join(SIZES))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, size, folder = a.child
        print(json.dumps((child_train if kind == "train" else child_generate)(size, Path(folder))))
        return
    from abcgpt.memory import fmt_bytes

    sizes = a.only.split(",") if a.only else list(SIZES)
    results, ok = [], True
    print(f"{'size':<10}{'what':<10}{'estimate':>10}{'measured':>10}{'ratio':>7}   largest parts of the estimate")
    for size in sizes:
        r = measure(size)
        results.append(r)
        for what in ("train", "generate"):
            m = r[what]
            ratio = m["estimate"] / max(m["measured"], 1)
            ok &= 0.5 <= ratio <= 2.0
            parts = sorted(((v, k) for k, v in m["parts"].items() if v), reverse=True)[:3]
            print(f"{size:<10}{what:<10}{fmt_bytes(m['estimate']):>10}{fmt_bytes(m['measured']):>10}{ratio:>7.2f}"
                  f"   {', '.join(f'{k} {fmt_bytes(v)}' for v, k in parts)}", flush=True)
    print(f"every estimate within 2x of the measured peak: {'yes' if ok else 'NO'}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
