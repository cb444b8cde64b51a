"""How low can the morph error go? Samples dealt from the corners' own sentences, scored as the report scores a mode.

    python scripts/morph_floor.py --ckpt runs/four/best                  # 200 characters, as the report samples
    python scripts/morph_floor.py --ckpt runs/four/best --new-tokens 300 --mode switch

Each corner writes its samples (the report's prompt, seed and count, three times the length), cut into turns:
sentences and lines of at least dial.MIN_TURN_CHARS characters. A sample at dial a is then dealt from the corners'
turns in exactly a's shares (dial.next_segment_source, as `switch` deals), each turn on a line of its own, cut at
the sample's length. No model runs between the corners, so what these samples score along every edge and at the
centroid (style.morph_error, style.centroid_style, with the report's classifier) is what a mode that deals whole
sentences cannot beat: the measurement's own floor at that length. --mode also scores the checkpoint's samples in
that mode, for comparison. docs/ablations.md has the numbers for `four`.
"""

import argparse
import re

import numpy as np
import torch

from abcgpt.checkpoint import load_checkpoint
from abcgpt.dial import MIN_TURN_CHARS, corner, dial_path, next_segment_source, uniform
from abcgpt.engine import Engine
from abcgpt.report import heldout_data
from abcgpt.report_metrics import Settings, edge_ts, edges, fit_classifier, style_curve
from abcgpt.style import centroid_style, morph_error, within_sample

SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


def turns_of(text: str, min_chars: int = MIN_TURN_CHARS) -> list[str]:
    """A text's sentences and lines of at least min_chars characters (stripped), in order."""
    return [t.strip() for t in SENTENCE_END.split(text) if len(t.strip()) >= min_chars]


def deal(turns: list[list[str]], shares: torch.Tensor, chars: int) -> str:
    """A sample of `chars` characters dealt from each corner's turns (turns[k], used in order) in the shares
    (N,): each next turn goes to the corner furthest below its share after it, each on its own line."""
    out, dealt, used = [], torch.zeros(1, len(turns)), [0] * len(turns)
    while sum(len(t) + 1 for t in out) < chars:
        k = int(next_segment_source(shares[None], dealt))
        if used[k] >= len(turns[k]):  # this corner's text is spent: the sample ends here
            break
        out.append(turns[k][used[k]])
        used[k] += 1
        dealt[0, k] += 1
    return "\n".join(out)[:chars]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--new-tokens", type=int, default=None, help="sample length (default: the report's)")
    p.add_argument("--mode", default=None, help="also score the checkpoint's own samples in this mode")
    args = p.parse_args()
    engine = Engine(load_checkpoint(args.ckpt))
    s = Settings() if args.new_tokens is None else Settings(new_tokens=args.new_tokens)
    clf = fit_classifier(heldout_data(engine.checkpoint), s)
    n, ts = len(engine.sources), edge_ts(len(engine.sources), s)
    turns = [[turns_of(t) for t in engine.generate(s.prompt, corner(k, n), 3 * s.new_tokens, s.temperature, s.top_k,
                                                   s.seed, n=s.samples, mode="mixture")] for k in range(n)]

    def styles(shares: torch.Tensor) -> list[list[float]]:  # each dealt sample's style (its lines' mean proba)
        return within_sample(clf, [deal([t[b] for t in turns], shares, s.new_tokens) for b in range(s.samples)]
                             )["line_proba"]

    print(f"{args.ckpt}: {s.samples} samples of {s.new_tokens} characters a position; morph error at t = "
          + " / ".join(f"{t:g}" for t in ts))
    floor = []
    for i, j in edges(n, s):
        m = morph_error(ts, [[x[j] for x in styles(d)] for d in dial_path(n, ts, i, j)])
        floor.append(m)
        print(f"  dealt   {engine.sources[i]} -> {engine.sources[j]}: " + " / ".join(f"{x:.2f}" for x in m))
    print("  dealt, mean over edges: " + " / ".join(f"{x:.3f}" for x in np.mean(floor, axis=0)))
    if n > 2:
        c = centroid_style(styles(uniform(n)), [styles(corner(k, n)) for k in range(n)])
        print(f"  dealt, centroid: {c['morph_error']:.3f}, mean position "
              + ", ".join(f"{src} {w:.2f}" for src, w in zip(engine.sources, c["mean_position"])))
    if args.mode:
        st = style_curve(engine, clf, engine.mode(args.mode), s)
        print(f"  {args.mode}, mean over edges: "
              + " / ".join(f"{x:.3f}" for x in np.mean([e.morph_error for e in st.edges], axis=0)))
        if st.centroid:
            print(f"  {args.mode}, centroid: {st.centroid.morph_error:.3f}")


if __name__ == "__main__":
    main()
