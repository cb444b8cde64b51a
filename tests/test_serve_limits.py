"""What one request may cost the server, and two things OpenAI clients and IPv6 users met.

A red team found: a 24 MB POST held the server for a minute (another client's /api/info waited 64 s) and its 422
echoed 72 MB; a batch was bounded by its counts, not by what it costs; /v1/models did not answer; the banner
printed http://::1:8000 for an IPv6 host. Now: a body over the limit gets 413 before it is read whole (from its
Content-Length, or counted as it arrives), a 422 echoes a few KB at most, a batch is bounded by its distinct dial
positions and its new tokens x rows, /v1/models lists the model, and the banner brackets IPv6 addresses."""

import json
import socket

import anyio
import httpx
import pytest
from conftest import live_server, train_synthetic, write_recipe
from fastapi.testclient import TestClient

from abcgpt.common import AbcgptError
from abcgpt.config import load_recipe
from abcgpt.serve import MAX_N, address, create_app, serve
from abcgpt.train import train

MAX_PROMPT_CHARS, MAX_NEW = 50, 10
LIMIT = 12 * MAX_PROMPT_CHARS + 65536  # the default body limit with these caps
SMALL = 8192  # every refusal is shorter than this, whatever the request held
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_synthetic(tmp_path_factory.mktemp("limits"), "train.steps=30")


@pytest.fixture(scope="module")
def app(run):
    return create_app(run, max_new_tokens=MAX_NEW, max_prompt_chars=MAX_PROMPT_CHARS)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app, raise_server_exceptions=False)


def is_413(r) -> bool:
    """413, one short line of JSON naming the limit."""
    return (r.status_code == 413 and len(r.content) < SMALL and b"\n" not in r.content
            and f"over {LIMIT} bytes" in r.json()["detail"])


# ------------------------------------------------------------------ request size


def test_the_largest_valid_body_fits_and_one_byte_more_is_refused(client):
    """The default limit holds the longest prompt with every character JSON-escaped (12 bytes as a surrogate
    pair) and every other field; a body of exactly the limit is read, one byte more gets 413."""
    worst = json.dumps({"prompt": "\U0001f600" * MAX_PROMPT_CHARS, "dial": {"alpha": 0.25, "omega": 0.75},
                        "max_new_tokens": MAX_NEW, "temperature": 0.8, "top_k": 40, "seed": 2**63 - 1,
                        "calibrated": False, "mode": "mixture", "stream": False}).encode()
    assert len(worst) < LIMIT // 8
    body = b'{"prompt": "' + b"\\u0061" * MAX_PROMPT_CHARS + b'", "stream": false, "max_new_tokens": 2}'
    padded = body + b" " * (LIMIT - len(body))  # JSON allows trailing white space
    r = client.post("/api/generate", content=padded, headers=JSON)
    assert r.status_code == 200 and len(r.json()["text"]) == 2, r.text[:300]
    assert is_413(client.post("/api/generate", content=padded + b" ", headers=JSON))


@pytest.mark.parametrize("path", ["/api/generate", "/v1/completions", "/api/info"])
def test_oversized_bodies_get_413_with_or_without_a_length(client, path):
    big = b" " * (LIMIT + 1)
    assert is_413(client.request("POST" if path != "/api/info" else "GET", path, content=big, headers=JSON))
    # an iterator goes out chunked, without a Content-Length: the server counts what arrives
    chunked = iter([b'{"prompt": "', b"a" * 40_000, b"a" * 40_000, b'"}'])
    assert is_413(client.request("POST" if path != "/api/info" else "GET", path, content=chunked, headers=JSON))


def asgi(app, headers: list[tuple[bytes, bytes]], receive) -> list[dict]:
    """Run one POST /api/generate through the app with this receive; the messages it sends."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/generate", "raw_path": b"/api/generate", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), *headers], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    sent = []

    async def send(message):
        sent.append(message)

    anyio.run(app, scope, receive, send)
    return sent


@pytest.mark.parametrize("length", [str(LIMIT + 1), "1" + "0" * 5000])
def test_a_content_length_over_the_limit_is_refused_without_reading_the_body(app, length):
    async def receive():
        pytest.fail("the body was read")

    sent = asgi(app, [(b"content-length", length.encode())], receive)
    assert sent[0]["status"] == 413 and b"max_body_bytes" in sent[1]["body"]


def test_a_chunked_body_is_refused_at_the_first_chunk_past_the_limit(app):
    """A body of four times the limit: the server stops reading once it holds more than the limit."""
    chunk, reads = 4096, []

    async def receive():
        reads.append(chunk)
        return {"type": "http.request", "body": b" " * chunk, "more_body": len(reads) < 4 * LIMIT // chunk}

    sent = asgi(app, [], receive)
    assert sent[0]["status"] == 413 and len(reads) == LIMIT // chunk + 1


def raw_exchange(base: str, head: str, body: bytes) -> bytes:
    """Send a request's head and part of its body on a socket, and read the answer without sending the rest."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            part = s.recv(65536)  # a socket.timeout here: the server was waiting for the body
            if not part:
                break
            answer += part
    return answer


def test_a_real_server_answers_413_before_the_body_arrives(app):
    """uvicorn: a Content-Length of 1 GB with no body sent, and a chunked body that passes the limit and never
    ends, are both answered at once; the server goes on answering."""
    with live_server(app) as base:
        head = "POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        answer = raw_exchange(base, head + "Content-Length: 1000000000\r\n\r\n", b"")
        assert answer.startswith(b"HTTP/1.1 413") and b"max_body_bytes" in answer, answer[:300]
        chunk = b" " * 8192
        chunks = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * (LIMIT // len(chunk) + 1)  # no final 0 chunk
        answer = raw_exchange(base, head + "Transfer-Encoding: chunked\r\n\r\n", chunks)
        assert answer.startswith(b"HTTP/1.1 413") and b"max_body_bytes" in answer, answer[:300]
        r = httpx.post(base + "/api/generate", content=iter([b'{"stream": false,', b' "max_new_tokens": 2}']),
                       headers=JSON, timeout=10)  # chunked under the limit: answered
        assert r.status_code == 200 and len(r.json()["text"]) == 2
        assert httpx.get(base + "/api/info", timeout=10).status_code == 200


# ------------------------------------------------------------------ what a 422 echoes


@pytest.mark.parametrize("path, body, field", [
    ("/api/generate", {"prompt": ["a" * 60_000]}, "prompt"),
    ("/api/generate", {"seed": "9" * 60_000}, "seed"),
    ("/api/generate", {"dial": [0.5] * 12_000}, "dial"),
    ("/api/generate", {"dial": {"k" * 500 + str(i): "x" for i in range(100)}}, "dial"),  # 300 errors, long keys
    ("/api/generate", {"dial": "z" * 60_000}, "dial"),  # the engine's message quotes the dial
    ("/v1/completions", {"model": {"m" * 60_000: 1}}, "model"),
    ("/v1/completions", {"prompt": [[["a" * 1000] * 20] * 3]}, "prompt"),
], ids=["long-list", "long-string", "many-items", "many-errors", "engine-message", "long-key", "nested"])
def test_a_422_echoes_a_few_kb_at_most_and_names_the_field(client, path, body, field):
    base = {"stream": False} if path == "/api/generate" else {}
    r = client.post(path, json=base | body)
    assert r.status_code == 422 and len(r.content) < SMALL, (r.status_code, len(r.content))
    assert any(d["loc"][:2] == ["body", field] for d in r.json()["detail"]), r.text[:300]


def test_a_body_that_is_not_an_object_is_echoed_short(client):
    r = client.post("/api/generate", content=json.dumps("x" * 60_000), headers=JSON)
    assert r.status_code == 422 and len(r.content) < SMALL and r.json()["detail"][0]["loc"] == ["body"]


# ------------------------------------------------------------------ what a batch costs


def test_new_tokens_x_rows_is_bounded(client):
    """A batch may cost what MAX_N samples of max_new_tokens cost at the model's full width. A two-source partition
    corner is half the network, so switch (both corners for every sample) costs what mixture (one corner a sample)
    costs: n = MAX_N passes in both; more tokens x rows than the limit is refused naming the limit and the value."""
    body = {"prompt": "ab", "max_tokens": MAX_NEW, "n": MAX_N, "dial": 0.5}
    for mode in ("switch", "mixture"):
        r = client.post("/v1/completions", json=body | {"mode": mode})
        assert r.status_code == 200 and len(r.json()["choices"]) == MAX_N


def test_max_batch_tokens_is_a_server_option(run):
    client = TestClient(create_app(run, max_new_tokens=MAX_NEW, max_batch_tokens=15))
    r = client.post("/api/generate", json={"dial": 0.5, "mode": "switch", "max_new_tokens": 10, "stream": False})
    assert r.status_code == 200  # two half-width corners: one full-width row
    r = client.post("/v1/completions", json={"max_tokens": 4, "n": 4})  # 4 rows x 4
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_tokens"]
    assert "= 16 tokens; at most 15" in r.json()["detail"][0]["msg"]


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """A bank of corners (model.width = "corner"): each corner is a whole network, so a dial between two corners
    costs two."""
    tmp = tmp_path_factory.mktemp("bank")
    train(load_recipe(str(write_recipe(tmp)), ["train.steps=4", "model.width=corner"]), tmp / "run", progress=False)
    return tmp / "run"


def test_networks_a_batch_runs_are_bounded(bank):
    """Each corner a batch runs is a network at every token, counted in networks of the model's width: a bank's
    corner is one; switch and tokens run the dial's every corner, mixture draws up to n of them, a corner is one."""
    client = TestClient(create_app(bank, max_new_tokens=MAX_NEW, max_dial_positions=1))
    for path, body in [("/api/generate", {"mode": "switch", "stream": False, "max_new_tokens": 3}),
                       ("/v1/completions", {"mode": "tokens", "max_tokens": 3}),
                       ("/v1/completions", {"mode": "mixture", "n": 2, "max_tokens": 3})]:
        r = client.post(path, json=body | {"dial": 0.5})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "dial"], r.text[:300]
        msg = r.json()["detail"][0]["msg"]
        assert "the work of 2 networks" in msg and "at most 1" in msg, msg
    for body in [{"dial": 0.5, "mode": "mixture", "n": 1}, {"dial": 1.0, "mode": "switch", "n": 4}]:
        assert client.post("/v1/completions", json=body | {"max_tokens": 3}).status_code == 200


@pytest.mark.parametrize("limits, words", [
    ({"max_body_bytes": 0}, "max_body_bytes must be an integer >= 1, got 0"),
    ({"max_body_bytes": 1.5}, "max_body_bytes must be an integer >= 1, got 1.5"),
    ({"max_dial_positions": 0}, "max_dial_positions must be an integer >= 1, got 0"),
    ({"max_batch_tokens": -1}, "max_batch_tokens must be an integer >= 1, got -1"),
    ({"max_batch_tokens": "8"}, "max_batch_tokens must be an integer >= 1, got '8'"),
])
def test_create_app_refuses_bad_cost_limits_before_loading(tmp_path, limits, words):
    with pytest.raises(AbcgptError) as e:
        create_app(tmp_path / "missing", **limits)
    assert words in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ OpenAI's model list, the banner


def test_v1_models_lists_the_model_that_completions_answers_as(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    entry = models["data"][0]
    assert set(entry) == {"id", "object", "created", "owned_by"}
    assert entry["object"] == "model" and entry["owned_by"] == "abcgpt" and isinstance(entry["created"], int)
    r = client.post("/v1/completions", json={"model": entry["id"], "prompt": "ab", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["model"] == entry["id"] and len(r.json()["choices"][0]["text"]) == 3
    assert client.post("/v1/completions", json={"max_tokens": 3}).json()["model"] == entry["id"]


@pytest.mark.parametrize("host, port, want", [("::1", 8000, "[::1]:8000"), ("::", 80, "[::]:80"),
                                              ("127.0.0.1", 8000, "127.0.0.1:8000"), ("localhost", 1, "localhost:1")])
def test_address_brackets_ipv6(host, port, want):
    assert address(host, port) == want


def ipv6_port() -> socket.socket:
    try:
        return socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")


def test_the_banner_and_errors_bracket_an_ipv6_host(run, tmp_path, monkeypatch, capsys):
    with ipv6_port() as busy:
        port = busy.getsockname()[1]
        with pytest.raises(AbcgptError, match=rf"^cannot listen on \[::1\]:{port}: "):
            serve(tmp_path / "missing", host="::1", port=port)
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets=None: sockets[0].close())  # no serving
    serve(run, host="::1", port=0, max_new_tokens=MAX_NEW)
    banner = capsys.readouterr().out
    assert "at http://[::1]:" in banner and "note:" not in banner, banner


def test_a_batch_that_cannot_fit_is_a_422_before_any_byte(app, client, monkeypatch):
    """The engine's memory check refuses a generation before its first token; the server says so as a 422 naming
    the tokens field (it was a 500, or a stream cut off without a word), and gives the slot back."""
    def refuse(*args, **kwargs):
        raise AbcgptError("generation needs about 9 TB but this machine has 1 GB free")

    monkeypatch.setattr("abcgpt.engine.require_memory", refuse)
    for path, body, field in [("/api/generate", {"stream": True}, "max_new_tokens"),
                              ("/api/generate", {"stream": False}, "max_new_tokens"),
                              ("/v1/completions", {"stream": True}, "max_tokens"),
                              ("/v1/completions", {"n": 2}, "max_tokens")]:
        r = client.post(path, json=body | {"dial": 0.5, field: 5})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], (path, r.text[:200])
        assert "9 TB" in r.json()["detail"][0]["msg"] and app.state.active == 0
