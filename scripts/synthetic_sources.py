"""Train a small dial model on N synthetic sources (disjoint 4-symbol alphabets) and print how well the
corners separate them: the mean held-out loss of each source at its own corner, at the other corners, at the
middle, and how many corners give their own source the lowest loss.

    python scripts/synthetic_sources.py --n 16 --steps 1000
    python scripts/synthetic_sources.py --n 16 --steps 1000 --set model.specialty_concentration=0.5
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from abcgpt.checkpoint import load_checkpoint
from abcgpt.config import load_recipe
from abcgpt.data import prepared_data
from abcgpt.heldout import loss_table
from abcgpt.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import synthetic_text, write_recipe  # noqa: E402

SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&*+-/<=>?@^_~"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tables = []
        for k in range(args.n):
            (tmp / f"s{k}.txt").write_text(synthetic_text(SYMBOLS[4 * k:4 * k + 4], 12_000, k))
            tables.append(f'[[data.sources]]\nname = "s{k}"\npath = "{tmp / f"s{k}.txt"}"\n')
        overrides = [f"train.steps={args.steps}", "train.eval_every=100000", "model.n_embd=32",
                     f"model.n_head={args.n if 32 % args.n == 0 else 1}", "train.batch_size=16", *args.set]
        recipe = load_recipe(str(write_recipe(tmp, sources="\n".join(tables))), overrides)
        train(recipe, tmp / "run", progress=False)
        t = loss_table(load_checkpoint(tmp / "run" / "last").model, prepared_data(recipe, progress=False), 8, 2)
    names = [f"s{k}" for k in range(args.n)]
    own = np.mean([t[s][s] for s in names])
    other = np.mean([t[c][s] for s in names for c in names if c != s])
    won = sum(t[s][s] < min(t[s][u] for u in names if u != s) for s in names)
    print(f"N={args.n} steps={args.steps} {' '.join(args.set)}: own corner {own:.3f}, other corners {other:.3f}, "
          f"middle {np.mean([t['middle'][s] for s in names]):.3f}, corners won {won}/{args.n} "
          f"(held-out, {8 * 2 * 16} windows of 16 tokens per cell)")


if __name__ == "__main__":
    main()
