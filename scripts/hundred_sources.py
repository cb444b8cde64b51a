"""A recipe of 100 sources for a small bank of corners (model.width = "corner") that trains on a 2-core CPU.

28 are real corpora: 26 of the voices (all but fortunes_zh and man_ja, whose thousands of characters would make the
character vocabulary most of the model) plus TinyStories and tiny Shakespeare (the built-ins kjv and python are the
voices bible_kjv and python_stdlib again), each cut to --bytes. The other 72 are synthetic, written into --out:
words over a 5-letter alphabet of their own (a fixed draw from a-z per source), so they add no character.

    python scripts/hundred_sources.py --out runs/hundred        # writes runs/hundred/hundred.toml and the texts
    abcgpt train --config runs/hundred/hundred.toml --out runs/hundred/run
    abcgpt eval --ckpt runs/hundred/run --quick
    abcgpt serve --ckpt runs/hundred/run
"""

import argparse
import random
import string
from pathlib import Path

from abcgpt.sources import VOICES

REAL = [v for v in VOICES if v not in ("fortunes_zh", "man_ja")] + ["tinystories", "shakespeare"]
MODEL = """
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 64
width = "corner"

[train]
steps = {steps}
batch_size = 32
sources_per_batch = 4
lr = 4e-3
min_lr = 4e-4
warmup_steps = 50
eval_every = {steps}
eval_batches = 2
checkpoint_every = 500
log_every = 50
"""


def synthetic(seed: int, n_bytes: int) -> str:
    """Lines of words over a 5-letter alphabet drawn for this source, word lengths 2-7."""
    rng = random.Random(seed)
    letters = "".join(rng.sample(string.ascii_lowercase, 5))
    words, size = [], 0
    while size < n_bytes:
        words.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))))
        size += len(words[-1]) + 1
    return "\n".join(" ".join(words[i:i + 10]) for i in range(0, len(words), 10)) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/hundred")
    p.add_argument("--bytes", type=int, default=100_000, help="training text per source (real ones are cut)")
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    out = Path(args.out).resolve()
    (out / "synthetic").mkdir(parents=True, exist_ok=True)
    tables = [f'[[data.sources]]\nname = "{name}"\nmax_bytes = {args.bytes}\n' for name in REAL]
    for i in range(100 - len(REAL)):
        path = out / "synthetic" / f"synthetic_{i:02d}.txt"
        path.write_text(synthetic(i, args.bytes))
        tables.append(f'[[data.sources]]\nname = "synthetic_{i:02d}"\npath = "{path}"\n')
    recipe = out / "hundred.toml"
    head = f"# written by scripts/hundred_sources.py: {len(REAL)} real sources, {100 - len(REAL)} synthetic\n"
    recipe.write_text(head + f'[data]\ntokenizer = "char"\ndir = "{out / "data"}"\n\n' + "\n".join(tables)
                      + MODEL.format(steps=args.steps))
    print(recipe)


if __name__ == "__main__":
    main()
