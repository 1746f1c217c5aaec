"""The reference-guided LLM judge ("Llama score"): an OpenAI-compatible chat model grades each
answer against its reference on 1-10.

Use::

    client = judge_client(LLMConfig(base_url=..., model=..., api_key_env=..., concurrency=...),
                          cache_path=run_dir / "judge_cache.jsonl")
    judged = judge_records(records, client)            # one dict per record, in order
    results["judge"] = judge_summary(judged, client)   # JSON-ready, with the judge model id

Parsing is strict: a reply must hold exactly one ``[[N]]`` and N must be an integer from 1 to 10
(``Rating:`` in front of it and text after it are not required). Several bracketed ratings count as
unparsed even when they agree, because a judge that changes its mind mid-reply has no single
answer. An unparsed reply gets one repair turn in the same conversation asking only for the
rating; if that is unparsed too the record is a parse failure with no score. A request that still
fails after the client's retries is a request failure with no score; it is not cached, so the next
run asks again. Every judgement and repair is cached by (judge model, prompt version and hash,
messages, sampling parameters), so a rerun asks nothing that was answered.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from pathlib import Path

from common.llm import ChatCache, LLMClient, LLMConfig

JUDGE_PROMPT_VERSION = "judge-v1"

SYSTEM_PROMPT = """\
You are an expert radiologist grading answers to questions about chest X-rays. A question may \
compare the patient's current study with a prior study. You are given the question, a reference \
answer written from the radiology reports, and a model's answer. Grade the model's answer against \
the reference answer; the reference is the truth even if you would have answered differently.

Check against the reference:
- findings: every finding in the reference is stated, and no finding is added that the reference \
does not support;
- laterality: left, right and bilateral agree;
- severity: levels such as small, mild, moderate and severe agree;
- temporal change: what is new, resolved, improved, worsened or unchanged since the prior study \
agrees.
A missed or contradicted finding, the wrong side or the wrong direction of change is a serious error. \
Do not reward length: detail the reference does not support earns nothing, and an invented finding \
is an error. A short answer that states everything in the reference deserves full marks.

Scale: 1-2 wrong or irrelevant; 3-4 major errors; 5-6 partly correct; 7-8 correct with minor \
omissions or imprecision; 9-10 equivalent to the reference.

Explain your grade in at most three sentences, then end with the rating, an integer from 1 to 10, \
on its own line in exactly this format: Rating: [[N]]"""

USER_TEMPLATE = """\
[Question]
{question}

[Reference answer]
{reference}

[Model answer]
{prediction}"""

REPAIR_PROMPT = """\
Your reply did not end with exactly one rating in the required format. Reply with only your rating \
of the model's answer, an integer from 1 to 10, in exactly this format: Rating: [[N]]"""

PROMPT_SHA256 = hashlib.sha256("\n".join([SYSTEM_PROMPT, USER_TEMPLATE, REPAIR_PROMPT]).encode()).hexdigest()
# The cache's prompt version carries the hash too, so editing the wording without bumping the
# version still gets fresh judgements instead of the old prompt's cached ones.
CACHE_PROMPT_VERSION = f"{JUDGE_PROMPT_VERSION}+{PROMPT_SHA256[:12]}"

_BRACKETED = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_ONE_TO_TEN = re.compile(r"10|[1-9]")


def parse_rating(reply: str) -> int | None:
    """The N of the reply's one ``[[N]]`` if 1 <= N <= 10, else None (none, several, out of range,
    not an integer)."""
    bracketed = _BRACKETED.findall(reply)
    if len(bracketed) != 1 or not _ONE_TO_TEN.fullmatch(bracketed[0]):
        return None
    return int(bracketed[0])


def judge_messages(record: dict) -> list[dict[str, str]]:
    """The judge's conversation for a prediction record (fields question, reference, prediction)."""
    user = USER_TEMPLATE.format(question=record["question"], reference=record["reference"],
                                prediction=record["prediction"])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def judge_client(config: LLMConfig, cache_path: str | Path) -> LLMClient:
    """A client whose cache keys carry the judge's prompt version and hash and the sampling parameters."""
    return LLMClient(config, ChatCache(cache_path), CACHE_PROMPT_VERSION, key_sampling=True)


def _judgement(reply: str | None, repair: str | None) -> dict:
    """A repair is None when it was not asked (no reply, or a parsed one) or its request failed."""
    replies = [text for text in (reply, repair) if text is not None]
    rating = parse_rating(reply) if reply is not None else None
    if rating is not None:
        outcome = "parsed"
    elif repair is None:  # the judgement or its repair never came back
        outcome = "request_failed"
    else:
        rating = parse_rating(repair)
        outcome = "unparsed" if rating is None else "repaired"
    return {"judge_score": None if rating is None else float(rating), "judge_parsed": int(rating is not None),
            "judge_outcome": outcome, "judge_replies": replies}


def judge_records(records: list[dict], client: LLMClient) -> list[dict]:
    """One judgement per prediction record, in order:
    ``{"judge_score": float | None, "judge_parsed": 0 | 1,
       "judge_outcome": "parsed" | "repaired" | "unparsed" | "request_failed",
       "judge_replies": [the judgement, the repair reply if one was asked]}``.
    The score is None unless parsed; merge with ``record | judgement``. ``client`` comes from
    `judge_client`."""
    if client.prompt_version != CACHE_PROMPT_VERSION or not client.key_sampling:
        raise ValueError("judge_records needs a client from evaluation.judge.judge_client, whose cache keys carry "
                         "the judge prompt's version and the sampling parameters")
    conversations = [judge_messages(record) for record in records]
    replies = client.complete(conversations, "judge", failures_as_none=True)
    repairs = {
        index: conversation + [{"role": "assistant", "content": reply}, {"role": "user", "content": REPAIR_PROMPT}]
        for index, (conversation, reply) in enumerate(zip(conversations, replies))
        if reply is not None and parse_rating(reply) is None
    }
    repaired = dict(zip(repairs, client.complete(list(repairs.values()), "judge repair", failures_as_none=True)))
    return [_judgement(reply, repaired.get(index)) for index, reply in enumerate(replies)]


def judge_summary(judgements: list[dict], client: LLMClient) -> dict:
    """For results.json: the judge's identity and the mean score over parsed items (None if none
    parsed), with the counts of parsed, repaired, unparsed and failed requests. Scores from a
    different judge model are not comparable (the paper's judge is Llama-3.1-405B)."""
    scores = [judgement["judge_score"] for judgement in judgements if judgement["judge_parsed"]]
    outcomes = Counter(judgement["judge_outcome"] for judgement in judgements)
    return {
        "model": client.config.model,
        "prompt_version": JUDGE_PROMPT_VERSION,
        "prompt_sha256": PROMPT_SHA256,
        "sampling": client.sampling,
        "mean": math.fsum(scores) / len(scores) if scores else None,
        "n": len(judgements),
        "n_parsed": len(scores),
        "n_repaired": outcomes["repaired"],
        "n_parse_failures": outcomes["unparsed"],
        "n_request_failures": outcomes["request_failed"],
    }
