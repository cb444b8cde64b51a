"""The abcgpt Python API in a few lines.

    python examples/python_api.py runs/demo

Loads a run, prints its sources, generates at three dial positions and prints the loss of two sentences
across the dial. Works for any run: it uses the checkpoint's own source names. For a run of two sources
the dial is a number in [0, 1] (0 = the first source, 1 = the second); with more it is given as a dict.
"""

import sys

import abcgpt
from abcgpt.common import AbcgptError

# one sentence in the style of each of the demo's sources; a run with other sources scores them all the same
SENTENCES = {
    "shakespeare": "ROMEO:\nBut soft, what light through yonder window breaks?",
    "tinystories": "Once upon a time, there was a little girl named Lily. She loved to play outside.",
}


def positions(sources: list[str]) -> list[tuple[str, object]]:
    """Three dial positions: each end and the middle (two sources), else first corner, uniform, last corner."""
    if len(sources) == 2:
        return [(f"{a:.1f}", a) for a in (0.0, 0.5, 1.0)]
    return [(sources[0], {sources[0]: 1.0}), ("uniform", "uniform"), (sources[-1], {sources[-1]: 1.0})]


def usable(m, text: str) -> str | None:
    """The text, cut to characters the model knows (a char-level vocabulary may lack some), or None."""
    kept = "".join(c for c in text if _known(m, c))
    return kept if len(kept) >= 2 else None


def _known(m, c: str) -> bool:
    try:
        return bool(m.tokenizer.encode(c))
    except AbcgptError:
        return False


def main(run_dir: str) -> None:
    m = abcgpt.load(run_dir)
    print(m)
    print("sources:", ", ".join(m.sources))

    prompt = "\n"
    for label, dial in positions(m.sources):
        weights = ", ".join(f"{s} {w:.2f}" for s, w in m.dial(dial).items())
        print(f"\n--- dial {label} ({weights})")
        print(m.generate(prompt, dial=dial, max_new_tokens=120, temperature=0.8, seed=0).strip())

    print("\nloss (nats/token) across the dial:")
    for name, text in SENTENCES.items():
        text = usable(m, text)
        if text is None:
            continue
        cells = "  ".join(f"{label}: {m.loss(text, dial=dial):.3f}" for label, dial in positions(m.sources))
        print(f"  {name}-like  {cells}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/python_api.py RUN_DIR")
    try:
        main(sys.argv[1])
    except AbcgptError as e:
        sys.exit(f"error: {e}")
