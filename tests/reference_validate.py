"""``datamodules.validate`` as it was before it checked column by column (commit 31fbbfa): sample by
sample. Kept as the reference that the column-wise checks must equal, line for line and problem for
problem (tests/test_validate.py). Not used by lumen itself.

The original description follows.

Checks a MIMIC-CXR-JPG + Medical-Diff-VQA copy, prognostic questions, MMXU files, enhanced
answers and an expert CSV before training on them.

    python -m datamodules.validate --mimic-cxr-jpg ROOT [--diffvqa DIR [--prognostic FILE] [--enhanced FILE]]
        [--mmxu FILE ... [--history none|global|regional] [--reports-root DIR]] [--experts CSV] [--read-images]

Every file given is read to its end, and every problem found is reported (file, line as a person
opens it, field, what was found, what to do; a problem repeated many times is counted, with its first
examples): unreadable, truncated or non-UTF-8 files, empty files, missing or malformed values, studies
or images that are not where the other tables say. Cross-checks: every question's images are in the
MIMIC-CXR-JPG metadata under the question's study, on disk (decoded, with ``--read-images``), in the
question's split (Medical-Diff-VQA and prognostic questions), and the interval from the MIMIC dates
is the question's and is not negative; every question's current image has expert predictions; every
Medical-Diff-VQA question has its enhanced answer. Prints what loaded (per split, task and question
type; MMXU per content type, answer letter and MIMIC split), what the documented policies skipped or
fell back on, and interval anomalies. Exits 1 when there is any problem, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd
from PIL import Image

from common.readers import InputError, Problems
from datamodules.diffvqa import SPLITS, DiffVQA, load_diffvqa, read_diffvqa, read_studies
from datamodules.enhance import load_enhanced
from datamodules.experts import load_experts
from datamodules.mimic import load_images
from datamodules.mmxu import HISTORY_MODES, LETTERS, check_mmxu_lines, load_mmxu
from datamodules.prognostic import load_prognostic
from datamodules.records import Sample

IMAGES = "question images"  # the source that image problems are grouped under


def _unreadable(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error})"
    return None


def _check_images(samples: list[Sample], read_images: bool, problems: Problems) -> None:
    """Each image of the samples exists (and, with ``read_images``, decodes), once per image, named
    by the first sample that uses it."""
    paths: dict[Path, tuple[str, str]] = {}
    for sample in samples:
        paths.setdefault(sample.image, (sample.sample_id, "image"))
        if sample.has_prior:
            paths.setdefault(sample.prior_image, (sample.sample_id, "prior_image"))
    for path, (sample_id, field) in paths.items():
        problem = _unreadable(path) if read_images else (None if Path(path).is_file() else "missing")
        if problem:
            kind = problem.split(" (")[0]
            problems.add(InputError(path, f"{problem} ({field} of {sample_id})", kind=f"{kind} images", source=IMAGES))


def _intervals(samples: list[Sample]) -> str | None:
    intervals = [s.interval_days for s in samples if s.has_prior]
    if not intervals:
        return None
    same_day, long = sum(days == 0 for days in intervals), sum(days > 3652 for days in intervals)
    return f"  intervals: {min(intervals):g}-{max(intervals):g} days; {same_day} same-day pairs, {long} over ten years"


@dataclass(frozen=True)
class _Image:
    study_id: int
    split: str
    day: date


def _metadata_index(images: pd.DataFrame) -> dict[str, _Image]:
    """dicom_id -> what the cross-checks compare, built once (a pandas lookup per image is slow at 377k)."""
    days = [moment.date() for moment in images["study_datetime"].tolist()]
    return {dicom_id: _Image(study_id, split, day) for dicom_id, study_id, split, day in
            zip(images["dicom_id"].tolist(), images["study_id"].tolist(), images["split"].tolist(), days)}


def _cross_check(samples: list[Sample], split: str | None, index: dict[str, _Image], rejected: set[str],
                 locate: Callable[[Sample], tuple[Path, int | None]], problems: Problems) -> None:
    """Each sample's images are in the MIMIC metadata under its study (and, with ``split``, in that
    split), and the interval between their MIMIC study dates is the sample's and not negative. An
    image whose metadata row was rejected (and reported) is not checked."""
    for sample in samples:
        path, line = locate(sample)

        def fail(field: str, problem: str, kind: str) -> None:
            problems.add(InputError(path, f"{sample.sample_id}: {problem}", line=line, field=field, kind=kind))

        found = {}
        for field, image, study_id in (("image", sample.image, sample.study_id),
                                       ("prior_image", sample.prior_image, sample.prior_study_id)):
            if image is None or image.stem in rejected:
                continue
            if image.stem not in index:
                fail(field, f"image {image.stem} is not in the MIMIC-CXR-JPG metadata", "image not in MIMIC metadata")
                continue
            row = found[field] = index[image.stem]
            if study_id is not None and row.study_id != study_id:
                fail(field, f"image {image.stem} belongs to study {row.study_id} in the MIMIC-CXR-JPG metadata, "
                            f"not {study_id}", "image of another study")
            if split is not None and row.split != split:
                fail(field, f"a {split} question, but MIMIC-CXR-JPG puts image {image.stem} in {row.split}",
                     "split differs from MIMIC's")
        if len(found) == 2:
            days = (found["image"].day - found["prior_image"].day).days
            if days < 0:
                fail("prior_image", f"the prior study is {-days} days after the current one by the MIMIC dates",
                     "negative interval")
            elif days != sample.interval_days:
                fail("prior_image", f"interval {sample.interval_days:g} days, but the MIMIC dates give {days}",
                     "interval differs from MIMIC's")


class _Validation:
    """One run of the checks: the report lines, the problems, and the samples checked so far."""

    def __init__(self, read_images: bool) -> None:
        self.read_images, self.lines, self.problems = read_images, [], Problems()
        self.index: dict[str, _Image] | None = None  # the MIMIC metadata, when it could be read
        self.rejected: set[str] = set()
        self.checked: list[Sample] = []

    def attempt(self, what: str, load: Callable):
        """``load()``, or None when a whole file could not be read (recorded, and said in the report)."""
        try:
            return load()
        except InputError as error:
            self.problems.add(error)
            self.lines.append(f"{what}: not loaded (see the problems below)")
            return None

    def samples(self, name: str, split: str | None, loaded, locate) -> list[Sample]:
        samples, report = loaded
        self.lines.append(f"{name}: {report}")
        interval = _intervals(samples)
        if interval:
            self.lines.append(interval)
        _check_images(samples, self.read_images, self.problems)
        if self.index is not None:
            _cross_check(samples, split, self.index, self.rejected, locate, self.problems)
        self.checked += samples
        return samples


def validate(mimic_cxr_jpg: Path, diffvqa: Path | None = None, read_images: bool = False,
             mmxu: tuple[Path, ...] = (), prognostic: Path | None = None, experts: Path | None = None,
             enhanced: Path | None = None, history: str = "none",
             reports_root: Path | None = None) -> tuple[list[str], list[str]]:
    """Returns (report lines, problem lines)."""
    run = _Validation(read_images)
    images = run.attempt("MIMIC-CXR-JPG tables", lambda: load_images(mimic_cxr_jpg, run.problems))
    if images is not None:
        run.index, run.rejected = _metadata_index(images), images.attrs.get("rejected", set())
        run.lines.append(
            f"MIMIC-CXR-JPG: {len(images)} images, {images['study_id'].nunique()} studies, "
            f"{images['subject_id'].nunique()} subjects; "
            + ", ".join(f"{n} {split}" for split, n in images["split"].value_counts().sort_index().items())
            + "; views: " + ", ".join(f"{n} {view}" for view, n in images["view"].value_counts().items()))
    data: DiffVQA | None = None
    if diffvqa is not None:
        data = run.attempt("Medical-Diff-VQA", lambda: read_diffvqa(diffvqa, run.problems))
    diffvqa_samples = []
    for split in SPLITS if data is not None else ():
        samples = run.samples(f"Medical-Diff-VQA {split}", split, load_diffvqa(data, mimic_cxr_jpg, split),
                              lambda s: (data.questions.path, data.questions.line(int(s.sample_id.split("-")[1]))))
        types = Counter(f"{s.task}/{s.question_type}" for s in samples)
        run.lines.append("  " + ", ".join(f"{n} {name}" for name, n in sorted(types.items())))
        diffvqa_samples += samples
    if prognostic is not None:
        studies = data.studies if data is not None else run.attempt(
            "Medical-Diff-VQA studies", lambda: read_studies(diffvqa, run.problems))
        if studies is None:
            run.lines.append(f"prognostic {prognostic}: not checked: its studies are looked up in mimic_all.csv")
        for split in SPLITS if studies is not None else ():
            loaded = run.attempt(f"prognostic {prognostic}", lambda: load_prognostic(
                prognostic, diffvqa, mimic_cxr_jpg, split, run.problems, studies))
            if loaded is None:
                break
            run.samples(f"prognostic {split}", split, loaded, lambda s: (prognostic, None))
    if enhanced is not None:
        _check_enhanced(run, enhanced, diffvqa_samples)
    for path in mmxu:
        if run.index is None:
            passed = run.attempt(f"MMXU {path}", lambda: check_mmxu_lines(path, run.problems))
            if passed is not None:
                run.lines.append(f"MMXU {path}: {passed} lines well-formed; images and intervals not checked: they "
                                 "are looked up in the MIMIC-CXR-JPG metadata")
            continue
        loaded = run.attempt(f"MMXU {path}", lambda: load_mmxu(path, mimic_cxr_jpg, history, reports_root,
                                                               run.problems, images))
        if loaded is None:
            continue
        samples = run.samples(f"MMXU {path}", None, loaded, lambda s, path=path: (path, None))
        types, letters = Counter(s.question_type for s in samples), Counter(s.answer for s in samples)
        splits = Counter(run.index[s.image.stem].split for s in samples)
        run.lines.append("  content types: " + ", ".join(f"{n} {name}" for name, n in sorted(types.items()))
                         + "; answers: " + ", ".join(f"{letters[letter]} {letter}" for letter in LETTERS)
                         + "; MIMIC splits of the current images: "
                         + ", ".join(f"{n} {split}" for split, n in sorted(splits.items())))
    if experts is not None:
        _check_experts(run, experts)
    return run.lines, run.problems.lines()


def _check_enhanced(run: _Validation, enhanced: Path, samples: list[Sample]) -> None:
    records = run.attempt(f"enhanced {enhanced}", lambda: load_enhanced(enhanced, run.problems))
    if records is None:
        return
    run.lines.append(f"enhanced {enhanced}: {len(records)} answers")
    for sample in samples:
        record = records.get(sample.sample_id)
        if record is None or record["short_answer"] != sample.answer:
            found = "no answer" if record is None else f"the short answer {record['short_answer']!r}"
            run.problems.add(InputError(enhanced, f"{found} for {sample.sample_id}, whose answer is {sample.answer!r}",
                                        fix="rebuild it with `python -m datamodules.build enhance`",
                                        kind="questions without their enhanced answer"))


def _check_experts(run: _Validation, experts: Path) -> None:
    predictions = run.attempt(f"experts {experts}", lambda: load_experts(experts, run.problems))
    if predictions is None:
        return
    run.lines.append(f"experts {experts}: {len(predictions)} images")
    for image in sorted({s.image for s in run.checked if s.image.stem not in predictions}):
        run.problems.add(InputError(experts, f"no predictions for {image.stem} ({image})",
                                    fix="rebuild it with `python -m datamodules.build experts` over these images",
                                    kind="question images without predictions"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mimic-cxr-jpg", type=Path, required=True, help="the MIMIC-CXR-JPG root")
    parser.add_argument("--diffvqa", type=Path, help="the Medical-Diff-VQA directory")
    parser.add_argument("--mmxu", type=Path, nargs="+", default=[], metavar="FILE",
                        help="MMXU JSONL files (MMXU-test.jsonl, dev-schema files), read against --mimic-cxr-jpg")
    parser.add_argument("--history", choices=HISTORY_MODES, default="none",
                        help="the MMXU history to build, as data.sources.mmxu.history (default: none)")
    parser.add_argument("--reports-root", type=Path, metavar="DIR",
                        help="the MIMIC-CXR reports directory (holding files/), for MMXU history")
    parser.add_argument("--prognostic", type=Path, metavar="FILE",
                        help="prognostic JSONL (python -m datamodules.build prognostic); needs --diffvqa")
    parser.add_argument("--enhanced", type=Path, metavar="FILE",
                        help="enhanced answers JSONL (python -m datamodules.build enhance); needs --diffvqa")
    parser.add_argument("--experts", type=Path, metavar="CSV",
                        help="expert CSV (python -m datamodules.build experts): every question image must be in it")
    parser.add_argument("--read-images", action="store_true", help="decode every image, not only check it exists")
    args = parser.parse_args(argv)
    if args.diffvqa is None and not args.mmxu:
        parser.error("nothing to check: give --diffvqa DIR, --mmxu FILE ..., or both")
    for flag in ("prognostic", "enhanced"):
        if getattr(args, flag) is not None and args.diffvqa is None:
            parser.error(f"--{flag} needs --diffvqa: its questions point at Medical-Diff-VQA studies")
    lines, problems = validate(args.mimic_cxr_jpg, args.diffvqa, args.read_images, tuple(args.mmxu), args.prognostic,
                               args.experts, args.enhanced, args.history, args.reports_root)
    print("\n".join(lines))
    if problems:
        print(f"\n{len(problems)} kind(s) of problem:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    print("\nno problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
