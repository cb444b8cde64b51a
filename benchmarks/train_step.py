"""Train-step time of the gated model against the same model without gates, eager and compiled.

    python benchmarks/train_step.py                      # the tiny recipe's model on this machine
    python benchmarks/train_step.py --config reference   # DESIGN §1's model (meant for a GPU)

Prints one table and the ratios taken in this run, and writes them as JSON (--json PATH)."""

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch

from abcgpt.common import pick_device
from abcgpt.config import load_recipe
from abcgpt.model import GPT
from abcgpt.train import autocast_for, peak_flops


def step_time(cfg, batch: int, device, autocast, compile_: bool, steps: int, warmup: int) -> float:
    """Median seconds per optimizer step (forward, backward, AdamW) on random tokens and dials."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), device.type)
    run = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    a = torch.rand(batch, 1, device=device)
    dials, sources = torch.cat([1 - a, a], 1), (torch.rand(batch, device=device) < a[:, 0]).long()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast():
            _, loss = run(x, dials, x, sources)
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
    modes = [False] + ([True] if args.compile == "yes" or (args.compile == "auto" and device.type == "cuda") else [])
    rows = {}
    for compile_ in modes:
        for gates in ("none", "abc"):
            for routing in (("soft", "routed") if gates == "abc" else ("soft",)):
                c = type(cfg)(**{**cfg.__dict__, "gates": gates, "routing": routing})
                key = f"{'compiled' if compile_ else 'eager'} {gates if gates == 'none' else 'gated ' + routing}"
                rows[key] = step_time(c, recipe.train.batch_size, device, autocast, compile_, args.steps, args.warmup)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"train step, {args.config} model ({GPT(cfg).num_params() / 1e6:.2f}M params), batch "
          f"{recipe.train.batch_size} x {cfg.block_size}, {name}, median of {args.steps} steps")
    tokens = recipe.train.batch_size * cfg.block_size
    peak = peak_flops(device, recipe.train.peak_tflops)
    token_flops = 6 * GPT(cfg).num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    mfu = {k: tokens / sec * token_flops / peak for k, sec in rows.items()} if peak else {}
    for key, sec in rows.items():
        print(f"  {key:24s} {sec * 1000:8.1f} ms  {tokens / sec:12,.0f} tokens/s"
              + (f"  MFU {mfu[key]:.1%}" if mfu else ""))
    ratios = {}
    for mode in ("eager", "compiled"):
        if f"{mode} none" in rows:
            for r in ("soft", "routed"):
                ratios[f"{mode} gated {r} / ungated"] = rows[f"{mode} gated {r}"] / rows[f"{mode} none"]
    for k, v in ratios.items():
        print(f"  {k:34s} {v:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "device": name, "batch": recipe.train.batch_size,
                       "block_size": cfg.block_size, "seconds": rows, "tokens_per_s": {k: tokens / v for k, v in
                                                                                         rows.items()},
                       "mfu": mfu, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
