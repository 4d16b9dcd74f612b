"""Generation through OpenAI-compatible servers (vLLM, SGLang, TGI, `transformers serve`) for self-distillation
at scale: concurrent requests over one or several base URLs, bounded retries with backoff, and failures
recorded per request instead of sinking the run."""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from sd2.errors import UserError

log = logging.getLogger(__name__)
RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIBackend:
    """Sends one request per prompt; returns (text, None, truncated, error) like the in-process generator."""

    def __init__(self, base_urls: list[str], model: str, *, api: str = "chat", api_key_env: str | None = None,
                 concurrency: int = 8, timeout: float = 300.0, max_retries: int = 4):
        if not base_urls:
            raise UserError("--base-url: required with --backend openai (e.g. http://127.0.0.1:8000)")
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in base_urls]
        self.model, self.api, self.concurrency = model, api, concurrency
        self.max_retries = max_retries
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise UserError(f"--api-key-env {api_key_env}: that environment variable is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self._next = itertools.cycle(range(len(self.urls)))
        self._lock = threading.Lock()

    def check(self) -> list[str]:
        """Every server answers /v1/models and serves the requested model; returns the served names."""
        served: list[str] = []
        for url in self.urls:
            try:
                r = self.client.get(f"{url}/v1/models", timeout=15)
            except httpx.HTTPError as exc:
                raise UserError(f"--base-url {url}: unreachable ({exc.__class__.__name__}: {exc})") from None
            if r.status_code >= 400:
                raise UserError(f"--base-url {url}: /v1/models answered HTTP {r.status_code}")
            names = [m.get("id") for m in r.json().get("data", [])]
            if names and self.model not in names:
                raise UserError(f"--served-model {self.model}: not served by {url} (it serves: {', '.join(names[:5])})")
            served.extend(names)
        return served

    def _url(self) -> str:
        with self._lock:
            return self.urls[next(self._next)]

    def _one(self, request: str, max_new_tokens: int, temperature: float, seed: int):
        body = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
        if self.api == "chat":
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": request}]
        else:
            path = "/v1/completions"
            body["prompt"] = request
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            url = self._url()
            try:
                r = self.client.post(url + path, json=body)
            except httpx.HTTPError as exc:
                last = f"{url}: {exc.__class__.__name__}"
            else:
                if r.status_code < 400:
                    try:
                        choice = r.json()["choices"][0]
                        text = choice["message"]["content"] if self.api == "chat" else choice["text"]
                    except (KeyError, IndexError, TypeError, ValueError):
                        return "", None, False, f"{url}: response without text"
                    if text is None or not str(text).strip():
                        return "", None, False, f"{url}: response without text"
                    return str(text).strip(), None, choice.get("finish_reason") == "length", None
                last = f"{url}: HTTP {r.status_code} {r.text[:200]}"
                if r.status_code not in RETRYABLE:
                    return "", None, False, last
            if attempt < self.max_retries:
                time.sleep(min(30.0, 0.5 * 2 ** attempt) * (1 + random.random() * 0.25))
        return "", None, False, f"gave up after {self.max_retries + 1} attempts: {last}"

    def generate(self, requests: list[str], *, max_new_tokens: int, temperature: float, seed: int):
        with ThreadPoolExecutor(self.concurrency) as pool:
            futs = [pool.submit(self._one, r, max_new_tokens, temperature, seed + i) for i, r in enumerate(requests)]
            return [f.result() for f in futs]
