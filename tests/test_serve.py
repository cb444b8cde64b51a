import json
import threading
import time

import httpx
import pytest
from conftest import live_server, write_recipe
from fastapi.testclient import TestClient

from abcgpt.checkpoint import load_checkpoint
from abcgpt.config import load_recipe
from abcgpt.engine import Engine
from abcgpt.serve import create_app
from abcgpt.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    train(load_recipe(str(write_recipe(tmp)), ["train.steps=120", "train.eval_every=120"]), tmp / "run",
          progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def client(run):
    return TestClient(create_app(run, max_concurrent=2, max_new_tokens=300, max_prompt_chars=50))


def events(body: str) -> list:
    return [json.loads(x[len("data: "):]) if x != "data: [DONE]" else "[DONE]"
            for x in body.split("\n\n") if x.startswith("data: ")]


def test_info(client):
    info = client.get("/api/info").json()
    assert info["sources"] == ["alpha", "omega"] and info["calibrated"] is False
    assert info["limits"] == {"max_new_tokens": 300, "max_prompt_chars": 50, "max_concurrent": 2}
    assert info["model"]["step"] == 120 and info["model"]["tokenizer"] == "char"
    assert info["mode"] == "switch" and info["modes"] == ["mixture", "switch", "tokens", "product", "gates"]
    from abcgpt.sampling import SAMPLING  # the one declaration of the defaults, which the page reads from here

    assert info["sampling"] == SAMPLING.to_dict()


def test_generate_whole_and_streamed_agree(client):
    req = {"prompt": " ", "dial": 0.0, "max_new_tokens": 40, "seed": 3}
    whole = client.post("/api/generate", json=req | {"stream": False}).json()
    assert whole["dial"] == {"alpha": 1.0, "omega": 0.0} and len(whole["text"]) == 40
    r = client.post("/api/generate", json=req)
    assert r.headers["content-type"].startswith("text/event-stream")
    ev = events(r.text)
    assert ev[-1]["done"] is True and ev[-1]["text"] == whole["text"]
    assert "".join(e["token"] for e in ev[:-1]) == whole["text"] and len(ev) > 5  # token by token
    # the dial changes the text: dial 1 writes omega's letters
    other = client.post("/api/generate", json=req | {"dial": {"omega": 1}, "stream": False}).json()
    assert other["dial"] == {"alpha": 0.0, "omega": 1.0}
    assert sum(c in "tuvwxyz" for c in other["text"]) > sum(c in "tuvwxyz" for c in whole["text"])


@pytest.mark.parametrize("body, field", [
    ({"dial": 1.5}, "dial"), ({"dial": {"beta": 1}}, "dial"), ({"dial": "nan"}, "dial"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 301}, "max_new_tokens"),
    ({"prompt": "é"}, "prompt"), ({"prompt": "a" * 51}, "prompt"), ({"temperature": -1}, "temperature"),
    ({"calibrated": True}, "calibrated"), ({"seed": "x"}, "seed"), ({"mode": "bogus"}, "mode"),
])
def test_bad_requests_name_the_field(client, body, field):
    r = client.post("/api/generate", json={"stream": False} | body)
    assert r.status_code == 422
    assert any(d["loc"][-1] == field for d in r.json()["detail"]), r.json()


def test_too_many_generations_get_429(client):
    client.app.state.active = 2
    try:
        r = client.post("/api/generate", json={"stream": False, "max_new_tokens": 5})
        assert r.status_code == 429 and "at most 2" in r.json()["detail"]
    finally:
        client.app.state.active = 0
    assert client.post("/api/generate", json={"stream": False, "max_new_tokens": 5}).status_code == 200
    assert client.app.state.active == 0  # slots are given back


def test_openai_completions(client):
    r = client.post("/v1/completions", json={"model": "x", "prompt": "ab", "max_tokens": 12, "n": 2,
                                             "temperature": 0.5, "top_p": 1, "dial": 0.2, "seed": 1}).json()
    assert r["object"] == "text_completion" and len(r["choices"]) == 2
    assert all(len(c["text"]) == 12 and c["finish_reason"] == "length" for c in r["choices"])
    assert r["usage"]["completion_tokens"] == 24
    ev = events(client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 8, "stream": True}).text)
    assert ev[-1] == "[DONE]" and ev[-2]["choices"][0]["finish_reason"] == "length"
    assert len("".join(e["choices"][0]["text"] for e in ev[:-1])) == 8


def test_schema_and_page_are_served_and_nothing_else(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/info", "/api/generate", "/v1/completions"} <= set(schema["paths"])
    assert "dial" in schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert client.get("/").status_code == 200 and "text/html" in client.get("/").headers["content-type"]
    for path in ("/static/../../pyproject.toml", "/static/%2e%2e/serve.py", "/etc/passwd"):
        assert client.get(path).status_code == 404


def test_client_that_disconnects_stops_its_generation(run):
    """A real server: a streaming client that goes away after a few tokens frees its slot at once, though it
    had asked for 50,000 tokens (most of a minute: 300 could all be sent before the client read 5), and the
    server keeps answering."""
    app = create_app(run, max_concurrent=1, max_new_tokens=50_000)
    with live_server(app) as base:
        with httpx.stream("POST", base + "/api/generate", json={"max_new_tokens": 50_000, "temperature": 1.0},
                          timeout=10) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            # still reading, so still connected: breaking out of iter_lines closes the stream (httpx), and a busy
            # server may see that before a check made after the loop
            assert app.state.active == 1
            lines.close()
        deadline = time.time() + 10
        while app.state.active and time.time() < deadline:
            time.sleep(0.02)
        assert app.state.active == 0
        r = httpx.post(base + "/api/generate", json={"stream": False, "max_new_tokens": 5}, timeout=10)
        assert r.status_code == 200


@pytest.mark.parametrize("path, tokens, body", [
    ("/v1/completions", "max_tokens", {"n": 16}),
    ("/api/generate", "max_new_tokens", {"stream": False}),
], ids=["completions-n16", "generate-whole"])
def test_client_that_gives_up_on_a_whole_answer_frees_its_slot(run, path, tokens, body):
    """A real server: a client that stops waiting for a non-streamed answer (a read timeout, after which httpx
    closes the connection) stops its generation. Its 50,000 tokens would take most of a minute; the slot frees
    long before that, and the next request is answered, not refused with 429 (the n=16 batch used to hold it to
    the end)."""
    app = create_app(run, max_concurrent=1, max_new_tokens=50_000)
    with live_server(app) as base:
        with pytest.raises(httpx.ReadTimeout):  # the server was busy on it: no quick answer
            httpx.post(base + path, json=body | {tokens: 50_000, "temperature": 1.0},
                       timeout=httpx.Timeout(10, read=1))
        deadline = time.time() + 10
        while app.state.active and time.time() < deadline:
            time.sleep(0.05)
        assert app.state.active == 0
        r = httpx.post(base + path, json=body | {tokens: 5}, timeout=10)
        assert r.status_code == 200, r.text


def test_sweep_stops_when_asked(run):
    """Engine.sweep's stop: set (here before the first token) it ends the batch after the current token."""
    stop = threading.Event()
    stop.set()
    engine = Engine(load_checkpoint(run))
    texts = engine.sweep(" ", [0.0, 1.0], 50_000, 1.0, 0, 0, n=2, stop=stop)
    assert [[len(t) for t in row] for row in texts] == [[1, 1], [1, 1]]
