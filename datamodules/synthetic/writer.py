"""Writing a simulated world to disk in the real MIMIC-CXR-JPG and Medical-Diff-VQA v1.0.1 layouts,
with a ``world.json`` manifest, and reusing it when the same world is already there."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from datamodules.synthetic.drawing import render_image
from datamodules.synthetic.experts import write_experts
from datamodules.synthetic.mmxu import write_mmxu
from datamodules.synthetic.population import FINDINGS, SITE_COLUMNS, SITES, ImageRecord, Study, simulate_population
from datamodules.synthetic.prognostic_truth import prognostic_records
from datamodules.synthetic.questions import _key_info, _pair_questions
from datamodules.synthetic.reports import _chexpert_labels, _procedure, report_text

GENERATOR = "lumen.datamodules.synthetic"
GENERATOR_VERSION = "1.3"  # 1.1: prognostic truth, MMXU files, expert CSV; 1.2: acute and chronic courses;
# 1.3: the dataset generator's grammar (its level words and places, bilateral only when so, shuffled additions)
METADATA_COLUMNS = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
VIEW_MEANINGS = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
GZIP = {"method": "gzip", "mtime": 0}  # mtime 0: same seed, same bytes


def _study_path(study: Study) -> Path:
    """``files/p{first two digits}/p{subject}/s{study}``: the images' folder; plus ``.txt``, the report."""
    subject = str(study.subject_id)
    return Path("files", f"p{subject[:2]}", f"p{subject}", f"s{study.study_id}")


def _write_image(job: tuple[Study, ImageRecord, int, int, Path]) -> None:
    """Draws one image and writes it as JPEG. Each image has its own random stream
    (``[seed, 3, image index]``), so the bytes do not depend on which process draws it or when."""
    study, image, seed, image_index, path = job
    pixels = render_image(study, image, np.random.default_rng([seed, 3, image_index]))
    Image.fromarray(pixels).save(path, quality=90)


def default_workers() -> int:
    """The CPUs this process may use (the scheduler's affinity, not the machine's count), at most 16."""
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 16))


T, R = TypeVar("T"), TypeVar("R")


def draw_in_processes(draw: Callable[[T], R], jobs: list[T], workers: int | None, description: str) -> Iterator[R]:
    """``draw(job)`` for every job, in order, with a progress bar; ``workers`` processes (None: one per
    usable CPU, at most 16; 1: in this process). ``draw`` must give the same result whichever process runs it."""
    workers = default_workers() if workers is None else workers
    with tqdm(total=len(jobs), desc=description, unit="image") as progress:
        if workers > 1 and len(jobs) > workers:
            # Forked on Linux (as DataLoader workers are): nothing to re-import, and no `if __name__ ==
            # "__main__"` guard asked of the caller; the children only draw with numpy, scipy and Pillow.
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                # Iterating waits for every job in order and raises a worker's error here.
                for result in pool.map(draw, jobs, chunksize=max(1, len(jobs) // (32 * workers))):
                    progress.update()
                    yield result
        else:
            for job in jobs:
                result = draw(job)
                progress.update()
                yield result


def generate_world(out: Path, subjects: int, seed: int, workers: int | None = None) -> dict:
    """Write the whole world into ``out`` (new or empty; world.json last) and return the manifest.

    Drawing the images is most of the work; ``workers`` processes draw them (None: one per usable
    CPU, at most 16; 1: in this process). The world is the same, byte for byte, whatever ``workers`` is."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: generate_world writes into a new or empty directory")
    studies = simulate_population(subjects, seed)
    mimic, reports, diffvqa, truth = (
        out / name for name in ("mimic-cxr-jpg", "mimic-cxr-reports", "medical-diff-vqa", "truth")
    )
    for directory in (mimic, reports, diffvqa, truth):
        directory.mkdir(parents=True, exist_ok=True)

    metadata, splits, chexpert, studies_rows, truth_rows, images = [], [], [], [], [], []
    previous: Study | None = None
    for study in studies:
        prior = previous if previous is not None and previous.subject_id == study.subject_id else None
        previous = study
        (mimic / _study_path(study)).mkdir(parents=True, exist_ok=True)
        for image in study.images:
            images.append((study, image, seed, len(images), mimic / _study_path(study) / f"{image.dicom_id}.jpg"))
            procedure = _procedure(study)
            metadata.append((
                image.dicom_id, study.subject_id, study.study_id, procedure, image.view, image.rows, image.columns,
                study.study_date, study.time, procedure, VIEW_MEANINGS[image.view],
                "Recumbent" if study.view == "AP" else "Erect",
            ))
            splits.append((image.dicom_id, study.study_id, study.subject_id, study.split))
        report = reports / _study_path(study).with_suffix(".txt")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(report_text(study, prior))
        labels = _chexpert_labels(study)
        chexpert.append({"subject_id": study.subject_id, "study_id": study.study_id, **labels})
        frontal = study.images[0]
        studies_rows.append({
            "subject_id": study.subject_id, "study_id": study.study_id, **labels, "dicom_id": frontal.dicom_id,
            "view": VIEW_MEANINGS[frontal.view], "split": study.split, "study_date": study.study_date,
        })
        truth_rows.append({
            "subject_id": study.subject_id, "study_id": study.study_id, "study_date": study.study_date,
            "view": study.view, **dict(zip(SITE_COLUMNS, study.levels)),
        })

    # Each job writes its own file and returns None: draining the iterator is the work.
    deque(draw_in_processes(_write_image, images, workers, f"drawing {subjects} subjects' images"), maxlen=0)

    tables = {
        "metadata": pd.DataFrame(metadata, columns=METADATA_COLUMNS),
        "split": pd.DataFrame(splits, columns=["dicom_id", "study_id", "subject_id", "split"]),
        "chexpert": pd.DataFrame(chexpert),
    }
    for name, table in tables.items():
        table.to_csv(mimic / f"mimic-cxr-2.0.0-{name}.csv.gz", index=False, compression=GZIP)
    mimic_all = pd.DataFrame(studies_rows)
    # As the dataset's get_mimic_all.py: a pandas rank, hence 1.0, 2.0, ...
    mimic_all["study_order"] = mimic_all.groupby("subject_id")["study_date"].rank(method="min")
    mimic_all.to_csv(diffvqa / "mimic_all.csv", index=False)
    questions = _pair_questions(studies, seed)
    questions.to_csv(diffvqa / "mimic_pair_questions.csv", index=False)
    (diffvqa / "all_diseases.json").write_text(json.dumps([_key_info(study) for study in studies], indent=4))
    pd.DataFrame(truth_rows).to_csv(truth / "studies.csv", index=False)
    prognostic = prognostic_records(studies, questions, seed)
    (out / "prognostic").mkdir()
    (out / "prognostic" / "prognostic.jsonl").write_text("".join(json.dumps(record) + "\n" for record in prognostic))
    expert_rows = write_experts(studies, seed, out / "experts" / "experts.csv")

    manifest = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "subjects": subjects,
        "seed": seed,
        "counts": {
            "subjects": subjects,
            "studies": len(studies),
            "images": len(images),
            "questions": len(questions),
            "difference_questions": int((questions["question_type"] == "difference").sum()),
            "prognostic_questions": len(prognostic),
            **write_mmxu(out, studies, seed),
            "expert_rows": expert_rows,
        },
        "findings": {finding.name: list(finding.levels) for finding in FINDINGS},
        "truth_columns": dict(zip(SITE_COLUMNS, ([f.name, site] for f, site in SITES))),
    }
    (out / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _our_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / "world.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def ensure_world(out: str | Path, subjects: int, seed: int, workers: int | None = None) -> Path:
    """``out`` holding the world for (subjects, seed), generating it only when it is not there yet.

    The world is written to a hidden sibling directory and renamed into place when complete, so an
    interrupted run never leaves a world that looks complete. An older world of ours is replaced;
    any other non-empty directory is refused.
    """
    out = Path(out)
    wanted = {"generator_version": GENERATOR_VERSION, "subjects": subjects, "seed": seed}

    def is_wanted(manifest: dict | None) -> bool:
        return manifest is not None and all(manifest.get(key) == value for key, value in wanted.items())

    existing = _our_manifest(out)
    if is_wanted(existing):
        return out
    if existing is None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not a synthetic world (no world.json written by {GENERATOR}); "
            "refusing to overwrite it: choose another directory or empty this one"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    partial.chmod(0o755)  # mkdtemp makes it private; the world is ordinary data
    try:
        generate_world(partial, subjects, seed, workers)
        # Another process (a second rank) may have put the same world in place meanwhile.
        if is_wanted(_our_manifest(out)):
            return out
        if out.exists():  # empty, or an older world of ours
            stale = Path(tempfile.mkdtemp(prefix=f".{out.name}.stale-", dir=out.parent))
            out.rename(stale)
            shutil.rmtree(stale)
        partial.rename(out)
    except OSError:
        if not is_wanted(_our_manifest(out)):
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out
