"""The OpenAI-compatible HTTP API over `Engine`: an ASGI app (FastAPI on Starlette, served by uvicorn).

FastAPI gives the routing, the request bodies' parsing and the server-sent events (`StreamingResponse`) that the
`openai` client reads; uvicorn is the ASGI server (graceful shutdown on SIGTERM). The counters are
`prometheus_client`'s, in its text format at /metrics. Routes: GET /health, GET /metrics, GET /v1/models,
POST /v1/completions (streaming or not), POST /v1/chat/completions (a clear error: a character model has no chat
template; docs/serving.md).
"""

import asyncio
import hmac
import json
import logging
import time

import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .engine import Busy, Engine, Job
from .protocol import APIError, CompletionRequest, chunk, completion_id, logprobs_body, settings_of, usage


logger = logging.getLogger(__name__)


class Metrics:
    """The counters a server operator expects, in a registry of the app's own."""

    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("char_lstm_requests", "HTTP requests, by route and status.", ["route", "status"],
                                registry=registry)
        self.characters = Counter("char_lstm_generated_characters", "Characters generated.", registry=registry)
        self.latency = Histogram("char_lstm_request_duration_seconds", "Completion requests, start to end.",
                                 registry=registry)
        self.first = Histogram("char_lstm_time_to_first_character_seconds",
                               "From a completion request to its first character.", registry=registry)
        Gauge("char_lstm_batch_slots_in_use", "Rows of the decoding batch in use.", registry=registry).set_function(
            lambda: engine.slots_in_use)
        Gauge("char_lstm_batch_slots", "Rows of the decoding batch (--max_batch_size).", registry=registry).set(
            engine.max_batch_size)
        Gauge("char_lstm_queue_length", "Requests waiting for a row.", registry=registry).set_function(
            lambda: engine.queue_length)


class Outbox:
    """The engine's events, handed to the event loop together: at most every `interval` seconds (a stream then
    carries the characters of several steps per chunk: fewer wake-ups, JSON documents and writes for the server and
    its clients), at once for a request's first characters or its end (the time to the first character and to the
    end are not delayed), and whenever the loop has nothing left to decode."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.02):
        self.loop, self.interval, self.items, self.urgent, self.last = loop, interval, [], False, 0.0

    def deliver(self, job: Job, text: str, entries: list, reason: str | None, error: str | None = None) -> None:
        self.items.append((job, (text, entries, reason, error)))
        if reason is not None or (text and job.shown == len(text)):  # the end, or the first characters
            self.urgent = True

    def flush(self, engine: Engine) -> None:
        now = time.perf_counter()
        if self.items and (self.urgent or now - self.last >= self.interval or not engine.slots_in_use):
            items, self.items, self.urgent, self.last = self.items, [], False, now
            self.loop.call_soon_threadsafe(self._dispatch, items)

    @staticmethod
    def _dispatch(items: list) -> None:
        for job, event in items:
            job.sink.put_nowait((job, *event))


class CountRequests:
    """Counts the requests by route and status: a plain ASGI middleware (Starlette's `BaseHTTPMiddleware` would pass
    every streamed chunk through a memory stream of its own). Paths that are no route count as "other", so that
    requests for random paths cannot grow the counters without end."""

    ROUTES = {"/health", "/v1/models", "/v1/completions", "/v1/chat/completions"}

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        status = []

        async def counted(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            status.append(500)  # answered by the outer error handler
            raise
        finally:
            path = scope["path"]
            model = path.startswith("/v1/models/")
            route = path if path in self.ROUTES else "/v1/models/{model}" if model else "other"
            self.metrics.requests.labels(route, str(status[0]) if status else "499").inc()


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return _error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(f"{error.detail}: {request.method} {request.url.path}", error.status_code,
                                        type=kind, headers=dict(error.headers or {})))  # 405: Allow

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        logger.exception("Request failed: %s %s", request.method, request.url.path)
        return _error_response(APIError(f"Internal error: {type(error).__name__}", 500, type="server_error"))


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError("Incorrect or missing API key: send the header `Authorization: Bearer <key>`.", 401,
                       code="invalid_api_key", type="authentication_error", headers={"WWW-Authenticate": "Bearer"})


async def _completion_request(request: Request) -> CompletionRequest:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(f"The request body is not JSON: {error}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object.", code="invalid_json")
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
        raise APIError("prompt must be a string or a list of strings (token ids are not taken: a character model "
                       "reads text).", param="prompt", code="invalid_value")
    try:
        return CompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise APIError(f"{param}: {first['msg']}.", param=param, code="invalid_value") from None


def _prompt_ids(tokenizer, prompts: list[str], max_characters: int) -> list[list[int]]:
    """The ids of each prompt, or an `APIError` naming what the model cannot read."""
    if not prompts:
        raise APIError("prompt is an empty list: give at least one prompt.", param="prompt", code="invalid_value")
    for prompt in prompts:
        if not prompt:
            raise APIError("A prompt is empty: a character model needs at least one character to start from.",
                           param="prompt", code="invalid_value")
        if len(prompt) > max_characters:
            raise APIError(f"A prompt has {len(prompt)} characters, more than this server's limit of "
                           f"{max_characters}.", param="prompt", code="invalid_value")
        unknown = tokenizer.oov_characters(prompt) if hasattr(tokenizer, "oov_characters") else []
        if unknown:
            raise APIError(f"The prompt has characters the model has never seen: {unknown}; remove them.",
                           param="prompt", code="unknown_characters")
    return [tokenizer(prompt)["input_ids"] for prompt in prompts]


class CompletionService:
    """POST /v1/completions: the request's jobs into the engine, their events out as a response or a stream."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, metrics: Metrics, max_tokens: int,
                 max_prompt_characters: int):
        self.engine, self.tokenizer, self.model_name, self.metrics = engine, tokenizer, model_name, metrics
        self.max_tokens, self.max_prompt_characters = max_tokens, max_prompt_characters
        self.outbox: Outbox | None = None

    def jobs(self, body: CompletionRequest) -> tuple[list[Job], list[str], int]:
        if body.model != self.model_name:
            raise APIError(f"The model `{body.model}` does not exist: this server serves `{self.model_name}` "
                           "(GET /v1/models).", param="model", code="model_not_found")
        settings = settings_of(body, self.max_tokens)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        ids = _prompt_ids(self.tokenizer, prompts, self.max_prompt_characters)
        sink, jobs = asyncio.Queue(), []
        for prompt_ids in ids:
            for choice in range(body.n or 1):
                generator = None
                if settings.seed is not None:  # each choice its own stream of draws: seed, seed + 1, ...
                    generator = torch.Generator().manual_seed(settings.seed + choice)
                jobs.append(Job(prompt_ids, settings, self.outbox.deliver, generator=generator, sink=sink,
                                index=len(jobs)))
        return jobs, prompts, sum(len(i) for i in ids)

    def submit(self, jobs: list[Job]) -> None:
        try:
            self.engine.submit(jobs)
        except Busy as busy:
            raise APIError(f"The server is busy: {busy}; retry in a second.", 429, code="rate_limit_exceeded",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None

    async def events(self, jobs: list[Job]):
        """(job, text, entries, reason, error) as the engine delivers them, until every job finished. What arrived
        while the reader was busy comes merged, one event per job: a loaded server sends fewer, longer chunks
        instead of falling behind with one chunk per character."""
        remaining, sink = len(jobs), jobs[0].sink
        while remaining:
            merged = {}
            event = await sink.get()
            while True:
                job, text, entries, reason, error = event
                if job.index in merged:
                    _, old_text, old_entries, _, _ = merged[job.index]
                    text, entries = old_text + text, old_entries + entries
                merged[job.index] = (job, text, entries, reason, error)
                if reason is not None or sink.empty():
                    break
                event = sink.get_nowait()
            for job, text, entries, reason, error in merged.values():
                self.metrics.characters.inc(len(text))
                if reason is not None:
                    remaining -= 1
                yield job, text, entries, reason, error

    def observe(self, jobs: list[Job], started: float) -> None:
        self.metrics.latency.observe(time.perf_counter() - started)
        firsts = [job.first_at for job in jobs if job.first_at is not None]
        if firsts:
            self.metrics.first.observe(min(firsts) - started)


def _start(body: CompletionRequest, prompts: list[str], job: Job) -> tuple[str, list, int]:
    """What a choice's text and logprobs start with, and the text offset of its first generated character (offsets
    count from the prompt's start, as OpenAI's do): with `echo`, the prompt (and its characters' log-probabilities,
    known once the prompt was read)."""
    prompt = prompts[job.index // (body.n or 1)]
    return (prompt, job.prompt_entries, 0) if body.echo else ("", [], len(prompt))


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(service: CompletionService, request: Request, body: CompletionRequest, jobs: list[Job],
                    prompts: list[str], prompt_tokens: int, started: float) -> Response:
    """The whole completion at once; a client that leaves before it ends frees its rows."""
    texts, entries, reasons = {job.index: "" for job in jobs}, {job.index: [] for job in jobs}, {}

    async def collect():
        async for job, text, new_entries, reason, error in service.events(jobs):
            if error is not None:
                raise APIError(f"Generation failed: {error}", 500, type="server_error")
            texts[job.index] += text
            entries[job.index] += new_entries
            if reason is not None:
                reasons[job.index] = reason

    collecting, leaving = asyncio.ensure_future(collect()), asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not collecting.done():
            collecting.cancel()
            service.engine.cancel(jobs)
    if not collecting.done() or collecting.cancelled():
        return Response(status_code=499)  # the client is gone: nobody reads this
    collecting.result()  # its error, if any
    service.observe(jobs, started)
    choices = []
    for job in jobs:
        text, start_entries, offset = _start(body, prompts, job)
        choices.append({"index": job.index, "text": text + texts[job.index], "finish_reason": reasons[job.index],
                        "logprobs": logprobs_body(start_entries + entries[job.index], offset)
                        if body.logprobs is not None else None})
    completion = sum(job.generated for job in jobs)
    return JSONResponse(chunk(completion_id(), service.model_name, choices, usage(prompt_tokens, completion)))


def _stream(service: CompletionService, body: CompletionRequest, jobs: list[Job], prompts: list[str],
            prompt_tokens: int, started: float) -> StreamingResponse:
    """Server-sent events: a chunk per step and choice, its last with the finish reason, the usage when asked
    (`stream_options.include_usage`), then `data: [DONE]`. A client that leaves frees its rows."""
    request_id = completion_id()

    def event(data) -> str:
        return f"data: {json.dumps(data)}\n\n"

    async def stream():
        offsets, finished = {}, False
        try:
            async for job, text, entries, reason, error in service.events(jobs):
                if error is not None:
                    yield event(APIError(f"Generation failed: {error}", 500, type="server_error").body())
                    break
                if job.index not in offsets:  # its first chunk: the echoed prompt first
                    start_text, start_entries, offsets[job.index] = _start(body, prompts, job)
                    text, entries = start_text + text, start_entries + entries
                logprobs = logprobs_body(entries, offsets[job.index]) if body.logprobs is not None else None
                offsets[job.index] += len(text)
                yield event(chunk(request_id, service.model_name, [
                    {"index": job.index, "text": text, "logprobs": logprobs, "finish_reason": reason}]))
            else:
                if body.stream_options is not None and body.stream_options.include_usage:
                    completion = sum(job.generated for job in jobs)
                    yield event(chunk(request_id, service.model_name, [], usage(prompt_tokens, completion)))
            finished = True
            service.observe(jobs, started)
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                service.engine.cancel(jobs)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None, max_tokens: int = 4096,
              max_prompt_characters: int = 65536, stream_interval: float = 0.02,
              cors_origins: list[str] | None = None) -> FastAPI:
    """The server's ASGI app over a not yet started `engine` (started and stopped with the app); `stream_interval`:
    the longest a generated character waits to be sent with others (`Outbox`); `cors_origins`: the web pages' origins
    allowed to call the API from a browser (none by default)."""
    created = int(time.time())
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "char_lstm"}
    metrics = Metrics(engine)
    service = CompletionService(engine, tokenizer, model_name, metrics, max_tokens, max_prompt_characters)

    async def lifespan(app: FastAPI):
        service.outbox = Outbox(asyncio.get_running_loop(), stream_interval)
        engine.on_step = service.outbox.flush
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="char_lstm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)

    app.add_middleware(CountRequests, metrics=metrics)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _add_routes(app, service, api_key, model_card)
    return app


def _add_routes(app: FastAPI, service: CompletionService, api_key: str | None, model_card: dict) -> None:
    engine, metrics, model_name = service.engine, service.metrics, service.model_name

    @app.get("/health")
    async def health():
        if engine.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok", "model": model_name, "slots_in_use": engine.slots_in_use,
                "queue_length": engine.queue_length}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, api_key)
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        _check_key(request, api_key)
        if model_id != model_name:
            raise APIError(f"The model `{model_id}` does not exist: this server serves `{model_name}`.", 404,
                           param="model", code="model_not_found")
        return model_card

    @app.post("/v1/completions")
    async def completions(request: Request):
        _check_key(request, api_key)
        started = time.perf_counter()
        body = await _completion_request(request)
        jobs, prompts, prompt_tokens = service.jobs(body)
        service.submit(jobs)
        if body.stream:
            return _stream(service, body, jobs, prompts, prompt_tokens, started)
        return await _complete(service, request, body, jobs, prompts, prompt_tokens, started)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        _check_key(request, api_key)
        raise APIError("This is a character-level language model without a chat template: it continues text. Send "
                       "the text to continue as `prompt` to POST /v1/completions.", param="messages",
                       code="chat_not_supported")
