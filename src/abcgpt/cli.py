"""The `abcgpt` command: prepare, train, sample, attribute, baselines, eval, calibrate, serve, export, info, config,
sources."""

import argparse
import dataclasses
import itertools
import json
import shutil
import signal
import sys
import textwrap
import threading
from pathlib import Path

from abcgpt.sampling import SAMPLING


def cmd_prepare(args) -> None:
    from abcgpt.common import existing_dir
    from abcgpt.config import load_recipe
    from abcgpt.data import load_data, prepare, stale_reason

    recipe = load_recipe(args.config, args.set, args.method)
    out = Path(args.out) if args.out else recipe.data_dir
    if (existing_dir(out) / "manifest.json").is_file() and not args.force:
        reason = stale_reason(recipe, load_data(out).manifest)
        if reason is None:
            print(f"{out} is up to date (use --force to rebuild)")
            return
        print(f"{out} is stale: {reason}; rebuilding")
    prepare(recipe, out)


def cmd_train(args) -> None:
    from abcgpt.checkpoint import read_recipe
    from abcgpt.common import AbcgptError, declared, existing_dir
    from abcgpt.config import load_recipe
    from abcgpt.train import train

    if args.resume:
        if args.config or args.set or args.out or args.method:
            raise AbcgptError("--resume takes the recipe and output folder from the run; only --steps may change")
        run = Path(args.resume)
        last = existing_dir(run / "last")
        if not (last / "config.json").is_file():
            raise AbcgptError(f"{run} holds no checkpoint to resume (no {run}/last)")
        recipe = read_recipe(last)  # the trainer loads (and checks) the whole checkpoint
        if args.steps is not None:
            with declared("--"):
                recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=args.steps))
        train(recipe, run, resume=True)
        return
    if not args.out:
        raise AbcgptError("train needs --out RUN_DIR (or --resume RUN_DIR)")
    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    train(load_recipe(args.config or "tiny", overrides, args.method), Path(args.out))


def cmd_sample(args) -> None:
    from abcgpt.checkpoint import load_checkpoint
    from abcgpt.common import AbcgptError, pick_device
    from abcgpt.dial_spec import format_dial
    from abcgpt.engine import Engine
    from abcgpt.heldout import WIDE_TABLE

    specs = args.sweep.split(",") if args.sweep is not None else [args.dial]
    if not all(spec.strip() for spec in specs):
        raise AbcgptError(f"--sweep {args.sweep!r} has an empty position: give comma-separated dial positions, "
                          "e.g. 0,0.5,1")
    engine = Engine(load_checkpoint(args.ckpt, pick_device(args.device)))
    sources, mode, notes = engine.sources, engine.mode(args.mode), []
    dials = [engine.dial_tensor(spec, args.calibrated, mode, notes) for spec in specs]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
              mode=mode)
    if args.n == 1 and not (args.sweep or args.json):  # one sample: stream it to the terminal
        pieces = engine.stream(args.prompt, dials[0], **kw)  # every argument checked here, before the header
        weights = ", ".join(f"{s} {w:.2f}" for s, w in zip(sources, dials[0].tolist())
                            if w > 0 or len(sources) <= WIDE_TABLE)  # (with many sources, the ones in the mix)
        print(f"--- dial {format_dial(dials[0], sources)} ({weights}), mode {mode}")
        sys.stdout.write(args.prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        return
    texts = engine.sweep(args.prompt, dials, n=args.n, **kw)  # one batch: every dial position times n samples
    if args.json:
        for d, row in zip(dials, texts):
            for i, text in enumerate(row):
                print(json.dumps({"dial": format_dial(d, sources), "weights": dict(zip(sources, d.tolist())),
                                  "mode": mode, "sample": i, "prompt": args.prompt, "text": text}))
    elif args.sweep:
        labels = [f"dial {format_dial(d, sources)}" for d in dials for _ in range(args.n)]
        print_side_by_side(labels, [args.prompt + t for row in texts for t in row], sources)
    else:
        for i, text in enumerate(texts[0]):
            print(f"--- sample {i + 1}/{args.n}, dial {format_dial(dials[0], sources)}, mode {mode}")
            print(args.prompt + text)


# 256-colour terminal backgrounds, one per source (cycling past 12), with black text on them
ANSI_BACKGROUNDS = (117, 218, 120, 222, 183, 159, 216, 152, 230, 189, 194, 224)


def shares(names: list[str], probs: list[float], most: int = 6) -> str:
    """'omega 0.98, alpha 0.02': the largest probabilities first, those under 0.005 and past `most` left out."""
    if max(probs) - min(probs) < 5e-4:
        return f"uniform over {len(names)} sources, {probs[0]:.2f} each"
    ranked = sorted(((p, s) for s, p in zip(names, probs) if p >= 0.005), reverse=True)
    more = f", + {len(ranked) - most} more" if len(ranked) > most else ""
    return ", ".join(f"{s} {p:.2f}" for p, s in ranked[:most]) + more


def read_text(args) -> str:
    """The text of `abcgpt attribute`: --text, --file or standard input (-), exactly one of them."""
    from abcgpt.common import AbcgptError

    given = [x for x in (args.text, args.file, args.stdin) if x is not None]
    if len(given) != 1:
        raise AbcgptError("give the text once: --text TEXT, --file PATH, or - to read standard input")
    if args.text is not None:
        return args.text
    where = "standard input" if args.stdin else args.file
    try:
        return sys.stdin.buffer.read().decode("utf-8") if args.stdin else Path(args.file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AbcgptError(f"{where} is not UTF-8 text") from None


def cmd_attribute(args) -> None:
    from abcgpt.checkpoint import load_checkpoint
    from abcgpt.common import pick_device
    from abcgpt.engine import Engine

    text = read_text(args)
    engine = Engine(load_checkpoint(args.ckpt, pick_device(args.device)))
    a = engine.attribute(text, args.dial, args.mode)
    if args.json:
        print(json.dumps(a.to_dict()))
        return
    color = sys.stdout.isatty()
    print(f"--- which source: prior {shares(a.sources, a.dial)}, mode {a.mode}, {len(a.tokens)} tokens")
    print(f"whole text (posterior after it): {shares(a.sources, a.final)}; top: {a.top}")
    print(f"mean over its tokens:            {shares(a.sources, a.mean)}")
    runs = a.runs()

    def paint(k: int, s: str) -> str:  # reset before each line break, so no colour bleeds to the line's end
        on = f"\033[30;48;5;{ANSI_BACKGROUNDS[k % len(ANSI_BACKGROUNDS)]}m"
        return "\n".join(f"{on}{line}\033[0m" if line else "" for line in s.split("\n"))

    if color:
        used = sorted({k for k, _ in runs})
        print("each token coloured by its most probable source: " + " ".join(paint(k, a.sources[k]) for k in used))
        print("".join(paint(k, s) for k, s in runs))
    else:
        print("each token marked with its most probable source, [source: text]:")
        print("".join(f"[{a.sources[k]}: {s}]" for k, s in runs))


def cmd_baselines(args) -> None:
    from abcgpt.config import load_recipe
    from abcgpt.train import train_baselines

    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    only = [p for p in args.only.split(",") if p] if args.only is not None else None
    paths = train_baselines(load_recipe(args.config, overrides, args.method), Path(args.out), only=only)
    print("baselines: " + ", ".join(str(p) for p in paths))


def cmd_forget(args) -> None:
    from abcgpt.sources_edit import forget

    out, notes = forget(Path(args.ckpt), args.source, Path(args.out), args.retrain_shared, args.set)
    for note in notes:
        print(f"note: {note}")
    print(f"{out}: the model without {args.source}" + (f", its shared units retrained for {args.retrain_shared} "
                                                        "steps" if args.retrain_shared else ""))


def cmd_add_source(args) -> None:
    from abcgpt.sources import SourceSpec
    from abcgpt.sources_edit import add_source

    spec = SourceSpec(name=args.source, path=str(Path(args.path).expanduser().resolve()) if args.path else None,
                      max_bytes=args.max_bytes, weight=args.weight)
    out = add_source(Path(args.ckpt), spec, args.steps, Path(args.out), args.replace_unknown, args.set)
    print(f"{out}: the model with {args.source} added (every other corner as it was)")


def cmd_eval(args) -> None:
    from abcgpt.common import check_output, check_writable, declared, pick_device
    from abcgpt.report import Settings, build_report, report_files, write_report

    with declared("--"):
        samples = {} if args.samples is None else {"samples": args.samples}
        settings = Settings.quick(**samples) if args.quick else Settings(**samples)
    settings.prompt = args.prompt
    out = check_writable(check_output(Path(args.out) if args.out else Path(args.ckpt) / "report", "report",
                                      report_files))  # refused before the work, not after it
    report, figures = build_report(Path(args.ckpt), Path(args.baselines) if args.baselines else None,
                                   args.quick, settings, pick_device(args.device), mode=args.mode)
    write_report(report, figures, out)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.html'} (also report.json, report.md and the PNGs there)")


def cmd_calibrate(args) -> None:
    from abcgpt.calibrate import Settings, calibrate
    from abcgpt.common import declared, pick_device

    with declared("--"):
        settings = Settings(samples=args.samples, prompt=args.prompt)
    cal = calibrate(Path(args.ckpt), settings, pick_device(args.device), mode=args.mode)
    pairs = ", ".join(f"{a:.2f}->{d:.2f}" for a, d in zip(cal["share"], cal["dial"]))
    print(f"calibration (mode {cal['mode']}) stored in the checkpoint (share asked -> dial): {pairs}")


def cmd_export(args) -> None:
    from abcgpt.export import export_gpt2

    notes: list[str] = []
    out = export_gpt2(Path(args.ckpt), args.dial, Path(args.out), force=args.force, mode=args.mode, notes=notes)
    for note in notes:
        print(f"note: {note}")
    print(f"exported to {out}: load it with transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained")


def cmd_info(args) -> None:
    from abcgpt.checkpoint import load_checkpoint
    from abcgpt.engine import Engine

    ckpt = load_checkpoint(args.ckpt)
    engine = Engine(ckpt)
    m, meta = ckpt.model.config, ckpt.meta
    heldout = (meta.metrics and meta.metrics.heldout) or {}
    cal = engine.calibration
    lines = [
        f"checkpoint    {ckpt.path}",
        f"sources       {', '.join(ckpt.sources)}  (dial 0 = {ckpt.sources[0]}, 1 = {ckpt.sources[-1]})"
        if len(ckpt.sources) == 2 else f"sources       {', '.join(ckpt.sources)}",
        f"model         {ckpt.model.num_params() / 1e6:.2f}M parameters, {m.n_layer} layers x {m.n_head} heads x "
        f"{m.n_embd}, context {m.block_size}, gates={m.gates}, routing={m.routing}",
        *([f"width         corner: each source its own network of that size ({ckpt.model.corner_params() / 1e6:.2f}M "
           f"parameters, what a token costs), {m.shared_fraction:.0%} of it shared; the parameters grow with the "
           f"number of sources"] if not ckpt.model.has_interior else []),
        f"tokenizer     {ckpt.tokenizer.kind}, vocabulary {ckpt.tokenizer.vocab_size}",
        f"recipe        {ckpt.recipe.name}, step {meta.step} of {ckpt.recipe.train.steps}",
        f"calibration   {'no' if cal is None else 'yes (mode ' + cal.mode + ')'}",
        f"dial mode     {engine.default_mode} by default between corners (--mode to choose)",
    ]
    if heldout:
        lines.append("held-out loss at the last evaluation (own corner): "
                     + ", ".join(f"{s} {heldout[s][s]:.3f}" for s in ckpt.sources if s in heldout))
    print("\n".join(lines))


def cmd_serve(args) -> None:
    from abcgpt.common import pick_device
    from abcgpt.serve import serve

    serve(Path(args.ckpt), args.host, args.port, pick_device(args.device), max_concurrent=args.max_concurrent,
          max_new_tokens=args.max_new_tokens, max_prompt_chars=args.max_prompt_chars, mode=args.mode,
          max_body_bytes=args.max_body_bytes, max_dial_positions=args.max_dial_positions,
          max_batch_tokens=args.max_batch_tokens)


def print_side_by_side(headers: list[str], texts: list[str], sources: list[str]) -> None:
    """Columns when the terminal is wide enough, else one sample after another."""
    width = shutil.get_terminal_size((120, 24)).columns
    k = len(texts)
    col = (width - 3 * (k - 1)) // k
    if col < 24:
        for h, t in zip(headers, texts):
            print(f"=== {h}\n{t}\n")
        return
    cols = []
    for h, t in zip(headers, texts):
        lines = [h.center(col, "-")]
        for para in t.split("\n"):
            lines += textwrap.wrap(para, col, replace_whitespace=False, drop_whitespace=True) or [""]
        cols.append(lines)
    for row in itertools.zip_longest(*cols, fillvalue=""):
        print(" | ".join(cell.ljust(col) for cell in row).rstrip())
    print(f"(dial 0 = {sources[0]}, 1 = {sources[-1]})" if len(sources) == 2 else "")


def cmd_sources(args) -> None:
    from abcgpt.sources import BUILTIN_SOURCES, VOICES, builtin_location

    width = max(map(len, BUILTIN_SOURCES))
    print("built-in sources (a recipe names them: [[data.sources]] name = \"...\"); where each is read from now:")
    for group, names in (("", [n for n in BUILTIN_SOURCES if n not in VOICES]),
                         ("voices ($ABCGPT_DATA_DIR/voices/<name>/text.txt; provenance in voices/SOURCES.md):",
                          [n for n in BUILTIN_SOURCES if n in VOICES])):
        if group:
            print(f"\n{group}")
        for n in names:
            print(f"  {n.ljust(width)}  {builtin_location(n):<16}  {BUILTIN_SOURCES[n].about}")


def cmd_config(args) -> None:
    from abcgpt.config import describe_keys, list_methods, list_recipes, load_recipe

    if args.keys:
        print("\n".join(describe_keys()))
        return
    if not args.config:
        print(f"built-in recipes: {', '.join(list_recipes())}; method presets: {', '.join(list_methods())}")
        return
    print(json.dumps(load_recipe(args.config, args.set, args.method).to_dict(), indent=2))


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line like every other error (and the usage left to --help)."""

    def error(self, message: str):
        from abcgpt.common import AbcgptError

        raise AbcgptError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="abcgpt", description="Train and use a GPT with a dial over its training sources.")
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_args(sp, required=False):
        sp.add_argument("--config", required=required, help="recipe name (tiny, reference, ...) or path to a .toml")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.lr=3e-4 (repeatable)")
        sp.add_argument("--method", help="a dial method preset applied over the recipe (configs/methods/: partition, "
                                         "reference), before --set")

    def mode_arg(sp):
        from abcgpt.dial import MODES

        sp.add_argument("--mode", choices=MODES, default=None,
                        help="what the dial does between corners: switch (the default for the partition method: a "
                             "blend, one source writes each turn, a line or sentence, in the dial's shares), mixture "
                             "(each sample from one source, drawn with the dial's odds), tokens, product, gates (the "
                             "network's own gates; the default for method=reference)")

    sp = sub.add_parser("prepare", help="fetch the sources, train the tokenizer, write token shards")
    recipe_args(sp)
    sp.set_defaults(config="tiny")
    sp.add_argument("--out", help="data directory (default: the recipe's data.dir)")
    sp.add_argument("--force", action="store_true", help="rebuild even if the data is up to date")
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("train", help="train a dial model (or resume one)")
    recipe_args(sp)
    sp.add_argument("--out", help="run directory for checkpoints and logs")
    sp.add_argument("--steps", type=int, help="number of optimizer steps (overrides train.steps)")
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("sample", help="generate text at a dial position")
    sp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    sp.add_argument("--dial", default="0.5", help="number in [0,1] (two sources), a source name, 'uniform', "
                                                  "or name=w,name=w (default 0.5)")
    sp.add_argument("--sweep", help="comma-separated dial positions, printed side by side, e.g. 0,0.5,1")
    sp.add_argument("--prompt", default="", help="text to start from (default: a newline)")
    sp.add_argument("-n", type=int, default=SAMPLING.n, help="samples per dial position")
    sp.add_argument("--max-new-tokens", type=int, default=SAMPLING.max_new_tokens)
    sp.add_argument("--temperature", type=float, default=SAMPLING.temperature, help="0 = greedy")
    sp.add_argument("--top-k", type=int, default=SAMPLING.top_k, help="0 disables top-k")
    sp.add_argument("--seed", type=int, default=SAMPLING.seed)
    sp.add_argument("--json", action="store_true", help="print one JSON object per sample")
    sp.add_argument("--calibrated", action="store_true",
                    help="read the dial as the share of the second source's style (needs `abcgpt calibrate`)")
    sp.add_argument("--device", default="auto")
    mode_arg(sp)
    sp.set_defaults(func=cmd_sample)

    sp = sub.add_parser("attribute", help="which source a text leans on, token by token (the mixture's posterior)")
    sp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    sp.add_argument("--text", help="the text to attribute")
    sp.add_argument("--file", help="read the text from this UTF-8 file")
    sp.add_argument("stdin", nargs="?", choices=["-"], metavar="-", help="read the text from standard input")
    sp.add_argument("--dial", default="uniform", help="the prior over sources, any dial (default uniform)")
    sp.add_argument("--mode", choices=("mixture", "switch"), default="mixture",
                    help="mixture (default): P(source | the text so far); switch: the same, restarted from the dial "
                         "after each turn (a line or sentence of at least 20 characters)")
    sp.add_argument("--json", action="store_true", help="print the summary and the per-token table as JSON")
    sp.add_argument("--device", default="auto")
    sp.set_defaults(func=cmd_attribute)

    what = ("train the ungated comparison models: joint, without each source, and each source alone for the steps "
            "the dial model spent on it (equal compute)")
    sp = sub.add_parser("baselines", help=what, description=what[0].upper() + what[1:] + ". Complete runs are "
                        "skipped, unfinished ones resumed.")
    recipe_args(sp, required=True)
    sp.add_argument("--out", required=True, help="folder for the baseline runs")
    sp.add_argument("--steps", type=int, help="overrides train.steps (must match the dial model's; alone_<s> trains "
                    "for its share of them)")
    sp.add_argument("--only", metavar="PATTERNS", help="train only the runs matching these comma-separated shell "
                    "patterns, e.g. 'joint,alone_*,without_bible_kjv'")
    sp.set_defaults(func=cmd_baselines)

    sp = sub.add_parser("eval", help="the dial report: losses, contrast, isolation, style curve, neuron view")
    sp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    sp.add_argument("--baselines", help="folder written by `abcgpt baselines` (for isolation, joint and alone)")
    sp.add_argument("--out", help="report folder (default: CKPT/report)")
    sp.add_argument("--quick", action="store_true", help="few batches and samples: a smoke test, not numbers")
    sp.add_argument("--samples", type=int, help="samples per style-curve position (default 32; quick 4)")
    sp.add_argument("--prompt", default="\n", help="prompt of every style sample (default: a newline)")
    sp.add_argument("--device", default="auto")
    mode_arg(sp)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("calibrate", help="fit and store the map from style share to dial position")
    sp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    sp.add_argument("--samples", type=int, default=32, help="samples per dial position")
    sp.add_argument("--prompt", default="\n", help="prompt of every style sample (default: a newline)")
    sp.add_argument("--device", default="auto")
    mode_arg(sp)
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("serve", help="a web page with a dial slider, and an HTTP API")
    sp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--max-concurrent", type=int, default=2, help="generations at once; more get HTTP 429")
    sp.add_argument("--max-new-tokens", type=int, default=1000, help="cap on new tokens per request")
    sp.add_argument("--max-prompt-chars", type=int, default=4000, help="cap on prompt length")
    sp.add_argument("--max-body-bytes", type=int, help="cap on a request's body; larger get HTTP 413 (default: room "
                    "for the longest prompt, 12 x --max-prompt-chars + 64 KiB)")
    sp.add_argument("--max-dial-positions", type=int, help="distinct dial positions (corner networks) one request "
                    "may run at once (default: 16)")
    sp.add_argument("--max-batch-tokens", type=int, help="cap on new tokens x rows per request (default: 16 x "
                    "--max-new-tokens)")
    sp.add_argument("--device", default="auto")
    mode_arg(sp)
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("export", help="write a Hugging Face transformers GPT-2 folder at one dial position")
    sp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    sp.add_argument("--dial", required=True,
                    help="dial to fold in: a number in [0, 1] (two sources), a source name, 'uniform', or name=w,...")
    sp.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer, README)")
    sp.add_argument("--force", action="store_true", help="replace --out if it exists")
    mode_arg(sp)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("info", help="what a checkpoint is: sources, size, recipe, steps, losses, calibration")
    sp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("forget", help="write a copy of a partition model without one source (its units removed, "
                                       "every other corner as it was)")
    sp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    sp.add_argument("--source", required=True, help="the source to remove")
    sp.add_argument("--out", required=True, help="new checkpoint folder (a run folder with --retrain-shared)")
    sp.add_argument("--retrain-shared", type=int, default=0, metavar="STEPS",
                    help="then train the shared units on the remaining sources for STEPS steps, every source's own "
                         "units frozen (they learnt from the removed source too)")
    sp.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                    help="a train key for --retrain-shared, e.g. --set train.threads=1 (repeatable)")
    sp.set_defaults(func=cmd_forget)

    sp = sub.add_parser("add-source", help='train a new source into a bank of corners (model.width = "corner"), '
                                           "every existing parameter frozen")
    sp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    sp.add_argument("--source", required=True, help="the new source's name: a built-in, or any name with --path")
    sp.add_argument("--path", help="its text: a file, or a folder of .txt files")
    sp.add_argument("--max-bytes", type=int, help="keep only the first N bytes of its training text")
    sp.add_argument("--weight", type=float, default=1.0, help="its weight in later use of the recipe (default 1)")
    sp.add_argument("--steps", type=int, required=True, help="optimizer steps on the new source")
    sp.add_argument("--out", required=True, help="new run folder (rerun the same command to resume it)")
    sp.add_argument("--replace-unknown", metavar="CHAR", help="a char tokenizer: write CHAR (one of its vocabulary) "
                    "for the new source's characters it lacks (refused, naming them, without it)")
    sp.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                    help="a train key, e.g. --set train.threads=1 or train.lr=1e-3 (repeatable)")
    sp.set_defaults(func=cmd_add_source)

    sp = sub.add_parser("sources", help="list the built-in sources a recipe can name, and where each is found")
    sp.set_defaults(func=cmd_sources)

    sp = sub.add_parser("config", help="show a recipe with defaults and overrides applied")
    recipe_args(sp)
    sp.add_argument("--keys", action="store_true", help="list every recipe key: its type, range and default")
    sp.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure a user can cause ends in one line on stderr: exit 2 for an error, 130 for
    Ctrl-C, 143 for SIGTERM, which is taken as Ctrl-C is; what was on disk before stays as it was (every write is
    atomic)."""
    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        from abcgpt.common import AbcgptError, Interrupted  # (imports torch: a Ctrl-C may come meanwhile)

        args = build_parser().parse_args(argv)
        args.func(args)
    except KeyboardInterrupt:  # first: when it comes during the import above, the names below are not bound yet
        return fail("interrupted; nothing was left half-written", 143 if terminated else 130)
    except Interrupted as e:
        return fail(str(e), 143 if terminated else 130)
    except AbcgptError as e:
        return fail(str(e))
    except BrokenPipeError:  # `abcgpt sample ... | head`
        return 0
    except OSError as e:  # a file that cannot be read or written: name it
        return fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
    return 0


def fail(message: str, code: int = 2) -> int:
    print(f"abcgpt: error: {' '.join(message.split())}", file=sys.stderr)  # always one line
    return code


if __name__ == "__main__":
    sys.exit(main())
