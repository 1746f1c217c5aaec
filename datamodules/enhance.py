"""Instruction enhancement: each short Medical-Diff-VQA answer rewritten as a full sentence with the
same meaning (the LUMEN paper did this with Llama-3.2-11B-Vision-Instruct).

Two backends: ``llm`` (any OpenAI-compatible endpoint, through ``common.llm``) and ``template``
(offline rules per question type, so the pipeline runs without any LLM). The output is JSONL, one
object per question row:

    {"sample_id": "diffvqa-<row>", "row": <row>, "question_type": ..., "question": ...,
     "short_answer": <the dataset's answer, stripped>, "answer": <the full sentence>,
     "backend": "template" | "llm", "model": <LLM or null>, "prompt_version": ...}

The short answer is kept beside the long one: metrics score the short one.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.llm import LLMClient
from common.readers import InputError, Problems, read_csv, read_jsonl, raise_or_record

PROMPT_VERSION = "enhance-v1"
TEMPLATE_VERSION = "template-v1"
SYSTEM_PROMPT = (
    "You rewrite short answers to questions about a chest X-ray into one complete, fluent sentence. "
    "Keep exactly the meaning of the short answer: add no finding, location, level or certainty that "
    "it does not state, and drop nothing it states. Reply with the sentence only."
)


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def _yes_no(question: str, yes: bool) -> str | None:
    """A yes/no answer restated from the question's own words, or None when the question is not one
    of the dataset's yes/no templates."""
    patterns = [
        (r"is there evidence of any abnormalities in this image\?",
         "there is evidence of abnormalities in this image", "there is no evidence of any abnormality in this image"),
        (r"is there (evidence of .+?)\?", r"there is \1", r"there is no \1"),
        (r"is the (.+?) bilateral\?", r"the \1 is bilateral", r"the \1 is not bilateral"),
        (r"is this PA view\?", "this is a PA view", "this is not a PA view"),
        (r"is this AP view\?", "this is an AP view", "this is not an AP view"),
        (r"is there (.+?)\?", r"there is \1", r"there is no \1"),
    ]
    for pattern, positive, negative in patterns:
        match = re.fullmatch(pattern, question.strip(), flags=re.IGNORECASE)
        if match:
            return _sentence(("Yes, " if yes else "No, ") + match.expand(positive if yes else negative))
    return None


def template_answer(question_type: str, question: str, answer: str) -> str:
    """The offline rewrite: the short answer placed in a sentence built from the question."""
    short = answer.strip()
    if short.lower() in ("yes", "no"):
        restated = _yes_no(question, short.lower() == "yes")
        if restated:
            return restated
        return _sentence(short)
    subject = re.fullmatch(
        r"(?:what (?:level|type) is|where (?:in the image )?is|is) the (.+?)(?: located)?(?: on the left side or right side)?\?",
        question.strip(), flags=re.IGNORECASE,
    )
    region = re.fullmatch(r"what abnormalities are seen in the (.+?)\?", question.strip(), flags=re.IGNORECASE)
    if question_type == "view":
        return _sentence(f"this image is taken in the {short}")
    if question_type == "abnormality":
        return _sentence(f"the {region.group(1) if region else 'image'} shows {short}")
    if question_type == "location" and subject:
        # A side is "on the left side"; an area ("left area") or a place the dataset names with its
        # article ("the lung bases") is "in" it.
        if short.startswith("the "):
            return _sentence(f"the {subject.group(1)} is located in {short}")
        return _sentence(f"the {subject.group(1)} is located in the {short}" if short.endswith("area")
                         else f"the {subject.group(1)} is located on the {short}")
    if question_type in ("level", "type") and subject:
        return _sentence(f"the {subject.group(1)} is {short}")
    # difference answers are already sentences (lower case): capitalise each one.
    return " ".join(_sentence(part) for part in re.split(r"(?<=\.)\s+", short) if part)


def enhance(questions_csv: str | Path, backend: str, client: LLMClient | None = None,
            splits: tuple[str, ...] = ("train", "val", "test")) -> list[dict]:
    """One record per question row of the given splits (see the module docstring)."""
    if backend not in ("template", "llm"):
        raise ValueError(f"backend={backend!r}: expected 'template' or 'llm'")
    if backend == "llm" and client is None:
        raise ValueError("backend='llm' needs an LLMClient")
    table = read_csv(questions_csv, ["question_type", "question", "answer", "split"],
                     "Medical-Diff-VQA's mimic_pair_questions.csv").frame
    rows = [(row, q) for row, q in enumerate(table.itertuples(index=False)) if q.split in splits]
    shorts = [str(q.answer).strip() for _, q in rows]
    if backend == "llm":
        conversations = [
            [{"role": "system", "content": SYSTEM_PROMPT},
             {"role": "user", "content": f"Question: {q.question}\nShort answer: {short}"}]
            for (_, q), short in zip(rows, shorts)
        ]
        longs = [text.strip() for text in client.complete(conversations, description="enhance")]
        model, version = client.config.model, client.prompt_version
    else:
        longs = [template_answer(q.question_type, q.question, short) for (_, q), short in zip(rows, shorts)]
        model, version = None, TEMPLATE_VERSION
    return [
        {"sample_id": f"diffvqa-{row}", "row": row, "question_type": q.question_type, "question": q.question,
         "short_answer": short, "answer": long, "backend": backend, "model": model, "prompt_version": version}
        for (row, q), short, long in zip(rows, shorts, longs)
    ]


ENHANCED_KEYS = ("sample_id", "short_answer", "answer")


def load_enhanced(path: str | Path, problems: Problems | None = None) -> dict[str, dict]:
    """sample_id -> its record, from a JSONL of ``enhance``. A line that is not such a record, or
    repeats a sample, is an error (with ``problems``: recorded and left out)."""
    records: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for line, record in read_jsonl(path, "enhanced answers: build them with `python -m datamodules.build enhance`"):
        try:
            if isinstance(record, InputError):
                raise record
            missing = [key for key in ENHANCED_KEYS if not isinstance(record.get(key), str) or not record[key]]
            if missing:
                raise InputError(path, f"no text in field(s) {missing}", line=line, field=missing[0],
                                 fix="rebuild the file with `python -m datamodules.build enhance`",
                                 kind="missing fields")
            if record["sample_id"] in records:
                raise InputError(path, f"{record['sample_id']} repeats line {first_line[record['sample_id']]}",
                                 line=line, field="sample_id", kind="repeated sample_id")
        except InputError as error:
            raise_or_record(problems, error)
            continue
        records[record["sample_id"]] = record
        first_line[record["sample_id"]] = line
    return records
