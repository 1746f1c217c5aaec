"""Difference answers scored as changes in the 14 CheXpert labels (MMXU appendix): the labels an
answer says were added and those it says went missing, per sample and pooled over a corpus.

An answer in the Medical-Diff-VQA grammar is parsed exactly (`parse_difference`) and each finding
name mapped to its label; any other answer is read clause by clause with keyword rules. The rules
are the offline stand-in for a CheXbert labeler, which needs Hub weights.

Official Diff-VQA finding names and their labels: atelectasis; cardiomegaly and enlargement of the
cardiac silhouette -> Cardiomegaly; consolidation; edema, vascular congestion, hilar congestion and
heart failure -> Edema; fracture; lung opacity; pleural effusion and blunting of the costophrenic
angle -> Pleural Effusion; pleural thickening -> Pleural Other; pneumonia (= infection) -> Pneumonia;
pneumothorax. Names with no CheXpert label are unmapped and their changes not scored: emphysema,
hernia, granuloma, calcification, scoliosis, tortuosity of the (descending) aorta, hematoma,
hypoxemia, contusion, air collection, gastric distention, thymoma, hyperaeration. "No Finding" is a
property of a whole study, never a change between two, so no phrase maps to it.

The phrases follow the CheXpert labeler's mention lists (stanfordmlgroup/chexpert-labeler,
``phrases/mention``) in part: its phrases for the findings Medical-Diff-VQA names (atelectasis,
cardiomegaly, edema, pleural effusion, pleural other), each one checked by a test, and our own for the
other labels (lung lesion, lung opacity, support devices and the rest are broader or narrower than its
lists). For those findings, these departures, each for a reason:

- mapped though the labeler gives them no label: "hilar congestion" and "cardiac decompensation"
  (Edema: pulmonary venous congestion and failure, which its list names "vascular congestion" and
  "heart failure"); "blunting of the (left, right or bilateral) costophrenic angle(s)" (Pleural
  Effusion: a Diff-VQA finding name, the sign of a small effusion; the labeler lists "blunt" among its
  no-finding phrases); "volume loss" (Atelectasis: the labeler lists it among its no-finding phrases,
  but in a change between two studies it is the collapse its atelectasis list names); "the heart is
  (now, newly, mildly, ...) enlarged" (Cardiomegaly, as its "enlarged heart");
- left out, because the labeler reads them only together with its negation and uncertainty rules,
  which a change reader does not have, and alone they name an organ rather than a finding: "the
  heart", "heart size", "cardiac size", "cardiac shadow", "cardiac contour", "cardiac silhouette"
  (Cardiomegaly), "indistinctness" (Edema);
- left out as ambiguous for a change between two studies: "fibrosis" (Pleural Other in its list, but
  in a chest X-ray report as often the lungs' interstitial fibrosis).

As with the labeler, "collapse" reads as atelectasis wherever it stands (a vertebral body's
compression collapse included), and "pericardial effusion" is not a pleural one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.difference_grammar import micro_scores, parse_difference

# (label, phrases), matched as whole words on lower-cased text in this order, each match blanked
# before the next pattern runs: the specific phrases come first, so "nodular opacity" is a Lung
# Lesion rather than a Lung Opacity and "pleural thickening" never reads as an effusion.
_LABEL_PHRASES = (
    ("Enlarged Cardiomediastinum", r"enlarged cardiomediastinum|enlarged mediastinum"
                                   r"|widen(?:ed|ing) (?:of the )?mediastinum|mediastinal widening"),
    ("Cardiomegaly", r"cardiomegaly|cardiac enlargement|enlarged (?:heart|cardiac silhouette)"
                     r"|enlargement of the (?:heart|cardiac silhouette)"
                     r"|heart is (?:(?:now|newly|mildly|moderately|markedly|no longer) )?enlarged"),
    ("Pleural Other", r"pleural (?:thickening|scarring|scars?|plaques?)|fibrothorax"
                      r"|pleuro-?(?:parenchymal|pericardial) scars?|pleural parenchymal scars?"),
    ("Pleural Effusion", r"pleural effusions?|(?<!pericardial )effusions?|pleural fluid"
                         r"|blunting of the (?:(?:left|right|bilateral) )?costophrenic angles?"),
    ("Pneumothorax", r"pneumothora(?:x|ces)"),
    ("Edema", r"o?edema|(?:pulmonary|vascular|hilar) congestion|heart failure|chf|vascular prominence"
              r"|cardiac decompensation"),
    ("Consolidation", r"consolidations?"),
    ("Pneumonia", r"pneumonias?|infections?|infectious process"),
    ("Atelectasis", r"atelectas[ie]s|atelectatic|collapsed?|volume loss"),
    ("Lung Lesion", r"nodules?|nodular (?:opacity|opacities|density|densities)|masse?s|mass"
                    r"|lesions?|tumou?rs?|carcinoma|neoplasm"),
    ("Lung Opacity", r"opacit(?:y|ies)|opacification|infiltrates?|infiltration|airspace disease"),
    ("Fracture", r"fractures?"),
    ("Support Devices", r"support devices?|(?:endotracheal|nasogastric|orogastric|feeding|chest"
                        r"|tracheostomy|et|ng|og) tubes?|(?:central(?: venous)?|picc|midline|arterial|ij"
                        r"|jugular|subclavian|swan[- ]ganz) (?:lines?|catheters?)|pacemakers?"
                        r"|defibrillators?|icd"),
)
_LABEL_PATTERNS = tuple((label, re.compile(rf"\b(?:{phrases})\b")) for label, phrases in _LABEL_PHRASES)

# Free text: sentences, then clauses; a clause without a cue of its own continues the direction of
# the clause before it in the sentence ("new effusion and edema": both new).
_SENTENCE_BREAK = re.compile(r"[.;:!?]+(?:\s|$)")
_CLAUSE_BREAK = re.compile(r",|\b(?:and|but|while|whereas|with)\b")
_NO_LONGER = re.compile(r"\bno longer\b")
# A negated or unchanged clause states no change ("no new effusion", "has not resolved",
# "the effusion is stable"), and ends the direction carried from the clause before.
_NO_CHANGE = re.compile(r"\b(?:no|not|without|never|none|neither|nor|unchanged|stable|persist\w*"
                        r"|again|remains?|remained|similar)\b|n't\b")
_ADDED_CUE = re.compile(r"\b(?:new|newly|additional|appear\w*|develop\w*|emerg\w*)\b")
_MISSING_CUE = re.compile(r"\b(?:resolv\w*|resolution|cleared|disappear\w*|removed|removal"
                          r"|withdrawn|gone|missing|absent|extubated)\b|\bno longer\b")


@dataclass(frozen=True)
class LabelChange:
    """The CheXpert labels a difference answer says were added and went missing."""

    added: frozenset[str]
    missing: frozenset[str]


def finding_labels(text: str) -> frozenset[str]:
    """The CheXpert labels a finding name or phrase mentions; empty for unmapped findings."""
    text, labels = text.lower(), set()
    for label, pattern in _LABEL_PATTERNS:
        text, count = pattern.subn(" ", text)
        if count:
            labels.add(label)
    return frozenset(labels)


def _clause_direction(clause: str, carried: str | None) -> str | None:
    """"added", "missing", or None when the clause states no change or both kinds of change."""
    if _NO_CHANGE.search(_NO_LONGER.sub(" ", clause)):
        return None
    added, missing = bool(_ADDED_CUE.search(clause)), bool(_MISSING_CUE.search(clause))
    if added and missing:
        return None
    if not (added or missing):
        return carried
    return "added" if added else "missing"


def _free_text_changes(text: str) -> LabelChange:
    changes: dict[str, set[str]] = {"added": set(), "missing": set()}
    for sentence in _SENTENCE_BREAK.split(text.lower()):
        direction = None
        for clause in _CLAUSE_BREAK.split(sentence):
            direction = _clause_direction(clause, direction)
            if direction:
                changes[direction] |= finding_labels(clause)
    return LabelChange(frozenset(changes["added"]), frozenset(changes["missing"]))


def _grammar_changes(added: frozenset[str], missing: frozenset[str]) -> LabelChange:
    return LabelChange(frozenset().union(*map(finding_labels, added)),
                       frozenset().union(*map(finding_labels, missing)))


def label_changes(text: str) -> LabelChange:
    """The added and missing CheXpert labels of a difference answer: from the Diff-VQA grammar
    when the whole answer parses, otherwise from keyword rules.

    The rules read each clause: a finding phrase with a cue of appearance ("new", "developed",
    "additional") is added, one with a cue of disappearance ("resolved", "no longer", "removed",
    "missing") is missing; a negated or unchanged clause ("no new effusion", "has not resolved",
    "stable") and a clause with both kinds of cue say nothing. Level changes ("the effusion has
    increased") are neither.
    """
    findings = parse_difference(text)
    if findings.parsed:
        return _grammar_changes(findings.added, findings.missing)
    return _free_text_changes(text)


def reference_label_changes(reference: str) -> LabelChange | None:
    """`label_changes` of a reference in the Diff-VQA grammar; None for one that is not."""
    findings = parse_difference(reference)
    return _grammar_changes(findings.added, findings.missing) if findings.parsed else None


def label_change_f1(pairs: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Micro precision/recall/F1 of the added and of the missing CheXpert labels over (prediction,
    reference) pairs of difference answers, each label change counted once per sample."""
    changes = [(label_changes(prediction), expected) for prediction, reference in pairs
               if (expected := reference_label_changes(reference)) is not None]  # unparsed references: counted apart
    return {kind: micro_scores([(getattr(predicted, kind), getattr(expected, kind))
                                for predicted, expected in changes])
            for kind in ("added", "missing")}
