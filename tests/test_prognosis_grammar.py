import pytest

from common.prognosis_grammar import Expectation, describe, parse_prognosis

EVERY_COURSE = [
    Expectation("pleural effusion", "increase", "moderate to large", "mild to moderate"),
    Expectation("pneumothorax", "decrease", "small", "large"),
    Expectation("cardiomegaly", "persist", "mild"),
    Expectation("atelectasis", "persist"),
    Expectation("lung opacity", "resolve"),
    Expectation("consolidation", "develop"),
    Expectation("edema", "stay_resolved"),
    Expectation("hernia", "keep_increasing"),
    Expectation("pneumonia", "keep_decreasing"),
]


@pytest.mark.parametrize("days", [1, 2, 365])
def test_every_course_reads_back_as_written(days):
    parsed = parse_prognosis(describe(days, EVERY_COURSE))
    assert parsed.parsed and parsed.days == days and parsed.expectations == frozenset(EVERY_COURSE)
    nothing = parse_prognosis(describe(days, []))
    assert nothing.parsed and nothing.days == days and nothing.expectations == frozenset()


@pytest.mark.parametrize("text", [
    "", "In 30 days.", "In 30 days, the effusion is expected to resolve",  # no full stop
    "In 30 days, the effusion will resolve.", "The effusion is expected to resolve.",  # no horizon
    "No change is expected in 3 days. The effusion is expected to resolve.",
    "In 30 days, the effusion is expected to increase from small.",
    "In a month, the effusion is expected to resolve.",
])
def test_text_outside_the_grammar_is_unparsed_not_partly_read(text):
    parsed = parse_prognosis(text)
    assert not parsed.parsed and parsed.days is None and parsed.expectations == frozenset()
