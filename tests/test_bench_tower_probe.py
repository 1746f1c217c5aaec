import pandas as pd
import torch

from bench.tower_probe import difference_sets_right, probe_probabilities


def test_difference_sets_are_right_only_when_both_the_added_and_the_missing_findings_match():
    findings = ["atelectasis", "cardiomegaly"]
    truth = pd.DataFrame([[False, False], [True, False], [True, True], [False, True]],
                         index=[1, 2, 3, 4], columns=findings)
    questions = pd.DataFrame({"study_id": [2, 3, 4], "ref_id": [1, 2, 3]})  # added A; added C; missing A
    assert difference_sets_right(questions, truth, truth) == 1.0
    nothing = pd.DataFrame(False, index=truth.index, columns=findings)
    assert difference_sets_right(questions, truth, nothing) == 0.0
    # Study 3 read without its cardiomegaly: 2 -> 3 then adds nothing, and 3 -> 4 adds cardiomegaly besides
    # missing atelectasis; only 1 -> 2 stays right.
    misread = truth.copy()
    misread.loc[3, "cardiomegaly"] = False
    assert difference_sets_right(questions, truth, misread) == 1 / 3
    # The same misreading on both studies of a pair does not change that pair's answer.
    unchanged = pd.DataFrame({"study_id": [4], "ref_id": [4]})
    assert difference_sets_right(unchanged, truth, nothing) == 1.0


def test_from_probabilities_a_change_is_read_only_when_it_is_more_likely_than_not():
    truth = pd.DataFrame({"atelectasis": [False, True]}, index=[1, 2])
    questions = pd.DataFrame({"study_id": [2], "ref_id": [1]})  # atelectasis added
    # Present now at 0.7, absent before at 0.6: the change has probability 0.7 x 0.6 = 0.42, so no change
    # is read, although each study alone reads the right way.
    assert difference_sets_right(questions, truth, pd.DataFrame({"atelectasis": [0.4, 0.7]}, index=[1, 2])) == 0.0
    assert difference_sets_right(questions, truth, pd.DataFrame({"atelectasis": [0.1, 0.9]}, index=[1, 2])) == 1.0


def test_the_token_reader_finds_a_finding_that_one_token_of_many_shows():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(200, 16, 4, generator=generator)
    present = torch.rand(200, generator=generator) < 0.5
    # A present finding lifts channel 0 of one token, a different token in each image.
    where = torch.randint(16, (200,), generator=generator)
    tokens[torch.arange(200)[present], where[present], 0] += 6.0
    labels = present.float()
    token_read = probe_probabilities(tokens[:150], labels[:150], tokens[150:]) > 0.5
    pooled_read = probe_probabilities(tokens[:150].mean(dim=1), labels[:150], tokens[150:].mean(dim=1)) > 0.5
    assert (token_read == present[150:]).float().mean() >= 0.95
    assert (token_read == present[150:]).float().mean() > (pooled_read == present[150:]).float().mean()
