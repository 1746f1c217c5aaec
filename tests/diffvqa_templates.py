"""The question and answer forms of Medical-Diff-VQA, per question type, as patterns to check the
synthetic world against.

Written down from the dataset's description (Hu et al., "Expert knowledge-aware image difference
graph representation learning for difference-aware medical VQA", KDD 2023) and from what its
generator (Holipori/MIMIC-Diff-VQA, ``code/question_gen.py`` and its ``libs/`` word lists) can write;
the vocabularies are the dataset's, the patterns and their grouping ours. Where the generator writes
a form only with one answer (a bilateral finding is asked about only when it is bilateral), the
pattern allows only that answer.
"""

from __future__ import annotations

import re

# The dataset's official finding names (its disease library), the words of its level and type lists,
# and its location words after its rewording ("lobe" reads "lung", "left-sided" reads "left").
FINDINGS = (
    "pleural effusion", "atelectasis", "cardiomegaly", "enlargement of the cardiac silhouette", "edema",
    "hernia", "vascular congestion", "hilar congestion", "pneumothorax", "heart failure", "lung opacity",
    "pneumonia", "tortuosity of the descending aorta", "scoliosis", "gastric distention", "hypoxemia",
    "hypertensive heart disease", "hematoma", "tortuosity of the thoracic aorta", "contusion", "emphysema",
    "granuloma", "calcification", "pleural thickening", "thymoma", "blunting of the costophrenic angle",
    "consolidation", "fracture", "pneumomediastinum", "air collection",
)
LEVELS = (
    "moderately", "moderate", "acute", "mildly", "mild", "small", "severe", "moderate to large",
    "moderate to severe", "mild to moderate", "minimal", "subtle", "massive", "minimally", "increasing",
    "decreasing", "minor", "trace",
)
TYPES = (
    "interstitial", "layering", "dense", "parenchymal", "compressive", "obstructive", "linear", "plate-like",
    "patchy", "ground-glass", "calcified", "scattered", "focal", "multifocal", "multi-focal",
)
LOCATION_WORDS = (
    "middle to lower", "left", "right", "retrocardiac", "pericardial", "bibasilar", "bilateral", "basilar",
    "apicolateral", "basal", "lung", "area", "base", "apical", "pleural", "upper", "lower", "middle", "mid", "rib",
)
# The places named after a finding ("in the left lower lobe"), as reports write them; the generator's
# records hold them reworded (`reworded`), its "no" questions draw from both.
_SIDED_PLACES = (
    "the {side} lung base", "the {side} base", "the {side} upper lung", "the {side} middle lung", "the {side} mid lung",
    "the {side} lower lung", "the {side} upper lobe", "the {side} middle lobe", "the {side} mid lobe",
    "the {side} lower lobe", "the {side} apical area", "the {side} apical region", "the {side} mid to lower lung",
    "the medial {side} lung base", "the {side} mid to lower hemithorax",
)
WRITTEN_PLACES = (
    *(place.format(side=side) for place in _SIDED_PLACES for side in ("left", "right")),
    "the lower and probably also middle lobe", "the lower lobe", "the upper lobe", "the middle lobe",
    "the lung bases", "the apical region", "the apical area", "the upper lungs", "the lower lungs",
    "the upper lobes", "the lower lobes", "the soft tissues",
)


def reworded(place: str) -> str:
    """A place as the generator's records hold it: "mid " reads "middle ", "lobe" "lung", a side's
    "base" "lung base", "region" "area"."""
    for before, after in (("mid ", "middle "), ("lobe", "lung"), ("left base", "left lung base"),
                          ("right base", "right lung base"), ("region", "area")):
        place = place.replace(before, after)
    return place


RECORDED_PLACES = tuple(dict.fromkeys(reworded(place) for place in WRITTEN_PLACES))
PLACES = tuple(dict.fromkeys(WRITTEN_PLACES + RECORDED_PLACES))


def _one_of(options) -> str:
    # Longest first, so "moderate to large" is not read as "moderate".
    return "(?:" + "|".join(re.escape(option) for option in sorted(options, key=len, reverse=True)) + ")"


FINDING = _one_of(FINDINGS)
LEVEL = _one_of(LEVELS)
TYPE = _one_of(TYPES)
WORDS = rf"{_one_of(LOCATION_WORDS)}(?: {_one_of(LOCATION_WORDS)})*"  # the location words of a record, in any order
YES_NO = "yes|no"

# Difference answers: level sentences, then at most one added and one missing sentence, each ending
# ". " in the generator's text (the world leaves off the last space; `difference_template` adds it).
# Lists read "a, and b" and "a, b, and c".
_LIST = rf"(?:{FINDING}, )+and {FINDING}"
LEVEL_SENTENCE = rf"the level of {FINDING} has changed from {LEVEL}(?: {LEVEL})* to {LEVEL}(?: {LEVEL})*\. "
ADDED_SENTENCE = (rf"the main image has (?:an additional finding of {FINDING}|additional findings of {_LIST}) "
                  r"than the reference image\. ")
MISSING_SENTENCE = (rf"the main image is missing (?:the finding of {FINDING}|the findings of {_LIST}) "
                    r"than the reference image\. ")
WHOLE_IMAGE_ANSWER = rf"nothing has changed\. |(?:{LEVEL_SENTENCE})*(?:{ADDED_SENTENCE})?(?:{MISSING_SENTENCE})?"

# question_type -> [(name, question pattern, answer pattern)]
TEMPLATES: dict[str, list[tuple[str, str, str]]] = {
    "abnormality": [
        ("all findings", r"what abnormalities are seen in this image\?", rf"{FINDING}(?:, {FINDING})*"),
        ("finding at a place", rf"what abnormalities are seen in {_one_of(RECORDED_PLACES)}\?", FINDING),
        ("any abnormality", r"is there evidence of any abnormalities in this image\?", YES_NO),
    ],
    "presence": [
        ("evidence of", rf"is there evidence of {FINDING} in this image\?", YES_NO),
        ("is there", rf"is there {FINDING}\?", YES_NO),
        ("at a place", rf"is there {FINDING} in {_one_of(PLACES)}\?", YES_NO),
        ("in an area", rf"is there {FINDING} in the {WORDS} area\?", YES_NO),
        ("bilateral", rf"is the {FINDING} bilateral\?", "yes"),
    ],
    "view": [
        ("which view", r"which view is this image taken\?", "PA view|AP view"),
        ("PA", r"is this PA view\?", YES_NO),
        ("AP", r"is this AP view\?", YES_NO),
    ],
    "location": [
        *((name, question, rf"{WORDS} area(?: and {WORDS} area)?|{_one_of(RECORDED_PLACES)}")
          for name, question in (("where located", rf"where in the image is the {FINDING} located\?"),
                                 ("where", rf"where is the {FINDING}\?"))),
        ("side", rf"is the {FINDING} located on the left side or right side\?", "left side|right side"),
    ],
    "level": [("level", rf"what level is the {FINDING}\?", rf"{LEVEL}(?: {LEVEL})*")],
    "type": [("type", rf"what type is the {FINDING}\?", rf"{TYPE}(?: {TYPE})*")],
    "difference": [
        ("whole image", r"what has changed compared to the reference image\?", WHOLE_IMAGE_ANSWER),
        ("one area", rf"what has changed in the {WORDS} area\?", LEVEL_SENTENCE),
    ],
}


def matching_template(question_type: str, question: str, answer: str) -> str | None:
    """The name of the template a row follows, or None when it follows none of its type's."""
    if question_type == "difference":
        answer += " "  # the generator ends every sentence with ". "
    for name, question_pattern, answer_pattern in TEMPLATES.get(question_type, []):
        if re.fullmatch(question_pattern, question) and re.fullmatch(answer_pattern, answer):
            return name
    return None
