"""How often attribution names the right source, on held-out text of known source (docs/attribution.md).

For every source of each model: passages of --tokens held-out tokens (non-overlapping, spread evenly over the
source's held-out text, at most --passages of them), read with a uniform prior (Engine.posteriors, the posterior
over sources after each token that mode mixture generates with; --mode switch restarts it after each line or
sentence end). Per token: how often the top source is the passage's own, over the tokens after the first --burn.
Per passage: how often the mixture's posterior after the whole passage (Attribution.final) puts its own source
first. Also the mean posterior of the own source over those tokens, and the source
put first instead most often (per passage), and the share of passages whose top source is right after reading 2, 5,
10, 20, 50, 100 and 200 tokens.

    python scripts/attribution.py runs/ablations/default-v22/s0=data/tiny runs/voices=data/voices \\
        runs/four=data/four --out docs/attribution.json

Prints a Markdown table; writes every number to --out.
"""

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from abcgpt.checkpoint import load_checkpoint
from abcgpt.common import AbcgptError
from abcgpt.data import load_data
from abcgpt.engine import Engine


def passages(heldout: np.ndarray, tokens: int, most: int) -> torch.Tensor:
    """(P, tokens) non-overlapping passages spread evenly over one source's held-out tokens."""
    count = min(most, len(heldout) // tokens)
    if count < 1:
        raise AbcgptError(f"{len(heldout)} held-out tokens: fewer than one passage of {tokens}")
    stride = len(heldout) // count
    return torch.from_numpy(np.stack([heldout[i * stride:i * stride + tokens] for i in range(count)]).astype(np.int64))


AFTER = (2, 5, 10, 20, 50, 100, 200)  # tokens read, where accuracy_after looks


def read(engine: Engine, ids: torch.Tensor, mode: str, batch: int) -> torch.Tensor:
    """(P, T, N) posteriors of passages ids (P, T), a batch at a time, uniform prior."""
    return torch.cat([engine.posteriors(ids[i:i + batch], "uniform", mode) for i in range(0, len(ids), batch)])


def measure(engine: Engine, data, tokens: int, most: int, burn: int, mode: str, batch: int = 64) -> dict:
    """Per source: passages, per-token and per-passage accuracy, mean posterior of the own source, top confusion."""
    out = {}
    for j, src in enumerate(engine.sources):
        ids = passages(data.heldout[j], tokens, most)
        post = read(engine, ids, mode, batch)
        whole = post if mode == "mixture" else read(engine, ids, "mixture", batch)  # the mixture's, in any mode
        top, final = post[:, burn:].argmax(-1), whole[:, -1].argmax(-1)
        wrong = Counter(engine.sources[k] for k in final.tolist() if k != j)
        out[src] = {"passages": len(ids), "token_accuracy": float((top == j).float().mean()),
                    "passage_accuracy": float((final == j).float().mean()),
                    "own_posterior": float(post[:, burn:, j].mean()),
                    # how much text it takes: the share of passages whose top source is right after t tokens
                    "accuracy_after": {t: float((post[:, t - 1].argmax(-1) == j).float().mean())
                                       for t in AFTER if t <= tokens},
                    "confused_with": wrong.most_common(1)[0][0] if wrong else None,
                    "confused_passages": wrong.most_common(1)[0][1] if wrong else 0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", metavar="RUN=DATA", help="a run and its prepared data folder")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per passage")
    ap.add_argument("--passages", type=int, default=100, help="passages per source, at most")
    ap.add_argument("--burn", type=int, default=20, help="per-token accuracy counts the tokens after these")
    ap.add_argument("--mode", choices=("mixture", "switch"), default="mixture")
    ap.add_argument("--out", type=Path, help="JSON file to write")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {"settings": {k: getattr(args, k) for k in ("tokens", "passages", "burn", "mode")}, "models": {}}
    print("| model | source | passages | per token (after 20) | per passage | mean P(own source) | "
          "most often put first instead |\n|---|---|---|---|---|---|---|")
    for spec in args.models:
        run, _, folder = spec.partition("=")
        t0 = time.time()
        engine = Engine(load_checkpoint(run, "cpu"))
        data = load_data(Path(folder))
        if data.sources != engine.sources or data.tokenizer.to_json() != engine.tokenizer.to_json():
            raise AbcgptError(f"{folder} is not the data {run} was trained on")
        rows = measure(engine, data, args.tokens, args.passages, args.burn, args.mode)
        mean = {k: float(np.mean([r[k] for r in rows.values()]))
                for k in ("token_accuracy", "passage_accuracy", "own_posterior")}
        results["models"][run] = {"sources": rows, "mean": mean, "chance": 1 / len(rows),
                                  "seconds": round(time.time() - t0, 1)}
        for src, r in rows.items():
            other = f"{r['confused_with']} ({r['confused_passages']})" if r["confused_with"] else "–"
            print(f"| {run} | {src} | {r['passages']} | "
                  f"{r['token_accuracy']:.3f} | {r['passage_accuracy']:.3f} | {r['own_posterior']:.3f} | {other} |")
        print(f"| **{run}** | **mean of {len(rows)}** (chance {1 / len(rows):.3f}) | | "
              + " | ".join(f"**{mean[k]:.3f}**" for k in mean) + " | |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
