"""Generation speed: KV cache against re-running the whole context, and a fixed dial folded into the weights
against the gated model and against an ordinary GPT of the same size.

    python benchmarks/generate.py                 # tiny recipe's model, batch 8, 300 new tokens

Prints tokens/s and the ratios taken in this run; --json PATH writes them."""

import argparse
import json
import time

import torch

from abcgpt.common import pick_device
from abcgpt.config import load_recipe
from abcgpt.generate import generate_tokens
from abcgpt.model import GPT


def tokens_per_s(model, prompt, dial, new_tokens: int, use_cache: bool, repeats: int) -> float:
    for _ in generate_tokens(model, prompt, dial, 4, use_cache=use_cache, seed=0):
        pass  # warm-up: first-call allocations are not what we measure
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in generate_tokens(model, prompt, dial, new_tokens, temperature=1.0, top_k=40, seed=0,
                                 use_cache=use_cache):
            pass
        if prompt.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return prompt.size(0) * new_tokens / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    recipe = load_recipe(args.config, args.set)
    device = pick_device(recipe.train.device)
    cfg = recipe.model
    # char recipes: about the size of their alphabets; BPE recipes: their vocabulary
    cfg.vocab_size = recipe.data.vocab_size if recipe.data.tokenizer == "bpe" else 96
    cfg.n_sources = len(recipe.data.sources)
    torch.manual_seed(0)
    gated = GPT(cfg).to(device).eval()
    dial = torch.tensor([0.3, 0.7], device=device)
    plain = GPT(type(cfg)(**{**cfg.__dict__, "gates": "none"})).to(device).eval()
    prompt = torch.zeros(args.batch, 1, dtype=torch.long, device=device)
    n = args.new_tokens
    rows = {
        "gated, no KV cache": tokens_per_s(gated, prompt, dial, n, False, 1),
        "gated, KV cache": tokens_per_s(gated, prompt, dial, n, True, args.repeats),
        "folded dial, KV cache": tokens_per_s(gated.folded(dial), prompt, None, n, True, args.repeats),
        "ungated GPT, KV cache": tokens_per_s(plain, prompt, None, n, True, args.repeats),
    }
    ratios = {
        "KV cache / no cache (gated)": rows["gated, KV cache"] / rows["gated, no KV cache"],
        "folded time / ungated time": rows["ungated GPT, KV cache"] / rows["folded dial, KV cache"],
        "gated time / folded time": rows["folded dial, KV cache"] / rows["gated, KV cache"],
    }
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"generation, {args.config} model ({gated.num_params() / 1e6:.2f}M params, block {cfg.block_size}), "
          f"batch {args.batch}, {n} new tokens, {name}")
    for k, v in rows.items():
        print(f"  {k:24s} {v:10,.0f} tokens/s")
    for k, v in ratios.items():
        print(f"  {k:30s} {v:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "device": name, "batch": args.batch, "new_tokens": n,
                       "tokens_per_s": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
