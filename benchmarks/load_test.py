"""Loopback load test of `abcgpt serve`: C concurrent clients against a real uvicorn server on 127.0.0.1.

    python benchmarks/load_test.py                          # trains a tiny synthetic model first (seconds)
    python benchmarks/load_test.py --ckpt runs/tiny --seconds 20 --clients 8 --json load.json

The server runs in this process (uvicorn in a thread, on a free loopback port), so its slot counter
(`app.state.active`) can be read afterwards; the RSS reported is this process's (server and clients together).
Each client loops, for at most --seconds and --max-requests in all, over a mix of requests:

    stream_full        /api/generate, streamed, read to the final event
    stream_disconnect  /api/generate, streamed, closed after a few events (the server must free its slot)
    whole              /api/generate with stream=false
    oversized          prompt over the cap, max_new_tokens over the cap, or a body that is not JSON (-> 422)
    completions        /v1/completions (OpenAI-style), whole or streamed

It records status counts per kind, latencies (time to first token and total, p50/p95), tokens/s, RSS before and
after; then checks that the server still answers /api/info and that no generation slot leaked. 200, 422 and 429
are expected answers (429 when more than max_concurrent generations run); anything else, a transport error, or
a malformed stream is an error, and the script exits 1 if there was any. A 429 is "unexplained" when, while it
was in flight, the clients never had more than max_concurrent generations going and none had just ended (a slot
is given back a moment after its client sees the end); unexplained 429s are reported, and also exit 1."""

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import live_server, write_recipe  # noqa: E402

KINDS = ("stream_full", "stream_disconnect", "whole", "oversized", "completions")
SLOT_KINDS = {"stream_full", "stream_disconnect", "whole", "completions"}  # those that take a generation slot
EXPECTED = {200, 422, 429}
RELEASE_LAG_S = 0.5  # how long after a client sees a generation end its slot may still be held


class Tracker:
    """Client-side count of generation requests in flight, to tell whether a 429 was deserved."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inflight = 0
        self.last_end = float("-inf")
        self.peaks: dict[int, int] = {}  # request id -> most generations in flight during its life

    def start(self, rid: int) -> None:
        with self.lock:
            self.inflight += 1
            for k in self.peaks:
                self.peaks[k] = max(self.peaks[k], self.inflight)
            self.peaks[rid] = self.inflight

    def end(self, rid: int) -> int:
        """Returns the most generations in flight during the request's life (itself included)."""
        with self.lock:
            self.inflight -= 1
            peak = self.peaks.pop(rid)
            self.last_end = time.perf_counter()
            return peak


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def sse_events(lines):
    for line in lines:
        if line.startswith("data: "):
            body = line[len("data: "):]
            yield "[DONE]" if body == "[DONE]" else json.loads(body)


def one_request(client: httpx.Client, kind: str, rng: random.Random, limits: dict, tokens: int) -> dict:
    """Send one request of a kind; returns status, kind, timings, tokens, and error (a string) if any."""
    t0 = time.perf_counter()
    out = {"kind": kind, "status": None, "ttft": None, "total": None, "tokens": 0, "error": None}
    seed = rng.randrange(2**31)
    if kind in ("stream_full", "stream_disconnect"):
        body = {"prompt": "ab", "dial": rng.random(), "max_new_tokens": tokens, "seed": seed}
        with client.stream("POST", "/api/generate", json=body) as r:
            out["status"] = r.status_code
            if r.status_code == 200:
                n, last = 0, None
                for ev in sse_events(r.iter_lines()):
                    if "token" in ev:
                        n += 1
                        if out["ttft"] is None:
                            out["ttft"] = time.perf_counter() - t0
                    last = ev
                    if kind == "stream_disconnect" and n >= 3:
                        break  # leaving the with-block closes the connection mid-stream
                out["tokens"] = n
                if kind == "stream_full" and not (isinstance(last, dict) and last.get("done") is True):
                    out["error"] = f"stream ended without its final event (last: {last!r})"
            else:
                r.read()
    elif kind == "whole":
        r = client.post("/api/generate", json={"prompt": "ab", "dial": {"alpha": 1, "omega": 2},
                                                "max_new_tokens": tokens, "seed": seed, "stream": False})
        out["status"] = r.status_code
        if r.status_code == 200:
            out["tokens"] = tokens  # it always generates exactly max_new_tokens
            if "text" not in r.json():
                out["error"] = "no text in the answer"
    elif kind == "completions":
        streamed = rng.random() < 0.5
        body = {"model": "x", "prompt": "ab", "max_tokens": tokens, "seed": seed, "stream": streamed,
                "n": 1 if streamed else 2, "dial": "omega"}
        if streamed:
            with client.stream("POST", "/v1/completions", json=body) as r:
                out["status"] = r.status_code
                if r.status_code == 200:
                    evs = list(sse_events(r.iter_lines()))
                    out["tokens"] = sum(1 for e in evs if e != "[DONE]" and e["choices"][0]["text"])
                    if not evs or evs[-1] != "[DONE]":
                        out["error"] = "completion stream ended without [DONE]"
                else:
                    r.read()
        else:
            r = client.post("/v1/completions", json=body)
            out["status"] = r.status_code
            if r.status_code == 200:
                out["tokens"] = r.json()["usage"]["completion_tokens"]
    elif kind == "oversized":
        variant = rng.choice(("prompt", "max_new_tokens", "garbage"))
        if variant == "prompt":
            r = client.post("/api/generate", json={"prompt": "a" * (limits["max_prompt_chars"] + 1), "stream": False})
        elif variant == "max_new_tokens":
            r = client.post("/api/generate", json={"max_new_tokens": limits["max_new_tokens"] + 1, "stream": False})
        else:
            r = client.post("/api/generate", content=b'{"prompt": "ab", "max_new_tok', headers={
                "content-type": "application/json"})
        out["status"] = r.status_code
        if r.status_code != 422:
            out["error"] = f"oversized request ({variant}) got {r.status_code}, not 422"
    total = time.perf_counter() - t0
    out["total"] = total
    if out["ttft"] is None and out["status"] == 200 and kind in ("whole", "completions"):
        out["ttft"] = total  # no tokens before the whole answer
    return out


def run_load(base: str, seconds: float = 20.0, clients: int = 8, max_requests: int = 5000, tokens: int = 32,
             app=None, seed: int = 0, timeout_s: float = 30.0) -> dict:
    """Drive `clients` concurrent clients against the server at `base` (loopback only) for at most `seconds`
    and `max_requests` requests in all; returns the summary (see the module docstring)."""
    assert base.startswith(("http://127.0.0.1:", "http://localhost:")), "loopback only"
    limits = httpx.get(base + "/api/info", timeout=10).json()["limits"]
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    tracker = Tracker()
    lock = threading.Lock()
    results: list[dict] = []
    sent = [0]
    deadline = time.perf_counter() + seconds
    rid_counter = iter(range(10**9))

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=base, timeout=timeout_s) as client:
            k = i  # each client starts at a different kind, then goes round them
            while time.perf_counter() < deadline:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                    rid = next(rid_counter)
                kind = KINDS[k % len(KINDS)]
                k += 1
                slot = kind in SLOT_KINDS
                started = time.perf_counter()
                recent_end = started - tracker.last_end < RELEASE_LAG_S
                if slot:
                    tracker.start(rid)
                try:
                    res = one_request(client, kind, rng, limits, tokens)
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    res = {"kind": kind, "status": None, "ttft": None, "total": time.perf_counter() - started,
                           "tokens": 0, "error": f"{type(e).__name__}: {e}"}
                finally:
                    if slot:
                        peak = tracker.end(rid)
                if res["status"] == 429:
                    res["explained_429"] = (slot and peak > limits["max_concurrent"]) or recent_end
                with lock:
                    results.append(res)
                if res["status"] == 429:
                    time.sleep(rng.uniform(0.01, 0.05))  # back off a little, as a polite client would

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + timeout_s + 10)
    wall = time.perf_counter() - t0
    hung = sum(t.is_alive() for t in threads)

    # afterwards: the server answers, and every slot comes back (a disconnected stream frees its slot when its
    # generation notices, within a token or so)
    try:
        info_status = httpx.get(base + "/api/info", timeout=10).status_code
    except httpx.HTTPError as e:
        info_status = f"{type(e).__name__}: {e}"
    active_after = None
    if app is not None:
        end = time.perf_counter() + 5
        while app.state.active and time.perf_counter() < end:
            time.sleep(0.02)
        active_after = app.state.active
    rss_after = proc.memory_info().rss

    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_kind[r["kind"]][str(r["status"])] += 1
    errors = [r for r in results if r["status"] not in EXPECTED or r["error"]]
    ok = [r for r in results if r["status"] == 200 and not r["error"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    total = [r["total"] for r in ok if r["kind"] != "stream_disconnect"]
    stream_rates = [r["tokens"] / (r["total"] - r["ttft"]) for r in ok
                    if r["kind"] == "stream_full" and r["tokens"] > 1 and r["total"] > r["ttft"]]
    tokens_total = sum(r["tokens"] for r in ok)
    summary = {
        "config": {"seconds": seconds, "clients": clients, "max_requests": max_requests, "tokens": tokens,
                   "limits": limits},
        "wall_s": round(wall, 2),
        "requests": len(results),
        "status": dict(sorted(Counter(str(r["status"]) for r in results).items())),
        "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "errors": len(errors),
        "error_samples": [f"{r['kind']}: {r['status']} {r['error']}" for r in errors[:10]],
        "unexplained_429": sum(1 for r in results if r["status"] == 429 and not r.get("explained_429")),
        "latency_s": {"ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
                      "total_p50": percentile(total, 50), "total_p95": percentile(total, 95)},
        "tokens_generated": tokens_total,
        "tokens_per_s": round(tokens_total / wall, 1) if wall else None,
        "stream_tokens_per_s_p50": statistics.median(stream_rates) if stream_rates else None,
        "rss_mb": {"before": round(rss_before / 2**20, 1), "after": round(rss_after / 2**20, 1),
                   "growth": round((rss_after - rss_before) / 2**20, 1)},
        "server_info_after": info_status,
        "active_after": active_after,
        "hung_clients": hung,
    }
    summary["ok"] = (summary["errors"] == 0 and summary["unexplained_429"] == 0 and info_status == 200
                     and active_after in (None, 0) and hung == 0)
    return summary


def tiny_checkpoint(tmp: Path) -> Path:
    from abcgpt.config import load_recipe
    from abcgpt.train import train

    train(load_recipe(str(write_recipe(tmp)), ["train.steps=30"]), tmp / "run", progress=False)
    return tmp / "run"


def print_summary(s: dict) -> None:
    def ms(x):
        return "-" if x is None else f"{1000 * x:.0f} ms"

    lat = s["latency_s"]
    print(f"{s['requests']} requests in {s['wall_s']} s with {s['config']['clients']} clients "
          f"(server limits {s['config']['limits']})")
    print(f"status: {s['status']}")
    for k, v in s["by_kind"].items():
        print(f"  {k:18s} {v}")
    print(f"time to first token p50 {ms(lat['ttft_p50'])}, p95 {ms(lat['ttft_p95'])}; "
          f"total p50 {ms(lat['total_p50'])}, p95 {ms(lat['total_p95'])}")
    rate = s["stream_tokens_per_s_p50"]
    print(f"tokens: {s['tokens_generated']} generated, {s['tokens_per_s']} tokens/s overall, "
          f"{'-' if rate is None else round(rate, 1)} tokens/s per stream (p50)")
    print(f"RSS: {s['rss_mb']['before']} MB before, {s['rss_mb']['after']} MB after "
          f"({s['rss_mb']['growth']:+} MB)")
    print(f"after: /api/info -> {s['server_info_after']}, active slots {s['active_after']}, "
          f"hung clients {s['hung_clients']}")
    print(f"errors: {s['errors']}, unexplained 429s: {s['unexplained_429']}")
    for e in s["error_samples"]:
        print(f"  {e}")
    print("OK" if s["ok"] else "FAILED")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint to serve (default: train a tiny synthetic one in a temp dir)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests in all")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generation request")
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=1000)
    p.add_argument("--max-prompt-chars", type=int, default=4000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args()

    from abcgpt.serve import create_app

    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(args.ckpt) if args.ckpt else tiny_checkpoint(Path(d))
        app = create_app(ckpt, args.device, max_concurrent=args.max_concurrent, max_new_tokens=args.max_new_tokens,
                         max_prompt_chars=args.max_prompt_chars)
        with live_server(app) as base:
            summary = run_load(base, args.seconds, args.clients, args.max_requests, args.tokens, app=app,
                               seed=args.seed)
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
