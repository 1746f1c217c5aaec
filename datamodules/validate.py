"""Checks a MIMIC-CXR-JPG + Medical-Diff-VQA copy, prognostic questions, MMXU files and an expert
CSV before training on them.

    python -m datamodules.validate --mimic-cxr-jpg ROOT [--diffvqa DIR [--prognostic FILE]]
        [--mmxu FILE ...] [--experts CSV] [--read-images]

Reports questions per split, task and question type (MMXU: per file, content type and answer
letter); rows skipped by the documented policies (later references, duplicates); interval anomalies (same-day pairs, more than ten years); images that are missing
(or, with ``--read-images``, unreadable); images of the checked questions without expert
predictions; and malformed tables or rows. Exits 1 when there is an error (a malformed table or
row, a missing or unreadable image, a question image without expert predictions), 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from datamodules.diffvqa import SPLITS, load_diffvqa
from datamodules.experts import load_experts
from datamodules.mimic import load_images
from datamodules.mmxu import LETTERS, load_mmxu
from datamodules.prognostic import load_prognostic
from datamodules.records import Sample

EXAMPLES = 5  # offending items listed per kind of error


def _unreadable(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error})"
    return None


def _check_samples(name: str, samples: list[Sample], read_images: bool, lines: list[str], errors: list[str]) -> None:
    """Interval anomalies (to ``lines``) and missing or unreadable images (to ``errors``)."""
    intervals = [s.interval_days for s in samples if s.has_prior]
    same_day = sum(days == 0 for days in intervals)
    long = sum(days > 3652 for days in intervals)
    if intervals:
        lines.append(f"  intervals: {min(intervals):g}-{max(intervals):g} days; {same_day} same-day pairs, "
                     f"{long} over ten years")
    problems: dict[str, list[str]] = {}
    paths = {(s.sample_id, "image"): s.image for s in samples}
    paths |= {(s.sample_id, "prior_image"): s.prior_image for s in samples if s.has_prior}
    for (sample_id, field), path in paths.items():
        problem = _unreadable(path) if read_images else (None if Path(path).is_file() else "missing")
        if problem:
            problems.setdefault(problem.split(" (")[0], []).append(f"{sample_id} {field} {path}: {problem}")
    for kind, items in problems.items():
        errors.append(f"{name}: {len(items)} {kind} images, e.g.\n    " + "\n    ".join(items[:EXAMPLES]))


def validate(mimic_cxr_jpg: Path, diffvqa: Path | None = None, read_images: bool = False,
             mmxu: tuple[Path, ...] = (), prognostic: Path | None = None,
             experts: Path | None = None) -> tuple[list[str], list[str]]:
    """Returns (report lines, error lines)."""
    lines, errors = [], []
    checked: list[Sample] = []
    try:
        images = load_images(mimic_cxr_jpg)
        lines.append(f"MIMIC-CXR-JPG: {len(images)} images, {images['study_id'].nunique()} studies, "
                     f"{images['subject_id'].nunique()} subjects; "
                     + ", ".join(f"{n} {split}" for split, n in images["split"].value_counts().sort_index().items())
                     + "; views: " + ", ".join(f"{n} {view}" for view, n in images["view"].value_counts().items()))
    except (OSError, ValueError, KeyError) as error:
        errors.append(f"MIMIC-CXR-JPG tables: {error}")
    for split in SPLITS if diffvqa is not None else ():
        try:
            samples, report = load_diffvqa(diffvqa, mimic_cxr_jpg, split)
        except (OSError, ValueError, KeyError) as error:
            errors.append(f"Medical-Diff-VQA {split}: {error}")
            continue
        types = Counter(f"{s.task}/{s.question_type}" for s in samples)
        lines.append(f"Medical-Diff-VQA {split}: {report}")
        lines.append("  " + ", ".join(f"{n} {name}" for name, n in sorted(types.items())))
        _check_samples(f"Medical-Diff-VQA {split}", samples, read_images, lines, errors)
        checked += samples
    for split in SPLITS if prognostic is not None else ():
        try:
            samples, report = load_prognostic(prognostic, diffvqa, mimic_cxr_jpg, split)
        except (OSError, ValueError, KeyError) as error:
            errors.append(f"prognostic {split}: {error}")
            continue
        lines.append(f"prognostic {split}: {report}")
        _check_samples(f"prognostic {split}", samples, read_images, lines, errors)
        checked += samples
    for path in mmxu:
        try:
            samples, report = load_mmxu(path, mimic_cxr_jpg)
        except (OSError, ValueError, KeyError) as error:
            errors.append(f"MMXU {path}: {error}")
            continue
        types, letters = Counter(s.question_type for s in samples), Counter(s.answer for s in samples)
        lines.append(f"MMXU {path}: {report}")
        lines.append("  content types: " + ", ".join(f"{n} {name}" for name, n in sorted(types.items()))
                     + "; answers: " + ", ".join(f"{letters[letter]} {letter}" for letter in LETTERS))
        _check_samples(f"MMXU {path}", samples, read_images, lines, errors)
        checked += samples
    if experts is not None:
        try:
            predictions = load_experts(experts)
        except (OSError, ValueError) as error:
            errors.append(f"experts: {error}")
            return lines, errors
        lines.append(f"experts {experts}: {len(predictions)} images")
        lacking = sorted({s.image for s in checked if s.image.stem not in predictions})
        if lacking:
            errors.append(f"experts {experts}: {len(lacking)} question images without predictions, e.g.\n    "
                          + "\n    ".join(map(str, lacking[:EXAMPLES])))
    return lines, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mimic-cxr-jpg", type=Path, required=True, help="the MIMIC-CXR-JPG root")
    parser.add_argument("--diffvqa", type=Path, help="the Medical-Diff-VQA directory")
    parser.add_argument("--mmxu", type=Path, nargs="+", default=[], metavar="FILE",
                        help="MMXU JSONL files (MMXU-test.jsonl, dev-schema files), read against --mimic-cxr-jpg")
    parser.add_argument("--prognostic", type=Path, metavar="FILE",
                        help="prognostic JSONL (python -m datamodules.build prognostic); needs --diffvqa")
    parser.add_argument("--experts", type=Path, metavar="CSV",
                        help="expert CSV (python -m datamodules.build experts): every question image must be in it")
    parser.add_argument("--read-images", action="store_true", help="decode every image, not only check it exists")
    args = parser.parse_args(argv)
    if args.diffvqa is None and not args.mmxu:
        parser.error("nothing to check: give --diffvqa DIR, --mmxu FILE ..., or both")
    if args.prognostic is not None and args.diffvqa is None:
        parser.error("--prognostic needs --diffvqa: its questions point at Medical-Diff-VQA studies")
    lines, errors = validate(args.mimic_cxr_jpg, args.diffvqa, args.read_images, tuple(args.mmxu), args.prognostic,
                             args.experts)
    print("\n".join(lines))
    if errors:
        print(f"\n{len(errors)} error(s):\n" + "\n".join(errors), file=sys.stderr)
        return 1
    print("\nno errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
