"""Train-step time of the recipe's gated model against the same model without gates, eager and compiled.

    python benchmarks/train_step.py                      # the tiny recipe's model on this machine
    python benchmarks/train_step.py --config four        # four sources
    python benchmarks/train_step.py --config reference   # DESIGN §1's model (meant for a GPU)

Every row draws its dials and sources as the recipe's training does (dial.sample_dials with the recipe's
[train] keys: for the default, every sequence at the corner of its source). "default" is the model as it trains:
rows whose dial silences units run through their sub-network at its own width (GPT.forward); "full width"
computes every unit and multiplies the silenced ones by 0 (own_width=False), as the method is written; "ungated"
is the same GPT without gates. Prints one table and the ratios taken in this run; --json PATH writes them."""

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch

from abcgpt.common import pick_device
from abcgpt.config import load_recipe
from abcgpt.data import dial_draw
from abcgpt.dial import sample_dials
from abcgpt.model import GPT
from abcgpt.train import autocast_for, peak_flops


def training_draws(recipe, batch: int, steps: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(dials, sources) of `steps` training batches, drawn as the recipe's Batcher draws them."""
    rng, n = np.random.default_rng(0), len(recipe.data.sources)
    draws = [sample_dials(rng, batch, n, **dial_draw(recipe)) for _ in range(steps)]
    return [(torch.from_numpy(d).to(device), torch.from_numpy(s).to(device)) for d, s in draws]


def step_time(cfg, draws, batch: int, device, autocast, compile_: bool, own_width: bool, steps: int,
              warmup: int) -> float:
    """Median seconds per optimizer step (forward, backward, AdamW) on random tokens at the given draws."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), device.type)
    run = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        dials, sources = draws[i % len(draws)]
        t0 = time.perf_counter()
        with autocast():
            _, loss = run(x, dials, x, sources, own_width=own_width)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", choices=["yes", "no", "auto"], default="auto",
                   help="also time torch.compile (auto: on CUDA only; it brings nothing on this CPU)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    recipe = load_recipe(args.config, args.set)
    device = pick_device(recipe.train.device)
    autocast = autocast_for(device, recipe.train.dtype) if device.type == "cuda" else nullcontext
    cfg = recipe.model
    # char recipes: about the size of their alphabets; BPE recipes: their vocabulary
    cfg.vocab_size = recipe.data.vocab_size if recipe.data.tokenizer == "bpe" else 96
    cfg.n_sources = len(recipe.data.sources)
    batch = recipe.train.batch_size
    draws = training_draws(recipe, batch, args.warmup + args.steps, device)
    modes = [False] + ([True] if args.compile == "yes" or (args.compile == "auto" and device.type == "cuda") else [])
    rows = {}
    for compile_ in modes:
        prefix = "compiled" if compile_ else "eager"
        for key, gates, own_width in (("ungated", "none", True), ("default", "abc", True),
                                      ("default full width", "abc", False)):
            c = type(cfg)(**{**cfg.__dict__, "gates": gates})
            rows[f"{prefix} {key}"] = step_time(c, draws, batch, device, autocast, compile_, own_width, args.steps,
                                                args.warmup)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"train step, {args.config} model ({GPT(cfg).num_params() / 1e6:.2f}M params, {cfg.n_sources} sources, "
          f"{cfg.method}, {cfg.routing}), batch {batch} x {cfg.block_size}, {name}, median of {args.steps} steps")
    tokens = batch * cfg.block_size
    peak = peak_flops(device, recipe.train.peak_tflops)
    token_flops = 6 * GPT(cfg).num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    # MFU counts the full-width model's FLOPs for every row (what an ungated GPT of this size does per token)
    mfu = {k: tokens / sec * token_flops / peak for k, sec in rows.items()} if peak else {}
    for key, sec in rows.items():
        print(f"  {key:28s} {sec * 1000:8.1f} ms  {tokens / sec:12,.0f} tokens/s"
              + (f"  MFU {mfu[key]:.1%}" if mfu else ""))
    ratios = {}
    for mode in ("eager", "compiled"):
        if f"{mode} ungated" in rows:
            ungated, full = rows[f"{mode} ungated"], rows[f"{mode} default full width"]
            ratios[f"{mode} default / ungated"] = rows[f"{mode} default"] / ungated
            ratios[f"{mode} default full width / ungated"] = full / ungated
            ratios[f"{mode} default / full width"] = rows[f"{mode} default"] / full
    for k, v in ratios.items():
        print(f"  {k:40s} {v:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "device": name, "batch": batch, "block_size": cfg.block_size,
                       "n_sources": cfg.n_sources, "seconds": rows,
                       "tokens_per_s": {k: tokens / v for k, v in rows.items()}, "mfu": mfu, "ratios": ratios},
                      f, indent=2)


if __name__ == "__main__":
    main()
