"""The OpenAI protocol as the server speaks it: the completion request (checked into `Settings`), OpenAI's error
body, and the response and stream chunks its clients read.

Errors are OpenAI's: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status it gives them (400 for
a request that cannot be served, 401 for a missing or wrong key, 429 when too many requests wait).
"""

import time
import uuid

from pydantic import BaseModel, ConfigDict

from .sampling import Settings


MAX_LOGPROBS = 5  # OpenAI's limit for completions
MAX_SEED = 2**63 - 1 - 16  # torch's generators take 64-bit seeds; each of up to 16 choices gets seed + its index


class APIError(Exception):
    """An error the client gets as OpenAI's error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. Fields OpenAI defines that a character model cannot honour are refused when set to
    anything but their neutral value (`_check_unsupported`); unknown fields are ignored, as OpenAI's server does.
    Types are strict, as JSON gives them: "5" is not a number, true is not 1 (an integer is a number)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    prompt: str | list[str]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict | None = None
    suffix: str | None = None
    user: str | None = None


def _check_unsupported(request: CompletionRequest) -> None:
    neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "suffix": None}
    for name, value in neutral.items():
        if getattr(request, name) not in (value, None, {}):
            raise APIError(f"{name} is not supported by this server (a character-level model); leave it out.",
                           param=name, code="unsupported_parameter")
    if request.best_of not in (None, request.n or 1):
        raise APIError("best_of must equal n (or be left out): this server returns every choice it generates.",
                       param="best_of", code="unsupported_parameter")


def settings_of(request: CompletionRequest, max_tokens_limit: int) -> Settings:
    """The request's `Settings`, or an `APIError` naming the first parameter out of its range."""
    _check_unsupported(request)
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    least = 0 if request.echo else 1  # echo with max_tokens 0: the prompt alone (scored, with logprobs)
    if not least <= max_tokens <= max_tokens_limit:
        raise APIError(f"max_tokens must be in [{least}, {max_tokens_limit}] (this server's limit), got {max_tokens}.",
                       param="max_tokens", code="invalid_value")
    temperature = 1.0 if request.temperature is None else request.temperature
    if not 0 <= temperature <= 2:
        raise APIError(f"temperature must be in [0, 2] (0: greedy), got {temperature}.", param="temperature",
                       code="invalid_value")
    top_p = 1.0 if request.top_p is None else request.top_p
    if not 0 < top_p <= 1:
        raise APIError(f"top_p must be in (0, 1], got {top_p}.", param="top_p", code="invalid_value")
    if not 1 <= (1 if request.n is None else request.n) <= 16:
        raise APIError(f"n must be in [1, 16], got {request.n}.", param="n", code="invalid_value")
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise APIError(f"seed must be in [0, {MAX_SEED}], got {request.seed}.", param="seed", code="invalid_value")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
        raise APIError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {request.logprobs}.", param="logprobs",
                       code="invalid_value")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError("stop must be up to 4 non-empty strings.", param="stop", code="invalid_value")
    return Settings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop), seed=request.seed,
                    logprobs=request.logprobs, prompt_logprobs=bool(request.echo) and request.logprobs is not None)


def logprobs_body(entries: list[tuple], offset: int) -> dict:
    """OpenAI's legacy completion logprobs for consecutive characters starting at text offset `offset` (counted from
    the prompt's start, as OpenAI counts; a prompt's first character has no log-probability: None)."""
    offsets, position = [], offset
    for text, _, _ in entries:
        offsets.append(position)
        position += len(text)
    return {"tokens": [text for text, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [top for _, _, top in entries], "text_offset": offsets}


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def chunk(request_id: str, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    body = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """Counts in characters (a character model's tokens)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
