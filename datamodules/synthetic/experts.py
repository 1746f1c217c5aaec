"""Simulated expert-model predictions for the synthetic world's images, in the expert CSV schema
of ``datamodules.experts``: what a good but imperfect TorchXRayVision would say about each image.

A pathology's probability is the sigmoid of a logit that is high when its finding is present (the
higher its level, the higher), middling for a pathology that goes with a present finding (an
enlarged cardiomediastinum with cardiomegaly, pneumonia with consolidation) and low otherwise, plus
Gaussian noise per image. Each subject has an age at the first study that grows with the study
dates, and a race; the estimates add noise per image. The view is the image's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.experts import COLUMNS, PATHOLOGIES, RACES
from datamodules.synthetic.population import Study

# The world's findings as the pathology model names them.
PATHOLOGY_OF_FINDING = {
    "pleural effusion": "Effusion", "atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
    "pneumothorax": "Pneumothorax", "lung opacity": "Lung Opacity", "consolidation": "Consolidation",
}
# Pathologies a present finding makes likelier without being them.
CORRELATED = {"cardiomegaly": "Enlarged Cardiomediastinum", "consolidation": "Pneumonia"}
ABSENT_LOGIT, PRESENT_LOGIT, PER_LEVEL, CORRELATED_LOGIT = -2.5, 1.5, 0.5, 0.0
LOGIT_NOISE = 1.0  # present findings reach p >= 0.5 about 98% of the time, absent ones about 1%
AGE_NOISE_YEARS = 3.7  # the riken age model's reported mean absolute error
RACE_SHARES = (0.05, 0.20, 0.75)  # Asian, Black, White: roughly MIMIC-CXR's among these three
RACE_CONCENTRATION = (8.0, 1.0)  # Dirichlet weight of the subject's race and of each other race


def _logits(study: Study) -> np.ndarray:
    logits = np.full(len(PATHOLOGIES), ABSENT_LOGIT)
    for finding, (level, _) in study.findings.items():
        logits[PATHOLOGIES.index(PATHOLOGY_OF_FINDING[finding.name])] = PRESENT_LOGIT + PER_LEVEL * level
        if finding.name in CORRELATED:
            logits[PATHOLOGIES.index(CORRELATED[finding.name])] = CORRELATED_LOGIT
    return logits


def expert_table(studies: list[Study], seed: int) -> pd.DataFrame:
    """One row per image of ``studies`` (ordered by subject then date, as ``simulate_population``
    gives them), in the columns of ``datamodules.experts.COLUMNS``; the same seed gives the same table."""
    rng = np.random.default_rng([seed, 7])
    rows = []
    first: Study | None = None
    for study in studies:
        if first is None or first.subject_id != study.subject_id:
            first = study
            first_age = rng.uniform(20, 90)
            race = rng.choice(len(RACES), p=RACE_SHARES)
        age = first_age + (study.date - first.date).days / 365.25
        logits = _logits(study)
        for image in study.images:
            probabilities = 1 / (1 + np.exp(-(logits + rng.normal(0, LOGIT_NOISE, len(PATHOLOGIES)))))
            alpha = np.where(np.arange(len(RACES)) == race, *RACE_CONCENTRATION)
            race_probabilities = rng.dirichlet(alpha)
            rows.append([
                image.dicom_id, study.subject_id, study.study_id, *np.round(probabilities, 6),
                round(age + rng.normal(0, AGE_NOISE_YEARS), 2), RACES[int(np.argmax(race_probabilities))],
                *np.round(race_probabilities, 6), "Lateral" if image.view == "LATERAL" else "Frontal",
            ])
    return pd.DataFrame(rows, columns=list(COLUMNS))


def write_experts(studies: list[Study], seed: int, path: Path) -> int:
    """Write ``expert_table`` to ``path`` and return its number of rows."""
    table = expert_table(studies, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return len(table)
