"""Held-out loss of every source at chosen dial positions: the numbers training logs and the demo prints."""

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from abcgpt.data import PreparedData, heldout_batches
from abcgpt.dial import corner, dial_path, even, uniform
from abcgpt.dial_spec import format_dial
from abcgpt.model import GPT


@torch.no_grad()
def batch_losses(model: GPT, tokens, dial: torch.Tensor | None, batch_size: int, n_batches: int,
                 autocast=nullcontext) -> np.ndarray:
    """Loss (nats) of each of n_batches fixed held-out batches of one source (the same batches for every
    dial and every model), at one dial (None for an ungated model)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for x, y in heldout_batches(tokens, model.config.block_size, batch_size, n_batches):
        with autocast():
            _, loss = model(x.to(device), None if dial is None else dial.to(device), y.to(device))
        out.append(loss.item())
    model.train(was_training)
    return np.array(out)


@torch.no_grad()
def dial_losses(engine, tokens, dials: list[torch.Tensor], mode: str, batch_size: int, n_batches: int) -> np.ndarray:
    """(len(dials), n_batches) loss (nats) of one source's fixed held-out batches at each dial, in one mode,
    through the inference engine (a combining mode computes the corners once per batch for every dial)."""
    out = []
    for x, y in heldout_batches(tokens, engine.model.config.block_size, batch_size, n_batches):
        out.append([-float(lp.mean()) for lp in engine.logprobs(x, y, dials, mode)])
    return np.array(out).T


def heldout_loss(model: GPT, tokens, dial: torch.Tensor, batch_size: int, n_batches: int,
                 autocast=nullcontext) -> float:
    """Mean next-token loss (nats) over n_batches fixed held-out batches of one source, at one dial."""
    return float(batch_losses(model, tokens, dial, batch_size, n_batches, autocast).mean())


FULL_TABLE = 16  # up to this many sources the table scores every source at every corner
WIDE_TABLE = 8  # past this many sources the table prints one line per source


def dial_positions(sources: list[str], interior: bool = True) -> dict[str, torch.Tensor]:
    """Each source's corner, then the middle of the dial (the uniform mixture) for a model with a network there."""
    n = len(sources)
    pos = {s: corner(k, n) for k, s in enumerate(sources)}
    if interior:
        pos["middle"] = uniform(n)
    return pos


def scored_at(position: str, sources: list[str]) -> list[str]:
    """The sources the table scores at a position: every one up to FULL_TABLE sources; past that, at a corner its own
    source and the next two (a fixed sample that still shows isolation: N^2 cells would cost more than training)."""
    if len(sources) <= FULL_TABLE or position not in sources:
        return list(sources)
    k = sources.index(position)
    return [sources[(k + i) % len(sources)] for i in range(3)]


def loss_table(model: GPT, data: PreparedData, batch_size: int, n_batches: int,
               autocast=nullcontext) -> dict[str, dict[str, float]]:
    """{dial position: {source: held-out loss}} at every corner and the middle (see scored_at). An ungated model has
    no dial: each source is scored once and its loss stands at every position."""
    tokens = dict(zip(data.sources, data.heldout))
    gated = model.config.gates != "none"
    once = {} if gated else {s: heldout_loss(model, tokens[s], None, batch_size, n_batches, autocast)
                             for s in data.sources}
    return {
        name: {s: heldout_loss(model, tokens[s], dial, batch_size, n_batches, autocast) if gated else once[s]
               for s in scored_at(name, data.sources)}
        for name, dial in dial_positions(data.sources, model.has_interior).items()
    }


def format_table(table: dict[str, dict[str, float]], sources: list[str]) -> str:
    """The loss table as aligned text; a star marks the best dial position for each source. Past WIDE_TABLE sources,
    one line per source: its own corner, and the mean and the lowest of the other corners scored."""
    if len(sources) > WIDE_TABLE:
        w = max(map(len, sources)) + 2
        lines = ["source".ljust(w) + "own corner".rjust(12) + "   other corners scored: mean, lowest"]
        for s in sources:
            others = {d: row[s] for d, row in table.items() if d not in (s, "middle") and s in row}
            low = min(others, key=others.get) if others else None
            tail = f"{sum(others.values()) / len(others):.3f}, {others[low]:.3f} ({low})" if others else "–"
            lines.append(s.ljust(w) + f"{table[s][s]:.3f}".rjust(12) + f"   {len(others)}: {tail}")
        return "\n".join(lines)
    best = {s: min(table, key=lambda d: table[d][s]) for s in sources}
    labels = {d: "middle (gates)" if d == "middle" else f"{d} corner" for d in table}
    w = max(len(v) for v in labels.values()) + 2
    lines = ["dial".ljust(w) + "".join(s.rjust(14) for s in sources)]
    for d, row in table.items():
        cells = "".join((f"{row[s]:.3f}" + ("*" if best[s] == d else " ")).rjust(14) for s in sources)
        lines.append(labels[d].ljust(w) + cells)
    return "\n".join(lines)


def gates_loss_curve(model: GPT, data: PreparedData, batch_size: int, n_batches: int, points: int = 11,
                     autocast=nullcontext) -> dict:
    """Held-out loss of each source along the dial from the first source's corner to the last's, through the
    network's own gates (mode gates: what training sees; the report scores the dial in any mode)."""
    ts = even(points)
    dials = dial_path(len(data.sources), ts)
    return {
        "sources": data.sources,
        "dial": [format_dial(d, data.sources) for d in dials],
        "t": ts,
        "loss": {s: [heldout_loss(model, tokens, d, batch_size, n_batches, autocast) for d in dials]
                 for s, tokens in zip(data.sources, data.heldout)},
        "tokens_per_point": batch_size * n_batches * model.config.block_size,
    }


def plot_gates_loss_curve(curve: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for s in curve["sources"]:
        ax.plot(curve["t"], curve["loss"][s], marker="o", label=f"held-out {s}")
    first, last = curve["sources"][0], curve["sources"][-1]
    ax.set_xlabel(f"dial  (0 = {first}, 1 = {last})")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title(title or "loss across the dial, the network's own gates (mode gates)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.text(0.01, 0.01, f"{curve['tokens_per_point']:,} tokens per point", transform=ax.transAxes,
            fontsize=7, color="gray")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
