"""Hostile HTTP requests and server options: each ends in a 4xx naming the field (or an AbcgptError naming the
option), never a 5xx or a traceback.

Python's json reads NaN, Infinity and -Infinity, which JSON does not have; FastAPI's 422 echoes the value it
refused, and encoding that echo failed, so such a value in any field was a 500."""

import json
import socket
from pathlib import Path

import anyio
import pytest
from conftest import train_synthetic
from fastapi.testclient import TestClient

from abcgpt.common import AbcgptError
from abcgpt.engine import MAX_NEW_TOKENS, MAX_SEED, Engine
from abcgpt.serve import CompletionRequest, GenerateRequest, create_app, serve

NON_FINITE = ["NaN", "Infinity", "-Infinity"]
GENERATE = {"stream": False, "max_new_tokens": 3}
COMPLETIONS = {"max_tokens": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_synthetic(tmp_path_factory.mktemp("hostile"), "train.steps=30")


@pytest.fixture(scope="module")
def client(run):
    return TestClient(create_app(run, max_concurrent=2, max_new_tokens=20), raise_server_exceptions=False)


def post_raw(client, path: str, text: str):
    """Post JSON text as it is (json= would refuse NaN)."""
    return client.post(path, content=text, headers={"content-type": "application/json"})


def strict_json(text: str):
    """Parse as JSON proper: NaN or Infinity in an answer fails."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in an answer: {text[:200]}"))


def with_raw(base: dict, field: str, raw: str) -> str:
    """base as JSON text with field set to a raw token (after the others: the last of a repeated key wins)."""
    return json.dumps(base)[:-1] + f', "{field}": {raw}}}'


FIELDS = ([("/api/generate", GENERATE, f) for f in GenerateRequest.model_fields]
          + [("/v1/completions", COMPLETIONS, f) for f in CompletionRequest.model_fields])


@pytest.mark.parametrize("raw", NON_FINITE)
@pytest.mark.parametrize("path, base, field", FIELDS, ids=[f"{p}:{f}" for p, _, f in FIELDS])
def test_non_finite_numbers_in_any_field_get_422_naming_it(client, path, base, field, raw):
    r = post_raw(client, path, with_raw(base, field, raw))
    assert r.status_code == 422, (r.status_code, r.text[:300])
    detail = strict_json(r.text)["detail"]
    assert detail and all(d["loc"][:2] == ["body", field] for d in detail), detail


@pytest.mark.parametrize("raw", NON_FINITE)
@pytest.mark.parametrize("path, base", [("/api/generate", GENERATE), ("/v1/completions", COMPLETIONS)])
def test_non_finite_dial_weights_get_422_naming_the_dial(client, path, base, raw):
    r = post_raw(client, path, with_raw(base, "dial", f'{{"alpha": {raw}, "omega": 1}}'))
    assert r.status_code == 422 and all(d["loc"][:2] == ["body", "dial"] for d in strict_json(r.text)["detail"])


@pytest.mark.parametrize("text", ["NaN", "[NaN]", "-Infinity", '"x"', "[" * 900 + "]" * 900])
def test_bodies_that_are_not_objects_get_422(client, text):
    for path in ("/api/generate", "/v1/completions"):
        r = post_raw(client, path, text)
        assert r.status_code == 422 and strict_json(r.text)["detail"][0]["loc"] == ["body"], r.text[:200]


@pytest.mark.parametrize("path, base, field, raw", [
    pytest.param("/api/generate", GENERATE, "calibrated", '"\\ud800"', id="lone-surrogate-echoed-in-a-422"),
    pytest.param("/v1/completions", COMPLETIONS, "prompt", "[" * 900 + "NaN" + "]" * 900, id="deep-nan-echoed"),
])
def test_echoed_values_are_always_json(client, path, base, field, raw):
    """What a 422 echoes back is encodable: lone surrogates are escaped, deep nesting is cut short."""
    r = post_raw(client, path, with_raw(base, field, raw))
    assert r.status_code == 422 and strict_json(r.text)["detail"][0]["loc"][:2] == ["body", field]


def test_a_lone_surrogate_echoed_in_an_answer_is_escaped(client):
    r = post_raw(client, "/v1/completions", with_raw(COMPLETIONS, "model", '"\\udfff"'))
    assert r.status_code == 200 and strict_json(r.text)["model"] == "\udfff"


@pytest.mark.parametrize("dial", ["alpha=1,omega", "omega,alpha=1", "alpha=1,", {"alpha=1,omega": 1},
                                  {"alpha,omega": 1}])
@pytest.mark.parametrize("path, base", [("/api/generate", GENERATE), ("/v1/completions", COMPLETIONS)])
def test_dials_mixing_weights_and_bare_names_are_refused(client, path, base, dial):
    r = client.post(path, json=base | {"dial": dial})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "dial"], r.text[:200]


@pytest.mark.parametrize("seed", [2**70, MAX_SEED + 1, -1])
@pytest.mark.parametrize("path, base", [("/api/generate", GENERATE), ("/v1/completions", COMPLETIONS)])
def test_seeds_outside_int64_are_refused_by_the_api_and_the_engine(client, path, base, seed):
    r = client.post(path, json=base | {"seed": seed})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "seed"]
    with pytest.raises(AbcgptError, match="seed"):
        Engine.check_sampling(3, 1.0, 0, seed=seed)


@pytest.mark.parametrize("model", [GenerateRequest, CompletionRequest])
def test_schema_bounds_agree_with_the_engine(client, model):
    """The schema's bounds are the engine's (top_k: 0 is allowed and means off, in the schema, its description,
    the engine and its message; max_new_tokens / max_tokens: the engine's cap; seed: int64)."""
    props = model.model_json_schema()["properties"]
    tokens = "max_new_tokens" if "max_new_tokens" in props else "max_tokens"
    assert props["top_k"]["minimum"] == 0 and "0 disables" in props["top_k"]["description"]
    Engine.check_sampling(3, 1.0, 0)
    with pytest.raises(AbcgptError, match=r"top_k must be None or an integer >= 0 \(0 = off\)"):
        Engine.check_sampling(3, 1.0, -1)
    assert (props[tokens]["minimum"], props[tokens]["maximum"]) == (1, MAX_NEW_TOKENS)
    with pytest.raises(AbcgptError, match=rf"in \[1, {MAX_NEW_TOKENS}\]"):
        Engine.check_sampling(MAX_NEW_TOKENS + 1, 1.0, 0)
    seed = props["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (0, MAX_SEED)
    assert props["temperature"]["minimum"] == 0 and "0 = greedy" in props["temperature"]["description"]
    path = "/api/generate" if model is GenerateRequest else "/v1/completions"
    base = GENERATE if model is GenerateRequest else COMPLETIONS
    assert client.post(path, json=base | {"top_k": 0}).status_code == 200
    assert client.post(path, json=base | {"top_k": -1}).json()["detail"][0]["loc"] == ["body", "top_k"]


@pytest.mark.parametrize("limits, words", [
    ({"max_concurrent": -1}, "max_concurrent must be an integer >= 1, got -1"),
    ({"max_concurrent": 0}, "max_concurrent must be an integer >= 1, got 0"),
    ({"max_concurrent": 1.5}, "max_concurrent must be an integer >= 1, got 1.5"),
    ({"max_concurrent": True}, "max_concurrent must be an integer >= 1, got True"),
    ({"max_new_tokens": 0}, f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], got 0"),
    ({"max_new_tokens": MAX_NEW_TOKENS + 1}, f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}]"),
    ({"max_prompt_chars": 0}, "max_prompt_chars must be an integer >= 1, got 0"),
    ({"max_prompt_chars": "10"}, "max_prompt_chars must be an integer >= 1, got '10'"),
])
def test_create_app_refuses_bad_limits_before_loading(tmp_path, limits, words):
    """One line naming the option and what it allows; checked before the checkpoint (here missing) is read."""
    with pytest.raises(AbcgptError) as e:
        create_app(tmp_path / "missing", **limits)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("port", [-1, 65536, 10**6, "8000", 80.0, None])
def test_serve_refuses_a_bad_port_before_loading(tmp_path: Path, port):
    with pytest.raises(AbcgptError, match=r"^port must be an integer in \[0, 65535\], got "):
        serve(tmp_path / "missing", port=port)


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(tmp_path: Path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(AbcgptError, match=f"^cannot listen on 127.0.0.1:{port}: Address already in use"):
            serve(tmp_path / "missing", port=port)
    with pytest.raises(AbcgptError, match="^cannot listen on no-such-host.invalid:8000"):
        serve(tmp_path / "missing", host="no-such-host.invalid", port=8000)


def test_a_stream_cancelled_from_outside_gives_its_slot_back(client):
    """An ASGI server or client may cancel a response while it waits to send (schemathesis cuts event streams at
    20 events this way): the slot comes back at once. It used to wait for the garbage collector to close the
    events' generator, and the fuzz test's slot check failed now and then."""
    app = client.app
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/generate", "raw_path": b"/api/generate", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}

    async def main() -> int:
        messages = [{"type": "http.request", "body": b'{"max_new_tokens": 20}', "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            await anyio.sleep_forever()  # the client never goes away by itself

        with anyio.CancelScope() as outside:
            async def send(message):
                if message["type"] == "http.response.body":
                    outside.cancel()
                    await anyio.sleep(0)  # cancelled here, while the response waits on the client

            await app(scope, receive, send)
        return app.state.active

    assert anyio.run(main) == 0
