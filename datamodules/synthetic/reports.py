"""MIMIC-CXR free-text reports of the simulated studies, compared with the previous study, and the
CheXpert labels a labeler would read in them."""

from __future__ import annotations

import numpy as np

from datamodules.mimic import CHEXPERT_LABELS
from datamodules.synthetic.population import DEVICES, FINDING_BY_NAME, FINDINGS, ZONES, Finding, Study


def _change(before: int | None, now: int) -> str:
    if before is None:
        return ""
    if before == 0:
        return ", new since the prior study"
    return ", increased" if now > before else ", decreased" if now < before else ", unchanged"


def _site_phrase(finding: Finding, site: str, level: int) -> str:
    """How a report names one site: ``small left pleural effusion``, ``patchy lung opacity in the left upper lung``."""
    words = finding.level_name(level) if finding.levels else finding.kind
    if finding.sites == ZONES:
        return f"{words} {finding.name} in the {site} lung"
    if finding.name == "atelectasis":
        return f"{words} {finding.name} at the {site} lung base"
    return " ".join(part for part in (words, site, finding.name) if part)


def report_text(study: Study, prior: Study | None) -> str:
    """A MIMIC-CXR-style free-text report comparing with the previous study."""
    sentences, negatives = [], []
    for finding in FINDINGS:
        for site in finding.sites:
            level = study.level(finding, site)
            before = prior.level(finding, site) if prior else None
            if level:
                phrase = _site_phrase(finding, site, level)
                sentences.append(phrase[0].upper() + phrase[1:] + _change(before, level) + ".")
            elif before:
                sentences.append(f"The previously seen {_site_phrase(finding, site, before)} has resolved.")
        if not any(study.level(finding, site) for site in finding.sites):
            negatives.append(finding.name)
    if "cardiomegaly" in negatives:
        sentences.append("The heart size is normal.")
        negatives.remove("cardiomegaly")
    if negatives:
        listed = negatives[0] if len(negatives) == 1 else f"{', '.join(negatives[:-1])} or {negatives[-1]}"
        sentences.append(f"No {listed}.")
    if study.level(DEVICES, "endotracheal tube"):
        sentences.append("Endotracheal tube terminates 4 cm above the carina.")
    if study.level(DEVICES, "central line"):
        sentences.append("Right internal jugular central venous catheter terminates in the mid SVC.")
    comparison = f"Chest radiograph from ___ ({(study.date - prior.date).days} days earlier)." if prior else "None."
    return (
        "                                 FINAL REPORT\n"
        f" EXAMINATION:  {_procedure(study)}\n \n"
        " INDICATION:  ___ with shortness of breath.\n \n"
        f" COMPARISON:  {comparison}\n \n"
        f" FINDINGS: \n \n {' '.join(sentences)}\n \n"
        f" IMPRESSION: \n \n {_impression(study)}\n"
    )


def _where(finding: Finding, sites: tuple[str, ...]) -> str:
    """Where the impression places a finding: ``left``, ``left upper``, ``bilateral``, or nothing."""
    if finding.sites == ("",):
        return ""
    sides = {site.split()[0] for site in sites}
    if len(sides) == 2:
        return "bilateral"
    if finding.sites == ZONES and len(sites) == 1:
        return sites[0]
    return f"{sides.pop()} lower" if finding.name == "atelectasis" else sides.pop()


def _impression(study: Study) -> str:
    present = study.findings
    items = []
    for finding, (level, sites) in present.items():
        words = (finding.level_name(level) if finding.levels else "", _where(finding, sites), finding.name)
        items.append(" ".join(word for word in words if word))
    text = "; ".join(items) or "no acute cardiopulmonary process"
    if FINDING_BY_NAME["consolidation"] in present:
        text += ". Pneumonia cannot be excluded"
    return text[0].upper() + text[1:] + "."


def _procedure(study: Study) -> str:
    return "CHEST (PORTABLE AP)" if study.view == "AP" else "CHEST (PA AND LAT)"


def _chexpert_labels(study: Study) -> dict[str, float]:
    """What a CheXpert labeler reads in our report: 1.0 positive, 0.0 negated, -1.0 uncertain,
    NaN not mentioned."""
    present = {finding.name for finding in study.findings}
    labels = dict.fromkeys(CHEXPERT_LABELS, np.nan)
    for label in ("Atelectasis", "Cardiomegaly", "Consolidation", "Lung Opacity", "Pleural Effusion", "Pneumothorax"):
        labels[label] = 1.0 if label.lower() in present else 0.0
    if "consolidation" in present:
        labels["Pneumonia"] = -1.0  # "pneumonia cannot be excluded"
    if not present:
        labels["No Finding"] = 1.0
    if any(study.level(DEVICES, site) for site in DEVICES.sites):
        labels["Support Devices"] = 1.0
    return labels
