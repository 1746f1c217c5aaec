"""The LightningDataModule: a weighted mixture of sources -> image-reading datasets -> collated batches."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common.contract import DEFAULT_RESIZE, InputSpec
from common.tokenizer import load_tokenizer
from common.readers import InputError
from datamodules.collate import LoadedSample, LumenCollator
from datamodules.dicom import IMAGE_SUFFIXES, is_dicom, read_study_file
from datamodules.diffvqa import LoadReport
from datamodules.experts import expert_texts, read_experts
from datamodules.index_cache import IndexCache, cache_key
from datamodules.records import Sample
from datamodules.sampling import MixtureBatchSampler, ResumableLoader
from datamodules.table import SampleTable, image_stems

log = logging.getLogger(__name__)

# Characters per token, for the length estimate that groups batches (the collator alone tokenizes).
CHARS_PER_TOKEN = 4


def read_image(path: Path, sample: Sample, field: str) -> Image.Image:
    """The sample's image at ``path`` as 8-bit grayscale. A DICOM file goes through
    ``datamodules.dicom`` (the pixel pipeline training, evaluation and prediction share); any other
    file is opened directly, without a DICOM parse."""
    if Path(path).suffix.lower() not in IMAGE_SUFFIXES and is_dicom(path):
        try:
            return read_study_file(path).image
        except InputError as error:
            raise InputError(error.path, f"{error.problem} ({field} of sample {sample.sample_id})", field=error.field,
                             fix=error.fix) from None
    try:
        with Image.open(path) as image:
            return image.convert("L")
    except FileNotFoundError:
        raise FileNotFoundError(f"sample {sample.sample_id}, field {field}: image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise OSError(f"sample {sample.sample_id}, field {field}: cannot read image {path}: {error}") from None


class SampleDataset(Dataset):
    """Reads a sample's image(s); everything else happens in the collator. ``samples``: a list, or a
    ``SampleTable`` (whose sample is made when it is read)."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> LoadedSample:
        sample = self.samples[index]
        prior = read_image(sample.prior_image, sample, "prior_image") if sample.has_prior else None
        return LoadedSample(sample, read_image(sample.image, sample, "image"), prior)


class LumenDataModule(L.LightningDataModule):
    """A mixture of sources (``datamodules.sources``) for training, validation loss and generation.

    Training draws each source's samples ``weight`` times per epoch, in length-grouped, seeded
    batches that every rank shards itself (``MixtureBatchSampler``; the trainer configs set
    ``use_distributed_sampler: false``). Validation and generation read every source's split in order.
    ``input_spec`` (image size, normalisation, visual tokens per image) comes from the model's base
    directory (``models.factory.input_spec``) so the collator and the model always agree.
    ``image_resize``: how images become the tower's square (``RESIZE_POLICIES``); ``None`` takes the
    base's own policy (``InputSpec.resize``: an NVILA base's ``image_aspect_ratio``), else
    ``DEFAULT_RESIZE``. A policy that differs from the base's wins, with a warning. The policy used is
    saved in checkpoints, so that evaluation sees images as training did.
    ``experts``: an expert-prediction CSV (``python -m datamodules.build experts``) whose text about the
    current image goes into every prompt, with age, race and view when ``expert_demographics``.
    ``packing``: training and validation-loss batches are one row of the samples end to end, with
    block-causal attention, instead of padded rows (``LumenCollator``); generation stays left-padded.
    ``limit`` caps each source's samples of a split (keeps CPU runs short; ``null`` for all), before
    anything (expert text) is added to them. A source
    set to ``null`` is left out (``data.sources.prognostic=null``). ``batch_size`` is the per-process
    micro-batch; ``global_batch_size`` (samples per optimizer step over all processes, from which
    train.py derives gradient accumulation) is recorded in checkpoints with the other settings.

    Samples are held as ``SampleTable`` columns, not objects. ``index_cache``: a directory where each
    source's split is kept once built (``datamodules.index_cache``), keyed by its input files and
    settings; a launch whose inputs did not change maps it instead of reading the dataset. Under a
    Trainer, ``prepare_data`` (one process per machine) builds the training and validation tables
    there before the other ranks look for them. ``null``: built in memory on every launch and rank.
    """

    def __init__(
        self,
        sources: dict[str, Any],
        tokenizer_dir: str,
        input_spec: InputSpec,
        use_prior: bool = True,
        interval_in_prompt: bool = True,
        experts: str | None = None,
        expert_demographics: bool = True,
        image_resize: str | None = None,
        batch_size: int = 8,
        global_batch_size: int | None = None,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        group_batches: int = 32,
        packing: bool = False,
        seed: int = 0,
        limit: dict[str, int | None] | None = None,
        index_cache: str | None = None,
    ):
        super().__init__()
        sources = {name: source for name, source in sources.items() if source is not None}
        if not sources:
            raise ValueError("data.sources is empty: name at least one source")
        tasks = sorted({task for source in sources.values() for task in source.tasks})
        # Through hydra.utils.instantiate the spec arrives as a DictConfig of its fields.
        input_spec = input_spec if isinstance(input_spec, InputSpec) else InputSpec(**input_spec)
        if image_resize is not None and input_spec.resize not in (None, image_resize):
            log.warning("data.image_resize=%s overrides the base's own policy, %s: the model sees images "
                        "resized unlike in its training (set data.image_resize=null to follow the base)",
                        image_resize, input_spec.resize)
        image_resize = image_resize or input_spec.resize or DEFAULT_RESIZE
        # Saved in checkpoints, so evaluation can prompt exactly as training did (loggers get the whole
        # resolved config from train.py instead).
        self.save_hyperparameters(
            {"tasks": tasks, "use_prior": use_prior, "interval_in_prompt": interval_in_prompt, "batch_size": batch_size,
             "global_batch_size": global_batch_size, "image_resize": image_resize,
             "sources": {name: type(source).__name__ for name, source in sources.items()},
             "experts_in_prompt": experts is not None, "expert_demographics": expert_demographics,
             # How MMXU's questions showed the prior report (none, global, regional); None without MMXU.
             "history": next((source.history for source in sources.values() if hasattr(source, "history")), None)},
            logger=False,
        )
        self.sources, self.use_prior = dict(sources), use_prior
        self.experts, self.expert_demographics = experts, expert_demographics
        if experts is not None and not Path(experts).is_file():
            raise FileNotFoundError(f"data.experts = {experts} does not exist: build it with "
                                    "`python -m datamodules.build experts`, or set data.experts=null")
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.group_batches, self.seed = group_batches, seed
        self.limit = dict(limit or {})
        self.tokens_per_image = input_spec.tokens_per_image
        self.tokenizer = load_tokenizer(tokenizer_dir, input_spec.image_token)
        collator_args = dict(tokenizer=self.tokenizer, interval_in_prompt=interval_in_prompt,
                             **(input_spec | {"resize": image_resize}))
        self.train_collator = LumenCollator(**collator_args, packing=packing)
        self.generation_collator = LumenCollator(**collator_args, for_generation=True)
        self.image_slots = len(self.train_collator.slots)
        self.index_cache = IndexCache(index_cache) if index_cache is not None else None
        self.tables: dict[str, list[SampleTable]] = {}
        # Per split and source, the samples loaded and those kept after ``limit``, so that results
        # can say how many of how many were scored.
        self.sample_counts: dict[str, dict[str, dict[str, int]]] = {}

    def prepare_data(self) -> None:
        """Builds the training and validation tables into the index cache (Lightning runs this in one
        process per machine, the others waiting), so that every rank then maps them."""
        if self.index_cache is not None:
            self._build(["train", "val"])

    def source_tables(self, split: str) -> list[SampleTable]:
        """Each source's samples of a split (after ``limit``), in source order."""
        if split not in self.tables:
            self._build([split])
        return self.tables[split]

    def _build(self, splits: list[str]) -> None:
        """The tables of ``splits`` not yet held: from the index cache, or read (each input file once
        for all of them) and stored there."""
        shared: dict = {}  # what the sources read, shared by them while these splits are built
        for split in splits:
            if split not in self.tables:
                self.tables[split] = [self._source_table(name, source, split, shared)
                                      for name, source in self.sources.items()]
        # What was read to build them goes with ``shared``: nothing of it stays in a rank, or is
        # inherited by its data-loader workers.
        self.__dict__.pop("_expert_table", None)
        self.__dict__.pop("_expert_index", None)

    def _source_table(self, name: str, source, split: str, shared: dict) -> SampleTable:
        limit = self.limit.get(split)
        key = self._cache_key(source, split, limit)
        cached = self.index_cache.load(key) if key is not None else None
        if cached is None:
            started = time.perf_counter()
            log.info("%s %s: reading the source%s", name, split, "" if key is None else " (not in the index cache yet)")
            table, report = source.load(split, self.use_prior, shared)
            record = {"source": name, "split": split, "loaded": len(table), "report": report.to_dict()}
            table = table[:limit]
            if self.experts:
                table = self._with_experts(table, name)
            if key is not None:
                self.index_cache.store(key, table, record)
                stored = self.index_cache.load(key)
                table = stored[0] if stored is not None else table  # mapped: its pages shared with other processes
            log.info("%s %s: built in %.1f s", name, split, time.perf_counter() - started)
        else:
            table, record = cached
        loaded, report = record["loaded"], LoadReport.from_dict(record["report"])
        log.info("%s %s: %s; kept %d of %d (data.limit.%s=%s)%s", name, split, report, len(table), loaded, split, limit,
                 " [index cache]" if cached is not None else "")
        self.sample_counts.setdefault(split, {})[name] = {"loaded": loaded, "kept": len(table)}
        return table

    def _cache_key(self, source, split: str, limit: int | None) -> str | None:
        """The index cache's key of a source's split, or None when it is not cached."""
        inputs = source.inputs(split) if self.index_cache is not None else None
        if inputs is None:
            return None
        settings = {name: value for name, value in asdict(source).items() if name != "weight"}
        if self.experts:
            inputs = [*inputs, Path(self.experts)]
        return cache_key({"source": type(source).__name__, "settings": settings, "split": split,
                          "use_prior": self.use_prior, "limit": limit, "experts": self.experts is not None,
                          "expert_demographics": self.expert_demographics}, inputs)

    @cached_property
    def _expert_table(self) -> pd.DataFrame:
        return read_experts(self.experts)

    @cached_property
    def _expert_index(self) -> pd.Index:
        """The CSV's dicom_ids, as a hash index of Python strings (the fastest to look many up in)."""
        return pd.Index(self._expert_table.index.to_numpy(dtype=object))

    def _with_experts(self, table: SampleTable, source: str) -> SampleTable:
        """Each sample with the expert models' text about its current image (the file stem is the
        dicom_id), the text of an image made and stored once."""
        stems = image_stems(table.column("image"))
        codes, dicom_ids = pd.factorize(stems.to_numpy(zero_copy_only=False))
        rows = self._expert_index.get_indexer(dicom_ids)
        if (rows < 0).any():
            absent = (rows < 0)[codes]
            first = int(np.flatnonzero(absent)[0])
            raise ValueError(
                f"{self.experts}: no expert predictions for {int(absent.sum())} image(s) of source {source}, e.g. "
                f"{table.column('image')[first].as_py()} ({table.column('sample_id')[first].as_py()}); rebuild it "
                "with `python -m datamodules.build experts`"
            )
        texts = expert_texts(self._expert_table.iloc[rows], self.expert_demographics)
        expert = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(texts.to_numpy(), pa.string()))
        return table.with_column("expert", expert)

    def table_bytes(self, split: str) -> int:
        """The bytes of a split's sample tables (held in memory, or mapped from the index cache)."""
        return sum(table.nbytes for table in self.source_tables(split))

    def samples(self, split: str) -> list[Sample]:
        return [sample for table in self.source_tables(split) for sample in table]

    def source_datasets(self, split: str) -> list[SampleDataset]:
        return [SampleDataset(table) for table in self.source_tables(split)]

    def dataset(self, split: str) -> SampleDataset:
        """All sources' samples of a split, one after another."""
        return SampleDataset(SampleTable.concat(self.source_tables(split)))

    def lengths(self, table: SampleTable) -> np.ndarray:
        """About how many tokens each sample takes: its visual tokens plus its text at CHARS_PER_TOKEN."""
        images = np.where(table.has_prior(), self.image_slots, 1)
        return images * self.tokens_per_image + table.text_chars() // CHARS_PER_TOKEN

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        tables = self.source_tables("train")
        table = SampleTable.concat(tables)
        rank, world_size = self._rank()
        sampler = MixtureBatchSampler(
            [len(part) for part in tables], [source.weight for source in self.sources.values()],
            self.lengths(table), self.batch_size, self.seed, rank, world_size, self.group_batches,
        )
        dataset = SampleDataset(table)
        return ResumableLoader(dataset, batch_sampler=sampler, collate_fn=self.train_collator,
                               num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        dataset = self.dataset("val")
        rank, world_size = self._rank()
        # Each rank scores its share; the module averages the loss over ranks.
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=False) if world_size > 1 else None
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=self.train_collator,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def generation_loader(self, split: str) -> DataLoader:
        """Left-padded prompts without answers, for ``Trainer.predict``."""
        return DataLoader(self.dataset(split), batch_size=self.eval_batch_size, collate_fn=self.generation_collator,
                          num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.generation_loader("test")
