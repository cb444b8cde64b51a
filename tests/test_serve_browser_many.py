"""The page with 100 sources, in headless Chromium: sources are picked by typing their names, each gets a weight
and can be removed, presets give the uniform middle and each corner, and what is sent is the normalised weights.
(Two sources keep their slider: tests/test_serve_browser.py.)"""

import os

import pytest
from conftest import live_server, need_chromium, source_tables, synthetic_text, write_recipe
from test_serve_browser import generate_requests, settled

from abcgpt.config import load_recipe
from abcgpt.serve import create_app
from abcgpt.train import train

pytestmark = pytest.mark.slow  # headless Chromium, and a 100-source model trained for it

N = 100
NAMES = [f"s{k:03d}" for k in range(N)]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def server100(tmp_path_factory):
    """100 small sources, 5 steps of a 1-layer model whose 200 channels give every source two: only the page is
    tested, not what the model learnt."""
    need_chromium()
    tmp = tmp_path_factory.mktemp("browser100")
    paths = {}
    for k, name in enumerate(NAMES):
        paths[name] = tmp / f"{name}.txt"
        paths[name].write_text(synthetic_text(LETTERS[k % 20:k % 20 + 6], 2_000, k))
    recipe = write_recipe(tmp, sources=source_tables(**paths))
    train(load_recipe(str(recipe), ["train.steps=5", "train.eval_every=5", "train.eval_batches=1",
                                    "model.n_embd=200", "model.n_head=100", "train.checkpoint_every=5"]), tmp / "run",
          progress=False)
    with live_server(create_app(tmp / "run", max_concurrent=2, max_new_tokens=400)) as base:
        yield base


def picked(page) -> list[str]:
    return page.eval_on_selector_all("#dial-picks .weight-row", "rs => rs.map(r => r.dataset.source)")


def set_weight(page, name: str, value: float) -> None:
    page.eval_on_selector(f"#w-{name}", f"el => {{ el.value = '{value}'; "
                                        "el.dispatchEvent(new Event('input', {bubbles: true})); }")


def generate(page) -> dict:
    """Click Generate; the body it sent, once the text is done."""
    with page.expect_request(lambda r: r.url.endswith("/api/generate")) as req:
        page.click("#generate")
    text, kind = settled(page)
    assert text.startswith("done") and kind == "", text
    return req.value.post_data_json


def test_pick_sources_by_name_and_weigh_them(server100, page):
    assert page.request.get(f"{server100}/api/info").json()["sources"] == NAMES
    page.goto(server100)
    page.wait_for_selector("#source-filter")
    page.fill("#prompt", " ")
    page.fill("#length", "40")
    page.fill("#seed", "0")
    # no source picked: every source equally, and nothing in the list
    assert picked(page) == [] and "all 100 sources equally" in page.inner_text("#dial-readout")
    assert page.query_selector("#dial") is None and page.query_selector("#dial-triangle") is None

    # typing shows the matching names (a dozen at most), Enter takes the one typed
    page.fill("#source-filter", "s0")
    shown = page.eval_on_selector_all(".pick-match", "bs => bs.map(b => b.dataset.source)")
    assert shown == NAMES[:12] and "88 more" in page.inner_text("#source-matches")
    page.fill("#source-filter", "s04")
    assert page.eval_on_selector_all(".pick-match", "bs => bs.length") == 10
    page.type("#source-filter", "2")
    page.press("#source-filter", "Enter")
    assert picked(page) == ["s042"] and page.input_value("#source-filter") == ""
    page.type("#source-filter", "s077")
    page.click(".pick-match[data-source='s077']")  # or click a match
    assert picked(page) == ["s042", "s077"]
    page.type("#source-filter", "s042")
    assert "in the mix already" in page.inner_text("#source-matches")
    page.fill("#source-filter", "")

    # weights: the slider's value, normalised; the share beside each is the normalised weight
    set_weight(page, "s042", 0.9)
    set_weight(page, "s077", 0.3)
    shares = page.eval_on_selector_all("#dial-picks .share", "os => os.map(o => o.textContent)")
    assert shares == ["0.75", "0.25"]
    body = generate(page)
    assert body["dial"] == pytest.approx({"s042": 0.75, "s077": 0.25}) and sum(body["dial"].values()) == 1
    assert len(page.inner_text("#output").strip()) > 0
    assert "s042 0.75 · s077 0.25" in page.inner_text("#status")
    assert page.inner_text("#dial-readout") == "s042 0.75 · s077 0.25"
    if os.environ.get("ABCGPT_SCREENSHOT_MANY"):  # a look at the page with 100 sources
        page.screenshot(path=os.environ["ABCGPT_SCREENSHOT_MANY"], full_page=True)

    # the sweep: the picked corners, their mix, and the uniform middle
    page.fill("#length", "3")
    bodies = generate_requests(page)
    page.click("#sweep")
    text, kind = settled(page, "sweep-status")
    assert text.startswith("sweep done") and kind == "", text
    heads = page.eval_on_selector_all(".sweep-head strong", "hs => hs.map(h => h.textContent)")
    assert heads == ["s042", "s077", "mix", "uniform"]
    assert bodies[2]["dial"] == pytest.approx({"s042": 0.75, "s077": 0.25})
    assert "uniform over 100 sources" in page.inner_text(".sweep-col:last-child .sweep-weights")

    # remove one: the other is the whole dial; remove both: every source equally again
    page.click("[aria-label='remove s077']")
    assert picked(page) == ["s042"]
    assert generate(page)["dial"] == {"s042": 1}
    page.click("[aria-label='remove s042']")
    assert picked(page) == []
    dial = generate(page)["dial"]
    assert sorted(dial) == NAMES and dial == pytest.approx(dict.fromkeys(NAMES, 0.01))


def test_presets(server100, page):
    page.goto(server100)
    page.wait_for_selector("#dial-preset")
    page.fill("#prompt", " ")
    page.fill("#length", "5")
    values = page.eval_on_selector_all("#dial-preset option", "os => os.map(o => o.value)")
    assert values == ["", "uniform", *[f"corner:{n}" for n in NAMES]]
    page.select_option("#dial-preset", "corner:s013")
    assert picked(page) == ["s013"] and page.input_value("#dial-preset") == ""
    assert generate(page)["dial"] == {"s013": 1}
    page.select_option("#dial-preset", "uniform")
    assert picked(page) == []
    assert generate(page)["dial"] == pytest.approx(dict.fromkeys(NAMES, 0.01))
    bodies = generate_requests(page)  # all weights 0: nothing is generated when the dial moves
    page.select_option("#dial-preset", "corner:s099")
    set_weight(page, "s099", 0)
    page.wait_for_timeout(600)
    assert "all weights are 0" in page.inner_text("#dial-readout") and bodies == []
