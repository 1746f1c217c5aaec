"""Instruction enhancement: offline templates and the LLM backend, through the build command."""

import json

import pandas as pd
import pytest

from datamodules.build import main
from datamodules.enhance import template_answer
from tests.test_llm import build_twice


@pytest.mark.parametrize(("question_type", "question", "answer", "expected"), [
    ("presence", "is there evidence of pleural effusion in this image?", "yes",
     "Yes, there is evidence of pleural effusion in this image."),
    ("presence", "is there pneumothorax?", "no", "No, there is no pneumothorax."),
    ("presence", "is the pleural effusion bilateral?", "no", "No, the pleural effusion is not bilateral."),
    ("view", "is this AP view?", "yes", "Yes, this is an AP view."),
    ("view", "which view is this image taken?", "PA view", "This image is taken in the PA view."),
    ("abnormality", "what abnormalities are seen in the left lung?", "atelectasis", "The left lung shows atelectasis."),
    ("abnormality", "is there evidence of any abnormalities in this image?", "no",
     "No, there is no evidence of any abnormality in this image."),
    ("location", "where in the image is the pleural effusion located?", "left costophrenic angle area",
     "The pleural effusion is located in the left costophrenic angle area."),
    ("location", "where is the atelectasis?", "the lung bases", "The atelectasis is located in the lung bases."),
    ("location", "where is the consolidation?", "the left apical area",
     "The consolidation is located in the left apical area."),
    ("location", "is the pleural effusion located on the left side or right side?", "left side",
     "The pleural effusion is located on the left side."),
    ("level", "what level is the cardiomegaly?", "moderate", "The cardiomegaly is moderate."),
    ("type", "what type is the opacity?", "patchy", "The opacity is patchy."),
    ("difference", "what has changed compared to the reference image?",
     "the main image has an additional finding of edema than the reference image. ",
     "The main image has an additional finding of edema than the reference image."),
])
def test_templates_restate_the_short_answer_with_the_question_words(question_type, question, answer, expected):
    assert template_answer(question_type, question, answer) == expected


def test_template_build_covers_every_row_and_keeps_the_short_answer(world, tmp_path, capsys):
    out = tmp_path / "enhanced.jsonl"
    main(["enhance", "--diffvqa", str(world / "medical-diff-vqa"), "--out", str(out), "--splits", "val"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    questions = pd.read_csv(world / "medical-diff-vqa" / "mimic_pair_questions.csv")
    val_rows = questions.index[questions["split"] == "val"].tolist()
    assert [r["row"] for r in records] == val_rows
    for record in records:
        source = questions.loc[record["row"]]
        assert record["sample_id"] == f"diffvqa-{record['row']}"
        assert record["short_answer"] == str(source.answer).strip()
        assert record["answer"][0].isupper() and record["answer"].endswith(".")
        assert record["backend"] == "template" and record["model"] is None
    assert f"{len(records)} answers enhanced (template)" in capsys.readouterr().out


def test_llm_build_asks_once_per_distinct_question_and_resumes_from_its_cache(world, tmp_path, monkeypatch):
    out = tmp_path / "enhanced.jsonl"
    asked, server = build_twice("enhance", world, out, monkeypatch)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    distinct = {(r["question"], r["short_answer"]) for r in records}
    assert asked == len(distinct) == len(server.requests)  # repeats and the second build came from the cache
    first = records[0]
    assert first["answer"] == f"QUESTION: {first['question']}\nSHORT ANSWER: {first['short_answer']}".upper().strip()
    assert first["model"] == "llama" and first["prompt_version"] == "enhance-v1"
    assert server.requests[0]["body"]["messages"][0]["role"] == "system"
