"""Generality against individuality as sources are added: docs/scaling.md.

A bank of corners (model.width = "corner": each source its own network of one size, a share of it shared by all)
over the first N real corpora of ../shared/data/voices, for every N and shared share, at the same corner size and
steps; each against ungated GPTs of one corner's size trained for the same compute: `joint` (every source, the dial
model's steps), `alone_<s>` (s only, the steps the dial model spent on s) and `without_<s>` (every source but s, for
isolation).

    python scripts/scaling.py run --n 2 4 8 16 --shared 0 0.125 0.25 0.5     # train what is missing, 2 at a time
    python scripts/scaling.py score                                           # every finished run -> results.jsonl
    python scripts/scaling.py report --out docs                               # the table and docs/scaling.png

Each run trains with `abcgpt train` on one thread (two run side by side on a 2-core machine); finished runs are
skipped, so a killed sweep resumes. Scores: each source's held-out loss at every corner (N x N cells) and at the
uniform dial in the default mode (the posterior mixture of the corners), on the same fixed held-out batches for
every model."""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from abcgpt.checkpoint import load_checkpoint, read_meta, read_recipe
from abcgpt.config import load_recipe
from abcgpt.data import alone_steps, heldout_batches, prepared_data
from abcgpt.dial import combine_scores, corner
from abcgpt.engine import Engine

# Real voices in the order sources are added; the second is cut to 100 KB: a small source beside ~1 MB ones
VOICES = ["fortunes_en", "devils_dictionary", "bible_kjv", "python_stdlib", "man_en", "fortunes_de", "jargon_file",
          "wordnet_glosses", "debian_changelogs", "c_headers", "fortunes_es", "perl_modules", "dict_gcide", "man_fr",
          "gnu_standards", "fortunes_it"]
SMALL = {"devils_dictionary": 100_000}
MAX_BYTES = 1_000_000
ISOLATION_SOURCES = 4  # without_<s> baselines for this many sources (the first, the small one among them); 6 past 8
MODEL = """
[model]
n_layer = 4
n_head = 8
n_embd = 64
block_size = 128
dropout = 0.0
width = "corner"

[train]
steps = {steps}
batch_size = 32
lr = 4e-3
min_lr = 4e-4
warmup_steps = 50
eval_every = {steps}
eval_batches = 4
checkpoint_every = 500
log_every = 50
threads = 1
"""


def write_recipe(root: Path, n: int, steps: int, weights: dict[str, float] | None = None) -> Path:
    """The recipe of the first n voices; weights: how often a source is drawn (default 1 each), for the dial model
    and its baselines alike."""
    path = root / "recipes" / f"voices{n}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = weights or {}
    tables = "".join(f'[[data.sources]]\nname = "{v}"\nmax_bytes = {SMALL.get(v, MAX_BYTES)}\n'
                     + (f"weight = {weights[v]}\n" if v in weights else "") + "\n" for v in VOICES[:n])
    path.write_text(f'[data]\ntokenizer = "char"\ndir = "{root}/data/voices{n}"\n\n{tables}{MODEL.format(steps=steps)}')
    return path


def finished(run: Path, steps: int) -> bool:
    cfg = run / "last" / "config.json"
    return cfg.is_file() and read_meta(run / "last").step >= steps


def jobs_for(root: Path, n: int, shared: list[float], seeds: list[int], steps: int, sets: list[str], tag: str,
             isolation: int | None = None, weights: dict[str, float] | None = None) -> list[tuple[Path, list[str]]]:
    """(run folder, `abcgpt train` overrides) of every run one N needs."""
    weights = weights or {}
    recipe = write_recipe(root, n, steps, weights)
    names = VOICES[:n]
    jobs = [(root / f"n{n}" / f"shared{f:g}{tag}" / f"s{seed}",
             [f"model.shared_fraction={f}", f"train.seed={seed}", *sets]) for f in shared for seed in seeds]
    base = ["model.gates=none", "model.routing=soft"]
    jobs.append((root / f"n{n}" / "joint", base))
    for i, s in enumerate(names):
        a = alone_steps(steps, [weights.get(v, 1.0) for v in names], i)
        jobs.append((root / f"n{n}" / f"alone_{s}",
                     base + [f"train.only_sources=['{s}']", f"train.steps={a}", f"train.warmup_steps={min(50, a)}",
                             f"train.eval_every={a}"]))
    isolated = names[:min(n, (ISOLATION_SOURCES if n <= 8 else 6) if isolation is None else isolation)]
    for s in isolated:
        rest = ",".join(f"'{x}'" for x in names if x != s)
        jobs.append((root / f"n{n}" / f"without_{s}", base + [f"train.only_sources=[{rest}]"]))
    return [(run, [str(recipe)] + o) for run, o in jobs]


def parse_weight(item: str) -> tuple[str, float]:
    name, _, w = item.partition("=")
    try:
        return name, float(w)
    except ValueError:
        sys.exit(f"scaling.py: --weight takes SOURCE=NUMBER, got {item!r}")


def cmd_run(args) -> None:
    root = Path(args.root)
    weights = dict(parse_weight(w) for w in args.weight)
    for name in set(weights) - set(VOICES):
        sys.exit(f"scaling.py: --weight names {name!r}, not one of {', '.join(VOICES)}")
    todo = []
    for n in args.n:
        for run, (recipe, *overrides) in jobs_for(root, n, args.shared, args.seeds, args.steps, args.set,
                                                  f"-{args.tag}" if args.tag else "", args.isolation, weights):
            steps = next((int(o.split("=")[1]) for o in overrides if o.startswith("train.steps=")), args.steps)
            if not finished(run, steps):
                todo.append((run, recipe, overrides, steps))
        recipe_n = write_recipe(root, n, args.steps, weights)
        if subprocess.run([sys.executable, "-m", "abcgpt", "prepare", "--config", str(recipe_n)],
                          stdout=subprocess.DEVNULL).returncode:
            sys.exit(f"scaling.py: could not prepare the data of {recipe_n} (abcgpt's error is above)")
    print(f"{len(todo)} runs to train, {args.jobs} at a time", flush=True)

    def one(job):
        run, recipe, overrides, steps = job
        resume = (run / "last" / "config.json").is_file()
        cmd = [sys.executable, "-m", "abcgpt", "train", "--config", recipe, "--out", str(run)]
        if resume:  # (the run holds its recipe and overrides)
            cmd = [sys.executable, "-m", "abcgpt", "train", "--resume", str(run)]
        else:
            cmd += [x for o in overrides for x in ("--set", o)]
        t0 = time.time()
        log = run.parent / f"{run.name}.log"
        run.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})
        print(f"{'ok ' if rc.returncode == 0 else 'FAILED'} {run} ({time.time() - t0:.0f} s): {shlex.join(cmd)}",
              flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))


@torch.no_grad()
def token_logprobs(model_or_engine, tokens, block: int, batch: int, batches: int, k: int | None = None) -> torch.Tensor:
    """(batches * batch, block) log-probs of a source's fixed held-out windows: an Engine's corner k, or a plain
    ungated model."""
    out = []
    for x, y in heldout_batches(tokens, block, batch, batches):
        if isinstance(model_or_engine, Engine):
            n = len(model_or_engine.sources)
            out.append(model_or_engine.logprobs(x, y, [corner(k, n)])[0])
        else:
            logits, _ = model_or_engine(x, None, y)
            out.append(torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).squeeze(-1))
    return torch.cat(out)


def score_run(run: Path, base: dict[str, Path], batch: int, batches: int) -> dict:
    ckpt = load_checkpoint(run / "last")
    engine, names = Engine(ckpt), ckpt.sources
    data = prepared_data(ckpt.recipe, progress=False)
    held = dict(zip(data.sources, data.heldout))
    block, n = ckpt.model.config.block_size, len(names)
    # every source at every corner, per token: the corner table, isolation, and the mixture at the uniform dial
    lp = {s: torch.stack([token_logprobs(engine, held[s], block, batch, batches, k) for k in range(n)], 1)
          for s in names}  # (rows, N, T)
    L = {s: [-float(lp[s][:, k].mean()) for k in range(n)] for s in names}
    uniform = {s: -float(combine_scores(lp[s], torch.full((lp[s].size(0), n), -np.log(n)), "mixture").mean())
               for s in names}
    bl = {}
    for key, path in base.items():
        model = load_checkpoint(path / "last").model.eval()
        wanted = names if key == "joint" else [key.split("_", 1)[1]]
        bl[key] = {s: -float(token_logprobs(model, held[s], block, batch, batches).mean()) for s in wanted}
    tag = run.parent.name.partition("-")[2]  # shared0.25-TAG: a variant of the same setting (scaling.py run --tag)
    row = {"run": str(run), "n": n, "shared": ckpt.recipe.model.shared_fraction, "tag": tag,
           "seed": ckpt.recipe.train.seed,
           "steps": ckpt.meta.step, "sources": names, "params": ckpt.model.num_params(),
           "corner_params": ckpt.model.corner_params(), "tokens_per_cell": batch * batches * block,
           "corner": {s: L[s][i] for i, s in enumerate(names)},
           "joint": bl["joint"], "alone": {s: bl[f"alone_{s}"][s] for s in names if f"alone_{s}" in bl},
           "without": {s: bl[f"without_{s}"][s] for s in names if f"without_{s}" in bl},
           "uniform": uniform}
    row["regret_uniform"] = float(np.mean([uniform[s] - row["corner"][s] for s in names]))
    row["isolation"] = {s: min((L[s][k] - bl["joint"][s]) / (row["without"][s] - bl["joint"][s])
                               for k in range(n) if names[k] != s) for s in row["without"]}
    return row


def cmd_score(args) -> None:
    root = Path(args.root)
    out = root / "results.jsonl"
    done = {json.loads(line)["run"] for line in out.read_text().splitlines()} if out.is_file() else set()
    for nd in sorted(root.glob("n*"), key=lambda p: int(p.name[1:])):
        base = {p.name: p for p in nd.iterdir() if p.is_dir() and p.name.split("_")[0] in ("joint", "alone", "without")
                and finished(p, read_recipe(p / "last").train.steps)}  # (a run still training has a last/ too)
        for run in sorted(nd.glob("shared*/s*")):
            if str(run) in done or not (run / "last" / "config.json").is_file():
                continue
            steps = load_recipe(str(root / "recipes" / f"{nd.name.replace('n', 'voices')}.toml")).train.steps
            if read_meta(run / "last").step < steps or "joint" not in base:
                continue
            row = score_run(run, base, args.batch, args.batches)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{run}: corner - alone {np.mean([row['corner'][s] - row['alone'][s] for s in row['alone']]):+.3f}, "
                  f"corner - joint {np.mean([row['corner'][s] - row['joint'][s] for s in row['sources']]):+.3f}, "
                  f"isolation {min(row['isolation'].values(), default=float('nan')):.2f}, "
                  f"regret {row['regret_uniform']:.3f}", flush=True)


def measurable(row: dict, margin: float = 0.05) -> list[str]:
    """The sources whose isolation means something: the model that never saw s is at least `margin` nats worse on s
    than the joint one. (At 16 sources the others already teach English: fortunes_en and devils_dictionary are
    predicted as well without themselves, and the ratio's denominator is about 0.)"""
    return [s for s in row["isolation"] if row["without"][s] - row["joint"][s] >= margin]


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (N, shared): means over sources (and seeds), the smallest source apart."""
    out = []
    for key in sorted({(r["n"], r["shared"], r.get("tag", "")) for r in rows}):
        rs = [r for r in rows if (r["n"], r["shared"], r.get("tag", "")) == key]
        small = [s for s in SMALL if s in rs[0]["sources"]]
        iso = bool(measurable(rs[0]))

        def mean(f, rs=rs):
            return float(np.mean([f(r) for r in rs]))
        out.append({
            "n": key[0], "shared": key[1], "tag": key[2], "seeds": len(rs), "params": rs[0]["params"],
            "corner_params": rs[0]["corner_params"],
            "vs_alone": mean(lambda r: np.mean([r["corner"][s] - r["alone"][s] for s in r["alone"]])),
            "vs_joint": mean(lambda r: np.mean([r["corner"][s] - r["joint"][s] for s in r["sources"]])),
            "vs_joint_max": mean(lambda r: max(r["corner"][s] - r["joint"][s] for s in r["sources"])),
            "small_vs_alone": mean(lambda r, s=small: r["corner"][s[0]] - r["alone"][s[0]]) if small else None,
            # (None for a run without without_<s> baselines: scaling.py run --isolation 0)
            "isolation_mean": mean(lambda r: np.mean([r["isolation"][s] for s in measurable(r)])) if iso else None,
            "isolation_min": mean(lambda r: min(r["isolation"][s] for s in measurable(r))) if iso else None,
            "isolated_sources": len(measurable(rs[0])),
            "regret": mean(lambda r: r["regret_uniform"]),
        })
    return out


def cmd_report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (Path(args.root) / "results.jsonl").read_text().splitlines()]
    table = summarise(rows)
    print("| N | shared | seeds | params (M) | corner − alone | corner − joint (mean / worst) "
          "| smallest source − alone | isolation (mean / worst, sources where it is defined) | regret at uniform |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in table:
        small = "–" if t["small_vs_alone"] is None else f"{t['small_vs_alone']:+.3f}"
        setting = f"{t['shared']:g}" + (f" ({t['tag']})" if t["tag"] else "")
        print(f"| {t['n']} | {setting} | {t['seeds']} | {t['params'] / 1e6:.2f} | {t['vs_alone']:+.3f} | "
              f"{t['vs_joint']:+.3f} / {t['vs_joint_max']:+.3f} | {small} | " + (
                  "–" if t["isolation_mean"] is None else
                  f"{t['isolation_mean']:.2f} / {t['isolation_min']:.2f} ({t['isolated_sources']})")
              + f" | {t['regret']:.3f} |")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for n in sorted({t["n"] for t in table}):
        ts = [t for t in table if t["n"] == n and not t["tag"] and t["isolation_mean"] is not None]  # the frontier
        for ax, key, label in ((axes[0], "vs_alone", "corner − alone"), (axes[1], "vs_joint", "corner − joint")):
            ax.plot([t[key] for t in ts], [t["isolation_mean"] for t in ts], marker="o", label=f"N = {n}")
            for t in ts:
                ax.annotate(f"{t['shared']:g}", (t[key], t["isolation_mean"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xlabel(f"{label} (nats/token, mean over sources)")
    for ax in axes:
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_ylabel("isolation (mean over sources, worst other corner)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("individuality (isolation) against corner quality; labels: shared share of a corner")
    fig.tight_layout()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(args.out) / "scaling.png")
    with open(Path(args.out) / "scaling.json", "w") as f:
        json.dump(table, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/scaling")
    sub = p.add_subparsers(required=True)
    r = sub.add_parser("run")
    r.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16])
    r.add_argument("--shared", type=float, nargs="+", default=[0.0, 0.125, 0.25, 0.5])
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides of the dial runs")
    r.add_argument("--isolation", type=int, default=None,
                   help=f"without_<s> baselines for the first this many sources ({ISOLATION_SOURCES}; 6 past N = 8)")
    r.add_argument("--tag", default="", help="their variant's name: runs go to nN/sharedF-TAG/")
    r.add_argument("--weight", action="append", default=[], metavar="SOURCE=W",
                   help="draw SOURCE W times as often (all runs of this --root: its recipe's weight)")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("score")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--batches", type=int, default=4)
    s.set_defaults(func=cmd_score)
    rp = sub.add_parser("report")
    rp.add_argument("--out", default="docs")
    rp.set_defaults(func=cmd_report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
