"""predict.py's speed: the latency of one pair with the model loaded, and manifest mode's throughput
against eval.py's on the same samples (the baseline; the goal is at least 0.9x its samples/s).

The samples are the first ``--samples`` of the world's test split. Both runs load the checkpoint,
read the images, generate greedily in batches of ``--batch-size`` (``evaluation.generation``) and
write their records; eval.py also loads the dataset's tables and scores, tabulates and plots, and
predict.py reads and checks the manifest's files. Each is timed end to end and in its generation
stage alone, the like-for-like part. Manifest mode runs twice: on the world's JPEGs, as eval.py reads
them, and on the same images written as 16-bit JPEG 2000 DICOMs, which it decodes and converts
(twice: once to check each row, once to answer it).

    python train.py                                                    # the demo checkpoint
    python -m bench.predict --ckpt outputs/<date>/<time>/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from datamodules.diffvqa import load_diffvqa
from datamodules.dicom import read_study_file
from datamodules.pairs import make_pair
from datamodules.synthetic.dicoms import write_dicom
import run.evaluate
import run.predict
from run.cli import compose_config, quiet_library_noise
from run.evaluate import evaluate
from run.predict import Predictor, predict

ROOT = Path(__file__).resolve().parents[1]


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


class GenerationClock:
    """Times the generation stage of eval.py and predict.py: both call ``generate_records``, each by the
    name its module imported, which this wraps while the benchmark runs."""

    def __init__(self):
        self.seconds = 0.0
        self.original = run.evaluate.generate_records

    def __enter__(self):
        def timed_generation(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        run.evaluate.generate_records = run.predict.generate_records = timed_generation
        return self

    def __exit__(self, *error):
        run.evaluate.generate_records = run.predict.generate_records = self.original


def write_manifest(path: Path, rows: list[tuple]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "current", "prior", "question", "interval_days"])
        writer.writerows(rows)
    return path


def as_dicoms(samples, directory: Path) -> dict[Path, Path]:
    """Each image of the samples written once as a 16-bit JPEG 2000 DICOM."""
    images = {path for sample in samples for path in (sample.image, sample.prior_image) if path is not None}
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for image in sorted(images):
        with Image.open(image) as grey:
            written[image] = write_dicom(grey, directory / f"{image.stem}.dcm", bits_stored=16,
                                         compression="jpeg2000-lossless")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint from train.py (or an export)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="single-pair latency: the median of this many")
    args = parser.parse_args()
    quiet_library_noise()
    cache = ROOT / ".cache" / "lumen"
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    eval_cfg = compose_config("eval", [f"ckpt={args.ckpt}", f"paths.output_dir={work / 'eval'}",
                                       f"paths.cache_dir={cache}", f"data.limit.test={args.samples}",
                                       f"data.eval_batch_size={args.batch_size}", "accelerator=cpu"])
    world = Path(eval_cfg.paths.world_dir)
    samples = load_diffvqa(world / "medical-diff-vqa", world / "mimic-cxr-jpg", "test")[0][:args.samples]
    jpegs = write_manifest(work / "jpegs.csv", [
        (s.sample_id, s.image, s.prior_image or "", s.question, "" if s.interval_days is None else s.interval_days)
        for s in samples])
    dicom_of = as_dicoms(samples, work / "dicoms")
    dicoms = write_manifest(work / "dicoms.csv", [
        (s.sample_id, dicom_of[s.image], dicom_of.get(s.prior_image, ""), s.question,
         "" if s.interval_days is None else s.interval_days) for s in samples])

    def manifest(path: Path, out: str, workers: int = 0):
        return lambda: predict(compose_config("predict", [f"ckpt={args.ckpt}", f"manifest={path}", f"out={work / out}",
                                                          f"batch_size={args.batch_size}", f"num_workers={workers}",
                                                          "accelerator=cpu"]))

    evaluate(eval_cfg)  # warm-up: files cached, libraries loaded; then every run starts from an empty directory
    eval_cfg.paths.output_dir = str(work / "eval-timed")
    runs = {"eval.py (baseline)": lambda: evaluate(eval_cfg), "predict.py manifest=, JPEGs": manifest(jpegs, "jpegs"),
            "predict.py manifest=, DICOMs": manifest(dicoms, "dicoms"),
            "predict.py manifest=, DICOMs, num_workers=2": manifest(dicoms, "dicoms-workers", workers=2)}
    seconds = {}
    for name, run_it in runs.items():
        with GenerationClock() as generation:
            seconds[name] = (timed(run_it), generation.seconds)

    predictor = Predictor(args.ckpt, accelerator="cpu")
    two = next(s for s in samples if s.has_prior)
    latencies = {}
    for name, current, prior in (("JPEG pair", two.image, two.prior_image),
                                 ("DICOM pair", dicom_of[two.image], dicom_of[two.prior_image])):
        def ask():
            predictor.ask(make_pair("bench", read_study_file(current), read_study_file(prior), "difference",
                                    interval_days=two.interval_days))
        ask()
        latencies[name] = statistics.median(timed(ask) for _ in range(args.repeats))

    print(f"\n{len(samples)} test samples, batches of {args.batch_size}, {torch.get_num_threads()} CPU threads, "
          f"checkpoint {args.ckpt}\n")
    print("| run | end to end (s) | samples/s | vs eval.py | generation (s) | samples/s | vs eval.py |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    whole, generating = seconds["eval.py (baseline)"]
    for name, (spent, generated) in seconds.items():
        print(f"| {name} | {spent:.1f} | {len(samples) / spent:.1f} | {whole / spent:.2f}x | {generated:.1f} | "
              f"{len(samples) / generated:.1f} | {generating / generated:.2f}x |")
    print("\n| one pair, model loaded (files read, prompt, generation) | median seconds |\n| --- | ---: |")
    for name, spent in latencies.items():
        print(f"| {name} | {spent:.3f} |")


if __name__ == "__main__":
    main()
