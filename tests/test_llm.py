"""The data-building LLM client against a small OpenAI-compatible server on loopback."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from datamodules.build import main as build
from common.llm import ChatCache, LLMClient, LLMConfig


# How long a held request waits at most: only a broken client (one that never sends the awaited requests)
# or a test that never releases reaches it.
HOLD_LIMIT_S = 30


class FakeEndpoint:
    """Answers /v1/chat/completions with ``answer(messages)`` (by default the upper-cased last user
    message); can fail the first calls with ``status``. Event-driven, never timed: ``gather=n`` holds the
    first requests until n are in flight at once (then lets every request through), and a request waits
    while ``answering`` is cleared (``hold=True`` starts it cleared; the test sets it)."""

    def __init__(self, failures: int = 0, answer=None, status: int = 503, gather: int = 0, hold: bool = False):
        self.requests, self.failures, self.status, self.gather = [], failures, status, gather
        self.answer = answer or (lambda messages: messages[-1]["content"].upper())
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Condition()
        self.answering = threading.Event()
        if not hold:
            self.answering.set()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                """Keeps the test output free of one access-log line per request."""

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                    fail = endpoint.failures > 0
                    endpoint.failures -= fail
                    endpoint.lock.notify_all()
                    if not endpoint.lock.wait_for(lambda: endpoint.max_in_flight >= endpoint.gather, timeout=HOLD_LIMIT_S):
                        endpoint.gather = 0  # never gathered: hold no later request
                endpoint.answering.wait(HOLD_LIMIT_S)
                with endpoint.lock:
                    endpoint.in_flight -= 1
                if fail:
                    self.send_response(endpoint.status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "busy"}}')
                    return
                answer = endpoint.answer(body["messages"])
                payload = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}],
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def build_twice(command: str, world, out, monkeypatch) -> tuple[int, FakeEndpoint]:
    """Runs ``python -m datamodules.build <command> --backend llm`` on the world's test split twice
    against a fresh loopback endpoint; returns the requests of the first build and the endpoint."""
    monkeypatch.setenv("LUMEN_TEST_KEY", "k")
    server = FakeEndpoint()
    args = [command, "--diffvqa", str(world / "medical-diff-vqa"), "--out", str(out), "--splits", "test",
            "--backend", "llm", "--base-url", server.url, "--model", "llama", "--api-key-env", "LUMEN_TEST_KEY"]
    try:
        build(args)
        asked = len(server.requests)
        build(args)
    finally:
        server.close()
    return asked, server


@pytest.fixture
def endpoint():
    server = FakeEndpoint()
    yield server
    server.close()


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"answer {i}"}] for i in range(n)]


def client(url, cache_path, monkeypatch, **options) -> LLMClient:
    monkeypatch.setenv("LUMEN_TEST_KEY", "secret-key")
    config = LLMConfig(base_url=url, model="llama-3.2-11b", api_key_env="LUMEN_TEST_KEY", **options)
    return LLMClient(config, ChatCache(cache_path), prompt_version="v1")


def test_answers_come_back_in_order_greedy_and_with_the_key_from_the_environment(endpoint, tmp_path, monkeypatch):
    answers = client(endpoint.url, tmp_path / "cache.jsonl", monkeypatch).complete(conversations(5))
    assert answers == [f"ANSWER {i}" for i in range(5)]
    assert all(r["body"]["temperature"] == 0.0 and r["body"]["model"] == "llama-3.2-11b" for r in endpoint.requests)
    assert {r["auth"] for r in endpoint.requests} == {"Bearer secret-key"}
    assert "secret-key" not in (tmp_path / "cache.jsonl").read_text()


def test_a_second_run_is_answered_from_the_cache(endpoint, tmp_path, monkeypatch):
    client(endpoint.url, tmp_path / "cache.jsonl", monkeypatch).complete(conversations(4))
    again = client(endpoint.url, tmp_path / "cache.jsonl", monkeypatch).complete(conversations(6))
    assert again == [f"ANSWER {i}" for i in range(6)]
    assert len(endpoint.requests) == 6  # 4, then only the 2 new ones


def test_the_cache_key_includes_model_and_prompt_version(endpoint, tmp_path, monkeypatch):
    client(endpoint.url, tmp_path / "cache.jsonl", monkeypatch).complete(conversations(2))
    other = client(endpoint.url, tmp_path / "cache.jsonl", monkeypatch)
    other.prompt_version = "v2"
    other.complete(conversations(2))
    assert len(endpoint.requests) == 4


def test_an_interrupted_cache_resumes_and_skips_its_torn_line(endpoint, tmp_path, monkeypatch):
    path = tmp_path / "cache.jsonl"
    client(endpoint.url, path, monkeypatch).complete(conversations(3))
    path.write_text(path.read_text() + '{"key": "abc", "answ')  # the process died mid-write
    cache = ChatCache(path)
    assert cache.torn_lines == 1 and len(cache.answers) == 3


def test_server_errors_are_retried_with_backoff(tmp_path, monkeypatch):
    server = FakeEndpoint(failures=2)
    try:
        answers = client(server.url, tmp_path / "cache.jsonl", monkeypatch, max_retries=3).complete(conversations(1))
    finally:
        server.close()
    assert answers == ["ANSWER 0"] and len(server.requests) == 3


def test_retries_are_bounded(tmp_path, monkeypatch):
    import openai

    server = FakeEndpoint(failures=10)
    try:
        with pytest.raises(openai.APIStatusError):
            client(server.url, tmp_path / "cache.jsonl", monkeypatch, max_retries=1).complete(conversations(1))
    finally:
        server.close()
    assert len(server.requests) == 2


def test_concurrency_is_bounded(tmp_path, monkeypatch):
    """The first requests are held until three are in flight together: a client that asks one at a time
    never gets an answer (its first request waits out the hold limit) and one that asks more than three
    at once has the rest arrive while those three wait."""
    server = FakeEndpoint(gather=3)
    try:
        client(server.url, tmp_path / "cache.jsonl", monkeypatch, concurrency=3).complete(conversations(12))
    finally:
        server.close()
    assert server.max_in_flight == 3 and len(server.requests) == 12


def test_a_missing_api_key_variable_is_a_clear_error(endpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("LUMEN_ABSENT_KEY", raising=False)
    config = LLMConfig(base_url=endpoint.url, model="m", api_key_env="LUMEN_ABSENT_KEY")
    with pytest.raises(KeyError, match="environment variable LUMEN_ABSENT_KEY is not set"):
        LLMClient(config, ChatCache(tmp_path / "c.jsonl"), "v1").complete(conversations(1))


def test_sampling_parameters_join_the_key_only_when_asked_so_earlier_caches_still_answer(endpoint, tmp_path,
                                                                                         monkeypatch):
    path = tmp_path / "cache.jsonl"
    client(endpoint.url, path, monkeypatch).complete(conversations(2))
    client(endpoint.url, path, monkeypatch, max_tokens=64).complete(conversations(2))
    assert len(endpoint.requests) == 2
    keyed = client(endpoint.url, path, monkeypatch, max_tokens=64)
    keyed.key_sampling = True
    keyed.complete(conversations(2))
    keyed.complete(conversations(2))
    assert len(endpoint.requests) == 4
    assert {r["body"]["max_tokens"] for r in endpoint.requests[2:]} == {64}
    assert json.loads(path.read_text().splitlines()[-1])["sampling"] == {"temperature": 0.0, "max_tokens": 64}


def test_a_request_failing_after_its_retries_can_be_a_none_that_is_asked_again_next_run(tmp_path, monkeypatch):
    server = FakeEndpoint(failures=2, status=429)
    path = tmp_path / "cache.jsonl"
    try:
        first = client(server.url, path, monkeypatch, max_retries=1, concurrency=1).complete(
            conversations(2), failures_as_none=True)
        second = client(server.url, path, monkeypatch, max_retries=1).complete(conversations(2), failures_as_none=True)
    finally:
        server.close()
    assert first == [None, "ANSWER 1"] and second == ["ANSWER 0", "ANSWER 1"]
    assert len(server.requests) == 2 + 1 + 1  # a try and a retry, the other, then the failed one again


def test_errors_that_are_not_transient_raise_even_with_failures_as_none(tmp_path, monkeypatch):
    import openai

    server = FakeEndpoint(failures=1, status=401)
    try:
        with pytest.raises(openai.AuthenticationError):
            client(server.url, tmp_path / "cache.jsonl", monkeypatch).complete(conversations(1), failures_as_none=True)
    finally:
        server.close()
