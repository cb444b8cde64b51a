"""Train-step time of the recipe's gated model against the same model without gates, eager and compiled.

    python benchmarks/train_step.py                      # the tiny recipe's model on this machine
    python benchmarks/train_step.py --config four        # four sources
    python benchmarks/train_step.py --config original   # DESIGN §1's model (meant for a GPU)
    python benchmarks/train_step.py --sources 2,8,32,100 # model.width = "corner": N sources, each the recipe's size

Every row draws its dials and sources as the recipe's training does (dial.sample_dials with the recipe's
[train] keys: for the default, every sequence at the corner of its source). "default" is the model as it trains:
rows whose dial silences units run through their sub-network at its own width (GPT.forward); "full width"
computes every unit and multiplies the silenced ones by 0 (own_width=False), as the method is written; "ungated"
is the same GPT without gates. Prints one table and the ratios taken in this run; --json PATH writes them.

--sources N,N,...: a bank of N corner networks of the recipe's size (model.width = "corner", each batch's sources
drawn from train.sources_per_batch of them: --set train.sources_per_batch=K, default 4), against the ungated GPT of
one corner's size on the same batch: tokens/s of each, their ratio, and the process's peak memory (CUDA: the
allocator's peak; CPU: the resident set's high-water mark, which only grows, so read it across the N in order)."""

import argparse
import json
import resource
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch

from abcgpt.common import pick_device
from abcgpt.config import load_recipe
from abcgpt.data import dial_draw
from abcgpt.dial import sample_dials
from abcgpt.model import GPT, build_model
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
    model = build_model(cfg).to(device)
    kwargs = {"own_width": own_width} if isinstance(model, GPT) else {}
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), device.type)
    run = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        dials, sources = draws[i % len(draws)]
        t0 = time.perf_counter()
        with autocast():
            _, loss = run(x, dials, x, sources, **kwargs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(device) -> float:
    """Bytes: the CUDA allocator's peak, or on the CPU the process's resident high-water mark."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def corner_width_sweep(recipe, ns: list[int], steps: int, warmup: int, device, autocast) -> dict:
    """Train-step tokens/s of a bank of N corners (model.width = "corner") against one corner's ungated GPT."""
    cfg = recipe.model
    cfg.vocab_size = recipe.data.vocab_size if recipe.data.tokenizer == "bpe" else 96
    batch, tokens = recipe.train.batch_size, recipe.train.batch_size * cfg.block_size
    k = recipe.train.sources_per_batch or 4
    out = {}
    ungated = step_time(type(cfg)(**{**cfg.__dict__, "gates": "none", "n_sources": 2}),
                        [(None, None)], batch, device, autocast, False, True, steps, warmup)
    for n in ns:
        c = type(cfg)(**{**cfg.__dict__, "width": "corner", "method": "partition", "n_sources": n})
        rng = np.random.default_rng(0)
        draws = [sample_dials(rng, batch, n, 0.5, 1.0, sources_per_batch=min(k, n)) for _ in range(warmup + steps)]
        draws = [(torch.from_numpy(d).to(device), torch.from_numpy(s).to(device)) for d, s in draws]
        sec = step_time(c, draws, batch, device, autocast, False, True, steps, warmup)
        params = build_model(c).num_params()
        out[n] = {"tokens_per_s": tokens / sec, "ungated_tokens_per_s": tokens / ungated,
                  "ratio": ungated / sec, "params": params, "peak_memory_bytes": peak_memory(device)}
        print(f"  N = {n:4d}: {params / 1e6:8.2f}M params, {tokens / sec:10,.0f} tokens/s, "
              f"{ungated / sec:.3f}x the ungated corner's {tokens / ungated:,.0f}, peak memory "
              f"{out[n]['peak_memory_bytes'] / 2**20:,.0f} MiB")
    return {"sources_per_batch": k, "batch": batch, "block_size": cfg.block_size, "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer, "shared_fraction": cfg.shared_fraction, "by_n": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", choices=["yes", "no", "auto"], default="auto",
                   help="also time torch.compile (auto: on CUDA only; it brings nothing on this CPU)")
    p.add_argument("--sources", help="comma-separated N: a bank of N corners of the recipe's size per N")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    recipe = load_recipe(args.config, args.set)
    device = pick_device(recipe.train.device)
    autocast = autocast_for(device, recipe.train.dtype) if device.type == "cuda" else nullcontext
    if args.sources:
        name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"train step, a bank of N corners of the {args.config} model's size, {name}, median of {args.steps}")
        result = corner_width_sweep(recipe, [int(n) for n in args.sources.split(",")], args.steps, args.warmup,
                                    device, autocast)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": args.config, "device": name} | result, f, indent=2)
        return
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
