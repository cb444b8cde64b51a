"""The loopback load test (benchmarks/load_test.py), run short: 6 clients for ~5 s against a real server."""

import sys

import pytest
from conftest import REPO, live_server, write_recipe

from abcgpt.config import load_recipe
from abcgpt.serve import create_app
from abcgpt.train import train

sys.path.insert(0, str(REPO / "benchmarks"))
from load_test import KINDS, run_load  # noqa: E402

pytestmark = pytest.mark.slow  # seconds of load on a live server


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    train(load_recipe(str(write_recipe(tmp)), ["train.steps=30"]), tmp / "run", progress=False)
    app = create_app(tmp / "run", max_concurrent=2, max_new_tokens=100, max_prompt_chars=200)
    with live_server(app) as base:
        return run_load(base, seconds=5, clients=6, max_requests=3000, tokens=24, app=app)


def test_only_expected_answers(summary):
    assert summary["errors"] == 0, summary["error_samples"]
    assert set(summary["status"]) <= {"200", "422", "429"}
    assert summary["hung_clients"] == 0


def test_every_kind_got_through(summary):
    for kind in KINDS:
        expected = "422" if kind == "oversized" else "200"
        assert summary["by_kind"].get(kind, {}).get(expected, 0) > 0, (kind, summary["by_kind"])
    assert summary["tokens_generated"] > 0


def test_429_only_when_concurrency_was_exceeded(summary):
    assert summary["status"].get("429", 0) > 0  # 6 clients against 2 slots: some must be turned away
    assert summary["unexplained_429"] == 0
    assert "429" not in summary["by_kind"]["oversized"]  # rejected requests never wait for a slot


def test_server_is_healthy_afterwards(summary):
    assert summary["server_info_after"] == 200
    assert summary["active_after"] == 0  # no generation slot leaked, disconnected streams included
    assert summary["rss_mb"]["growth"] < 200
    assert summary["ok"]
