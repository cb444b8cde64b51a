"""`abcgpt serve`: the dial in a browser (a page with a live slider) and an HTTP API, on FastAPI.

    GET  /                 the page (static files shipped in the package, no build step, no CDN)
    GET  /api/info         sources, model, calibration, limits
    POST /api/generate     prompt + dial -> text, streamed as server-sent events (or whole with stream=false)
    POST /api/attribute    text (+ dial as the prior) -> which source each token leans on (the mixture's posterior)
    POST /v1/completions   OpenAI-compatible completions, with the dial as an extra field
    GET  /v1/models        OpenAI's model list: the one model, under the name /v1/completions reports
    GET  /openapi.json     the schema (and /docs)

Requests never name files: the only files served are the page's own. Generations run one token at a time in
worker threads, at most `max_concurrent` at once (more get 429), and stop when their client goes away. A request
body over `max_body_bytes` gets 413 before it is read whole; a request's batch is bounded by what it costs (its
distinct dial positions, and new tokens x rows), not only by its counts; a 422 echoes at most a few KB."""

import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from abcgpt.checkpoint import load_checkpoint
from abcgpt.common import AbcgptError, check_integer
from abcgpt.dial import MODE, MODES
from abcgpt.engine import ATTRIBUTION_MODES, MAX_NEW_TOKENS, MAX_SEED, Engine
from abcgpt.sampling import SAMPLING

STATIC = Path(__file__).parent / "static"
Dial = float | str | dict[str, float]


SEED = Field(None, ge=0, le=MAX_SEED)
MAX_N = 16  # completions per /v1/completions request
ECHO_CHARS = 300  # a value a 422 echoes (or a key in its loc) is cut to this: the field's name says what was wrong
ECHO_BYTES = 4096  # a 422 lists errors until its detail reaches this size
DIAL = "a number in [0, 1] (two sources), a source name, 'uniform', 'name=w,name=w', or {source: weight}"


class Body(BaseModel):
    # JSON types as the schema says (no true for 1, no 1 for true), and only finite numbers: Python's json reads
    # NaN and Infinity, which JSON does not have
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class GenerateRequest(Body):
    prompt: str = ""
    dial: Dial = Field(0.5, description=DIAL)
    max_new_tokens: int = Field(SAMPLING.max_new_tokens, ge=1, le=MAX_NEW_TOKENS,
                                description="capped lower by the server's limit")
    temperature: float = Field(SAMPLING.temperature, ge=0.0, le=10.0, description="0 = greedy")
    top_k: int = Field(SAMPLING.top_k, ge=0, description="0 disables")
    seed: int | None = SEED
    calibrated: bool = Field(False, description="read a numeric dial as the share of the second source's style")
    mode: str | None = Field(None, description=f"what the dial does between corners: one of {', '.join(MODES)} "
                                               "(default: the server's)")
    stream: bool = True


class AttributeRequest(Body):
    text: str = Field(description="the text to attribute; at most the server's max_prompt_chars characters")
    dial: Dial = Field("uniform", description=f"the prior over sources: {DIAL}")
    mode: str = Field("mixture", description="mixture: P(source | the text so far); switch: the same, restarted "
                                             "from the dial after each turn (a line or sentence)")


class CompletionRequest(Body):
    """OpenAI's /v1/completions request; fields it has that we do not use (top_p, stop, ...) are ignored."""
    model: str | None = None
    prompt: str = ""
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS, description="capped lower by the server's limit")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="extra: 0 disables")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    seed: int | None = SEED
    dial: Dial = Field(0.5, description=f"extra: {DIAL}")
    calibrated: bool = False
    mode: str | None = Field(None, description="extra: the dial's mode, as in /api/generate")


class InputError(Exception):
    """A request that passed the schema but not our checks: 422 naming the field, like FastAPI's own."""

    def __init__(self, field: str, msg: str, status: int = 422):
        self.field, self.msg, self.status = field, msg, status


def json_safe(x: object, depth: int = 0) -> object:
    """A 422 echoes the request's values, as Python's json read them: non-finite floats become strings ('nan',
    'inf', '-inf': JSON has no such numbers), containers nested deeper than 16 levels become '...' (encoding a
    900-deep list recursed past Python's limit)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict | list | tuple) and depth >= 16:
        return "..."
    if isinstance(x, dict):
        return {k: json_safe(v, depth + 1) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v, depth + 1) for v in x]
    return x


def cut(x: object, chars: int = ECHO_CHARS) -> object:
    """x, or the start of its JSON text when that is longer than `chars`: a 24 MB field was echoed whole (72 MB)."""
    if isinstance(x, str):
        return x if len(x) <= chars else x[:chars] + "..."
    text = json.dumps(x, default=str)
    return x if len(text) <= chars else text[:chars] + "..."


def short_errors(errors: list[dict]) -> list[dict]:
    """Validation errors as a 422 echoes them: every value and loc key cut short (see json_safe), and no more
    errors than fit in ECHO_BYTES (a dial dict of 10,000 bad weights is 10,000 errors); the first always."""
    out, size = [], 0
    for err in errors:
        err = {k: [cut(p) for p in v] if k == "loc" else cut(json_safe(v)) for k, v in err.items()}
        size += len(json.dumps(err, default=str))
        if out and size > ECHO_BYTES:
            break
        out.append(err)
    return out


class SafeJSON(JSONResponse):
    """JSON in ASCII: a lone surrogate a request sent ("\\ud800" is valid JSON) and we echo goes out escaped
    instead of failing to encode as UTF-8."""

    def render(self, content) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


class SlotStream(StreamingResponse):
    """Server-sent events that give their generation slot back when the response ends, however it ends: done,
    failed, the client gone, or cancelled from outside (a `finally` in the events' generator would then wait for
    the garbage collector, and the slot with it)."""

    def __init__(self, events, release: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app sees it. A Content-Length over
    the limit is refused without reading anything; a body without one (chunked) is counted as it arrives and
    refused at the first chunk past the limit, so no more than the limit is ever held. (A 24 MB body held the
    event loop for a minute.) The body is read here, then handed to the app as one message."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and (len(length) > 18 or int(length) > self.limit):  # int() of 5,000 digits fails
            return await self.refuse(scope, receive, send)
        body, size, message = [], 0, {"type": "http.request", "more_body": True}
        while message["type"] == "http.request" and message.get("more_body", False):
            message = await receive()
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self.refuse(scope, receive, send)
            body.append(message.get("body", b""))
        # the body whole, or the client's goodbye if it left halfway; then the connection's own messages
        first = [message if message["type"] != "http.request" else
                 {"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replay():
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send) -> None:
        msg = f"request body over {self.limit} bytes (the server's max_body_bytes)"
        await SafeJSON({"detail": msg}, status_code=413, headers={"Connection": "close"})(scope, receive, send)


@dataclass(frozen=True)
class Limits:
    """What one server allows: generations at once; new tokens and prompt characters per request; the request body's
    size (None: room for the longest prompt, every character JSON-escaped as a surrogate pair, 12 bytes, plus 64 KiB
    for the other fields); the networks a request's batch runs at once, counted in networks of the model's width
    (None: MAX_N); new tokens x rows of a batch (None: MAX_N x max_new_tokens, the largest batch of single-network
    samples the other caps allow). Each is checked when made: below 1 the server would refuse everything."""
    max_concurrent: int = 2
    max_new_tokens: int = 1000
    max_prompt_chars: int = 4000
    max_body_bytes: int | None = None
    max_dial_positions: int | None = None
    max_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        check_integer("max_concurrent", self.max_concurrent, 1)
        check_integer("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        check_integer("max_prompt_chars", self.max_prompt_chars, 1)
        for name, default in (("max_body_bytes", 12 * self.max_prompt_chars + 65536),
                              ("max_dial_positions", MAX_N), ("max_batch_tokens", MAX_N * self.max_new_tokens)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
            check_integer(name, getattr(self, name), 1)


def corner_work(engine: Engine) -> float:
    """The work of one corner network, in networks of the model's full width: a bank's corner is a whole network; a
    partition corner holds the shared units and 1/N of the rest of every group."""
    cfg = engine.model.config
    if not engine.model.has_interior or cfg.method != "partition":
        return 1.0
    return cfg.shared_fraction + (1 - cfg.shared_fraction) / len(engine.sources)


def batch_cost(state, dial: torch.Tensor, mode: str, n: int) -> tuple[int, int]:
    """(networks, rows) that n samples at this dial cost, as Engine._tokens runs them, counted in networks and rows
    of the model's full width: a corner, mode gates or an ungated model is one network on n rows; mixture draws a
    corner for each sample (at most n of the dial's k corners, n rows); switch, tokens and product run all k corners
    for every sample (n x k rows of corner networks)."""
    k = int((dial > 0).sum())
    m = MODE[mode]
    if not state.engine.gated or k == 1:
        return 1, n
    used, rows = m.runs(n, k)
    if m.folds_gates:
        return used, rows
    work = state.corner_work
    return math.ceil(used * work - 1e-9), math.ceil(rows * (1 if m.draws_corner else work) - 1e-9)


def check_request(state, req, tokens_field: str, n_new: int, n: int = 1) -> tuple[str, torch.Tensor, int]:
    """A generation request's mode, dial and prompt length in tokens, after the engine's checks and the server's
    limits (each failure an InputError naming its field)."""
    engine, lim = state.engine, state.limits
    try:
        mode = engine.mode(req.mode or state.mode)
    except AbcgptError as e:
        raise InputError("mode", str(e)) from None
    if req.calibrated and not isinstance(req.dial, int | float):
        raise InputError("calibrated", "needs a numeric dial (the share of the second source's style)")
    try:
        dial = engine.dial_tensor(req.dial, req.calibrated, mode)
    except AbcgptError as e:
        raise InputError("calibrated" if req.calibrated else "dial", str(e)) from None
    if len(req.prompt) > lim.max_prompt_chars:
        raise InputError("prompt", f"prompt has {len(req.prompt)} characters; at most {lim.max_prompt_chars}")
    try:
        n_prompt = len(engine.prompt_ids(req.prompt))
    except AbcgptError as e:
        raise InputError("prompt", str(e)) from None
    if n_new > lim.max_new_tokens:
        raise InputError(tokens_field, f"{tokens_field} is {n_new}; at most {lim.max_new_tokens}")
    # what the batch costs, not only its counts: each network runs at every token, each row is a sequence with its
    # KV cache. The prompt is left out: it is cropped to the context and read in one pass.
    networks, rows = batch_cost(state, dial, mode, n)
    if networks > lim.max_dial_positions:
        raise InputError("dial", f"in mode {mode} this dial runs the work of {networks} networks of the model's "
                                 f"width at once (its corners); at most {lim.max_dial_positions} per request (the "
                                 f"server's max_dial_positions): give fewer sources weight, or "
                                 f"{'lower n' if MODE[mode].draws_corner else 'use mode mixture'}")
    if n_new * rows > lim.max_batch_tokens:
        raise InputError(tokens_field, f"{tokens_field} x rows is {n_new} x {rows} = {n_new * rows} tokens; at most "
                                       f"{lim.max_batch_tokens} per request (the server's max_batch_tokens; rows: n x "
                                       f"the corners mode {mode} runs for each)")
    return mode, dial, n_prompt


def take_slot(state) -> Callable[[], None]:
    """Claim a generation slot (429 when none is free); returns its release, which is safe to call twice. The event
    loop is the only writer of state.active."""
    if state.active >= state.limits.max_concurrent:
        raise InputError("", f"too many generations at once (at most {state.limits.max_concurrent}); try again "
                             "shortly", status=429)
    state.active += 1
    held = [True]

    def release() -> None:
        if held:
            held.pop()
            state.active -= 1

    return release


async def start_stream(state, release: Callable[[], None], tokens_field: str, prompt: str, dial: torch.Tensor,
                       mode: str, n_new: int, temperature: float, top_k: int, seed: int | None):
    """The engine's stream of one sequence, set up off the event loop (the prompt read at every corner, the memory
    estimate, the threads fitted); a refusal there (the batch cannot fit) is a 422 naming tokens_field, before any
    byte is sent, and gives the slot back."""
    try:
        return await asyncio.to_thread(state.engine.stream, prompt, dial, n_new, temperature, top_k, seed,
                                       mode=mode)
    except AbcgptError as e:
        release()
        raise InputError(tokens_field, str(e)) from None


async def pieces(request: Request, texts):
    """Text pieces of one sequence as they are generated, until done or the client is gone."""
    while True:
        piece = await asyncio.to_thread(next, texts, None)  # the model runs off the event loop
        if piece is None or await request.is_disconnected():
            break
        yield piece


def sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def validation_error(_: Request, e: RequestValidationError):
    return SafeJSON({"detail": jsonable_encoder(short_errors(e.errors()))}, status_code=422)


async def input_error(_: Request, e: InputError):
    if e.status == 429:
        return SafeJSON({"detail": e.msg}, status_code=429)
    # cut: an engine message may quote the request (a 60 KB dial string as an unknown source name)
    return SafeJSON({"detail": [{"loc": ["body", e.field], "msg": cut(e.msg, 1000), "type": "value_error"}]},
                    status_code=e.status)


router = APIRouter()


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html")


@router.get("/api/info")
async def info(request: Request):
    state = request.app.state
    engine, lim = state.engine, state.limits
    cfg, model, cal = engine.model.config, engine.model, engine.calibration
    return {"sources": engine.sources, "calibrated": cal is not None and len(engine.sources) == 2,
            "calibration_mode": cal.mode if cal is not None else None,
            "modes": list(MODES), "mode": state.mode,
            "model": {"params": model.num_params(), "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                      "n_embd": cfg.n_embd, "block_size": cfg.block_size, "vocab_size": cfg.vocab_size,
                      "tokenizer": engine.tokenizer.kind, "recipe": engine.recipe.name,
                      "step": engine.meta.step, "gates": cfg.gates, "width": cfg.width},
            "limits": {"max_new_tokens": lim.max_new_tokens, "max_prompt_chars": lim.max_prompt_chars,
                       "max_concurrent": lim.max_concurrent},
            "sampling": SAMPLING.to_dict()}


@router.post("/api/generate")
async def api_generate(req: GenerateRequest, request: Request):
    state = request.app.state
    mode, dial, _ = check_request(state, req, "max_new_tokens", req.max_new_tokens)
    weights = dict(zip(state.engine.sources, dial.tolist()))
    release = take_slot(state)
    texts = await start_stream(state, release, "max_new_tokens", req.prompt, dial, mode, req.max_new_tokens,
                               req.temperature, req.top_k, req.seed)
    stream = pieces(request, texts)
    if not req.stream:
        try:
            text = "".join([p async for p in stream])
        finally:
            release()
        return {"text": text, "dial": weights, "mode": mode, "prompt": req.prompt}

    async def events():
        text = []
        async for p in stream:
            text.append(p)
            yield sse({"token": p})
        yield sse({"done": True, "text": "".join(text), "dial": weights, "mode": mode})

    return SlotStream(events(), release)


@router.post("/api/attribute")
async def api_attribute(req: AttributeRequest, request: Request):
    """Which source each token leans on: the posterior over sources after each token (Engine.attribute). It costs
    one pass of every corner with weight over the text, what mode mixture pays to read a prompt of that length, so
    the text is capped like a prompt; it takes a generation slot while it runs."""
    state = request.app.state
    engine = state.engine
    if not engine.gated:
        raise InputError("", "this model is ungated: it has no sources to attribute a text to")
    if req.mode not in ATTRIBUTION_MODES:
        raise InputError("mode", f"attribution's mode is mixture or switch, got {cut(req.mode)!r}")
    try:
        dial = engine.dial_tensor(req.dial, mode=req.mode)
    except AbcgptError as e:
        raise InputError("dial", str(e)) from None
    if len(req.text) > state.limits.max_prompt_chars:
        raise InputError("text", f"text has {len(req.text)} characters; at most {state.limits.max_prompt_chars}")
    release = take_slot(state)
    try:
        attribution = await asyncio.to_thread(engine.attribute, req.text, dial, req.mode)
    except AbcgptError as e:  # what is left to refuse is the text: empty, or characters the model does not know
        raise InputError("text", str(e)) from None
    finally:
        release()
    return attribution.to_dict()


@router.get("/v1/models")
async def models(request: Request):
    """OpenAI's model list (clients ask it first): the one model, under the name /v1/completions gives it."""
    state = request.app.state
    return {"object": "list", "data": [{"id": state.engine.recipe.name, "object": "model",
                                        "created": state.created, "owned_by": "abcgpt"}]}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = request.app.state
    mode, dial, n_prompt = check_request(state, req, "max_tokens", req.max_tokens, req.n)
    if req.stream and req.n > 1:
        raise InputError("n", "streaming returns one completion: n must be 1 with stream=true")
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": req.model or state.engine.recipe.name}
    usage = {"prompt_tokens": n_prompt, "completion_tokens": req.max_tokens * req.n,
             "total_tokens": n_prompt + req.max_tokens * req.n}
    release = take_slot(state)
    if req.stream:
        texts = await start_stream(state, release, "max_tokens", req.prompt, dial, mode, req.max_tokens,
                                   req.temperature, req.top_k, req.seed)

        async def events():
            async for p in pieces(request, texts):
                yield sse(head | {"choices": [{"text": p, "index": 0, "logprobs": None, "finish_reason": None}]})
            yield sse(head | {"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]})
            yield sse("[DONE]")

        return SlotStream(events(), release)
    texts = await whole_batch(request, release, req.prompt, dial, mode, req)
    choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": "length"} for i, t in enumerate(texts)]
    return head | {"choices": choices, "usage": usage}


async def whole_batch(request: Request, release: Callable[[], None], prompt: str, dial: torch.Tensor, mode: str,
                      req: CompletionRequest) -> list[str]:
    """n completions in one batch, in a thread that stops when the client goes away (a disconnect does not end the
    handler: it has to look); the slot is released as soon as the batch ends."""
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(
        request.app.state.engine.sweep, prompt, [dial], max_new_tokens=req.max_tokens, temperature=req.temperature,
        top_k=req.top_k, seed=req.seed, n=req.n, mode=mode, stop=stop))
    work.add_done_callback(lambda _: release())  # if this handler is cancelled: free when the thread is
    try:
        while not (await asyncio.wait([work], timeout=0.05))[0]:
            if await request.is_disconnected():
                stop.set()
    finally:
        stop.set()  # if this handler is cancelled, the batch still ends within a token
    release()  # now, not when the callback's turn comes: that can be after the answer is sent
    try:
        return work.result()[0]
    except AbcgptError as e:  # refused before its first token (the batch cannot fit)
        raise InputError("max_tokens", str(e)) from None


def create_app(ckpt_path: Path, device: str | torch.device = "cpu", max_concurrent: int = 2,
               max_new_tokens: int = 1000, max_prompt_chars: int = 4000, mode: str | None = None,
               max_body_bytes: int | None = None, max_dial_positions: int | None = None,
               max_batch_tokens: int | None = None) -> FastAPI:
    """The server's app for a checkpoint, with its Limits (checked before the checkpoint is read). Its state
    (app.state): the engine, the limits, the default mode, the generations running."""
    limits = Limits(max_concurrent, max_new_tokens, max_prompt_chars, max_body_bytes, max_dial_positions,
                    max_batch_tokens)
    engine = Engine(load_checkpoint(ckpt_path, device))
    app = FastAPI(title="abcgpt", version="0.1.0", default_response_class=SafeJSON,
                  description=f"A GPT with a dial over its training sources: {', '.join(engine.sources)}.")
    app.state.engine, app.state.limits, app.state.mode = engine, limits, engine.mode(mode)
    app.state.corner_work = corner_work(engine)
    app.state.created = int((engine.path / "config.json").stat().st_mtime)  # /v1/models': when it was saved
    app.state.active = 0  # generations running
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(InputError, input_error)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)
    return app


def address(host: str, port: int) -> str:
    """host:port as a URL writes it: an IPv6 address in brackets (http://[::1]:8000/)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(ckpt: Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", **limits) -> None:
    import socket

    import uvicorn

    check_integer("port", port, 0, 65535)
    try:  # the address first: a host that does not resolve, or a port in use, is one line before any loading
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise AbcgptError(f"cannot listen on {address(host, port)}: {e.strerror or e}") from None
    app = create_app(ckpt, device, **limits)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {host}, reachable from other machines; the API has no authentication")
    print(f"abcgpt serving {ckpt} at http://{address(host, sock.getsockname()[1])}/  (API schema: /docs)")
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
