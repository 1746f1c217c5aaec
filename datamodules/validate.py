"""Checks a MIMIC-CXR-JPG + Medical-Diff-VQA copy, prognostic questions, MMXU files, enhanced
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
import os
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from common.readers import InputError, Problems
from datamodules.diffvqa import SPLITS, DiffVQA, load_diffvqa, read_diffvqa, read_studies
from datamodules.enhance import load_enhanced
from datamodules.experts import read_experts
from datamodules.mimic import load_images
from datamodules.mmxu import HISTORY_MODES, LETTERS, check_mmxu_lines, load_mmxu
from datamodules.prognostic import load_prognostic, read_prognostic
from datamodules.table import SampleTable, image_stems, one_array

IMAGES = "question images"  # the source that image problems are grouped under
FILE_THREADS = 4  # files looked at at once: a look on a network filesystem mostly waits
FILE_CHUNK = 1024  # files per task given to a thread


def _unreadable(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error})"
    return None


def _missing(path: str) -> str | None:
    return None if os.path.isfile(path) else "missing"


def _intervals(table: SampleTable) -> str | None:
    intervals = table.column("interval_days").drop_null().to_numpy()
    if not len(intervals):
        return None
    same_day, long = int((intervals == 0).sum()), int((intervals > 3652).sum())
    return f"  intervals: {intervals.min():g}-{intervals.max():g} days; {same_day} same-day pairs, {long} over ten years"


@dataclass
class _Metadata:
    """What the cross-checks compare, per image of the MIMIC-CXR-JPG metadata, as columns: its
    ``dicom_ids`` (Arrow, to look many up at once), ``study_id``, ``split`` and ``day`` (the study date
    as days since 1970-01-01)."""

    dicom_ids: pa.Array
    study_id: np.ndarray
    split: np.ndarray
    day: np.ndarray

    @classmethod
    def of(cls, images: pd.DataFrame) -> _Metadata:
        days = images["study_datetime"].dt.normalize() - pd.Timestamp("1970-01-01")
        return cls(pa.array(images["dicom_id"].to_numpy(dtype=object), pa.string()), images["study_id"].to_numpy(),
                   images["split"].to_numpy(dtype=object), days.dt.days.to_numpy())

    def rows(self, dicom_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Each dicom_id's row, -1 for one not in the metadata (or none)."""
        found = pc.index_in(dicom_ids, value_set=self.dicom_ids)
        return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


class _Validation:
    """One run of the checks: the report lines, the problems, and the samples checked so far."""

    def __init__(self, read_images: bool) -> None:
        self.read_images, self.lines, self.problems = read_images, [], Problems()
        self.index: _Metadata | None = None  # the MIMIC metadata, when it could be read
        self.rejected: set[str] = set()
        self.checked: list[SampleTable] = []
        self.files_checked: list[pa.Array] = []  # each distinct file is looked at once

    def attempt(self, what: str, load: Callable):
        """``load()``, or None when a whole file could not be read (recorded, and said in the report)."""
        try:
            return load()
        except InputError as error:
            self.problems.add(error)
            self.lines.append(f"{what}: not loaded (see the problems below)")
            return None

    def samples(self, name: str, split: str | None, loaded, locate: Callable[[str], tuple[Path, int | None]]
                ) -> SampleTable:
        table, report = loaded
        table = table if isinstance(table, SampleTable) else SampleTable.from_samples(table)
        self.lines.append(f"{name}: {report}")
        interval = _intervals(table)
        if interval:
            self.lines.append(interval)
        self.check_files(table)
        if self.index is not None:
            self.cross_check(table, split, locate)
        self.checked.append(table)
        return table

    def check_files(self, table: SampleTable) -> None:
        """Each image of the samples exists (and, with ``read_images``, decodes), once per file in the
        whole run, named by the first sample that uses it; the files are looked at by several threads
        (a network filesystem answers each in about a millisecond)."""
        # A file is named by its first mention, counting each sample's image, then its prior image, in
        # sample order. Worked out on each column's distinct files, not on every sample's.
        files, mentions = [], []
        for offset, column in enumerate(("image", "prior_image")):
            encoded = one_array(table.column(column)).dictionary_encode()
            codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False)
            named = np.flatnonzero(codes >= 0)
            distinct, first = np.unique(codes[named], return_index=True)
            files.append(encoded.dictionary.take(pa.array(distinct)))
            mentions.append(2 * named[first] + offset)
        files, mention = pa.concat_arrays(files), np.concatenate(mentions)
        same = files.dictionary_encode().indices.to_numpy(zero_copy_only=False)
        order = np.lexsort((mention, same))
        first = order[np.r_[True, same[order][1:] != same[order][:-1]]] if len(order) else order
        if self.files_checked:
            first = first[~pc.is_in(files.take(pa.array(first)), value_set=pa.concat_arrays(
                self.files_checked)).to_numpy(zero_copy_only=False)]
        first = first[np.argsort(mention[first])]
        files, mention = files.take(pa.array(first, pa.int64())), mention[first]
        self.files_checked.append(files)
        ordered = files.to_pylist()
        look = _unreadable if self.read_images else _missing
        chunks = [ordered[start:start + FILE_CHUNK] for start in range(0, len(ordered), FILE_CHUNK)]
        with ThreadPoolExecutor(FILE_THREADS) as pool:
            found = [problem for chunk in pool.map(lambda paths: [look(path) for path in paths], chunks)
                     for problem in chunk]
        sample_ids = table.column("sample_id")
        for index in (index for index, problem in enumerate(found) if problem):
            field = "image" if mention[index] % 2 == 0 else "prior_image"
            problem, sample_id = found[index], sample_ids[int(mention[index] // 2)].as_py()
            self.problems.add(InputError(ordered[index], f"{problem} ({field} of {sample_id})",
                                         kind=f"{problem.split(' (')[0]} images", source=IMAGES))

    def cross_check(self, table: SampleTable, split: str | None,
                    locate: Callable[[str], tuple[Path, int | None]]) -> None:
        """Each sample's images are in the MIMIC metadata under its study (and, with ``split``, in that
        split), and the interval between their MIMIC study dates is the sample's and not negative. An
        image whose metadata row was rejected (and reported) is not checked. Column by column; the
        problems are reported sample by sample, as they come."""
        failures: list[tuple[int, int, str, str, str]] = []  # (sample, order, field, problem, kind)
        found = {}
        index = self.index
        for order, (field, study_column) in enumerate((("image", "study_id"), ("prior_image", "prior_study_id"))):
            # Looked up once per distinct image, not once per sample.
            images = one_array(table.column(field)).dictionary_encode()
            stems = image_stems(images.dictionary).to_pylist()
            looked_up = index.rows(pa.array(stems, pa.string()))
            skipped = np.array([stem in self.rejected for stem in stems], dtype=bool)  # reported on their own
            codes = pc.fill_null(images.indices, -1).to_numpy(zero_copy_only=False)
            checked = codes >= 0
            checked[checked] = ~skipped[codes[checked]]
            rows = np.where(checked, looked_up[np.maximum(codes, 0)], -1) if len(stems) else np.full(len(codes), -1)
            known = rows >= 0
            found[field] = (known, np.where(known, index.day[rows], 0))
            for position in np.flatnonzero(checked & ~known):
                failures.append((position, 3 * order, field, f"image {stems[codes[position]]} is not in the "
                                 "MIMIC-CXR-JPG metadata", "image not in MIMIC metadata"))
            studies = table.column(study_column).to_numpy(zero_copy_only=False)
            given = pd.notna(studies)
            metadata_study = index.study_id[rows]
            for position in np.flatnonzero(known & given & (metadata_study != studies)):
                failures.append((position, 3 * order + 1, field, f"image {stems[codes[position]]} belongs to "
                                 f"study {int(metadata_study[position])} in the MIMIC-CXR-JPG metadata, not "
                                 f"{int(studies[position])}", "image of another study"))
            if split is not None:
                metadata_split = index.split[rows]
                for position in np.flatnonzero(known & (metadata_split != split)):
                    failures.append((position, 3 * order + 2, field, f"a {split} question, but MIMIC-CXR-JPG puts image "
                                     f"{stems[codes[position]]} in {metadata_split[position]}",
                                     "split differs from MIMIC's"))
        both = found["image"][0] & found["prior_image"][0]
        days = found["image"][1] - found["prior_image"][1]  # compared only where both were found
        intervals = table.column("interval_days").to_numpy(zero_copy_only=False)
        for position in np.flatnonzero(both & (days < 0)):
            failures.append((position, 6, "prior_image", f"the prior study is {int(-days[position])} days after the "
                             "current one by the MIMIC dates", "negative interval"))
        for position in np.flatnonzero(both & (days >= 0) & (days != intervals)):
            failures.append((position, 6, "prior_image", f"interval {intervals[position]:g} days, but the MIMIC "
                             f"dates give {int(days[position])}", "interval differs from MIMIC's"))
        sample_ids = table.column("sample_id")
        for position, _, field, problem, kind in sorted(failures, key=lambda failure: failure[:2]):
            sample_id = sample_ids[int(position)].as_py()
            path, line = locate(sample_id)
            self.problems.add(InputError(path, f"{sample_id}: {problem}", line=line, field=field, kind=kind))


def validate(mimic_cxr_jpg: Path, diffvqa: Path | None = None, read_images: bool = False,
             mmxu: tuple[Path, ...] = (), prognostic: Path | None = None, experts: Path | None = None,
             enhanced: Path | None = None, history: str = "none",
             reports_root: Path | None = None) -> tuple[list[str], list[str]]:
    """Returns (report lines, problem lines)."""
    run = _Validation(read_images)
    images = run.attempt("MIMIC-CXR-JPG tables", lambda: load_images(mimic_cxr_jpg, run.problems))
    if images is not None:
        run.index, run.rejected = _Metadata.of(images), images.attrs.get("rejected", set())
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
        table = run.samples(f"Medical-Diff-VQA {split}", split, load_diffvqa(data, mimic_cxr_jpg, split),
                            lambda sample_id: (data.questions.path, data.questions.line(int(sample_id.split("-")[1]))))
        kinds = pc.binary_join_element_wise(table.column("task").cast(pa.string()),
                                            table.column("question_type").cast(pa.string()), "/")
        types = {count["values"]: count["counts"] for count in pc.value_counts(kinds).to_pylist()}
        run.lines.append("  " + ", ".join(f"{n} {name}" for name, n in sorted(types.items())))
        diffvqa_samples.append(table)
    if prognostic is not None:
        studies = data.studies if data is not None else run.attempt(
            "Medical-Diff-VQA studies", lambda: read_studies(diffvqa, run.problems))
        if studies is None:
            run.lines.append(f"prognostic {prognostic}: not checked: its studies are looked up in mimic_all.csv")
        records = run.attempt(f"prognostic {prognostic}", lambda: read_prognostic(prognostic, studies, run.problems)) \
            if studies is not None else None
        for split in SPLITS if records is not None else ():
            loaded = load_prognostic(prognostic, diffvqa, mimic_cxr_jpg, split, run.problems, studies, records)
            run.samples(f"prognostic {split}", split, loaded, lambda sample_id: (prognostic, None))
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
        samples = list(run.samples(f"MMXU {path}", None, loaded, lambda sample_id, path=path: (path, None)))
        types, letters = Counter(s.question_type for s in samples), Counter(s.answer for s in samples)
        rows = run.index.rows(pa.array([s.image.stem for s in samples], pa.string()))
        splits = Counter(run.index.split[row] for row in rows if row >= 0)  # load_mmxu found each in the metadata
        run.lines.append("  content types: " + ", ".join(f"{n} {name}" for name, n in sorted(types.items()))
                         + "; answers: " + ", ".join(f"{letters[letter]} {letter}" for letter in LETTERS)
                         + "; MIMIC splits of the current images: "
                         + ", ".join(f"{n} {split}" for split, n in sorted(splits.items())))
    if experts is not None:
        _check_experts(run, experts)
    return run.lines, run.problems.lines()


def _check_enhanced(run: _Validation, enhanced: Path, tables: list[SampleTable]) -> None:
    records = run.attempt(f"enhanced {enhanced}", lambda: load_enhanced(enhanced, run.problems))
    if records is None:
        return
    run.lines.append(f"enhanced {enhanced}: {len(records)} answers")
    for table in tables:
        for sample_id, answer in zip(table.column("sample_id").to_pylist(), table.column("answer").to_pylist()):
            record = records.get(sample_id)
            if record is None or record["short_answer"] != answer:
                found = "no answer" if record is None else f"the short answer {record['short_answer']!r}"
                run.problems.add(InputError(enhanced, f"{found} for {sample_id}, whose answer is {answer!r}",
                                            fix="rebuild it with `python -m datamodules.build enhance`",
                                            kind="questions without their enhanced answer"))


def _check_experts(run: _Validation, experts: Path) -> None:
    """Every problem of the CSV (read column by column when it has none), and every question image
    without predictions."""
    dicom_ids = run.attempt(f"experts {experts}", lambda: pa.array(read_experts(experts, run.problems).index.to_numpy(
        dtype=object), pa.string()))
    if dicom_ids is None:
        return
    run.lines.append(f"experts {experts}: {len(dicom_ids)} images")
    images = pc.unique(pa.chunked_array([table.column("image") for table in run.checked], pa.string()))
    missing = images.filter(pc.invert(pc.is_in(image_stems(images), value_set=dicom_ids)))
    for image in sorted(Path(image) for image in missing.to_pylist()):
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
