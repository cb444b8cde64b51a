"""The page of `abcgpt serve` in headless Chromium, as docs/serve.png shows it: a trained checkpoint at one dial and
mode, then a sweep of the same prompt and seed across the dial.

    python scripts/screenshot.py runs/demo docs/serve.png --dial 0.5 --mode switch

Needs Debian's chromium and the dev extras (playwright); serves on a free loopback port."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import live_server  # noqa: E402

from abcgpt.serve import create_app  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--dial", default="0.5")
    p.add_argument("--mode", default=None, help="the page's mode select (default: the checkpoint's)")
    p.add_argument("--prompt", default="")
    p.add_argument("--length", default="240")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    with live_server(create_app(Path(args.ckpt), max_concurrent=4)) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(base)
        page.wait_for_selector("#dial")
        page.fill("#prompt", args.prompt)
        page.fill("#length", args.length)
        page.fill("#seed", "0")
        if args.mode:
            page.select_option("#mode", args.mode)
        page.eval_on_selector("#dial", f"el => {{ el.value = '{args.dial}'; "
                                       "el.dispatchEvent(new Event('input', {bubbles: true})); }")
        page.wait_for_function("document.querySelector('#status').innerText.includes('done')", timeout=120_000)
        page.click("#sweep")
        page.wait_for_function("document.querySelector('#sweep-status').innerText.includes('sweep done')",
                               timeout=300_000)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
