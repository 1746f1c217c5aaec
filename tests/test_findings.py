import pytest

from datamodules.mimic import CHEXPERT_LABELS
from evaluation.findings import (
    finding_labels,
    label_change_f1,
    label_changes,
    reference_label_changes,
)


def added(*findings: str) -> str:
    listed = findings[0] if len(findings) == 1 else ", ".join(findings[:-1]) + ", and " + findings[-1]
    kind = "an additional finding" if len(findings) == 1 else "additional findings"
    return f"the main image has {kind} of {listed} than the reference image. "


def missing(*findings: str) -> str:
    listed = findings[0] if len(findings) == 1 else ", ".join(findings[:-1]) + ", and " + findings[-1]
    kind = "the finding" if len(findings) == 1 else "the findings"
    return f"the main image is missing {kind} of {listed} than the reference image. "


# --- Medical-Diff-VQA finding names -> CheXpert labels

@pytest.mark.parametrize(("finding", "label"), [
    ("atelectasis", "Atelectasis"),
    ("cardiomegaly", "Cardiomegaly"),
    ("enlargement of the cardiac silhouette", "Cardiomegaly"),
    ("consolidation", "Consolidation"),
    ("edema", "Edema"),
    ("vascular congestion", "Edema"),
    ("hilar congestion", "Edema"),
    ("heart failure", "Edema"),
    ("fracture", "Fracture"),
    ("lung opacity", "Lung Opacity"),
    ("pleural effusion", "Pleural Effusion"),
    ("blunting of the costophrenic angle", "Pleural Effusion"),
    ("pleural thickening", "Pleural Other"),
    ("pneumonia", "Pneumonia"),
    ("infection", "Pneumonia"),
    ("pneumothorax", "Pneumothorax"),
])
def test_official_finding_name_maps_to_its_chexpert_label(finding, label):
    assert finding_labels(finding) == {label}


@pytest.mark.parametrize("finding", [
    "emphysema", "hernia", "granuloma", "calcification", "scoliosis", "tortuosity of the descending aorta",
    "hematoma", "hypoxemia", "contusion", "air collection", "gastric distention", "thymoma", "hyperaeration",
])
def test_official_finding_name_without_a_chexpert_label_is_unmapped(finding):
    assert finding_labels(finding) == frozenset()


@pytest.mark.parametrize(("phrase", "label"), [
    ("widened mediastinum", "Enlarged Cardiomediastinum"),
    ("nodular opacity", "Lung Lesion"),
    ("left upper lobe mass", "Lung Lesion"),
    ("patchy opacities", "Lung Opacity"),
    ("endotracheal tube", "Support Devices"),
    ("right PICC line", "Support Devices"),
])
def test_free_text_phrase_maps_to_its_chexpert_label(phrase, label):
    assert finding_labels(phrase) == {label}


# The CheXpert labeler's mention phrases (phrases/mention/*.txt) that a change reader follows, each with
# its label, and the departures evaluation/findings.py documents.
@pytest.mark.parametrize(("phrase", "label"), [
    ("collapse", "Atelectasis"), ("left lower lobe collapse", "Atelectasis"),
    ("cardiomegaly", "Cardiomegaly"), ("cardiac enlargement", "Cardiomegaly"), ("enlarged heart", "Cardiomegaly"),
    ("edema", "Edema"), ("heart failure", "Edema"), ("chf", "Edema"), ("vascular congestion", "Edema"),
    ("pulmonary congestion", "Edema"), ("vascular prominence", "Edema"),
    ("pleural fluid", "Pleural Effusion"), ("effusion", "Pleural Effusion"),
    ("pleural thickening", "Pleural Other"), ("fibrothorax", "Pleural Other"), ("pleural scar", "Pleural Other"),
    ("pleural parenchymal scar", "Pleural Other"), ("pleuro-parenchymal scar", "Pleural Other"),
    ("pleuro-pericardial scar", "Pleural Other"),
    # departures, each for a reason given in the module's docstring
    ("hilar congestion", "Edema"), ("cardiac decompensation", "Edema"),
    ("blunting of the costophrenic angle", "Pleural Effusion"),
    ("blunting of the left costophrenic angle", "Pleural Effusion"),
    ("blunting of the bilateral costophrenic angles", "Pleural Effusion"),
    ("volume loss", "Atelectasis"), ("the heart is enlarged", "Cardiomegaly"),
    ("the heart is now enlarged", "Cardiomegaly"),
])
def test_the_labelers_mention_phrases_and_the_documented_synonyms_map_to_their_label(phrase, label):
    assert finding_labels(phrase) == {label}


@pytest.mark.parametrize("phrase", ["the heart", "heart size", "cardiac silhouette", "indistinctness", "fibrosis"])
def test_the_labelers_phrases_that_need_its_negation_rules_map_to_no_label(phrase):
    assert finding_labels(phrase) == frozenset()


@pytest.mark.parametrize("phrase", ["pericardial effusion", "Kerley B lines", "normal study"])
def test_look_alike_phrases_map_to_no_label(phrase):
    assert finding_labels(phrase) == frozenset()


def test_every_mapped_label_is_a_chexpert_label():
    phrases = ("atelectasis cardiomegaly consolidation edema widened mediastinum fracture nodule opacity "
               "pleural effusion pleural thickening pneumonia pneumothorax chest tube")
    assert finding_labels(phrases) == set(CHEXPERT_LABELS) - {"No Finding"}


# --- grammar answers

def test_grammar_answer_maps_added_and_missing_findings():
    changes = label_changes(added("pleural effusion", "vascular congestion") + missing("atelectasis"))
    assert changes.added == {"Pleural Effusion", "Edema"}
    assert changes.missing == {"Atelectasis"}


def test_grammar_answer_with_two_names_for_one_label_gives_the_label_once():
    changes = label_changes(added("cardiomegaly", "enlargement of the cardiac silhouette"))
    assert changes.added == {"Cardiomegaly"}


def test_grammar_answer_drops_unmapped_findings():
    changes = label_changes(added("hernia", "edema") + missing("scoliosis"))
    assert (changes.added, changes.missing) == ({"Edema"}, frozenset())


def test_grammar_answer_ignores_level_changes():
    changes = label_changes("the level of pleural effusion has changed from small to moderate. ")
    assert (changes.added, changes.missing) == (frozenset(), frozenset())


def test_nothing_has_changed_has_no_label_changes():
    changes = label_changes("nothing has changed.")
    assert (changes.added, changes.missing) == (frozenset(), frozenset())


# --- free text

@pytest.mark.parametrize(("text", "expected_added", "expected_missing"), [
    ("There is a new left pleural effusion.", {"Pleural Effusion"}, set()),
    ("The effusion has resolved.", set(), {"Pleural Effusion"}),
    ("Interval resolution of the right pneumothorax.", set(), {"Pneumothorax"}),
    ("The pneumothorax is no longer seen.", set(), {"Pneumothorax"}),
    ("Interval development of bilateral effusions and mild edema.", {"Pleural Effusion", "Edema"}, set()),
    ("The endotracheal tube has been removed; a new right PICC line has appeared.",
     {"Support Devices"}, {"Support Devices"}),
    ("New consolidation in the left lower lobe, but the pneumothorax has resolved.",
     {"Consolidation"}, {"Pneumothorax"}),
])
def test_free_text_change_cues_give_added_and_missing_labels(text, expected_added, expected_missing):
    changes = label_changes(text)
    assert (changes.added, changes.missing) == (expected_added, expected_missing)


@pytest.mark.parametrize("text", [
    "No new effusion.",
    "The effusion has not resolved.",
    "There is no pneumothorax.",
    "The left pleural effusion is stable.",
    "Cardiomegaly persists.",
    "The effusion has increased in size.",
    "The heart is big.",
    "A new effusion has replaced the resolved pneumothorax.",
])
def test_free_text_without_a_single_clear_change_gives_no_labels(text):
    changes = label_changes(text)
    assert (changes.added, changes.missing) == (frozenset(), frozenset())


def test_free_text_direction_does_not_carry_past_a_negated_clause():
    changes = label_changes("New pleural effusion, no edema and atelectasis.")
    assert (changes.added, changes.missing) == ({"Pleural Effusion"}, frozenset())


def test_free_text_direction_does_not_carry_into_the_next_sentence():
    changes = label_changes("There is a new effusion. Atelectasis at the left base.")
    assert changes.added == {"Pleural Effusion"}


def test_answer_partly_in_the_grammar_is_read_by_the_rules():
    changes = label_changes(added("edema") + "the heart is big.")
    assert (changes.added, changes.missing) == ({"Edema"}, frozenset())


def test_no_answer_ever_changes_no_finding():
    changes = label_changes("New finding: the study is now normal, no finding remains.")
    assert "No Finding" not in changes.added | changes.missing


# --- references and pooled scores

def test_a_free_text_reference_has_no_label_changes_and_is_left_out_of_the_f1():
    assert reference_label_changes("The effusion has resolved.") is None
    grammar = "the main image has an additional finding of pleural effusion than the reference image. "
    assert label_change_f1([("new pleural effusion", "The effusion has resolved."), (grammar, grammar)]) == \
        label_change_f1([(grammar, grammar)])


def test_label_change_f1_pools_added_and_missing_labels_over_samples():
    pairs = [
        ("There is a new pleural effusion and new edema.", added("pleural effusion")),
        (added("atelectasis"), added("atelectasis") + missing("pneumothorax")),
        ("nothing has changed.", missing("lung opacity")),
        ("The pneumothorax has resolved.", missing("pneumothorax")),
    ]
    scores = label_change_f1(pairs)
    # added: predicted {Effusion, Edema}, {Atelectasis}; expected {Effusion}, {Atelectasis}.
    assert scores["added"] == {"precision": pytest.approx(2 / 3), "recall": 1.0,
                               "f1": pytest.approx(0.8), "support": 2}
    # missing: predicted {Pneumothorax} once; expected Pneumothorax twice and Lung Opacity once.
    assert scores["missing"] == {"precision": 1.0, "recall": pytest.approx(1 / 3),
                                 "f1": pytest.approx(0.5), "support": 3}


def test_label_change_f1_counts_an_unmapped_finding_in_neither_prediction_nor_reference():
    scores = label_change_f1([(added("edema"), added("hernia", "edema"))])
    assert scores["added"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
