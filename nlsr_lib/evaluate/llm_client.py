"""A chat-completions client for LLM judges over any OpenAI-compatible API (spec/evaluation.md §5).

* Configuration comes only from the environment, through variables whose *names* are arguments:
  ``NLSR_JUDGE_BASE_URL`` (else ``OPENAI_BASE_URL``), ``NLSR_JUDGE_MODEL`` and ``NLSR_JUDGE_API_KEY`` (else
  ``OPENAI_API_KEY``). A missing one is a :class:`JudgeConfigError` naming the variable to set. The key is handed to
  the ``openai`` client and never printed: ``repr``/``str`` of a :class:`ChatClient` name the variable, not the value.
* Retries are openai's own (``max_retries``, default 2: at most 3 attempts; connection errors, timeouts, 408, 409,
  429 and >= 500 are retried, after ``retry-after-ms``/``retry-after`` or ``min(0.5·2^k, 8)·U(0.75, 1)`` s, spec §5).
  After them a call raises :class:`JudgeAPIError` with the openai error class name and the HTTP status. A 200 whose
  body has no choice, no message or no text content is a :class:`JudgeReplyError`.
* :meth:`ChatClient.map_complete` runs many calls on a bounded thread pool (at most ``concurrency`` in flight);
  results come in input order and a failed item's exception is returned in its place, not raised.
* :class:`Usage` counts calls, cache hits (recorded by the judge), tokens, errors by class and an estimated cost.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import NlsrError

BASE_URL_ENV, MODEL_ENV, API_KEY_ENV = "NLSR_JUDGE_BASE_URL", "NLSR_JUDGE_MODEL", "NLSR_JUDGE_API_KEY"
BASE_URL_FALLBACK_ENV, API_KEY_FALLBACK_ENV = "OPENAI_BASE_URL", "OPENAI_API_KEY"
DEFAULT_TIMEOUT_S = 60.0  # spec §5, "Judge client"
DEFAULT_MAX_RETRIES = 2  # openai's default: at most 3 attempts

Messages = Sequence[dict[str, Any]]


class JudgeError(NlsrError):
    """Base of the LLM judge's errors."""


class JudgeConfigError(JudgeError, ValueError):
    """A judge setting is missing from the environment; the message names the variable(s) to set."""


class JudgeAPIError(JudgeError, RuntimeError):
    """A chat-completions call failed after openai's retries. ``error_class`` is the openai exception's class name
    (``RateLimitError``, ``APITimeoutError``, ...); ``status`` its HTTP status (None without a response)."""

    def __init__(self, error_class: str, status: int | None, detail: str):
        self.error_class, self.status = error_class, status
        super().__init__(f"judge API call failed: {error_class} (status {status}) {detail}".rstrip())


class JudgeReplyError(JudgeError, ValueError):
    """A 200 reply whose body is not a usable chat completion (no choices, no message, content None, not JSON)."""

    error_class = "JudgeReplyError"
    status = 200


def error_name(exc: BaseException) -> str:
    """The name recorded for a failed call: the openai class for API errors, else the exception's class."""
    return getattr(exc, "error_class", None) or type(exc).__name__


@dataclass(frozen=True)
class Completion:
    """One chat completion: its text and what the server reported about it."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    model: str | None


@dataclass
class Usage:
    """Running totals of one client (thread-safe). Cost is estimated from per-1M-token prices when both are given."""

    price_prompt_per_1m: float | None = None
    price_completion_per_1m: float | None = None
    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_completion(self, c: Completion) -> None:
        with self._lock:
            self.calls += 1
            self.prompt_tokens += c.prompt_tokens
            self.completion_tokens += c.completion_tokens

    def add_error(self, exc: BaseException) -> None:
        with self._lock:
            self.calls += 1
            self.errors[error_name(exc)] += 1

    def add_cache_hits(self, n: int = 1) -> None:
        with self._lock:
            self.cache_hits += n

    @property
    def cost(self) -> float | None:
        """Estimated cost in the prices' currency, or None when a price is missing."""
        if self.price_prompt_per_1m is None or self.price_completion_per_1m is None:
            return None
        return (self.prompt_tokens * self.price_prompt_per_1m
                + self.completion_tokens * self.price_completion_per_1m) / 1e6

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"calls": self.calls, "cache_hits": self.cache_hits, "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens, "errors": dict(sorted(self.errors.items())),
                    "estimated_cost": self.cost}


def read_env(name: str, fallback: str | None, what: str) -> str:
    """The value of ``name`` (else of ``fallback``); :class:`JudgeConfigError` naming both when neither is set."""
    for var in (name, fallback):
        if var and os.environ.get(var, "").strip():
            return os.environ[var].strip()
    either = f"{name}" + (f" (or {fallback})" if fallback else "")
    raise JudgeConfigError(f"the LLM judge needs the {what}: set the environment variable {either}")


def _redact_url(url: str) -> str:
    """``url`` without any user:password part (never shown)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=host))


class ChatClient:
    """Chat completions on the endpoint, model and key named by environment variables (module docstring)."""

    def __init__(self, base_url_env: str = BASE_URL_ENV, model_env: str = MODEL_ENV, api_key_env: str = API_KEY_ENV,
                 base_url_fallback_env: str | None = BASE_URL_FALLBACK_ENV,
                 api_key_fallback_env: str | None = API_KEY_FALLBACK_ENV, timeout: float = DEFAULT_TIMEOUT_S,
                 max_retries: int = DEFAULT_MAX_RETRIES, price_prompt_per_1m: float | None = None,
                 price_completion_per_1m: float | None = None):
        import openai

        self.base_url = read_env(base_url_env, base_url_fallback_env, "API base URL")
        self.model = read_env(model_env, None, "judge model")
        self.api_key_env = api_key_env if os.environ.get(api_key_env, "").strip() else api_key_fallback_env
        self.timeout, self.max_retries = timeout, max_retries
        self.usage = Usage(price_prompt_per_1m, price_completion_per_1m)
        self._client = openai.OpenAI(base_url=self.base_url, timeout=timeout, max_retries=max_retries,
                                     api_key=read_env(api_key_env, api_key_fallback_env, "API key"))

    def __repr__(self) -> str:
        return (f"ChatClient(model={self.model!r}, base_url={_redact_url(self.base_url)!r}, "
                f"api_key=<from ${self.api_key_env}>, timeout={self.timeout}, max_retries={self.max_retries})")

    __str__ = __repr__

    def complete(self, messages: Messages, model: str | None = None, **params: Any) -> Completion:
        """One completion at temperature 0 unless ``params`` say otherwise; ``model`` overrides the env model (a
        fallback judge). Raises :class:`JudgeAPIError` after the retries, :class:`JudgeReplyError` on a bad 200."""
        params.setdefault("temperature", 0)
        try:
            resp = self._create(list(messages), model or self.model, params)
            out = _completion(resp)
        except JudgeError as exc:
            self.usage.add_error(exc)
            raise
        self.usage.add_completion(out)
        return out

    def _create(self, messages: list, model: str, params: dict) -> Any:
        import openai

        try:
            return self._client.chat.completions.create(model=model, messages=messages, **params)
        except openai.APIStatusError as exc:
            raise JudgeAPIError(type(exc).__name__, exc.status_code, _detail(exc.body)) from None
        except openai.APIError as exc:  # APITimeoutError, APIConnectionError, APIResponseValidationError
            raise JudgeAPIError(type(exc).__name__, getattr(exc, "status_code", None), "") from None
        except json.JSONDecodeError as exc:
            raise JudgeReplyError(f"the judge API answered 200 with a body that is not JSON ({exc})") from None

    def map_complete(self, message_lists: Sequence[Messages], concurrency: int = 8,
                     **params: Any) -> list[Completion | Exception]:
        """:meth:`complete` for every message list, at most ``concurrency`` at once; in input order, each failed
        item's exception in its place."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1; got {concurrency}")

        def one(messages: Messages) -> Completion | Exception:
            try:
                return self.complete(messages, **params)
            except Exception as exc:  # noqa: BLE001 (returned to the caller, per item)
                return exc

        if not message_lists:
            return []
        with ThreadPoolExecutor(max_workers=min(concurrency, len(message_lists)),
                                thread_name_prefix="llm-judge") as pool:
            return list(pool.map(one, message_lists))


def _detail(body: Any) -> str:
    """The server's error message (``e.body`` is the inner error object, spec §5), short."""
    message = body.get("message") if isinstance(body, dict) else body
    return f"- {str(message)[:300]}" if message else ""


def _completion(resp: Any) -> Completion:
    """The :class:`Completion` of a parsed 200 body; :class:`JudgeReplyError` naming what is missing."""
    choices = getattr(resp, "choices", None)
    if not choices:
        raise JudgeReplyError(f"the judge API answered 200 without choices: {str(resp)[:200]}")
    choice = choices[0]
    message = getattr(choice, "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str):
        refusal = getattr(message, "refusal", None)
        raise JudgeReplyError("the judge API answered 200 without text content"
                              + (f" (refusal: {refusal!r})" if refusal else ""))
    usage = getattr(resp, "usage", None)
    return Completion(text=content, finish_reason=getattr(choice, "finish_reason", None),
                      prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                      completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                      model=getattr(resp, "model", None))


__all__ = [
    "API_KEY_ENV",
    "API_KEY_FALLBACK_ENV",
    "BASE_URL_ENV",
    "BASE_URL_FALLBACK_ENV",
    "MODEL_ENV",
    "ChatClient",
    "Completion",
    "JudgeAPIError",
    "JudgeConfigError",
    "JudgeError",
    "JudgeReplyError",
    "Usage",
    "error_name",
    "read_env",
]
