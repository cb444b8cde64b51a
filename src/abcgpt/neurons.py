"""What the gated units look like: their specialties, how many fire at a dial, and what they respond to.

Three views of the units of a gated GPT (see model.py for the unit order in `model.specialties`):
- specialty histogram: how the frozen specialties are spread, per kind of unit;
- firing fractions: share of units of each kind whose gate exceeds a threshold at given dials (DESIGN §4's
  "units firing at corners, edges and centroid");
- band response: from activations on held-out text, whether MLP units with a given specialty actually
  respond more to their own source's text, i.e. whether training made the specialties mean anything.
"""

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from abcgpt.data import PreparedData, heldout_batches
from abcgpt.model import GPT

UNIT_KINDS = ("residual", "head", "mlp")


def _specialties(model: GPT) -> torch.Tensor:
    if model.config.gates != "abc":
        raise ValueError("an ungated model (gates='none') has no specialties to look at")
    return model.specialties.detach().float().cpu()


def unit_kinds(model: GPT) -> dict[str, torch.Tensor]:
    """Row indices into model.specialties of each kind of unit; heads and MLP units in layer order."""
    _specialties(model)
    offsets = np.cumsum([0] + model.group_sizes)
    rows = lambda groups: torch.cat([torch.arange(offsets[g], offsets[g + 1]) for g in groups])
    n = len(model.group_sizes)
    return {"residual": rows([0]), "head": rows(range(1, n, 2)), "mlp": rows(range(2, n, 2))}


def specialty_histogram(model: GPT, bins: int = 20) -> dict:
    """Histogram per kind of m (two sources, over [0, 1]) or of the largest weight max_k m_k (N > 2, over
    [1/N, 1]: 1/N is a unit shared evenly, 1 a pure specialist), and per kind the number of units that lean
    to each source (argmax of m; lean[kind][k] for source k). JSON-serialisable."""
    spec = _specialties(model)
    n = spec.size(1)
    if n == 2:
        quantity, values, lo = "m", spec[:, 1], 0.0
    else:
        quantity, values, lo = "max_m", spec.max(dim=1).values, 1.0 / n
    edges = np.linspace(lo, 1.0, bins + 1)
    lean = spec.argmax(dim=1)
    counts, leans = {}, {}
    for kind, idx in unit_kinds(model).items():
        counts[kind] = np.histogram(values[idx].numpy(), bins=edges)[0].tolist()
        leans[kind] = torch.bincount(lean[idx], minlength=n).tolist()
    return {"quantity": quantity, "bins": edges.tolist(), "counts": counts, "lean": leans}


def firing_fractions(model: GPT, dials: list[torch.Tensor], threshold: float = 0.5) -> dict:
    """Per kind (and "all") and per dial: the fraction of units with gate > threshold, and the mean gate."""
    spec = _specialties(model)
    g = model.unit_gates(torch.stack(dials).float()).float().cpu()  # (D, U)
    kinds = unit_kinds(model) | {"all": torch.arange(spec.size(0))}
    return {
        "threshold": threshold,
        "dials": [d.tolist() for d in dials],
        "fraction": {k: (g[:, idx] > threshold).float().mean(dim=1).tolist() for k, idx in kinds.items()},
        "mean_gate": {k: g[:, idx].mean(dim=1).tolist() for k, idx in kinds.items()},
    }


def _bands(spec_mlp: torch.Tensor, bands: int, sources: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Band of every MLP unit: equal-width bins of m for two sources, else the source it leans to."""
    n = spec_mlp.size(1)
    if n == 2:
        band = (spec_mlp[:, 1] * bands).long().clamp(max=bands - 1)  # m = 1 goes into the last band
        edges = np.linspace(0.0, 1.0, bands + 1)
        return band, [f"{edges[i]:.2f}-{edges[i + 1]:.2f}" for i in range(bands)]
    return spec_mlp.argmax(dim=1), list(sources)


def band_response(model: GPT, data: PreparedData, batch_size: int = 16, n_batches: int = 2, bands: int = 10,
                  autocast=nullcontext) -> dict:
    """Mean |pre-gate MLP activation| of the units of each specialty band on each source's held-out text.

    The dial sits at the uniform mixture, where (almost) every unit is partly on, so what a unit responds to
    reflects its weights rather than its gate. "preference" is a band's response to a source over its mean
    response across sources (> 1: prefers that source; None where a band is empty or silent)."""
    spec = _specialties(model)
    n = spec.size(1)
    if len(data.heldout) != n:
        raise ValueError(f"the data has {len(data.heldout)} sources, the model was built for {n}")
    device = next(model.parameters()).device
    dial = torch.full((n,), 1.0 / n, device=device)
    blocks = model.transformer.h
    sums = torch.zeros(len(blocks), 4 * model.config.n_embd, device=device, dtype=torch.float64)

    def hook(layer):
        def fn(module, inputs, output):
            sums[layer] += output.detach().abs().sum(dim=(0, 1), dtype=torch.float64)
        return fn

    per_source = []  # (L * 4C,) mean |activation| per unit, layers in the order of specialties' MLP rows
    tokens = batch_size * n_batches * model.config.block_size
    was_training = model.training
    handles = [b.mlp.gelu.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        model.eval()
        with torch.no_grad():
            for held in data.heldout:
                sums.zero_()
                for x, _ in heldout_batches(held, model.config.block_size, batch_size, n_batches):
                    with autocast():
                        model(x.to(device), dial)
                per_source.append((sums / tokens).flatten().cpu())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    band, labels = _bands(spec[unit_kinds(model)["mlp"]], bands, data.sources)
    units = torch.bincount(band, minlength=len(labels))
    table = torch.stack([torch.zeros(len(labels), dtype=torch.float64).index_add_(0, band, r) for r in per_source])
    table = table / units.clamp(min=1)  # (sources, bands): mean response of the band's units
    mean = table.mean(dim=0)
    # None, not NaN, where undefined: JSON has no NaN
    cell = lambda v, ok: float(v) if ok else None
    return {
        "bands": labels,
        "units": units.tolist(),
        "response": {s: [cell(v, u > 0) for v, u in zip(table[k], units)] for k, s in enumerate(data.sources)},
        "preference": {s: [cell(v / mu, u > 0 and mu > 0) for v, mu, u in zip(table[k], mean, units)]
                       for k, s in enumerate(data.sources)},
        "dial": "uniform",
        "tokens_per_source": tokens,
    }


def plot_neuron_view(hist: dict, firing: dict, response: dict, dial_labels: list[str], sources: list[str],
                     path: Path) -> None:
    """One PNG, three panels: specialty histogram per kind, fraction firing vs dial per kind, and each
    specialty band's preference for each source (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=110)
    ax = axes[0]
    edges = np.asarray(hist["bins"])
    for kind, counts in hist["counts"].items():
        c = np.asarray(counts, dtype=float)
        # share of the kind's units per bin: kinds differ in size by orders of magnitude
        ax.stairs(c / max(c.sum(), 1), edges, label=f"{kind} ({int(c.sum())})")
    ax.set_xlabel("specialty m" if hist["quantity"] == "m" else "largest specialty weight max_k m_k")
    ax.set_ylabel("share of units")
    ax.set_title("specialties")
    ax.legend(fontsize=8)

    ax = axes[1]
    x = np.arange(len(dial_labels))
    for kind, frac in firing["fraction"].items():
        ax.plot(x, frac, marker="o", label=kind, linestyle="--" if kind == "all" else "-")
    ax.set_xticks(x, dial_labels, rotation=30 if len(dial_labels) > 6 else 0, fontsize=8)
    ax.set_xlabel("dial")
    ax.set_ylabel(f"fraction with gate > {firing['threshold']:g}")
    ax.set_ylim(0, 1)
    ax.set_title("units firing")
    ax.legend(fontsize=8)

    ax = axes[2]
    x = np.arange(len(response["bands"]))
    w = 0.8 / len(sources)
    for k, s in enumerate(sources):
        pref = [np.nan if v is None else v for v in response["preference"][s]]
        ax.bar(x + (k - (len(sources) - 1) / 2) * w, pref, w, label=s)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(x, response["bands"], rotation=45, fontsize=7)
    ax.set_xlabel("MLP units by specialty band")
    ax.set_ylabel("response / mean over sources")
    ax.set_title("what MLP units respond to (dial uniform)")
    ax.legend(fontsize=8)
    ax.text(0.01, 0.99, f"{response['tokens_per_source']:,} held-out tokens per source", transform=ax.transAxes,
            fontsize=7, color="gray", va="top")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
