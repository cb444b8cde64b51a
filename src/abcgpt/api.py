"""The Python API, for notebooks and scripts: `abcgpt.load` gives the inference engine (engine.Engine).

    import abcgpt
    m = abcgpt.load("runs/demo")            # a run directory (its best checkpoint, else its last) or a checkpoint
    m.sources                               # ['tinystories', 'shakespeare']
    m.generate("Once upon", dial=0.2)       # the new text (the prompt is not repeated)
    m.generate("Once upon", dial=0.5, mode="switch")   # a blend: the source may change at each turn
    for piece in m.stream("ROMEO:", dial=1.0): print(piece, end="")
    m.loss("To be, or not to be", dial=1.0) # mean next-token loss in nats per token

A dial is a number a in [0, 1] (two sources: 0 is the first source, 1 the second), a source name, "uniform",
"name=w,name=w", a dict {name: weight}, or a sequence of N weights; weights are normalised to sum to 1.
"""

import os
from pathlib import Path

from abcgpt.checkpoint import load_checkpoint
from abcgpt.common import AbcgptError, pick_device
from abcgpt.engine import Engine


def load(run_dir: str | os.PathLike, device: str = "auto") -> Engine:
    """Load a run directory (its best checkpoint, else its last) or a checkpoint directory.
    device: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or "mps".
    Every bad argument is an AbcgptError, with the message `abcgpt sample` prints for it."""
    if not isinstance(run_dir, str | os.PathLike):
        raise AbcgptError(f"run_dir must be a path (a str or a pathlib.Path), got {type(run_dir).__name__}")
    return Engine(load_checkpoint(Path(run_dir), pick_device(device)))
