"""The client of an optional LLM judge: one OpenAI-compatible chat-completions endpoint, its
answers cached on disk.

Owns: the request (one user message of one text part, ``n=1``, a temperature and a token cap;
models whose names mark them as reasoning models get ``max_completion_tokens`` and no
temperature, as the paper's harness sends them), where it goes (a base URL with or without
``/v1``), the API key (read from :data:`API_KEY_VARIABLE` at each request, never stored), the
per-request timeout, retries with exponential back-off on connection errors, timeouts, HTTP 5xx
and 429, the one-line :class:`JudgeError` when the endpoint cannot be used, and the cache
(``judge-cache.jsonl``: one JSON line per answer, keyed by a hash of the model, the prompt, the
token cap and the attempt), so a re-run sends no request.
Does not know: benchmarks, prompts' content or how a reply is read
(:mod:`opsd_core.evaluation.judge_rules`); it uses only the standard library.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from opsd_core.errors import OpsdError

API_KEY_VARIABLE = "OPSD_JUDGE_API_KEY"
CACHE_FILE = "judge-cache.jsonl"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF_S = 1.0
# The harness sends these model families ``max_completion_tokens`` and no temperature.
_COMPLETION_TOKEN_MODELS = ("o1", "o3", "o4", "gpt-5")


class JudgeError(OpsdError):
    """The judge endpoint could not be used; the message says what failed, where, and what to do."""


def chat_completions_url(base_url: str) -> str:
    """The endpoint a base URL names: ``http://host:8000/v1`` and ``http://host:8000`` both give
    ``http://host:8000/v1/chat/completions``; a URL already ending in ``/chat/completions`` is
    used as it is."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/chat/completions"


def cache_key(model: str, prompt: str, max_tokens: int, attempt: int) -> str:
    """The hex SHA-256 of what determines an answer: model, full prompt, token cap, attempt."""
    return hashlib.sha256(json.dumps([model, prompt, max_tokens, attempt]).encode("utf-8")).hexdigest()


class JudgeCache:
    """Judge answers on disk, one JSON line ``{"key", "model", "reply"}`` each, appended as they
    arrive. A cut last line (a crash while writing) is dropped from the file; any other line that
    is not such an object is an error naming the file and the line."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.replies: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")  # after a final newline comes one empty piece
        offset = 0
        for number, raw in enumerate(lines, start=1):
            last = number == len(lines)
            if raw.strip():
                try:
                    record = json.loads(raw.decode("utf-8"))
                    self.replies[str(record["key"])] = str(record["reply"])
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
                    if last:
                        with open(self.path, "r+b") as handle:
                            handle.truncate(offset)
                        return
                    raise JudgeError(
                        f"{self.path}, line {number}: not a judge answer ({error}); delete that line and its item is "
                        "asked again"
                    ) from None
                if last:
                    with open(self.path, "ab") as handle:
                        handle.write(b"\n")
            offset += len(raw) + 1

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, model: str, reply: str) -> None:
        self.replies[key] = reply
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "model": model, "reply": reply}) + "\n")


@dataclass
class JudgeClient:
    """An OpenAI-compatible chat endpoint asked one prompt at a time.

    Attributes:
        url: the base URL (``http://host:8000/v1`` or ``http://host:8000``), see
            :func:`chat_completions_url`.
        model: the model name sent in each request.
        cache_path: where answers are cached (None: in memory only).
        timeout_s: seconds one request may take.
        retries: further tries after a connection error, a timeout, HTTP 5xx or 429.
        backoff_s: the wait before the first retry; it doubles with each one.
        endpoint: where requests go (:func:`chat_completions_url` of ``url``).
        sent: requests answered by the endpoint so far.
        cached: answers served from the cache so far.
    """

    url: str
    model: str
    cache_path: Path | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S
    endpoint: str = field(init=False)
    sent: int = field(default=0, init=False)
    cached: int = field(default=0, init=False)
    cache: JudgeCache = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.endpoint = chat_completions_url(self.url)
        self.cache = JudgeCache(self.cache_path)

    def ask(self, prompt: str, max_tokens: int, temperature: float = 0.0, attempt: int = 0) -> str:
        """The judge's reply to ``prompt`` (stripped), from the cache when this model, prompt,
        token cap and ``attempt`` (0 for the first asking, 1 for the same prompt asked again, ...)
        were answered before."""
        key = cache_key(self.model, prompt, max_tokens, attempt)
        known = self.cache.get(key)
        if known is not None:
            self.cached += 1
            return known
        reply = self._post(self._payload(prompt, max_tokens, temperature))
        self.sent += 1
        self.cache.put(key, self.model, reply)
        return reply

    def _payload(self, prompt: str, max_tokens: int, temperature: float) -> dict:
        payload: dict = {
            "model": self.model,
            "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
            "n": 1,
        }
        if any(marker in self.model for marker in _COMPLETION_TOKEN_MODELS):
            payload["max_completion_tokens"] = max_tokens
        else:
            payload["temperature"] = temperature
            payload["max_tokens"] = max_tokens
        return payload

    def _post(self, payload: dict) -> str:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(API_KEY_VARIABLE)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = json.dumps(payload).encode("utf-8")
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as error:
                if error.code != 429 and error.code < 500:
                    raise JudgeError(self._refused(error)) from None
                failure = f"HTTP {error.code} {error.reason}"
                advice = "the server failed or limited the rate; retry later or raise --judge-retries"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                reason = getattr(error, "reason", error)
                if isinstance(reason, TimeoutError):
                    failure = f"no answer within {self.timeout_s:g} s"
                    advice = "raise --judge-timeout or check the server's load"
                else:
                    failure = str(reason)
                    advice = "start the server or fix --judge (a base URL such as http://host:8000/v1)"
        tries = self.retries + 1
        raise JudgeError(
            f"LLM judge {self.endpoint} failed {tries} {'try' if tries == 1 else 'tries'}, the last: {failure}; {advice}"
        )

    def _content(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw.decode("utf-8"))
            content = reply["choices"][0]["message"]["content"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError):
            shown = raw[:120].decode("utf-8", errors="replace").replace("\n", " ")
            raise JudgeError(
                f"LLM judge {self.endpoint} answered something that is not a chat completion ({shown!r}); "
                "point --judge at an OpenAI-compatible server"
            ) from None
        return (content or "").strip()

    def _refused(self, error: urllib.error.HTTPError) -> str:
        try:
            detail = error.read()[:160].decode("utf-8", errors="replace").replace("\n", " ")
        except OSError:
            detail = ""
        if error.code in (401, 403):
            advice = f"set the key in the environment variable {API_KEY_VARIABLE}"
        else:
            advice = "check --judge (an OpenAI-compatible base URL) and that --judge-model names a model it serves"
        return f"LLM judge {self.endpoint} refused the request: HTTP {error.code} {error.reason} {detail!r}; {advice}"
