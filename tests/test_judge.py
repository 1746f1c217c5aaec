"""The reference-guided LLM judge against a small OpenAI-compatible server on loopback."""

import json
import logging

import pytest

from common.llm import ChatCache, LLMClient, LLMConfig
from evaluation.judge import (JUDGE_PROMPT_VERSION, PROMPT_SHA256, REPAIR_PROMPT, SYSTEM_PROMPT, judge_client,
                              judge_messages, judge_records, judge_summary, parse_rating)
from tests.test_llm import FakeEndpoint

KEY = "judge-secret-key"

# What the fake judge replies to each model answer: the judgement, then the reply to the repair turn.
SCRIPT = {
    "small left effusion": ["Same finding and side as the reference.\nRating: [[7]]", "unused"],
    "an effusion": ["The side is missing. I would give it six.", "Rating: [[6]]"],
    "no effusion": ["Contradicts the reference.", "It is wrong."],
    "right effusion": ["Wrong side. Rating: [[3]] ... on reflection Rating: [[4]]", "Rating: [[4]]"],
    "effusion, left, small, stable": ["Rating: [[11]]", "Rating: [[11]]"],
}


def script(messages: list[dict]) -> str:
    prediction = messages[1]["content"].split("[Model answer]\n")[1]
    return SCRIPT[prediction][(len(messages) - 2) // 2]


def records(*predictions: str) -> list[dict]:
    return [{"sample_id": f"s{i}", "question": "Is there a pleural effusion?", "reference": "yes, small left effusion",
             "prediction": prediction} for i, prediction in enumerate(predictions)]


@pytest.fixture
def endpoint():
    server = FakeEndpoint(answer=script)
    yield server
    server.close()


def client(url, tmp_path, monkeypatch, **options) -> LLMClient:
    monkeypatch.setenv("LUMEN_JUDGE_KEY", KEY)
    config = LLMConfig(base_url=url, model="llama-3.1-8b-judge", api_key_env="LUMEN_JUDGE_KEY", **options)
    return judge_client(config, tmp_path / "judge_cache.jsonl")


@pytest.mark.parametrize("reply, rating", [
    ("Correct.\nRating: [[7]]", 7), ("[[10]]", 10), ("Rating: [[1]].", 1), ("Rating:[[7]]\nThat is all.", 7),
    ("Rating: [[3]] ... Rating: [[7]]", None), ("Rating: [[7]]\nRating: [[7]]", None),
    ("Rating: [[0]]", None), ("Rating: [[11]]", None), ("Rating: [[7.5]]", None), ("Rating: [[ 7]]", None),
    ("Rating: [[07]]", None), ("Rating: [[seven]]", None), ("Rating: 7", None), ("Rating: [7]", None), ("", None),
])
def test_a_rating_is_exactly_one_bracketed_integer_from_1_to_10(reply, rating):
    assert parse_rating(reply) == rating


def test_a_good_judgement_gives_its_score_from_one_greedy_request(endpoint, tmp_path, monkeypatch):
    [judgement] = judge_records(records("small left effusion"), client(endpoint.url, tmp_path, monkeypatch))
    assert judgement == {"judge_score": 7.0, "judge_parsed": 1, "judge_outcome": "parsed",
                         "judge_replies": [SCRIPT["small left effusion"][0]]}
    [request] = endpoint.requests
    assert request["body"]["temperature"] == 0.0
    system, user = request["body"]["messages"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["content"] == ("[Question]\nIs there a pleural effusion?\n\n[Reference answer]\nyes, small left "
                               "effusion\n\n[Model answer]\nsmall left effusion")


def test_a_malformed_judgement_is_fixed_by_one_repair_turn_in_the_same_conversation(endpoint, tmp_path, monkeypatch):
    [judgement] = judge_records(records("an effusion"), client(endpoint.url, tmp_path, monkeypatch))
    assert judgement == {"judge_score": 6.0, "judge_parsed": 1, "judge_outcome": "repaired",
                         "judge_replies": SCRIPT["an effusion"]}
    first, repair = (request["body"]["messages"] for request in endpoint.requests)
    assert repair == first + [{"role": "assistant", "content": SCRIPT["an effusion"][0]},
                              {"role": "user", "content": REPAIR_PROMPT}]


def test_malformed_twice_is_a_parse_failure_without_a_score(endpoint, tmp_path, monkeypatch):
    [judgement] = judge_records(records("no effusion"), client(endpoint.url, tmp_path, monkeypatch))
    assert judgement["judge_score"] is None and judgement["judge_parsed"] == 0
    assert judgement["judge_outcome"] == "unparsed" and len(endpoint.requests) == 2  # one repair only


def test_several_ratings_are_unparsed_and_repaired(endpoint, tmp_path, monkeypatch):
    [judgement] = judge_records(records("right effusion"), client(endpoint.url, tmp_path, monkeypatch))
    assert judgement["judge_score"] == 4.0 and judgement["judge_outcome"] == "repaired"


def test_an_out_of_range_rating_is_never_clamped(endpoint, tmp_path, monkeypatch):
    [judgement] = judge_records(records("effusion, left, small, stable"), client(endpoint.url, tmp_path, monkeypatch))
    assert judgement["judge_score"] is None and judgement["judge_outcome"] == "unparsed"


def test_the_summary_averages_parsed_items_and_counts_each_failure(endpoint, tmp_path, monkeypatch):
    judge = client(endpoint.url, tmp_path, monkeypatch)
    judgements = judge_records(records("small left effusion", "an effusion", "no effusion"), judge)
    assert judge_summary(judgements, judge) == {
        "model": "llama-3.1-8b-judge", "prompt_version": JUDGE_PROMPT_VERSION, "prompt_sha256": PROMPT_SHA256,
        "sampling": {"temperature": 0.0, "max_tokens": 256}, "mean": 6.5, "n": 3, "n_parsed": 2, "n_repaired": 1,
        "n_parse_failures": 1, "n_request_failures": 0,
    }
    assert judge_summary([judgements[2]], judge)["mean"] is None  # no default score when nothing parsed


def test_a_timeout_is_a_request_failure_for_that_sample_and_is_asked_again_next_run(tmp_path, monkeypatch):
    server = FakeEndpoint(answer=script, hold=True)  # no answer until the first run has given up
    try:
        [failed] = judge_records(records("small left effusion"),
                                 client(server.url, tmp_path, monkeypatch, timeout_s=0.2, max_retries=1))
        assert not (tmp_path / "judge_cache.jsonl").exists()
        server.answering.set()
        [judged] = judge_records(records("small left effusion"), client(server.url, tmp_path, monkeypatch))
    finally:
        server.close()
    assert failed == {"judge_score": None, "judge_parsed": 0, "judge_outcome": "request_failed", "judge_replies": []}
    assert judged["judge_score"] == 7.0 and len(server.requests) == 2 + 1


def test_a_rate_limit_is_retried_with_backoff(tmp_path, monkeypatch):
    server = FakeEndpoint(answer=script, failures=1, status=429)
    try:
        [judgement] = judge_records(records("small left effusion"), client(server.url, tmp_path, monkeypatch,
                                                                           max_retries=2))
    finally:
        server.close()
    assert judgement["judge_score"] == 7.0 and len(server.requests) == 2


def test_a_failed_repair_keeps_the_cached_judgement_and_asks_only_the_repair_again(tmp_path, monkeypatch):
    server = FakeEndpoint(answer=script)
    try:
        judge = client(server.url, tmp_path, monkeypatch, max_retries=0)
        judge.complete([judge_messages(records("an effusion")[0])])  # the judgement arrives
        server.failures, server.status = 1, 503  # then the repair fails
        [failed] = judge_records(records("an effusion"), judge)
        [repaired] = judge_records(records("an effusion"), client(server.url, tmp_path, monkeypatch))
    finally:
        server.close()
    assert failed["judge_outcome"] == "request_failed" and failed["judge_replies"] == [SCRIPT["an effusion"][0]]
    assert repaired["judge_score"] == 6.0 and len(server.requests) == 1 + 1 + 1


def test_a_second_run_asks_nothing_and_gives_the_same_judgements(endpoint, tmp_path, monkeypatch):
    predictions = list(SCRIPT)
    first = judge_records(records(*predictions), client(endpoint.url, tmp_path, monkeypatch))
    asked = len(endpoint.requests)
    again = judge_records(records(*predictions), client(endpoint.url, tmp_path, monkeypatch))
    assert again == first and len(endpoint.requests) == asked == 9  # 5 judgements, 4 repairs


def test_the_cache_records_the_prompt_version_and_sampling_but_never_the_api_key(endpoint, tmp_path, monkeypatch,
                                                                                 caplog, capsys):
    caplog.set_level(logging.DEBUG)
    judge_records(records(*SCRIPT), client(endpoint.url, tmp_path, monkeypatch))
    assert {r["auth"] for r in endpoint.requests} == {f"Bearer {KEY}"}
    cache = (tmp_path / "judge_cache.jsonl").read_text()
    entries = [json.loads(line) for line in cache.splitlines()]
    assert {entry["prompt_version"] for entry in entries} == {f"{JUDGE_PROMPT_VERSION}+{PROMPT_SHA256[:12]}"}
    assert {json.dumps(entry["sampling"]) for entry in entries} == {'{"temperature": 0.0, "max_tokens": 256}'}
    captured = capsys.readouterr()
    assert KEY not in cache + caplog.text + captured.out + captured.err


def test_a_client_not_built_for_the_judge_is_refused(endpoint, tmp_path):
    plain = LLMClient(LLMConfig(base_url=endpoint.url, model="m"), ChatCache(tmp_path / "c.jsonl"), "v1")
    with pytest.raises(ValueError, match="judge_client"):
        judge_records(records("small left effusion"), plain)
