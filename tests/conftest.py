import os
import random
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's, driven by Playwright (no browser download)
LAUNCH = {"executable_path": CHROMIUM, "args": ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]}


def need_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (apt-get install chromium) for the browser test")
        pytest.skip("chromium is not installed")


@pytest.fixture
def page():
    """A headless Chromium page, 1280 x 900 (the browser tests)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(**LAUNCH)
        yield browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()


def shared_data() -> Path:
    d = os.environ.get("ABCGPT_DATA_DIR")
    return Path(d) if d else REPO.parent / "shared" / "data"


@pytest.fixture
def data_dir(monkeypatch) -> Path:
    """The corpora (shared/data layout); tests that need them skip without them."""
    d = shared_data()
    if not (d / "shakespeare" / "input.txt").is_file():
        pytest.skip(f"corpora not found in {d}: set ABCGPT_DATA_DIR")
    monkeypatch.setenv("ABCGPT_DATA_DIR", str(d))
    return d


def synthetic_text(alphabet: str, n_chars: int, seed: int) -> str:
    """Words over one alphabet, in lines: two such sources are told apart by their characters alone."""
    rng = random.Random(seed)
    words, size = [], 0
    while size < n_chars:
        w = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6)))
        words.append(w)
        size += len(w) + 1
    lines = [" ".join(words[i:i + 8]) for i in range(0, len(words), 8)]
    return "\n".join(lines) + "\n"


def source_tables(**paths: Path) -> str:
    """[[data.sources]] tables, one per name=path."""
    return "".join(f'[[data.sources]]\nname = "{name}"\npath = "{path}"\n\n' for name, path in paths.items())


def train_synthetic(tmp: Path, *overrides: str) -> Path:
    """A run of write_recipe's recipe in tmp/run (seconds), with --set overrides; returns the run folder."""
    from abcgpt.config import load_recipe
    from abcgpt.train import train

    train(load_recipe(str(write_recipe(tmp)), list(overrides)), tmp / "run", progress=False)
    return tmp / "run"


def noisy(model):
    """The model with non-zero biases and LayerNorm shifts (normally 0 at init), so tests of what a forward does
    with them can fail."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return model


def write_recipe(tmp: Path, extra_train: str = "", sources: str | None = None) -> Path:
    """A seconds-long recipe over two synthetic sources with disjoint alphabets."""
    (tmp / "a.txt").write_text(synthetic_text("abcdefg", 40_000, 0))
    (tmp / "b.txt").write_text(synthetic_text("tuvwxyz", 40_000, 1))
    sources = sources or f"""
[[data.sources]]
name = "alpha"
path = "{tmp / 'a.txt'}"

[[data.sources]]
name = "omega"
path = "{tmp / 'b.txt'}"
"""
    path = tmp / "synthetic.toml"
    path.write_text(f"""
[data]
dir = "{tmp / 'data'}"
tokenizer = "char"
{sources}
[model]
n_layer = 1
n_head = 2
n_embd = 16
block_size = 16

[train]
steps = 30
batch_size = 8
lr = 3e-3
warmup_steps = 5
eval_every = 10
eval_batches = 2
checkpoint_every = 10
log_every = 5
threads = 1
{extra_train}
""")
    return path


@contextmanager
def live_server(app):
    """Serve an ASGI app with uvicorn on a free loopback port, in a thread; yields its base URL."""
    import httpx
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(base + "/api/info", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
