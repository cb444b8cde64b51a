"""End to end in a real headless Chromium (Debian's package, driven by Playwright): the page loads, text
streams in, moving the slider changes the voice, the mode select sends its mode, a cleared number box means the
server's default, a bad value gets a message naming its box, and the sweep covers every source. .ci/run installs
chromium."""

import os
import time

import pytest
from conftest import LAUNCH, live_server, need_chromium, source_tables, synthetic_text, write_recipe

from abcgpt.config import load_recipe
from abcgpt.serve import create_app
from abcgpt.train import train

pytestmark = pytest.mark.slow  # headless Chromium, and a model trained for it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need_chromium()
    tmp = tmp_path_factory.mktemp("browser")
    train(load_recipe(str(write_recipe(tmp)), ["train.steps=150", "train.eval_every=150"]), tmp / "run",
          progress=False)
    with live_server(create_app(tmp / "run", max_concurrent=2, max_new_tokens=400)) as base:
        yield base


@pytest.fixture(scope="module")
def server6(tmp_path_factory):
    """Six sources (one more than the sweep used to show), trained for a few steps: only the page is tested."""
    need_chromium()
    tmp = tmp_path_factory.mktemp("browser6")
    paths = {}
    for k in range(6):
        paths[f"s{k}"] = tmp / f"s{k}.txt"
        paths[f"s{k}"].write_text(synthetic_text("abcdefghijklmnopqrstuvwx"[4 * k:4 * k + 4], 3_000, k))
    recipe = write_recipe(tmp, sources=source_tables(**paths))
    train(load_recipe(str(recipe), ["train.steps=5", "train.eval_every=5", "model.n_head=8"]), tmp / "run",
          progress=False)
    with live_server(create_app(tmp / "run", max_concurrent=2, max_new_tokens=400)) as base:
        yield base


def letters(text: str, alphabet: str) -> int:
    return sum(c in alphabet for c in text)


def settled(page, status: str = "status") -> tuple[str, str]:
    """(text, kind) of a status line once it is no longer busy."""
    page.wait_for_function(f"document.querySelector('#{status}').dataset.kind !== 'busy'", timeout=60_000)
    return page.inner_text(f"#{status}"), page.get_attribute(f"#{status}", "data-kind")


def generate_requests(page) -> list:
    """The bodies of the page's POST /api/generate, appended as they are sent."""
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/api/generate") else None)
    return bodies


def test_slider_streams_and_changes_the_voice(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(**LAUNCH)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server)
        page.wait_for_selector("#dial")
        page.fill("#prompt", " ")
        page.fill("#length", "300")

        def move(value: str) -> str:
            """Set the slider (an input event, as a drag makes) and return the text once it is done."""
            page.eval_on_selector("#dial", f"el => {{ el.value = '{value}'; "
                                           "el.dispatchEvent(new Event('input', {bubbles: true})); }")
            # the restart is debounced: wait for it to begin before waiting for it to end
            page.wait_for_function("!document.querySelector('#status').innerText.toLowerCase().includes('done')",
                                   timeout=10_000)
            lengths = []
            deadline = time.time() + 60
            while time.time() < deadline:
                lengths.append(len(page.inner_text("#output")))
                if "done" in page.inner_text("#status").lower():
                    break
                time.sleep(0.02)
            assert "done" in page.inner_text("#status").lower(), page.inner_text("#status")
            return page.inner_text("#output"), lengths

        text0, lengths0 = move("0")
        # streamed: the text was seen growing before it was done
        assert len(set(lengths0)) > 3, lengths0
        text1, _ = move("1")
        assert text0 != text1
        assert letters(text0, "abcdefg") > letters(text0, "tuvwxyz")
        assert letters(text1, "tuvwxyz") > letters(text1, "abcdefg")
        if os.environ.get("ABCGPT_SCREENSHOT"):  # how docs/serve.png is made
            page.screenshot(path=os.environ["ABCGPT_SCREENSHOT"], full_page=True)
        browser.close()


def test_mode_select_sends_its_mode(server, page):
    info = page.request.get(f"{server}/api/info").json()
    page.goto(server)
    page.wait_for_selector("#dial")
    # the sampling boxes start at the engine's defaults, read from /api/info (declared once, abcgpt/sampling.py)
    assert [float(page.input_value(f"#{b}")) for b in ("temperature", "top-k", "length")] == [
        info["sampling"]["temperature"], info["sampling"]["top_k"], info["sampling"]["max_new_tokens"]]
    assert info["modes"] == ["mixture", "switch", "tokens", "product", "gates"] and info["mode"] == "switch"
    page.goto(server)
    page.wait_for_selector("#dial")
    assert page.eval_on_selector_all("#mode option", "os => os.map(o => o.value)") == info["modes"]
    assert page.input_value("#mode") == info["mode"]
    assert page.get_by_label("between corners").get_attribute("id") == "mode"
    page.fill("#prompt", " ")
    page.fill("#length", "20")
    generates = lambda r: r.url.endswith("/api/generate")  # noqa: E731
    with page.expect_request(generates) as req:  # choosing a mode restarts generation with it
        page.select_option("#mode", "product")
    assert req.value.post_data_json["mode"] == "product"
    page.wait_for_function("document.querySelector('#status').dataset.kind !== 'busy'", timeout=30_000)
    status = page.inner_text("#status")
    assert status.startswith("done") and "product" in status, status
    assert "product" in page.inner_text("#mode-hint")
    with page.expect_request(generates) as req:
        page.click("#sweep")
    assert req.value.post_data_json["mode"] == "product" and req.value.post_data_json["stream"] is False
    # (a sweep of 20 tokens can end before a Stop click lands: wait for it instead, and read its status)
    page.wait_for_function("document.querySelector('#sweep-status').innerText.includes('sweep done')",
                           timeout=60_000)
    assert "product" in page.inner_text("#sweep-status")


def test_calibrated_is_off_outside_the_calibration_mode(server, page):
    """A calibration holds only in its own mode: elsewhere the page disables the toggle (the server says 422)."""
    info = page.request.get(f"{server}/api/info").json() | {"calibrated": True, "calibration_mode": "gates"}
    page.route("**/api/info", lambda route: route.fulfill(json=info))
    page.goto(server)
    page.wait_for_selector("#dial")
    assert page.is_disabled("#calibrated") == (info["mode"] != "gates")
    page.select_option("#mode", "gates")
    assert page.is_enabled("#calibrated") and page.is_hidden("#calibrated-why")
    page.check("#calibrated")
    page.select_option("#mode", "switch")
    assert page.is_disabled("#calibrated") and "gates" in page.inner_text("#calibrated-why")
    page.fill("#prompt", " ")
    page.fill("#length", "5")
    with page.expect_request(lambda r: r.url.endswith("/api/generate")) as req:
        page.click("#generate")
    assert req.value.post_data_json["calibrated"] is False


def test_cleared_number_boxes_mean_the_servers_defaults(server, page):
    """A cleared box is left out of the request (it used to be sent as null, and the server said 422)."""
    page.goto(server)
    page.wait_for_selector("#dial")
    page.fill("#prompt", " ")
    bodies = generate_requests(page)
    boxes = {"length": "max_new_tokens", "temperature": "temperature", "top-k": "top_k", "seed": "seed"}
    for box in boxes:
        page.fill(f"#{box}", "")
    page.click("#generate")
    text, kind = settled(page)
    assert text.startswith("done") and kind == "", text
    assert not set(boxes.values()) & set(bodies[-1]), bodies[-1]
    assert len(page.inner_text("#output")) > 100  # the server's default length (200), not an empty answer
    # the sweep with a cleared seed: one random seed, the same in every column
    page.fill("#length", "5")
    bodies.clear()
    page.click("#sweep")
    text, kind = settled(page, "sweep-status")
    assert text.startswith("sweep done") and kind == "", text
    seeds = {b["seed"] for b in bodies}
    assert len(bodies) == 5 and len(seeds) == 1 and isinstance(seeds.pop(), int), bodies


def test_a_bad_value_gets_a_message_naming_its_box(server, page):
    page.goto(server)
    page.wait_for_selector("#dial")
    page.fill("#prompt", " ")
    bodies = generate_requests(page)

    def generate_with(box: str, value: str) -> str:
        page.fill(f"#{box}", value)
        page.click("#generate")
        text, kind = settled(page)
        assert kind == "error" and page.get_attribute(f"#{box}", "aria-invalid") == "true", (text, kind)
        return text

    # refused by the server (422): the message names the page's box and the API's field
    text = generate_with("length", "5000")
    assert "HTTP 422" in text and "length (max_new_tokens)" in text and "at most 400" in text, text
    page.fill("#length", "5")
    text = generate_with("temperature", "20")
    assert "HTTP 422" in text and "temperature" in text and "less than or equal to 10" in text, text
    assert page.get_attribute("#length", "aria-invalid") is None  # the mark follows the latest error only
    page.fill("#temperature", "0.8")
    # caught before sending: not a number, or not a whole number where the API wants an integer
    bodies.clear()
    text = generate_with("top-k", "2.5")
    assert text.startswith("top-k:") and "whole number" in text, text
    page.fill("#top-k", "")
    page.click("#seed")
    page.keyboard.press("Control+A")
    page.keyboard.type("1e")  # the browser reads this as "" (bad input), not as a cleared box
    page.click("#generate")
    text, kind = settled(page)
    assert kind == "error" and text.startswith("seed:") and "not a number" in text, text
    assert bodies == []
    # the sweep says so too, once, in its status line
    page.fill("#seed", "0")
    page.fill("#length", "5000")
    page.click("#sweep")
    text, kind = settled(page, "sweep-status")
    assert kind == "error" and "5 of 5 failed" in text and "length (max_new_tokens)" in text, text


def test_a_busy_server_is_a_message_too(server, page):
    """429 ({"detail": "text"}): retried a few times, then shown."""
    page.route("**/api/generate", lambda route: route.fulfill(status=429, json={"detail": "too many at once"}))
    page.goto(server)
    page.wait_for_selector("#dial")
    page.click("#generate")
    text, kind = settled(page)
    assert kind == "error" and text == "error (HTTP 429): too many at once", text


def test_sweep_covers_every_source(server6, page):
    """Six sources: a column at each corner and one at the uniform middle (the page used to stop at five)."""
    names = [f"s{k}" for k in range(6)]
    assert page.request.get(f"{server6}/api/info").json()["sources"] == names
    page.goto(server6)
    page.wait_for_selector("#w-s5")
    page.fill("#prompt", " ")
    page.fill("#length", "3")
    bodies = generate_requests(page)
    page.click("#sweep")
    text, kind = settled(page, "sweep-status")
    assert text.startswith("sweep done") and kind == "", text
    heads = page.eval_on_selector_all(".sweep-head strong", "hs => hs.map(h => h.textContent)")
    assert heads == [*names, "uniform"]
    assert [b["dial"] for b in bodies] == [{n: float(n == c) for n in names} for c in names] + [dict.fromkeys(names, 1)]
    assert page.eval_on_selector_all(".sweep-note", "ns => ns.map(n => n.textContent)") == [""] * 7


@pytest.mark.parametrize("mode", ["mixture", "switch"])
def test_dragging_the_slider_with_a_fixed_seed_moves_one_way(server, page, mode):
    """Issue 24: with the seed fixed, each slider step regenerates from the same random numbers, so the style read
    at each step (the share of omega's letters) moves one way: in mixture the voice changes once, in switch (the
    blend) the text changes gradually and its share of omega never falls back by much."""
    page.goto(server)
    page.wait_for_selector("#dial")
    page.fill("#prompt", " ")
    page.fill("#length", "200")
    page.fill("#seed", "0")  # (its first random number, the corner offset, is 0.50: the voice changes mid-way)
    page.select_option("#mode", mode)
    settled(page)
    texts = []
    for value in ("0.1", "0.3", "0.5", "0.7", "0.9"):
        page.eval_on_selector("#dial", f"el => {{ el.value = '{value}'; "
                                       "el.dispatchEvent(new Event('input', {bubbles: true})); }")
        page.wait_for_function("!document.querySelector('#status').innerText.toLowerCase().includes('done')",
                               timeout=10_000)
        page.wait_for_function("document.querySelector('#status').innerText.toLowerCase().includes('done')",
                               timeout=60_000)
        texts.append(page.inner_text("#output"))
    share = [letters(t, "tuvwxyz") / max(1, letters(t, "abcdefgtuvwxyz")) for t in texts]
    if mode == "mixture":
        voices = [round(s) for s in share]
        assert voices == sorted(voices), share
    else:
        assert all(b >= a - 0.2 for a, b in zip(share, share[1:])), share
    assert share[-1] > share[0], share
