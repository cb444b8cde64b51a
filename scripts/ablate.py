"""Ablations of the dial: train one recipe setting per seed, write its dial report, keep the headline numbers.

    python scripts/ablate.py run --name partition --config tiny --set model.routing=soft --seeds 0 1 2 \
        --baselines runs/tiny_baselines
    python scripts/ablate.py run --name partition --mode switch --seeds 0 1 2 --baselines runs/tiny_baselines
    python scripts/ablate.py table            # the markdown table of docs/ablations.md, from the results file
    python scripts/ablate.py plot             # isolation against corner loss, one point per setting
    python scripts/ablate.py modes --name partition-corners100 --seed 0   # one run in every mode (docs/modes.png)

Each (name, seed) trains into ROOT/NAME/sSEED with `abcgpt train` and is scored with `abcgpt eval --baselines`
in one dial mode (`--mode`; the checkpoint's default otherwise) into sSEED/report (or sSEED/report-MODE): a
mode changes only inference, so every mode reuses the same trained runs. Complete runs and reports are reused, so a
killed sweep resumes. One JSON line per (name, mode, seed) goes to ROOT/results.jsonl; `table` averages the seeds
of every (name, mode) (mean, and the spread as min..max)."""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from abcgpt.style import mean_style


def run(cmd: list[str], threads: int) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)})


STYLE_AT = (0.3, 0.5, 0.7)  # dial positions (of the first edge) whose morph error and mean style a row keeps
STYLE_TOL = 0.1  # the nearest style position counts for one of STYLE_AT within this (a 3-point curve has no 0.3)


def edge_mean_style(edge: dict) -> list[float | None] | None:
    """The report's mean style on the corners' scale along an edge (style.mean_style; for reports from before it
    was stored, from the per-sample styles)."""
    return edge.get("mean_style") or (mean_style(edge["sample_style"]) if edge.get("sample_style") else None)


def at_positions(ts: list[float], values: list | None) -> dict[str, float | None]:
    """{"0.3": value, ...}: values at the style position nearest each of STYLE_AT (None: none within STYLE_TOL,
    no values, or undefined there)."""
    out = {}
    for want in STYLE_AT:
        i = int(np.argmin([abs(t - want) for t in ts]))
        near = abs(ts[i] - want) <= STYLE_TOL + 1e-9
        out[str(want)] = values[i] if values is not None and near and i < len(values) else None
    return out


def read_report(path: Path) -> dict:
    """A report.json. One written before report.json took the Report's own field names (corner_table, style_curve
    and the style's summaries at the top) is read into that shape."""
    r = json.loads(path.read_text())
    if "corners" not in r:
        r["corners"] = {"table": r.pop("corner_table"), "own": r.pop("corner_loss"), "contrast": r.pop("contrast"),
                        "middle": r.pop("middle")}
        corner, near = r.pop("isolation"), r.pop("isolation_near", None)
        r["isolation"] = None if corner is None else {"corner": corner, "near": near}
        r["style"] = r.pop("style_curve") | {k: r.pop(k, None) for k in (
            "calibration_error", "monotone", "mixing_mid", "morph_mid", "morph_mid_edges", "morph_mid_samples",
            "coin_flip_mid")}
    return r


def headline(report: dict) -> dict:
    """The report's headline numbers, one value each (the worst source where there are several)."""
    sources, corners, style, isolation = report["sources"], report["corners"], report["style"], report["isolation"]
    corner = corners["own"]
    edge = style["edges"][0]
    mid = len(edge["t"]) // 2
    row = {
        "corner": {s: corner[s]["mean"] for s in sources},
        "vs_joint": {s: corner[s].get("vs_joint") for s in sources},
        "vs_alone": {s: corner[s].get("vs_alone") for s in sources},
        "contrast": corners["contrast"],
        "isolation": {s: min(v.values()) for s, v in isolation["corner"].items()} if isolation else None,
        "middle_vs_joint": {s: corners["middle"][s].get("vs_joint") for s in sources},
        "calibration_error": style["calibration_error"],
        "monotone": style["monotone"],
        "share_mid": edge["share_to"][mid],
        "mixing_mid": edge["mixing"][mid],
        "morph_mid": style["morph_mid"],  # mean over edges; None: undefined, or a report from before it
        "morph_mid_samples": style["morph_mid_samples"],
        # the first edge at STYLE_AT (nearest positions, see at_positions; none in rows from before them)
        "style_t": at_positions(edge["t"], edge["t"]),
        "morph_error": at_positions(edge["t"], edge.get("morph_error")),
        "mean_style": at_positions(edge["t"], edge_mean_style(edge)),
        "mode": report["mode"],
        "regret_max": report["regret"]["max"],
        "isolation_near": ({s: min(v.values()) for s, v in isolation["near"].items()}
                           if isolation and isolation["near"] else None),
        "fluency_gap": report["fluency"]["max_gap"] if report.get("fluency") else None,
        "calibrated_error": report.get("calibrated", {}).get("calibration_error"),
        "samples_per_point": edge["samples_per_point"],
        "heldout_tokens_per_cell": report["heldout_tokens_per_cell"],
    }
    return row


def cmd_run(args) -> None:
    root = Path(args.root)
    for seed in args.seeds:
        out = root / args.name / f"s{seed}"
        sets = [*args.set, f"train.seed={seed}", f"train.threads={args.threads}"]
        train = [sys.executable, "-m", "abcgpt", "train", "--config", args.config, "--out", str(out)]
        train += (["--method", args.method] if args.method else []) + [x for s in sets for x in ("--set", s)]
        if not (out / "last" / "config.json").is_file():
            run(train, args.threads)
        folder = out / (f"report-{args.mode}" if args.mode else "report")
        report = folder / "report.json"
        mode = ["--mode", args.mode] if args.mode else []
        meta = json.loads((out / "last" / "config.json").read_text())
        if args.calibrate and "calibration" not in meta:  # fit share -> dial; the report then scores it too
            run([sys.executable, "-m", "abcgpt", "calibrate", "--ckpt", str(out / "last"), *mode], args.threads)
            report.unlink(missing_ok=True)
        if not report.is_file():
            base = ["--baselines", args.baselines] if args.baselines else []
            run([sys.executable, "-m", "abcgpt", "eval", "--ckpt", str(out / "last"), *base, *mode,
                 "--out", str(folder)], args.threads)
        row = {"name": args.name, "config": args.config, "set": args.set, "seed": seed,
               "command": shlex.join(["abcgpt", *train[3:]])} | headline(read_report(report))
        with open(root / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def _agg(values: list, signed: bool = False) -> str:
    x = np.array([v for v in values if v is not None], dtype=float)
    f = "{:+.3f}" if signed else "{:.2f}"  # signed: regret and fluency gaps, a few thousandths for the mixture
    if x.size == 0:
        return "–"
    if x.size == 1:
        return f.format(x[0])
    return f"{f.format(x.mean())} ({f.format(x.min())}..{f.format(x.max())})"


def knob_overrides(run: Path, config: str) -> list[str]:
    """The --set that rebuilds a run's model and training keys from today's recipe defaults (its saved recipe
    is the truth: the defaults may have moved since it was trained). The seed and threads are left out: the
    script sets them per run."""
    from abcgpt.config import DERIVED, load_recipe

    saved = json.loads((run / "recipe.json").read_text())
    method = saved["model"].get("method", "reference")
    base = load_recipe(config, method=method).to_dict()  # the method's preset (configs/methods/) on the recipe
    out = [f"--method {method}"] if method != load_recipe(config).model.method else []
    skip = {"seed", "threads", "method"} | DERIVED["model"]
    for section in ("model", "train"):
        for key, default in base[section].items():
            value = saved[section].get(key, default)
            if key not in skip and value != default:
                out.append(f"{section}.{key}={json.dumps(value)}")
    return out


def results_by_name(root: Path) -> dict[str, list[dict]]:
    """The rows of results.jsonl by setting ("name" or "name · mode"), one per seed: the last line of a
    (name, mode, seed) wins, so a re-scored run replaces its old row."""
    latest = {}
    for line in open(root / "results.jsonl"):
        r = json.loads(line)
        latest[(r["name"], r.get("mode"), r["seed"])] = r
    by_name = {}
    for (name, mode, _), r in latest.items():
        by_name.setdefault(f"{name} · {mode}" if mode else name, []).append(r)
    return by_name


def cmd_table(args) -> None:
    print("| setting · mode | `--set` (on today's defaults) | seeds | corner − joint | corner − alone | contrast "
          "| isolation "
          "| isolation at 0.1 | max regret | middle − joint | fluency gap | calib. error (calibrated) | monotone "
          "| share at 0.5 | mixing at 0.5 | morph error 0.3 / 0.5 / 0.7 (coin flip "
          + " / ".join(f"{2 * t * (1 - t):.2f}" for t in STYLE_AT) + ") | mean style 0.3 / 0.5 / 0.7 "
          "| morph error at 0.5 (coin flip 0.50) |")
    print("|---" * 18 + "|")
    for name, rs in results_by_name(Path(args.root)).items():
        sources = list(rs[0]["corner"])

        def per_source(key, rs=rs, sources=sources):
            return " / ".join(_agg([r[key][s] if r.get(key) else None for r in rs]) for s in sources)

        def per_position(key, rs=rs):  # "–" alone for rows from before STYLE_AT
            if not any(r.get(key) for r in rs):
                return "–"
            return " / ".join(_agg([r[key].get(str(t)) if r.get(key) else None for r in rs]) for t in STYLE_AT)

        run_dir = Path(args.root) / rs[0]["name"] / f"s{rs[0]['seed']}"
        sets = " ".join(f"`{x}`" for x in knob_overrides(run_dir, rs[0]["config"]))
        sets = sets or "–"
        calibrated = [r.get("calibrated_error") for r in rs]
        calib = _agg([r["calibration_error"] for r in rs])
        if any(c is not None for c in calibrated):
            calib += f" ({_agg(calibrated)})"
        print(f"| {name} | {sets} | {len(rs)} | {per_source('vs_joint')} | {per_source('vs_alone')} | "
              f"{per_source('contrast')} | "
              f"{per_source('isolation')} | {per_source('isolation_near')} | "
              f"{_agg([r.get('regret_max') for r in rs], signed=True)} | {per_source('middle_vs_joint')} | "
              f"{_agg([r.get('fluency_gap') for r in rs], signed=True)} | "
              f"{calib} | {sum(r['monotone'] for r in rs)}/{len(rs)} | "
              f"{_agg([r['share_mid'] for r in rs])} | {_agg([r['mixing_mid'] for r in rs])} | "
              f"{per_position('morph_error')} | {per_position('mean_style')} | "
              f"{_agg([r.get('morph_mid') for r in rs])} |")


def cmd_plot(args) -> None:
    """Isolation against corner loss, one point per setting (mean over seeds and sources): the frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in results_by_name(Path(args.root)).items():
        rs = [r for r in rows if r["isolation"]]
        if not rs:
            continue
        x = np.mean([np.mean(list(r["vs_joint"].values())) for r in rs])
        y = np.mean([np.mean(list(r["isolation"].values())) for r in rs])
        ax.scatter(x, y, color="C3" if name.startswith("reference") else "C0")
        ax.annotate(f"{name} ({len(rs)})", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.8, ls=":", color="grey")
    ax.axvline(0.05, ls=":", color="grey")
    ax.set_xlabel("corner loss − joint baseline (nats/token, mean of sources; goal ≤ 0.05)")
    ax.set_ylabel("isolation (mean of sources; goal ≥ 0.8)")
    ax.set_title("the dial's frontier: red = reference method, blue = partition (seeds in brackets)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


def _nan(values: list | None) -> list[float]:
    return [np.nan if v is None else v for v in values]


def cmd_modes(args) -> None:
    """One run's reports in every mode, along the dial (the first edge): dial regret and the fluency gap (left),
    the style share and the mean style on the corners' scale (top), mixing inside samples and the morph error
    (bottom, with a coin flip's 2t(1 - t) for reference). It only reads reports: it scores nothing."""
    run = Path(args.root) / args.name / f"s{args.seed}"
    reports = sorted((read_report(p) for p in run.glob("report*/report.json")), key=lambda r: r["mode"])
    if not reports:
        raise SystemExit(f"no report*/report.json under {run}: score it with `run --name {args.name} --mode ...`")
    draw_modes(reports, f"{args.name}, seed {args.seed}", args.out)


def draw_modes(reports: list[dict], label: str, out: str) -> None:
    """cmd_modes' figure, from report.json dicts (one per mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(13.5, 7.4))
    regret, share, style = ax[0]
    fluency, mixing, morph = ax[1]
    for k, r in enumerate(reports):
        e, c = r["style"]["edges"][0], f"C{k}"
        pos = r["regret"]["positions"]
        regret.plot([p["weights"][1] for p in pos], [p["regret"] for p in pos], marker=".", color=c, label=r["mode"])
        share.plot(e["t"], e["share_to"], marker=".", color=c)
        if (m := edge_mean_style(e)) is not None:
            style.plot(e["t"], _nan(m), marker=".", color=c)
        mixing.plot(e["t"], _nan(e["mixing"]), marker=".", color=c)
        if e.get("morph_error") and any(v is not None for v in e["morph_error"]):
            morph.plot(e["t"], _nan(e["morph_error"]), marker=".", color=c)
        if e.get("fluency_gap"):
            fluency.plot(e["t"], e["fluency_gap"], marker=".", color=c)
    for a in (share, style):
        a.plot([0, 1], [0, 1], color="gray", ls="--", lw=1)
    t = np.linspace(0, 1, 101)
    morph.plot(t, 2 * t * (1 - t), color="gray", ls=":", lw=1.5, label="coin flip, 2t(1−t)")
    morph.legend(fontsize=7, loc="upper right")
    for a in (mixing, morph):
        a.set_ylim(bottom=0)
    for a in (regret, fluency):  # gates' untrained middle is 1-2 nats off; the others within a few hundredths
        a.set_yscale("symlog", linthresh=0.05)
    src = reports[0]["sources"]
    titles = {regret: "dial regret (nats/token, symlog)", share: f"share read as {src[1]}",
              style: "mean style on the corners' scale (0, 1 = corners)", fluency:
              "fluency: judge loss − corners' mean (symlog)", mixing: "mixing inside samples",
              morph: "morph error: mean over samples of |style − dial|"}
    for a, title in titles.items():
        a.set_title(title, fontsize=9)
        a.set_xlabel(f"dial (0 = {src[0]}, 1 = {src[1]})", fontsize=8)
        a.tick_params(labelsize=7)
        a.grid(alpha=0.3)
    regret.legend(fontsize=7, title="mode", title_fontsize=7)
    fig.suptitle(f"{label}: the dial between corners, by mode", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/ablations", help="where runs and results.jsonl go")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--name", required=True)
    r.add_argument("--config", default="tiny")
    r.add_argument("--method", help="a method preset (configs/methods/), before --set")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--baselines", help="folder written by `abcgpt baselines` for this recipe (for isolation)")
    r.add_argument("--calibrate", action="store_true", help="run `abcgpt calibrate` before the report")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run (run two sweeps on two cores)")
    r.add_argument("--mode", help="the dial's mode for the report (default: the checkpoint's; see abcgpt sample -h)")
    sub.add_parser("table")
    pl = sub.add_parser("plot")
    pl.add_argument("--out", default="docs/ablation_frontier.png")
    md = sub.add_parser("modes", help="one run's reports in every mode, along the dial (two sources)")
    md.add_argument("--name", default="partition-corners100")
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--out", default="docs/modes.png")
    args = p.parse_args()
    {"run": cmd_run, "table": cmd_table, "plot": cmd_plot, "modes": cmd_modes}[args.cmd](args)


if __name__ == "__main__":
    main()
