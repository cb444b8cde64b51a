"""Dials as users write them: a number, a source name, 'uniform', 'name=w,...', a dict, a sequence or a tensor,
read into a point of the simplex (dial.py holds the maths); and the short label a dial is shown by."""

import math
from collections.abc import Mapping, Sequence
from numbers import Real

import torch

from abcgpt.common import AbcgptError
from abcgpt.dial import corner, uniform

DialSpec = float | str | Mapping[str, float] | Sequence[float] | torch.Tensor


def parse_dial(spec: DialSpec, sources: list[str]) -> tuple[torch.Tensor, str | None]:
    """Read a dial given by a user into an (N,) simplex point, plus a note when weights were normalised.

    Accepted: a number a in [0, 1] (two sources only; 0 = first source, 1 = second), a source name (its corner),
    'uniform' (the centroid), a named mixture 'name=w,name=w' or {name: w} with non-negative weights, or a
    sequence of N weights in source order."""
    n = len(sources)
    if isinstance(spec, bool) or spec is None:
        raise AbcgptError(f"dial must be a number, a source name, 'uniform', 'name=w,...' or a dict, got {spec!r}")
    if isinstance(spec, torch.Tensor):
        spec = spec.tolist()
    if isinstance(spec, Mapping):
        if not spec:
            raise AbcgptError("dial dict is empty: give {name: weight} with names from " + ", ".join(sources))
        return _weighted(list(spec.items()), sources, repr(dict(spec)))
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if len(spec) != n:
            raise AbcgptError(f"a dial of weights needs {n} numbers (one per source: {', '.join(sources)}), "
                              f"got {len(spec)}")
        return _weighted(list(zip(sources, spec)), sources, repr(list(spec)))
    if isinstance(spec, Real):
        return _scalar(float(spec), repr(spec), sources), None
    if not isinstance(spec, str):
        raise AbcgptError(f"dial must be a number, a source name, 'uniform', 'name=w,...' or a dict, got {spec!r}")
    text = spec.strip()
    try:
        return _scalar(float(text), text, sources), None
    except ValueError:
        pass
    if text == "uniform":
        return uniform(n), None
    if text in sources:
        return corner(sources.index(text), n), None
    pairs = []
    for part in text.split(","):
        name, eq, w = part.partition("=")
        if not eq:
            raise AbcgptError(f"cannot read dial {text!r}: give a number in [0, 1], a source name, 'uniform', "
                              f"or name=weight,... with names from {', '.join(sources)}")
        try:
            weight = float(w)
        except ValueError:
            raise AbcgptError(f"weight of {name.strip()!r} in dial is not a number: {w.strip()!r}") from None
        pairs.append((name.strip(), weight))
    return _weighted(pairs, sources, repr(text))


def _scalar(a: float, text: str, sources: list[str]) -> torch.Tensor:
    if not math.isfinite(a) or not 0.0 <= a <= 1.0:
        raise AbcgptError(f"dial {text} is outside [0, 1]: 0 means {sources[0]}, 1 means {sources[-1]}")
    if len(sources) != 2:
        raise AbcgptError(f"a numeric dial needs two sources, this model has {len(sources)}: use name=weight,... "
                          f"with names from {', '.join(sources)}")
    return torch.tensor([1.0 - a, a])


def _weighted(pairs: list, sources: list[str], shown: str) -> tuple[torch.Tensor, str | None]:
    """(name, weight) pairs -> normalised simplex point; a name given twice adds up."""
    weights = torch.zeros(len(sources), dtype=torch.float64)  # float64: huge finite weights must not overflow
    for name, w in pairs:
        if not isinstance(name, str) or name not in sources:
            raise AbcgptError(f"unknown source {name!r} in dial; known sources: {', '.join(sources)}")
        if not isinstance(w, Real) or isinstance(w, bool):
            raise AbcgptError(f"weight of {name!r} in dial is not a number: {w!r}")
        if not math.isfinite(w) or w < 0:
            raise AbcgptError(f"weight of {name!r} in dial must be a finite number >= 0, got {w}")
        weights[sources.index(name)] += float(w)
    top = float(weights.max())
    if top <= 0:
        raise AbcgptError(f"dial {shown} has all weights zero: at least one must be positive")
    scaled = weights / top  # divide by the largest first, so huge weights cannot overflow the sum
    total = top * float(scaled.sum())
    note = None
    if abs(total - 1.0) > 1e-6:
        weights = scaled / scaled.sum()
        parts = ",".join(f"{s}={w:.3g}" for s, w in zip(sources, weights.tolist()) if w > 0)
        note = f"dial weights summed to {total:g}; normalised to {parts}"
    return weights.float(), note


def format_dial(dial: torch.Tensor, sources: list[str]) -> str:
    """Short label for a dial: the number a for two sources, else name=w for the non-zero weights."""
    w = dial.tolist()
    if len(sources) == 2:
        return f"{w[1]:.2f}"
    return ",".join(f"{s}={x:.2f}" for s, x in zip(sources, w) if x > 0)
