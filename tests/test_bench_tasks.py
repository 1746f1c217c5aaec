"""bench/tasks.py's split of the prognostic questions by what the prior study changes."""

from __future__ import annotations

from bench.tasks import by_finding, prior_dependent
from datamodules.synthetic.population import simulate_population
from datamodules.synthetic.prognosis import prognosis
from evaluation.prognosis import parse_prognosis, same_prognosis
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
        # ... and the findings named are those whose expected course differs.
        truth, guess = by_finding(record["answer"]), by_finding(alone)
        for finding in truth.keys() | guess.keys():
            assert (finding in dependent[record["id"]]) == (truth.get(finding) != guess.get(finding))
    assert 0 < sum(map(bool, dependent.values())) < len(records)
