"""Data loading at the real datasets' size: the demo's synthetic world scaled to the real row counts, and
every data stage of a launch timed and measured on it, each in a fresh process.

    python -m bench.scale                          # the real counts (writes ~377k image links once)
    python -m bench.scale --scale 0.05             # a quick run at 5% of them
    python -m bench.scale --stages datamodule validate

The scaled world (``--out``, by default ``<cache>/scale-<scale>-<world>``, ``<cache>`` being
``LUMEN_CACHE`` or ``.cache/lumen``) is the demo world (``prepare=synthetic``'s, prepared first, as is
its tiny base, whose tokenizer the DataModule loads) with its subjects repeated in order, each repeat
("copy") under new identifiers, until the counts below are reached. It is written once and reused while
its ``scale.json`` (written last) matches the world and the scale. Real counts, times ``--scale``:

- 164,324 Medical-Diff-VQA difference questions (Medical-Diff-VQA paper, table of question types):
  reached by the number of subjects copied into Medical-Diff-VQA, cut at the subject that comes
  closest; each copy keeps every difference row, so its prognostic records come along;
- 700,703 questions in all (``mimic_pair_questions.csv``, data-formats.md): the world asks ~7
  diagnostic questions per difference question where the real dataset asks 3.3, so the copies'
  diagnostic rows are thinned evenly (every n-th kept) to the rest of the count;
- 227,835 MIMIC-CXR studies (the MIMIC-CXR paper, Johnson et al. 2019: 377,110 images of 227,835
  studies; the issue's "280k" is not a documented figure): the subjects that follow, in the same
  order, go into the MIMIC-CXR-JPG tables (and the expert CSV) only, as the real MIMIC-CXR has
  studies without Diff-VQA questions, until the study count is closest;
- 377,110 MIMIC-CXR-JPG images (data-formats.md): the world has 1.4 images per study where the real
  dataset has 1.66, so images are added, evenly over all studies, as further images of their study
  (the same view and JPEG under a new dicom_id, with their own metadata, split and expert rows).

Every table is consistent: a copy's subject, study and dicom ids are new (subjects and studies
numbered in the world's order, spread over the real id ranges; the dicom_id's first group is the
copy and the added-image number) and the same in the metadata, split, chexpert, ``mimic_all.csv``
(one row per Diff-VQA study), ``mimic_pair_questions.csv``, expert CSV (one row per image) and
prognostic JSONL, whose ``id``, ``source_row`` and ``source_sample_id`` are recomputed for the
thinned question table. Dates and times are the world's. Each image is a link
``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`` to the world's JPEG. Not written: reports, MMXU,
``all_diseases.json`` (no loader reads it) and the world's ground truth.

Stages, each in a new process (imports and caches cold), timed from the launch: "imports" is the
process's start-up and imports, "wall" the stage's own work after them; "peak RSS" is the process's
high-water mark at the stage's end (``VmHWM``; ``ru_maxrss`` would count the parent's size too):

- ``datamodule``: train.yaml with ``data=lumen``, experts (``data.experts=${paths.experts}``) and
  prognostic questions on the scaled world, composed, its DataModule instantiated, ``prepare_data()``
  run (as the Trainer runs it) and ``train_dataloader()`` built; then, in the same process,
  ``val_dataloader()`` on its own. Twice: cold (an empty ``data.index_cache``) and warm (a second
  launch on the cache the first wrote). "sample table" is ``LumenDataModule.table_bytes("train")``,
  the host memory of a rank's training samples; "memory a forked loader worker copies" is what a
  process forked from the launch (as a data-loader worker is) writes to, or copies on write, by
  reading every ``WORKER_STRIDE``-th training sample (``Private_Dirty``), from the table and, the
  baseline, from the same samples held as a list of ``Sample`` objects (as before issue 22): reading
  an object writes its reference count, so its page is copied;
- ``diffvqa``: ``DiffVQASource.load`` of train, val and test;
- ``validate``: ``python -m datamodules.validate`` (no ``--read-images``) on the MIMIC root,
  Medical-Diff-VQA directory, prognostic JSONL and expert CSV;
- ``prognostic``: ``python -m datamodules.build prognostic --backend rules`` to a temporary file.

The printed report (machine, code version, counts, table) goes into docs/results.md as it is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
GB = 1024**3
SCALE_VERSION = 1  # raise it when the scaled world's layout or content changes
MARKER = "scale.json"
REAL = {"images": 377_110, "studies": 227_835, "questions": 700_703, "difference": 164_324}
STAGES = ("datamodule", "diffvqa", "validate", "prognostic")
# The targets, per table row.
WORKER_STRIDE = 7  # of the training samples, those a forked worker reads to show what it shares
TARGETS = {"datamodule-warm": "≤ 10 s", "datamodule-cold": "≤ 45 s", "sample table": "≤ 1 GB per rank",
           "validate": "≤ 20 s"}
MIMIC_TABLES = ("metadata", "split", "chexpert")
GZIP = {"method": "gzip", "compresslevel": 1, "mtime": 0}  # as shipped (gzipped); level 1: written fast


# ---------------------------------------------------------------------------------------------- scaling


def even_counts(slots: int, total: int) -> np.ndarray:
    """``total`` spread as evenly as whole numbers allow over ``slots`` (each gets floor or ceil)."""
    edges = np.arange(slots + 1, dtype=np.int64) * total // slots
    return np.diff(edges)


def subjects_reaching(target: int, per_subject: np.ndarray) -> int:
    """How many subjects, taken from the world in order and over again, have counts summing closest
    to ``target`` (at least one)."""
    cumulative = np.concatenate([[0], np.cumsum(per_subject)])
    copies, rest = divmod(target, int(cumulative[-1]))
    cut = int(np.searchsorted(cumulative, rest))
    if cut > 0 and rest - cumulative[cut - 1] < cumulative[cut] - rest:
        cut -= 1
    return max(1, copies * len(per_subject) + cut)


@dataclass
class Ids:
    """The scaled world's identifiers: subject slot ``copy * subjects + i`` (``i``: the subject's rank in
    the world) and likewise each study, numbered in order and spread over the real 8-digit ranges."""

    subjects: np.ndarray  # the world's subject ids, sorted
    studies: np.ndarray  # the world's study ids, sorted
    copies: int

    def __post_init__(self):
        self.subject_step = 10_000_000 // (self.copies * len(self.subjects))
        self.study_step = 10_000_000 // (self.copies * len(self.studies))
        if not (self.subject_step and self.study_step):
            raise ValueError(f"{self.copies} copies of the world do not fit in 8-digit ids: use a larger world")

    def subject_slot(self, subject_ids, copy) -> np.ndarray:
        return copy * len(self.subjects) + np.searchsorted(self.subjects, subject_ids)

    def subject(self, subject_ids, copy) -> np.ndarray:
        return 10_000_000 + self.subject_slot(subject_ids, copy) * self.subject_step

    def study(self, study_ids, copy) -> np.ndarray:
        return 50_000_000 + (copy * len(self.studies) + np.searchsorted(self.studies, study_ids)) * self.study_step

    @staticmethod
    def dicom(dicom_ids: pd.Series, copy, added=0) -> np.ndarray:
        """The world's dicom_id with its first group replaced by the copy and the added-image number."""
        prefix = np.char.mod("%04x", np.asarray(copy)).astype(object) + np.char.mod(
            "%04x", np.broadcast_to(added, np.shape(copy))).astype(object)
        return prefix + dicom_ids.str.slice(8).to_numpy(dtype=object)


def tiled(table: pd.DataFrame, ids: Ids, subjects: int) -> tuple[pd.DataFrame, np.ndarray]:
    """``table``'s rows for the first ``subjects`` subject slots (copy by copy, in the table's order),
    and each row's copy."""
    copies = -(-subjects // len(ids.subjects))
    rows = np.tile(np.arange(len(table)), copies)
    copy = np.repeat(np.arange(copies), len(table))
    kept = ids.subject_slot(table["subject_id"].to_numpy()[rows], copy) < subjects
    return table.iloc[rows[kept]].reset_index(drop=True), copy[kept]


def renumbered(table: pd.DataFrame, copy: np.ndarray, ids: Ids, study_columns=("study_id",)) -> pd.DataFrame:
    table = table.copy()
    table["subject_id"] = ids.subject(table["subject_id"].to_numpy(), copy)
    for column in study_columns:
        table[column] = ids.study(table[column].to_numpy(), copy)
    if "dicom_id" in table:
        table["dicom_id"] = Ids.dicom(table["dicom_id"], copy)
    return table


@dataclass
class World:
    """The small world's tables, as written by ``datamodules.synthetic``."""

    root: Path
    metadata: pd.DataFrame
    split: pd.DataFrame
    chexpert: pd.DataFrame
    studies: pd.DataFrame  # mimic_all.csv
    questions: pd.DataFrame
    experts: pd.DataFrame
    prognostic: pd.DataFrame

    @classmethod
    def read(cls, root: Path) -> World:
        mimic = root / "mimic-cxr-jpg"
        read = dict(dtype={"dicom_id": str}, keep_default_na=False, na_values=[""])
        tables = {name: pd.read_csv(mimic / f"mimic-cxr-2.0.0-{name}.csv.gz", **read) for name in MIMIC_TABLES}
        with (root / "prognostic" / "prognostic.jsonl").open() as lines:
            prognostic = pd.DataFrame([json.loads(line) for line in lines if line.strip()])
        return cls(root, **tables, studies=pd.read_csv(root / "medical-diff-vqa" / "mimic_all.csv", **read),
                   questions=pd.read_csv(root / "medical-diff-vqa" / "mimic_pair_questions.csv", **read),
                   experts=pd.read_csv(root / "experts" / "experts.csv", **read), prognostic=prognostic)

    def per_subject(self, table: pd.DataFrame) -> np.ndarray:
        subjects = np.sort(self.metadata["subject_id"].unique())
        return np.bincount(np.searchsorted(subjects, table["subject_id"].to_numpy()), minlength=len(subjects))


def targets(scale: float) -> dict[str, int]:
    return {name: max(1, round(count * scale)) for name, count in REAL.items()}


def scaled_tables(world: World, scale: float) -> dict[str, pd.DataFrame]:
    """Every table of the scaled world (module docstring), plus ``links``: each image's path under the
    MIMIC root and the world's JPEG it links to."""
    want = targets(scale)
    difference = world.questions["question_type"] == "difference"
    in_diffvqa = subjects_reaching(want["difference"], world.per_subject(world.questions[difference]))
    # The chexpert table has one row per MIMIC-CXR study.
    subjects = max(in_diffvqa, subjects_reaching(want["studies"], world.per_subject(world.chexpert)))
    ids = Ids(np.sort(world.metadata["subject_id"].unique()), np.sort(world.metadata["study_id"].unique()),
              copies=-(-subjects // world.metadata["subject_id"].nunique()))

    questions, copy = tiled(world.questions.rename_axis("world_row").reset_index(), ids, in_diffvqa)
    is_difference = (questions["question_type"] == "difference").to_numpy()
    diagnostic = np.flatnonzero(~is_difference)
    wanted_diagnostic = want["questions"] - int(is_difference.sum())
    if wanted_diagnostic > len(diagnostic):
        raise ValueError(f"{world.root}: {len(diagnostic)} diagnostic questions in the copies, {wanted_diagnostic} "
                         "wanted: this world asks too few diagnostic questions per difference question")
    kept = is_difference.copy()
    kept[diagnostic] = even_counts(len(diagnostic), max(wanted_diagnostic, 0)).astype(bool)
    questions, copy = questions[kept].reset_index(drop=True), copy[kept]
    # Row of (copy, world row) in the thinned table: what the prognostic records point to.
    new_row = np.full(ids.copies * len(world.questions), -1)
    new_row[copy * len(world.questions) + questions["world_row"].to_numpy()] = np.arange(len(questions))
    questions = renumbered(questions.drop(columns="world_row"), copy, ids, ("study_id", "ref_id"))

    prognostic, copy = tiled(world.prognostic, ids, in_diffvqa)
    rows = new_row[copy * len(world.questions) + prognostic["source_row"].to_numpy()]
    if (rows < 0).any():
        raise ValueError(f"{world.root}: a prognostic record's source row is not a kept question")
    prognostic = renumbered(prognostic, copy, ids, ("study_id", "ref_id"))
    prognostic["source_row"] = rows
    prognostic["id"] = "prognostic-" + pd.Series(rows).astype(str)
    prognostic["source_sample_id"] = "diffvqa-" + pd.Series(rows).astype(str)

    mimic_all, copy = tiled(world.studies, ids, in_diffvqa)
    mimic_all = renumbered(mimic_all, copy, ids)
    chexpert, copy = tiled(world.chexpert, ids, subjects)
    chexpert = renumbered(chexpert, copy, ids)

    # Images: the subjects' images, then added images spread evenly over them.
    images, copy = tiled(world.metadata, ids, subjects)
    added = even_counts(len(images), max(want["images"] - len(images), 0))
    repeat = np.repeat(np.arange(len(images)), 1 + added)
    # 0: the image itself; 1, 2, ...: its added copies.
    number = np.arange(len(repeat)) - np.repeat(np.cumsum(1 + added) - (1 + added), 1 + added)
    images, copy = images.iloc[repeat].reset_index(drop=True), copy[repeat]
    world_dicoms = images["dicom_id"]
    metadata = renumbered(images, copy, ids)
    metadata["dicom_id"] = Ids.dicom(world_dicoms, copy, number)

    def per_image(table: pd.DataFrame) -> pd.DataFrame:
        """``table``'s row of each image (keyed by the world's dicom_id) under the image's new ids."""
        rows = renumbered(table.set_index("dicom_id").loc[world_dicoms].reset_index()[table.columns], copy, ids)
        rows["dicom_id"] = metadata["dicom_id"]
        return rows

    def image_paths(table: pd.DataFrame, root: str) -> pd.Series:
        subject = table["subject_id"].astype(str)
        return (root + "/files/p" + subject.str.slice(0, 2) + "/p" + subject + "/s" + table["study_id"].astype(str)
                + "/" + table["dicom_id"] + ".jpg")

    links = pd.DataFrame({"path": image_paths(metadata, ""),
                          "target": image_paths(images, str((world.root / "mimic-cxr-jpg").resolve()))})
    return {"metadata": metadata, "split": per_image(world.split), "chexpert": chexpert, "mimic_all": mimic_all,
            "questions": questions, "experts": per_image(world.experts), "prognostic": prognostic, "links": links}


def counts(tables: dict[str, pd.DataFrame]) -> dict[str, int]:
    questions = tables["questions"]
    return {"images": len(tables["metadata"]), "studies": tables["metadata"]["study_id"].nunique(),
            "subjects": tables["metadata"]["subject_id"].nunique(), "questions": len(questions),
            "difference": int((questions["question_type"] == "difference").sum()),
            "diffvqa_studies": len(tables["mimic_all"]), "prognostic": len(tables["prognostic"]),
            "expert_rows": len(tables["experts"])}


def write_scaled(tables: dict[str, pd.DataFrame], out: Path) -> None:
    mimic, diffvqa = out / "mimic-cxr-jpg", out / "medical-diff-vqa"
    for directory in (mimic, diffvqa, out / "prognostic", out / "experts"):
        directory.mkdir(parents=True)
    for name in MIMIC_TABLES:
        tables[name].to_csv(mimic / f"mimic-cxr-2.0.0-{name}.csv.gz", index=False, compression=GZIP)
    tables["mimic_all"].to_csv(diffvqa / "mimic_all.csv", index=False)
    tables["questions"].to_csv(diffvqa / "mimic_pair_questions.csv", index=False)
    tables["experts"].to_csv(out / "experts" / "experts.csv", index=False)
    tables["prognostic"].to_json(out / "prognostic" / "prognostic.jsonl", orient="records", lines=True)
    links = tables["links"]
    for folder in links["path"].str.rpartition("/")[0].unique():
        os.makedirs(f"{mimic}{folder}")
    for path, target in tqdm(zip(links["path"].tolist(), links["target"].tolist()), total=len(links),
                             desc="linking the scaled world's images", unit="image", mininterval=2):
        os.symlink(target, f"{mimic}{path}")


def world_key(world: Path, scale: float) -> dict:
    manifest = json.loads((world / "world.json").read_text())
    return {"bench": "bench.scale", "version": SCALE_VERSION, "world": str(world.resolve()), "scale": scale,
            **{key: manifest[key] for key in ("generator_version", "subjects", "seed")}}


def scale_world(world: Path, out: Path, scale: float) -> tuple[dict, float | None]:
    """``out`` holding ``world`` scaled to ``scale`` of the real counts: (its ``scale.json``, the seconds
    it took to write, None when it was already there). Written in a hidden sibling and renamed into
    place with ``scale.json`` last, so an interrupted run never leaves a world that looks complete; a
    scaled world of other parameters is replaced, any other non-empty directory refused."""
    key = world_key(world, scale)
    try:
        existing = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        existing = None
    if existing is not None and {k: existing.get(k) for k in key} == key:
        return existing, None
    if existing is None and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no {MARKER}: refusing to overwrite it; "
                              "choose another --out")
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        print(f"scaling {world.name} to {scale:g} of the real counts into {out}", flush=True)
        tables = scaled_tables(World.read(world), scale)
        print("writing its tables", flush=True)
        write_scaled(tables, partial)
        marker = {**key, "counts": counts(tables), "targets": targets(scale)}
        (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return marker, time.perf_counter() - started


# ----------------------------------------------------------------------------------------------- stages
# Each runs in its own process (``run_stage``) and imports what it needs itself, so that the time its
# imports take is measured apart from its work.


def stage_datamodule(args: argparse.Namespace) -> dict:
    from run.cli import compose_config
    from run.train import instantiate_data
    from models.config import ModelConfig
    from models.factory import input_spec

    imported = time.time()
    started = time.perf_counter()
    world = args.world
    overrides = [f"paths.cache_dir={args.cache_dir}", "paths.output_dir=unused", "prepare=none", "data=lumen",
                 f"paths.tiny_base={args.base}", f"paths.mimic_cxr_jpg={world / 'mimic-cxr-jpg'}",
                 f"paths.diffvqa={world / 'medical-diff-vqa'}",
                 f"paths.prognostic={world / 'prognostic/prognostic.jsonl'}",
                 f"paths.experts={world / 'experts/experts.csv'}", "data.experts=${paths.experts}"]
    overrides.append(f"data.index_cache={args.index_cache}")
    cfg = compose_config("train", overrides)
    datamodule = instantiate_data(cfg, input_spec(ModelConfig(**cfg.model.net)))
    datamodule.prepare_data()  # as the Trainer does, in one process per machine, before the ranks' loaders
    loader = datamodule.train_dataloader()
    train_seconds = time.perf_counter() - started
    train_rss = peak_rss()
    started = time.perf_counter()
    datamodule.val_dataloader()
    val_seconds, val_rss = time.perf_counter() - started, peak_rss()
    table = loader.dataset.samples
    worker_bytes = forked_reader_bytes(table, WORKER_STRIDE)
    objects = list(table)  # the baseline: the same samples as Python objects, as they were held before
    return {"imported": imported, "seconds": train_seconds, "rss": train_rss, "table_bytes": datamodule.table_bytes("train"),
            "val_seconds": val_seconds, "val_rss": val_rss, "counts": datamodule.sample_counts,
            "worker_bytes": worker_bytes, "objects_worker_bytes": forked_reader_bytes(objects, WORKER_STRIDE)}


def copied_bytes() -> int:
    """The memory this process has written to, in bytes: its own, or copied on write from the process
    it was forked from (``Private_Dirty``; Linux). Pages of a mapped file it only read are the page
    cache's, shared, and not counted."""
    rollup = Path("/proc/self/smaps_rollup").read_text().split()
    return int(rollup[rollup.index("Private_Dirty:") + 1]) * 1024


def forked_reader_bytes(samples, stride: int) -> int:
    """The memory a process forked from the launch (as a data-loader worker is) copies by reading every
    ``stride``-th of ``samples`` (a ``Sample`` each, no image)."""
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(reading)
        before = copied_bytes()
        for index in range(0, len(samples), stride):
            samples[index].question
        os.write(writing, str(copied_bytes() - before).encode())
        os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as answer:
        grown = int(answer.read())
    os.waitpid(pid, 0)
    return grown


def stage_diffvqa(args: argparse.Namespace) -> dict:
    from datamodules.sources import DiffVQASource

    imported = time.time()
    started = time.perf_counter()
    source = DiffVQASource(str(args.world / "medical-diff-vqa"), str(args.world / "mimic-cxr-jpg"))
    loaded = {split: len(source.load(split, use_prior=True)[0]) for split in ("train", "val", "test")}
    return {"imported": imported, "seconds": time.perf_counter() - started, "rss": peak_rss(), "counts": loaded}


def stage_validate(args: argparse.Namespace) -> dict:
    from datamodules.validate import main as validate

    imported = time.time()
    started = time.perf_counter()
    world = args.world
    code = validate(["--mimic-cxr-jpg", str(world / "mimic-cxr-jpg"), "--diffvqa", str(world / "medical-diff-vqa"),
                     "--prognostic", str(world / "prognostic/prognostic.jsonl"),
                     "--experts", str(world / "experts/experts.csv")])
    return {"imported": imported, "seconds": time.perf_counter() - started, "rss": peak_rss(), "exit_code": code}


def stage_prognostic(args: argparse.Namespace) -> dict:
    from datamodules.build import main as build

    imported = time.time()
    started = time.perf_counter()
    build(["prognostic", "--backend", "rules", "--diffvqa", str(args.world / "medical-diff-vqa"),
           "--out", str(args.work / "prognostic.jsonl")])
    with (args.work / "prognostic.jsonl").open() as lines:
        records = sum(1 for _ in lines)
    return {"imported": imported, "seconds": time.perf_counter() - started, "rss": peak_rss(), "records": records}


CHILDREN = {"datamodule": stage_datamodule, "diffvqa": stage_diffvqa, "validate": stage_validate,
            "prognostic": stage_prognostic}


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes: ``VmHWM``, the high-water mark of its own
    address space. Not ``ru_maxrss``: Linux carries that over from the parent at fork and across exec,
    so every child of a large parent would report at least the parent's size."""
    status = Path("/proc/self/status").read_text()  # Linux
    return int(status.split("VmHWM:", 1)[1].split()[0]) * 1024


def run_stage(stage: str, world: Path, work: Path, base: Path, cache_dir: Path, index_cache: Path | None = None,
              name: str | None = None) -> dict:
    """One stage in a new process: its report (``CHILDREN``), with ``imports`` (seconds from the launch
    to the end of its imports) and ``error`` when it failed."""
    name = name or stage
    result, log = work / f"{name}.json", work / f"{name}.log"
    command = [sys.executable, "-m", "bench.scale", "--child", stage, "--out", str(world), "--work", str(work),
               "--result", str(result), "--base", str(base), "--cache-dir", str(cache_dir)]
    if index_cache is not None:
        command += ["--index-cache", str(index_cache)]
    print(f"stage {name}: running (its log, kept with --keep: {log})", flush=True)
    launched = time.time()
    with log.open("w") as output:
        code = subprocess.run(command + ["--launched", repr(launched)], cwd=ROOT, stdout=output,
                              stderr=subprocess.STDOUT).returncode
    print(f"stage {name}: {'done' if code == 0 else f'exit code {code}'} after {time.time() - launched:.0f} s",
          flush=True)
    report = {"log": str(log)}
    if code != 0 or not result.is_file():
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        return {**report, "error": f"exit code {code}: {tail[0]}"}
    report.update(json.loads(result.read_text()))
    report["imports"] = report.pop("imported") - launched
    return report


def child_main(args: argparse.Namespace) -> None:
    report = CHILDREN[args.child](args)
    args.result.write_text(json.dumps(report))


# ---------------------------------------------------------------------------------------------- report


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (f"{os.cpu_count()} cores ({usable} usable), {model}, {memory:.0f} GB; OMP_NUM_THREADS={threads}; "
            f"Python {platform.python_version()}, pandas {pd.__version__}")


def code_version() -> str:
    def git(*arguments: str) -> str:
        result = subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.strip() or "unknown"

    return (f"{git('describe', '--always', '--dirty')} (commit {git('rev-parse', 'HEAD')}, "
            f"branch {git('branch', '--show-current')})")


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def gigabytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GB:.2f}"


def table_rows(reports: dict[str, dict]) -> list[str]:
    rows = []

    def row(stage: str, report: dict, wall_key: str = "seconds", rss_key: str = "rss", imports: bool = True,
            target: str = "—", note: str = "") -> None:
        if "error" in report:
            rows.append(f"| {stage} | failed: {report['error']} | | | {target} |")
            return
        imported = seconds(report["imports"]) if imports else "—"
        rows.append(f"| {stage}{note} | {seconds(report[wall_key])} | {imported} | {gigabytes(report[rss_key])} | "
                    f"{target} |")

    for temperature in ("cold", "warm"):
        report = reports.get(f"datamodule-{temperature}")
        if report is None:
            continue
        cache = "index cache " + temperature
        loaded = report.get("counts", {}).get("train", {})
        note = f" ({cache}; {sum(c['kept'] for c in loaded.values()):,} training samples)" if loaded else f" ({cache})"
        row("DataModule ready, data=lumen + experts + prognostic (train loader)", report,
            target=TARGETS[f"datamodule-{temperature}"], note=note)
        if "error" not in report:
            val = report["counts"].get("val", {})
            built, kept = sum(c["loaded"] for c in val.values()), sum(c["kept"] for c in val.values())
            row("its validation loader", report, wall_key="val_seconds", rss_key="val_rss", imports=False,
                note=f" ({built:,} rows built, {kept:,} kept)")
            rows.append(f"| sample table (train split), host memory per rank ({temperature}; memory-mapped from the "
                        f"index cache) | — | — | {gigabytes(report['table_bytes'])} | {TARGETS['sample table']} |")
            rows.append(f"| memory a forked loader worker copies reading every {WORKER_STRIDE}th training sample "
                        f"({temperature}): from the table / from the same samples as Python objects (before) | — | — | "
                        f"{gigabytes(report['worker_bytes'])} / {gigabytes(report['objects_worker_bytes'])} | "
                        "shared, not copied |")
    if "diffvqa" in reports:
        report = reports["diffvqa"]
        note = "" if "error" in report else " (" + ", ".join(f"{n:,} {s}" for s, n in report["counts"].items()) + ")"
        row("DiffVQASource.load, three splits", report, note=note)
    if "validate" in reports:
        report = reports["validate"]
        note = "" if "error" in report else f" (exit code {report['exit_code']})"
        row("python -m datamodules.validate without --read-images", report, target=TARGETS["validate"], note=note)
    if "prognostic" in reports:
        report = reports["prognostic"]
        note = "" if "error" in report else f" ({report['records']:,} records)"
        row("python -m datamodules.build prognostic (rules)", report, note=note)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real counts (default 1.0)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--out", type=Path, help="the scaled world (default: <cache>/scale-<scale>-<world>)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the stages' work directory (logs, index cache, built prognostic JSONL)")
    for hidden in ("--child", "--work", "--result", "--base", "--cache-dir", "--index-cache", "--launched"):
        parser.add_argument(hidden, help=argparse.SUPPRESS,
                            type=(str if hidden == "--child" else float if hidden == "--launched" else Path))
    args = parser.parse_args()
    if args.child:
        args.world = args.out
        child_main(args)
        return

    from run.cli import compose_config, prepare

    cache = Path(os.environ.get("LUMEN_CACHE", ROOT / ".cache" / "lumen"))
    cfg = compose_config("train", [f"paths.cache_dir={cache}", "paths.output_dir=unused"])
    prepare(cfg)  # the demo world and its tiny base, when not there yet
    world, base = Path(cfg.paths.world_dir), Path(cfg.paths.tiny_base)
    out = args.out or cache / f"scale-{args.scale:g}-{world.name}"
    marker, written = scale_world(world, out, args.scale)

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    reports = {}
    try:
        for stage in args.stages:
            if stage == "datamodule":
                index_cache = work / "index-cache"
                index_cache.mkdir()
                # Cold: an empty index cache; warm: a second launch on the cache the first one wrote.
                for temperature in ("cold", "warm"):
                    name = f"datamodule-{temperature}"
                    reports[name] = run_stage(stage, out, work, base, cache, index_cache, name)
            else:
                reports[stage] = run_stage(stage, out, work, base, cache)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    made, wanted = marker["counts"], marker["targets"]
    print(f"\n## Data loading at the real row counts (`bench/scale.py`, {datetime.date.today().isoformat()})\n")
    print(f"- machine: {machine()}")
    print(f"- code: {code_version()}")
    print(f"- scaled world: {out} ({'written in ' + seconds(written) + ' s' if written is not None else 'reused'}), "
          f"--scale {args.scale:g} of the real counts, from {world.name}")
    print("- counts (wanted): " + ", ".join(
        f"{made[name]:,} {label} ({wanted[name]:,})" for name, label in
        (("images", "images"), ("studies", "studies"), ("questions", "Diff-VQA questions"),
         ("difference", "difference questions")))
          + f"; {made['diffvqa_studies']:,} studies in mimic_all.csv, {made['subjects']:,} subjects, "
          f"{made['prognostic']:,} prognostic questions, {made['expert_rows']:,} expert rows")
    print("\n| stage | wall (s) | imports (s) | peak RSS (GB) | target |\n| --- | ---: | ---: | ---: | --- |")
    print("\n".join(table_rows(reports)))
    if args.keep:
        print(f"\nstage logs and outputs kept in {work}")
    failed = [name for name, report in reports.items() if "error" in report]
    if failed:
        print(f"\nfailed: {', '.join(failed)}; see the logs (run with --keep to keep them)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
