"""The synthetic world speaks Medical-Diff-VQA's grammar: every question and answer it writes follows
one of the dataset's templates (``tests.diffvqa_templates``), with the generator's habits: a bilateral
finding asked about only when it is bilateral, one finding per place, its level words, its places,
and added findings in shuffled order."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from common import difference_grammar
from datamodules.synthetic import FINDING_BY_NAME, FINDINGS, simulate_population
from datamodules.synthetic.questions import PLACES, WHOLE_IMAGE, _pair_questions, finding_zones, key_location
from tests.diffvqa_templates import LEVELS, RECORDED_PLACES, TEMPLATES, WRITTEN_PLACES, matching_template

SEED = 0


@pytest.fixture(scope="module")
def population():
    """300 subjects' studies and question table (no images): enough rows for the rare forms."""
    studies = simulate_population(300, SEED)
    return {study.study_id: study for study in studies}, _pair_questions(studies, SEED)


def unmatched_rows(table: pd.DataFrame) -> list[tuple]:
    return [(index, row.question_type, row.question, row.answer) for index, row in enumerate(table.itertuples())
            if matching_template(row.question_type, row.question, row.answer) is None]


def test_every_row_of_a_written_world_follows_a_template_of_its_type(world):
    table = pd.read_csv(world / "medical-diff-vqa" / "mimic_pair_questions.csv")
    assert len(table) > 100
    assert unmatched_rows(table) == []


def test_every_row_of_a_large_population_follows_a_template_of_its_type(population):
    _, table = population
    assert unmatched_rows(table) == []


def test_the_world_writes_every_template(population):
    _, table = population
    used = {(row.question_type, matching_template(row.question_type, row.question, row.answer))
            for row in table.itertuples()}
    every = {(question_type, name) for question_type, templates in TEMPLATES.items() for name, _, _ in templates}
    assert used == every


def test_is_the_finding_bilateral_is_asked_only_of_a_finding_on_both_sides_and_answered_yes(population):
    studies, table = population
    rows = table[table.question.str.fullmatch(r"is the .+ bilateral\?")]
    assert len(rows) >= 5
    assert set(rows.answer) == {"yes"}
    for row in rows.itertuples():
        finding = FINDING_BY_NAME[re.fullmatch(r"is the (.+) bilateral\?", row.question)[1]]
        _, sites = studies[row.study_id].findings[finding]
        assert {site.split()[0] for site in sites} == {"left", "right"}, row


def test_what_abnormalities_are_seen_at_a_place_names_one_finding_that_is_there(population):
    studies, table = population
    rows = table[table.question.str.startswith("what abnormalities are seen in the ")]
    assert len(rows) >= 20
    for row in rows.itertuples():
        place = re.fullmatch(r"what abnormalities are seen in (.+)\?", row.question)[1]
        finding = FINDING_BY_NAME[row.answer]  # one official name, not a list
        _, sites = studies[row.study_id].findings[finding]
        assert PLACES[place] & finding_zones(finding, sites), row


def test_levels_are_words_of_the_real_level_list_in_rising_order():
    for finding in FINDINGS:
        assert set(finding.levels) <= set(LEVELS), finding.name
        # The prognostic builder ranks levels by lumen's list: the world's must be in it, least first.
        ranks = [difference_grammar.LEVELS.index(level) for level in finding.levels]
        assert ranks == sorted(ranks), finding.name


def test_no_level_answer_or_sentence_is_large_alone(population):
    _, table = population
    levels = table[table.question_type == "level"].answer
    assert set(levels) <= set(LEVELS)
    assert "moderate to large" in set(levels)
    assert not table.answer.str.contains(r"(?<!moderate to )\blarge\b").any()


def test_places_are_the_real_places_and_the_world_uses_many(population):
    _, table = population
    diagnostic = table[table.question_type.isin(["abnormality", "presence"])].question
    asked = diagnostic.str.extract(r" in (the .+)\?$")[0].dropna()
    asked = asked[~asked.str.endswith(" area") | asked.isin(PLACES)]  # not "the left lung area": location words
    answered = table[(table.question_type == "location") & table.answer.str.startswith("the ")].answer
    assert set(asked) <= set(WRITTEN_PLACES) | set(RECORDED_PLACES)
    assert set(answered) <= set(RECORDED_PLACES)
    assert {"the left lower lung", "the lung bases", "the right lung base", "the upper lungs"} <= set(answered)
    assert len(set(asked)) >= 15


def test_the_world_s_places_cover_the_zones_of_its_findings():
    for place, zones in PLACES.items():
        assert place in WRITTEN_PLACES or place in RECORDED_PLACES, place
        assert zones, place
    for finding in FINDINGS:
        for sites in ((site,) for site in finding.sites):
            _, place = key_location(finding, sites)
            if place:
                assert place in RECORDED_PLACES and PLACES[place] == finding_zones(finding, sites), (finding, sites)


def test_a_place_asked_about_is_answered_from_the_finding_s_zones(population):
    studies, table = population
    rows = table[table.question.str.fullmatch(r"is there .+ in the .+\?") & ~table.question.str.endswith(" area?")]
    assert {"yes", "no"} <= set(rows.answer)
    for row in rows.itertuples():
        name, place = re.fullmatch(r"is there (.+) in (the .+)\?", row.question).groups()
        finding = FINDING_BY_NAME[name]
        present = studies[row.study_id].findings
        covered = bool(finding in present and PLACES[place] & finding_zones(finding, present[finding][1]))
        assert covered == (row.answer == "yes"), row


def added_lists(table: pd.DataFrame) -> list[list[str]]:
    answers = table[table.question == WHOLE_IMAGE].answer
    listed = answers.str.extract(r"additional findings of (.+?) than the reference image")[0].dropna()
    return [re.split(r", (?:and )?", items) for items in listed]


def test_added_findings_come_in_shuffled_order(population):
    _, table = population
    official = [finding.name for finding in FINDINGS]
    orders = [[official.index(name) for name in names] for names in added_lists(table)]
    assert len(orders) >= 20
    assert any(order != sorted(order) for order in orders)
    assert any(order == sorted(order) for order in orders)


def test_the_shuffled_order_is_the_seed_s():
    studies = simulate_population(100, SEED)
    first, again = _pair_questions(studies, SEED), _pair_questions(studies, SEED)
    pd.testing.assert_frame_equal(first, again)
    assert added_lists(first) != added_lists(_pair_questions(studies, SEED + 1))
