"""An OpenAI-compatible chat client (the data builders and the LLM judge use it): any endpoint (e.g. vLLM serving
Llama-3.2-11B-Vision-Instruct on this machine), greedy, with a resumable cache.

- temperature 0; bounded retries with exponential backoff (the ``openai`` client's own, for
  connection errors, 408/409/429 and 5xx); at most ``concurrency`` requests in flight;
- the API key is read from the environment variable ``api_key_env`` and never logged or cached;
- every answer is appended to a JSONL cache keyed by (model, prompt version, messages) as soon as it
  arrives, so an interrupted build resumes without asking again or losing work; with
  ``key_sampling`` the sampling parameters (temperature, max_tokens) join the key;
- with ``failures_as_none`` a request that still fails after its retries (timeout, connection
  error, 408/409/429, 5xx) gives ``None`` for that conversation instead of stopping the run; it is
  not cached, so the next run asks again. Other errors (a wrong key or model) still raise.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class LLMConfig:
    base_url: str  # e.g. http://localhost:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_tokens: int = 256
    max_retries: int = 5
    concurrency: int = 8
    timeout_s: float = 120.0


class ChatCache:
    """Append-only JSONL of answers. A torn last line (an interrupted write) is skipped and counted."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.answers: dict[str, str] = {}
        self.torn_lines = 0
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.answers[entry["key"]] = entry["answer"]
                except (json.JSONDecodeError, KeyError):
                    self.torn_lines += 1
        if self.torn_lines:
            log.warning("%s: skipped %d unreadable line(s) (an interrupted write)", self.path, self.torn_lines)

    @staticmethod
    def key(model: str, prompt_version: str, messages: Messages, sampling: dict | None = None) -> str:
        # Without sampling the payload is the original one, so caches written before it still answer.
        parts = [model, prompt_version, messages] + ([sampling] if sampling is not None else [])
        payload = json.dumps(parts, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def add(self, key: str, model: str, prompt_version: str, answer: str, sampling: dict | None = None) -> None:
        self.answers[key] = answer
        entry = {"key": key, "model": model, "prompt_version": prompt_version,
                 **({"sampling": sampling} if sampling is not None else {}), "answer": answer}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _transient(error: Exception) -> bool:
    """The failures the openai client retries: timeouts, connection errors, 408/409/429 and 5xx."""
    import openai

    if isinstance(error, openai.APIConnectionError):  # timeouts included
        return True
    return isinstance(error, openai.APIStatusError) and (error.status_code in (408, 409, 429)
                                                         or error.status_code >= 500)


class LLMClient:
    def __init__(self, config: LLMConfig, cache: ChatCache, prompt_version: str, key_sampling: bool = False):
        self.config, self.cache, self.prompt_version = config, cache, prompt_version
        self.sampling = {"temperature": 0.0, "max_tokens": config.max_tokens}
        # Off for the data builds, whose caches were keyed without sampling parameters.
        self.key_sampling = key_sampling

    def _api_key(self) -> str:
        key = os.environ.get(self.config.api_key_env)
        if key is None:
            raise KeyError(
                f"environment variable {self.config.api_key_env} is not set: export it with the endpoint's API key "
                "(any non-empty value for a local vLLM server)"
            )
        return key

    def complete(self, conversations: Sequence[Messages], description: str = "LLM",
                 failures_as_none: bool = False) -> list[str | None]:
        """The answer to each conversation, in order: cached ones at once, the rest from the endpoint.

        An answer is ``None`` only with ``failures_as_none``, where its request still failed after
        the retries; otherwise that failure raises.
        """
        sampling = self.sampling if self.key_sampling else None
        keys = [ChatCache.key(self.config.model, self.prompt_version, messages, sampling)
                for messages in conversations]
        todo = {key: messages for key, messages in zip(keys, conversations) if key not in self.cache.answers}
        if todo:
            asyncio.run(self._ask_all(todo, description, failures_as_none))
        return [self.cache.answers.get(key) for key in keys]

    async def _ask_all(self, todo: dict[str, Messages], description: str, failures_as_none: bool) -> None:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=self.config.base_url, api_key=self._api_key(),
                             max_retries=self.config.max_retries, timeout=self.config.timeout_s)
        slots = asyncio.Semaphore(self.config.concurrency)
        progress = tqdm(total=len(todo), desc=description, unit="request")

        async def ask(key: str, messages: Messages) -> None:
            try:
                async with slots:
                    response = await client.chat.completions.create(
                        model=self.config.model, messages=messages, **self.sampling)
            except Exception as error:
                if not (failures_as_none and _transient(error)):
                    raise
                log.warning("%s: a request failed after %d retries (%s); it is not cached and is asked again "
                            "on the next run", description, self.config.max_retries, type(error).__name__)
            else:
                self.cache.add(key, self.config.model, self.prompt_version, response.choices[0].message.content or "",
                               self.sampling if self.key_sampling else None)
            progress.update()

        try:
            await asyncio.gather(*(ask(key, messages) for key, messages in todo.items()))
        finally:
            progress.close()
            await client.close()
