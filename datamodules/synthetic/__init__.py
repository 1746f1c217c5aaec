"""A simulated longitudinal chest X-ray population, written in the real MIMIC-CXR-JPG and
Medical-Diff-VQA v1.0.1 formats so that the same loaders serve real and synthetic data.

Each subject has 2-6 dated studies. Every finding site (a side, a lung zone, a device) follows a
continuous-time Markov chain over levels with rates per day, so the state at the next study
depends on the interval. Images, reports, CheXpert labels and Medical-Diff-VQA questions are all
drawn from these states; ``truth/studies.csv`` keeps the states for builders that need ground truth.

    python -m datamodules.synthetic --out DIR --subjects 125 --seed 0
"""

from __future__ import annotations

from datamodules.synthetic.population import FINDING_BY_NAME, FINDINGS, Finding, Study, simulate_population
from datamodules.synthetic.questions import difference_answer
from datamodules.synthetic.writer import GENERATOR_VERSION, ensure_world, generate_world

__all__ = [
    "FINDINGS", "FINDING_BY_NAME", "GENERATOR_VERSION", "Finding", "Study",
    "difference_answer", "ensure_world", "generate_world", "simulate_population",
]
