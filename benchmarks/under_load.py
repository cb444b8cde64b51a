"""Training and sampling speed on a busy machine: each measured alone and beside one CPU-bound process, in one run.

    python benchmarks/under_load.py                    # the tiny recipe, this machine's default threads
    python benchmarks/under_load.py --threads 2 --env OMP_WAIT_POLICY=active   # compare a setting

Each measurement is a fresh `abcgpt` process (what a user runs): training reports tokens/s in its log (the median
of its log lines after the first, which holds start-up), sampling is timed over its generation only (the process's
start-up measured apart and taken off). The competitor is a Python busy loop, one core's worth of work, as a
user's other program would be. Prints, for training and for sampling, the speed alone, beside the competitor, and
the slowdown (alone / loaded); --json PATH writes them."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ABCGPT = [sys.executable, "-m", "abcgpt"]


def train_speed(env: dict, steps: int) -> float:
    """Median training tokens/s of a fresh run of the tiny recipe."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*ABCGPT, "train", "--config", "tiny", "--out", f"{tmp}/run", "--set", f"train.steps={steps}",
                        "--set", "train.eval_every=100000", "--set", "train.log_every=5", "--set",
                        "train.checkpoint_every=100000"], check=True, env=env, capture_output=True)
        lines = [json.loads(x) for x in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        speeds = [r["tok_per_s"] for r in lines if r.get("type") == "train"][1:]
    return statistics.median(speeds)


def sample_seconds(env: dict, ckpt: Path, tokens: int) -> float:
    """Seconds one `abcgpt sample` spends generating `tokens` tokens (its start-up taken off)."""
    def timed(n: int) -> float:
        t0 = time.perf_counter()
        subprocess.run([*ABCGPT, "sample", "--ckpt", str(ckpt), "--dial", "0.5", "--max-new-tokens", str(n),
                        "--seed", "0"], check=True, env=env, capture_output=True)
        return time.perf_counter() - t0
    return timed(tokens) - timed(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for abcgpt (default: abcgpt's own choice)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="more environment for abcgpt")
    p.add_argument("--json")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env |= dict(kv.split("=", 1) for kv in args.env)

    with tempfile.TemporaryDirectory() as tmp:  # a small checkpoint to sample from
        subprocess.run([*ABCGPT, "train", "--config", "tiny", "--out", f"{tmp}/ck", "--set", "train.steps=10",
                        "--set", "train.eval_every=100000"], check=True, env=env, capture_output=True)
        out = {}
        for loaded in (False, True):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
            try:
                time.sleep(0.5 if loaded else 0)
                out["loaded" if loaded else "alone"] = {"train_tok_s": train_speed(env, args.steps),
                                                        "sample_s": sample_seconds(env, Path(f"{tmp}/ck"),
                                                                                   args.tokens)}
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    out["train_slowdown"] = out["alone"]["train_tok_s"] / out["loaded"]["train_tok_s"]
    out["sample_slowdown"] = out["loaded"]["sample_s"] / out["alone"]["sample_s"]
    out["cpus"], out["setting"] = os.cpu_count(), {k: env.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    a, b = out["alone"], out["loaded"]
    print(f"{os.cpu_count()} CPUs, abcgpt with {out['setting']}")
    print(f"training: {a['train_tok_s']:,.0f} tokens/s alone, {b['train_tok_s']:,.0f} beside a busy process: "
          f"{out['train_slowdown']:.2f}x slower")
    print(f"sampling {args.tokens} tokens: {a['sample_s']:.2f} s alone, {b['sample_s']:.2f} s beside it: "
          f"{out['sample_slowdown']:.2f}x slower")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
