"""predict.py's speed: the latency of one pair with the model loaded, and manifest mode's throughput
against eval.py's on the same samples (the baseline; the goal is at least 0.9x its samples/s).

The samples are the first ``--samples`` of the world's test split. Both runs load the checkpoint,
read the images, generate greedily in batches of ``--batch-size`` and write their records; eval.py
also scores them. Manifest mode runs twice: on the world's JPEGs, as eval.py reads them, and on the
same images written as 16-bit JPEG 2000 DICOMs, which it must decode and convert first.

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
from run.cli import compose_config, quiet_library_noise
from run.evaluate import evaluate
from run.predict import Predictor, predict

ROOT = Path(__file__).resolve().parents[1]


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


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
    parser.add_argument("--samples", type=int, default=64)
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

    def manifest(path: Path, out: str):
        return lambda: predict(compose_config("predict", [f"ckpt={args.ckpt}", f"manifest={path}", f"out={work / out}",
                                                          f"batch_size={args.batch_size}", "accelerator=cpu"]))

    evaluate(eval_cfg)  # warm-up: files cached, libraries loaded; then every run starts from an empty directory
    eval_cfg.paths.output_dir = str(work / "eval-timed")
    seconds = {"eval.py (baseline)": timed(lambda: evaluate(eval_cfg)),
               "predict.py manifest=, JPEGs": timed(manifest(jpegs, "jpegs")),
               "predict.py manifest=, DICOMs": timed(manifest(dicoms, "dicoms"))}

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
    print("| run | seconds | samples/s | vs eval.py |\n| --- | ---: | ---: | ---: |")
    baseline = seconds["eval.py (baseline)"]
    for name, spent in seconds.items():
        print(f"| {name} | {spent:.1f} | {len(samples) / spent:.2f} | {baseline / spent:.2f}x |")
    print("\n| one pair, model loaded (files read, prompt, generation) | median seconds |\n| --- | ---: |")
    for name, spent in latencies.items():
        print(f"| {name} | {spent:.3f} |")


if __name__ == "__main__":
    main()
