"""The LightningDataModule: Medical-Diff-VQA samples -> image-reading datasets -> collated batches."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from datamodules.collate import LoadedSample, LumenCollator, load_tokenizer
from datamodules.diffvqa import load_diffvqa
from datamodules.records import Sample

log = logging.getLogger(__name__)


def read_image(path: Path, sample: Sample, field: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("L")
    except FileNotFoundError:
        raise FileNotFoundError(f"sample {sample.sample_id}, field {field}: image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise OSError(f"sample {sample.sample_id}, field {field}: cannot read image {path}: {error}") from None


class SampleDataset(Dataset):
    """Reads a sample's image(s); everything else happens in the collator."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> LoadedSample:
        sample = self.samples[index]
        prior = read_image(sample.prior_image, sample, "prior_image") if sample.has_prior else None
        return LoadedSample(sample, read_image(sample.image, sample, "image"), prior)


class LumenDataModule(L.LightningDataModule):
    """Medical-Diff-VQA (real or synthetic) for training, validation loss and answer generation.

    ``input_spec`` (image size, normalisation, visual tokens per image) comes from the model's base
    directory (``models.checkpoints.input_spec``) so the collator and the model always agree.
    ``limit`` caps the samples of a split (keeps CPU runs short; ``null`` for all).
    """

    def __init__(
        self,
        mimic_cxr_jpg: str,
        diffvqa: str,
        tokenizer_dir: str,
        input_spec: dict[str, Any],
        tasks: tuple[str, ...] = ("diagnostic", "difference"),
        use_prior: bool = True,
        interval_in_prompt: bool = True,
        test_policy: str = "all",
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        limit: dict[str, int | None] | None = None,
    ):
        super().__init__()
        # Saved in checkpoints, so evaluation can prompt exactly as training did.
        self.save_hyperparameters(
            {"tasks": list(tasks), "use_prior": use_prior, "interval_in_prompt": interval_in_prompt,
             "batch_size": batch_size}
        )
        self.mimic_cxr_jpg, self.diffvqa = mimic_cxr_jpg, diffvqa
        self.tasks, self.use_prior, self.test_policy = tuple(tasks), use_prior, test_policy
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.limit = dict(limit or {})
        self.tokenizer = load_tokenizer(tokenizer_dir, input_spec["image_token"])
        collator_args = dict(tokenizer=self.tokenizer, interval_in_prompt=interval_in_prompt, **input_spec)
        self.train_collator = LumenCollator(**collator_args)
        self.generation_collator = LumenCollator(**collator_args, for_generation=True)
        self.datasets: dict[str, SampleDataset] = {}

    def samples(self, split: str) -> list[Sample]:
        samples, report = load_diffvqa(self.diffvqa, self.mimic_cxr_jpg, split, self.tasks, self.use_prior,
                                       self.test_policy)
        log.info("Medical-Diff-VQA %s: %s", split, report)
        limit = self.limit.get(split)
        return samples[:limit] if limit is not None else samples

    def dataset(self, split: str) -> SampleDataset:
        if split not in self.datasets:
            self.datasets[split] = SampleDataset(self.samples(split))
        return self.datasets[split]

    def _loader(self, split: str, shuffle: bool, collator: LumenCollator, batch_size: int) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.train_collator, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.train_collator, self.eval_batch_size)

    def generation_loader(self, split: str) -> DataLoader:
        """Left-padded prompts without answers, for ``Trainer.predict``."""
        return self._loader(split, False, self.generation_collator, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.generation_loader("test")
