"""bench/tasks.py's split of the prognostic questions by what the prior study changes."""

from __future__ import annotations

from bench.tasks import by_finding, prior_dependent
from datamodules.synthetic.population import simulate_population
from datamodules.synthetic.prognostic_truth import prognosis
from common.prognosis_grammar import parse_prognosis, same_prognosis
from tests.helpers import WORLD_SUBJECTS, read_jsonl


def test_the_findings_the_prior_changes_are_where_the_current_study_alone_forecasts_otherwise(world):
    records = read_jsonl(world / "prognostic" / "prognostic.jsonl")
    dependent = prior_dependent(WORLD_SUBJECTS, 0, records)
    studies = {study.study_id: study for study in simulate_population(WORLD_SUBJECTS, 0)}
    assert dependent.keys() == {r["id"] for r in records}
    for record in records:
        alone = prognosis(studies[record["study_id"]], record["days"])
        # A question the prior changes is exactly one the one-image forecast gets wrong ...
        assert bool(dependent[record["id"]]) != same_prognosis(parse_prognosis(alone), parse_prognosis(record["answer"]))
        # ... and the findings named are exactly what must be corrected in that forecast to get the truth.
        truth, guess, named = by_finding(record["answer"]), by_finding(alone), dependent[record["id"]]
        corrected = {f: e for f, e in guess.items() if f not in named} | {f: truth[f] for f in named if f in truth}
        assert corrected == truth
        for finding in named:  # none of them could be left out
            assert {f: e for f, e in corrected.items() if f != finding} | (
                {finding: guess[finding]} if finding in guess else {}) != truth
    assert 0 < sum(map(bool, dependent.values())) < len(records)
