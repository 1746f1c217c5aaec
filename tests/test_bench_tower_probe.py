import pandas as pd

from bench.tower_probe import difference_sets_right


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
