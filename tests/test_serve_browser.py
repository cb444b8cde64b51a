"""End to end in a real headless Chromium (Debian's package, driven by Playwright): the page loads, text
streams in, moving the slider changes the voice, and the mode select sends its mode. .ci/run installs chromium."""

import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import live_server, write_recipe

from abcgpt.config import load_recipe
from abcgpt.serve import create_app
from abcgpt.train import train

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH = {"executable_path": CHROMIUM, "args": ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (apt-get install chromium) for the browser test")
        pytest.skip("chromium is not installed")
    tmp = tmp_path_factory.mktemp("browser")
    train(load_recipe(str(write_recipe(tmp)), ["train.steps=150", "train.eval_every=150"]), tmp / "run",
          progress=False)
    with live_server(create_app(tmp / "run", max_concurrent=2, max_new_tokens=400)) as base:
        yield base


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(**LAUNCH)
        yield browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()


def letters(text: str, alphabet: str) -> int:
    return sum(c in alphabet for c in text)


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
    assert info["modes"] == ["mixture", "switch", "tokens", "product", "gates"] and info["mode"] != "switch"
    page.goto(server)
    page.wait_for_selector("#dial")
    assert page.eval_on_selector_all("#mode option", "os => os.map(o => o.value)") == info["modes"]
    assert page.input_value("#mode") == info["mode"]
    assert page.get_by_label("between corners").get_attribute("id") == "mode"
    page.fill("#prompt", " ")
    page.fill("#length", "20")
    generates = lambda r: r.url.endswith("/api/generate")  # noqa: E731
    with page.expect_request(generates) as req:  # choosing a mode restarts generation with it
        page.select_option("#mode", "switch")
    assert req.value.post_data_json["mode"] == "switch"
    page.wait_for_function("document.querySelector('#status').dataset.kind !== 'busy'", timeout=30_000)
    status = page.inner_text("#status")
    assert status.startswith("done") and "switch" in status, status
    assert "switch" in page.inner_text("#mode-hint")
    with page.expect_request(generates) as req:
        page.click("#sweep")
    assert req.value.post_data_json["mode"] == "switch" and req.value.post_data_json["stream"] is False
    # (a sweep of 20 tokens can end before a Stop click lands: wait for it instead, and read its status)
    page.wait_for_function("document.querySelector('#sweep-status').innerText.includes('sweep done')",
                           timeout=60_000)
    assert "switch" in page.inner_text("#sweep-status")


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
