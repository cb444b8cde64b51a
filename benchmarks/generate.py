"""Generation speed, on randomly initialised models of one recipe's size (no training, no files).

1. Bare networks, a one-token prompt: KV cache against re-running the whole context; a fixed dial's SubNetwork
   (gates folded into the weights) against the gated model and against an ordinary (ungated) GPT of the same size:
   dial 0.3 (no gate is 0: full width) and a corner of a two- and a four-source model (their own width, 1/N of
   every group of units).
2. Through the inference engine (abcgpt.engine.Engine, as `abcgpt sample`, the server and the API call it): each
   dial mode (mixture, switch, tokens, product, gates) at a corner and at dial 0.5 of a two-source model, and at
   the uniform dial of a four-source model of the same size, against the ungated GPT through the same engine. All
   from the same 8-token prompt (so the prompt posterior of mixture and switch is not trivial; scoring the prompt
   with every corner is part of what is timed), batch, new tokens, sampling settings and seed. Sub-networks
   are cached by the engine, so they are built in the warm-up, as in a long-lived server.

    python benchmarks/generate.py                      # tiny recipe's size, batch 8, 300 new tokens, 3 repeats
    python benchmarks/generate.py --config original --json runs/bench/generate.json

Prints tokens/s (best of --repeats, after a warm-up), the ratios taken in this run, and a table of
"mode at position time / ungated time" (1.00x = the cost of an ordinary GPT); --json PATH writes them all."""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from abcgpt.checkpoint import Checkpoint
from abcgpt.common import pick_device
from abcgpt.config import load_recipe
from abcgpt.dial import MODES, corner
from abcgpt.engine import Engine, generate_tokens
from abcgpt.model import GPT, GPTConfig, SubNetwork
from abcgpt.tokenizer import CharTokenizer

PROMPT = "The king"  # 8 characters: 8 tokens of the benchmark's character tokenizer
SOURCES = ["tinystories", "shakespeare", "kjv", "python"]  # the four recipe's; the two-source model uses two
TEMPERATURE, TOP_K, SEED = 1.0, 40, 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(run, device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of run(), after one warm-up call (first-call allocations, and the
    engine's folding, are not what we measure)."""
    run()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def tokens_per_s(model, prompt, dial, new_tokens: int, use_cache: bool, repeats: int) -> float:
    """A bare network, through generate_tokens."""
    def run():
        for _ in generate_tokens(model, prompt, dial, new_tokens, temperature=TEMPERATURE, top_k=TOP_K, seed=SEED,
                                 use_cache=use_cache):
            pass
    return prompt.size(0) * new_tokens / best_time(run, prompt.device, repeats)


def engine_tokens_per_s(engine: Engine, dial, mode: str, batch: int, new_tokens: int, repeats: int) -> float:
    """Through the engine: `batch` samples of `new_tokens` after PROMPT at one dial, one engine.generate call."""
    def run():
        engine.generate(PROMPT, dial=dial, max_new_tokens=new_tokens, temperature=TEMPERATURE, top_k=TOP_K,
                        seed=SEED, n=batch, mode=mode)
    return batch * new_tokens / best_time(run, engine.device, repeats)


def char_tokenizer(vocab_size: int) -> CharTokenizer:
    """A character tokenizer of exactly vocab_size tokens: a line break and the characters from the space up
    (printable ASCII first, so PROMPT encodes and the sentence ends of `switch` exist)."""
    return CharTokenizer(["\n"] + [chr(c) for c in range(32, 32 + vocab_size - 1)])


def make_engine(cfg: GPTConfig, sources: list[str], device: torch.device, recipe) -> Engine:
    model = GPT(cfg).to(device).eval()
    ckpt = Checkpoint(path=Path("(random init)"), model=model, recipe=recipe, tokenizer=char_tokenizer(cfg.vocab_size),
                      meta={"sources": sources, "step": 0})
    return Engine(ckpt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="the recipe whose model size every model here has")
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
    n, batch = args.new_tokens, args.batch
    cfg2 = dataclasses.replace(cfg, n_sources=2)
    cfg4 = dataclasses.replace(cfg, n_sources=4)
    plain_cfg = dataclasses.replace(cfg, gates="none")

    # 1. bare networks
    torch.manual_seed(0)
    gated = GPT(cfg2).to(device).eval()
    gated4 = GPT(cfg4).to(device).eval()
    dial = torch.tensor([0.3, 0.7], device=device)
    plain = GPT(plain_cfg).to(device).eval()
    prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)
    corner2, corner4 = SubNetwork(gated, corner(0, 2).to(device)), SubNetwork(gated4, corner(0, 4).to(device))
    rows = {
        "gated, no KV cache": tokens_per_s(gated, prompt, dial, n, False, 1),
        "gated, KV cache": tokens_per_s(gated, prompt, dial, n, True, args.repeats),
        "dial 0.3 sub-network": tokens_per_s(SubNetwork(gated, dial), prompt, None, n, True, args.repeats),
        f"corner of 2 ({corner2.width} ch.)": tokens_per_s(corner2, prompt, None, n, True, args.repeats),
        f"corner of 4 ({corner4.width} ch.)": tokens_per_s(corner4, prompt, None, n, True, args.repeats),
        "ungated GPT, KV cache": tokens_per_s(plain, prompt, None, n, True, args.repeats),
    }
    ungated = rows["ungated GPT, KV cache"]
    ratios = {
        "KV cache / no cache (gated)": rows["gated, KV cache"] / rows["gated, no KV cache"],
        "dial 0.3 sub-network time / ungated time": ungated / rows["dial 0.3 sub-network"],
        "gated time / dial 0.3 sub-network time": rows["dial 0.3 sub-network"] / rows["gated, KV cache"],
        "corner of 2 tokens/s / ungated": rows[f"corner of 2 ({corner2.width} ch.)"] / ungated,
        "corner of 4 tokens/s / ungated": rows[f"corner of 4 ({corner4.width} ch.)"] / ungated,
    }

    # 2. through the engine: every mode at three positions, against the ungated GPT
    torch.manual_seed(0)
    two = make_engine(cfg2, SOURCES[:2], device, recipe)
    four = make_engine(cfg4, SOURCES, device, recipe)
    ungated = make_engine(plain_cfg, SOURCES[:2], device, recipe)
    positions = {  # column -> (engine, dial)
        "corner": (two, SOURCES[0]),
        "0.5": (two, 0.5),
        "uniform N=4": (four, "uniform"),
    }
    ungated_tps = engine_tokens_per_s(ungated, SOURCES[0], "gates", batch, n, args.repeats)
    engine_tps = {mode: {col: engine_tokens_per_s(eng, d, mode, batch, n, args.repeats)
                         for col, (eng, d) in positions.items()} for mode in MODES}
    vs_ungated = {mode: {col: ungated_tps / v for col, v in cols.items()} for mode, cols in engine_tps.items()}

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"generation, {args.config} model ({gated.num_params() / 1e6:.2f}M params, block {cfg.block_size}), "
          f"batch {batch}, {n} new tokens, {name}")
    for k, v in rows.items():
        print(f"  {k:24s} {v:10,.0f} tokens/s")
    for k, v in ratios.items():
        print(f"  {k:40s} {v:.2f}x")
    prompt_tokens = len(two.prompt_ids(PROMPT))
    print(f"\nthrough the engine, a prompt of {prompt_tokens} tokens "
          f"(ungated GPT: {ungated_tps:,.0f} tokens/s); mode at position time / ungated time:")
    cols = list(positions)
    print(f"  {'mode':8s}" + "".join(f"{c:>14s}" for c in cols))
    for mode in MODES:
        print(f"  {mode:8s}" + "".join(f"{vs_ungated[mode][c]:13.2f}x" for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "device": name, "batch": batch, "new_tokens": n,
                       "tokens_per_s": rows, "ratios": ratios,
                       "engine": {"prompt": PROMPT, "prompt_tokens": prompt_tokens,
                                  "ungated_tokens_per_s": ungated_tps, "tokens_per_s": engine_tps,
                                  "time_vs_ungated": vs_ungated}}, f, indent=2)


if __name__ == "__main__":
    main()
