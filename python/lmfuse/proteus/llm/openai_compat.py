"""A backend for any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, hosted
APIs), written on the standard library only (``urllib``).

Requests go only to ``{base_url}/chat/completions``. The key is sent as a bearer token and is
never logged, stored in the run log or shown in ``repr``. Structured output uses
``response_format = {"type": "json_schema", ...}`` (``structured="json_schema"``, the default),
``{"type": "json_object"}`` or nothing; either way the caller still parses and validates the
reply (see :func:`lmfuse.proteus.llm.backend.ask_json`).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from .backend import LLMError, check_messages

STRUCTURED = ("json_schema", "json_object", "none")
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAICompatBackend:
    """Chat completions over HTTP.

    ``base_url``: e.g. ``http://127.0.0.1:8000/v1`` (a URL already ending in
    ``/chat/completions`` is used as it is); default ``$LMFUSE_LLM_URL``. ``model``: default
    ``$LMFUSE_LLM_MODEL`` or ``"default"``. ``api_key``: default ``$LMFUSE_LLM_KEY`` (optional).
    ``timeout``: seconds per request. ``retries``: extra attempts after a connection error, a
    timeout or a retryable status (408/409/425/429/5xx), waiting ``backoff * 2**i`` seconds before
    retry ``i``. Other error statuses fail at once with :class:`LLMError`.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 2, backoff: float = 0.5, structured: str = "json_schema"):
        url = base_url if base_url is not None else os.environ.get("LMFUSE_LLM_URL", "")
        if not isinstance(url, str) or not url:
            raise ValueError("base_url is required (or set LMFUSE_LLM_URL), e.g. http://127.0.0.1:8000/v1")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be an http(s) URL, got {url!r}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model or os.environ.get("LMFUSE_LLM_MODEL") or "default"
        self._key = api_key if api_key is not None else os.environ.get("LMFUSE_LLM_KEY")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not (isinstance(backoff, (int, float)) and backoff >= 0):
            raise ValueError(f"backoff must be >= 0, got {backoff!r}")
        if structured not in STRUCTURED:
            raise ValueError(f"structured must be one of {STRUCTURED}, got {structured!r}")
        self.timeout, self.retries, self.backoff, self.structured = float(timeout), retries, float(backoff), structured
        self.name = f"openai:{self.model}"
        self.requests = 0
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}

    def __repr__(self) -> str:  # the key is never shown
        return f"OpenAICompatBackend(url={self.url!r}, model={self.model!r}, key={'set' if self._key else 'unset'})"

    def _body(self, messages, schema, max_tokens, temperature, seed) -> bytes:
        body = {"model": self.model, "messages": messages, "max_tokens": int(max_tokens),
                "temperature": float(temperature)}
        if seed is not None:
            body["seed"] = int(seed)
        if schema is not None and self.structured == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "reply", "schema": schema, "strict": False}}
        elif schema is not None and self.structured == "json_object":
            body["response_format"] = {"type": "json_object"}
        return json.dumps(body).encode()

    def chat(self, messages: list[dict], *, schema: dict | None = None, max_tokens: int = 512,
             temperature: float = 0.0, seed: int | None = None) -> str:
        """The reply text of the first choice. Raises :class:`LLMError` on transport errors and
        error statuses (after the retries) and on a response that is not a chat completion."""
        msgs = check_messages(messages)
        if schema is not None and self.structured != "json_schema":
            msgs = msgs + [{"role": "user", "content": "Reply with one JSON value valid under this schema:\n"
                            + json.dumps(schema)}]
        data = self._body(msgs, schema, max_tokens, temperature, seed)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.requests += 1
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace") if e.fp is not None else ""
                last = LLMError(f"{self.url} answered HTTP {e.code}: {detail}")
                if e.code in _RETRY_STATUS:
                    continue
                raise last from None
            except (socket.timeout, TimeoutError) as e:
                last = LLMError(f"{self.url} timed out after {self.timeout:g} s")
                continue
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    last = LLMError(f"{self.url} timed out after {self.timeout:g} s")
                else:
                    last = LLMError(f"cannot reach {self.url}: {reason}")
                continue
            except (ConnectionError, OSError) as e:
                last = LLMError(f"connection to {self.url} failed: {e}")
                continue
            return self._content(raw)
        raise LLMError(f"{last} (after {self.retries + 1} attempt(s))")

    def _content(self, raw: bytes) -> str:
        try:
            payload = json.loads(raw)
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMError(f"{self.url} returned something that is not a chat completion: {raw[:120]!r}") from None
        usage = payload.get("usage") or {}
        for k in self.usage:
            if isinstance(usage.get(k), int):
                self.usage[k] += usage[k]
        if not isinstance(content, str):
            raise LLMError(f"{self.url} returned a message without text content")
        return content
