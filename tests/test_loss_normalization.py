"""An optimizer step's loss is the mean over all its target tokens (model.loss_normalization=global_tokens):
the same global batch gives the same gradient as one micro-batch or cut into accumulated micro-batches,
with micro-batches of very different target counts; the per-micro-batch mean (micro_batch) does not."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from common.tokenizer import load_tokenizer
from datamodules.collate import LumenCollator
from datamodules.datamodule import SampleDataset
from datamodules.sources import DiffVQASource
from models.config import ModelConfig
from models.factory import input_spec
from models.lit_module import LumenLitModule as LumenModule
from models.lumen import target_count
from tests.helpers import SUMMATION_ORDER_TOLERANCE, assert_same_up_to_summation_order, relative_difference

ROOT = Path(__file__).resolve().parents[1]
MICRO_BATCHES = 4

# The one-step trainers below train without validation batches on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def training_samples(world: Path) -> list[dict]:
    """Eight training samples: four one-image questions with the shortest answers, then four two-image
    questions with the longest, so that cut in four the micro-batches have very unequal target counts."""
    source = DiffVQASource(str(world / "medical-diff-vqa"), str(world / "mimic-cxr-jpg"))
    loaded = sorted(source.load("train", use_prior=True)[0], key=lambda sample: len(sample.answer))
    chosen = [sample for sample in loaded if not sample.has_prior][:4] + [sample for sample in loaded if sample.has_prior][-4:]
    return [SampleDataset(chosen)[i] for i in range(len(chosen))]


@pytest.fixture(scope="module")
def samples(world):
    return training_samples(world)


def net(tiny_base) -> dict:
    return {"base": str(tiny_base), "vision": {"type": "hf", "layer": -1}, "fusion": {"mode": "difference"}}


def collate(tiny_base, samples) -> dict:
    collator = LumenCollator(load_tokenizer(tiny_base / "llm"), **input_spec(ModelConfig(**net(tiny_base))))
    return collator(samples)


def micro_batches(tiny_base, samples: list[dict], count: int) -> list[dict]:
    """``samples`` cut in order into ``count`` collated micro-batches."""
    size = len(samples) // count
    return [collate(tiny_base, samples[i:i + size]) for i in range(0, len(samples), size)]


def module(tiny_base, normalization: str, build: bool = True) -> LumenModule:
    """Seeded, so every test starts from the same weights (built now, or by the trainer under FSDP2, where
    rank 0's seed makes the fresh parts); SGD at lr 0 leaves them unchanged and the step's gradient stays
    on the parameters after training."""
    torch.manual_seed(0)
    lumen = LumenModule(net=net(tiny_base), optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.0},
                        scheduler={"warmup_ratio": 0.0}, loss_normalization=normalization)
    if build:
        lumen.configure_model()
    return lumen


def gradients(lumen: LumenModule) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.clone() for name, parameter in lumen.model.named_parameters() if parameter.grad is not None}


def trainer(max_steps: int = 1, accumulate: int = 1, validation_batches: float = 0) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                     gradient_clip_val=None, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=validation_batches)


def loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)


def one_step(lumen: LumenModule, batches: list[dict]) -> tuple[dict[str, torch.Tensor], float]:
    """One optimizer step over ``batches`` (accumulated), unclipped: the step's gradient and logged train/loss."""
    fitting = trainer(accumulate=len(batches))
    fitting.fit(lumen, train_dataloaders=loader(batches))
    return gradients(lumen), float(fitting.logged_metrics["train/loss"])


@pytest.fixture(scope="module")
def reference(tiny_base, samples):
    """The whole global batch as one batch: its mean loss over all target tokens, and that loss's gradient."""
    lumen = module(tiny_base, "global_tokens")
    loss = lumen(collate(tiny_base, samples)).loss
    loss.backward()
    return gradients(lumen), float(loss.detach())


def test_the_micro_batches_have_very_unequal_target_counts(tiny_base, samples):
    counts = [int(target_count(batch["labels"])) for batch in micro_batches(tiny_base, samples, MICRO_BATCHES)]
    assert max(counts) > 3 * min(counts), counts


@pytest.mark.parametrize("count", [1, MICRO_BATCHES])
def test_a_step_is_the_mean_over_all_its_target_tokens_however_the_batch_is_cut(tiny_base, samples, reference,
                                                                               count):
    expected_gradients, expected_loss = reference
    actual_gradients, logged_loss = one_step(module(tiny_base, "global_tokens"), micro_batches(tiny_base, samples, count))
    assert_same_up_to_summation_order(actual_gradients, expected_gradients)
    assert logged_loss == pytest.approx(expected_loss, rel=SUMMATION_ORDER_TOLERANCE)


def test_the_mean_of_micro_batch_means_weighs_short_answers_more(tiny_base, samples, reference):
    """The documented alternative: each micro-batch's own mean, averaged over the accumulation."""
    expected_gradients, _ = reference
    actual_gradients, _ = one_step(module(tiny_base, "micro_batch"), micro_batches(tiny_base, samples, MICRO_BATCHES))
    total = torch.cat([gradient.flatten() for gradient in expected_gradients.values()])
    actual = torch.cat([actual_gradients[name].flatten() for name in expected_gradients])
    # Orders of magnitude beyond rounding: another weighting of the tokens, not another summation order.
    assert relative_difference(actual, total) > 1000 * SUMMATION_ORDER_TOLERANCE


def test_the_last_shorter_window_of_an_epoch_is_the_mean_over_its_own_tokens(tiny_base, samples):
    """Three micro-batches with two per step: the epoch's second step has one, and is that one's token mean."""
    batches = micro_batches(tiny_base, samples, MICRO_BATCHES)[:3]
    alone = module(tiny_base, "global_tokens")
    alone(batches[2]).loss.backward()
    expected = gradients(alone)
    lumen = module(tiny_base, "global_tokens")
    trainer(max_steps=2, accumulate=2).fit(lumen, train_dataloaders=loader(batches))
    assert_same_up_to_summation_order(gradients(lumen), expected)


def test_the_validation_loss_is_the_mean_over_all_validation_tokens(tiny_base, samples, reference):
    validating = trainer(validation_batches=1.0)
    validating.validate(module(tiny_base, "micro_batch"), dataloaders=loader(micro_batches(tiny_base, samples,
                                                                                         MICRO_BATCHES)))
    assert float(validating.logged_metrics["val/loss"]) == pytest.approx(reference[1], rel=SUMMATION_ORDER_TOLERANCE)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_processes_of_two_accumulated_micro_batches_step_as_the_global_batch(world, tiny_base, reference,
                                                                                tmp_path, strategy):
    """FSDP2 (trainer=fsdp) and DDP (trainer=ddp) on two processes (tests/loss_worker.py): rank r
    accumulates micro-batches 2r and 2r + 1."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "tests/loss_worker.py", str(world), str(tiny_base), str(tmp_path), strategy]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    expected_gradients, expected_loss = reference
    for rank in range(2):
        measured = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert_same_up_to_summation_order(measured["gradients"], expected_gradients)
        assert measured["loss"] == pytest.approx(expected_loss, rel=SUMMATION_ORDER_TOLERANCE)


def test_an_unknown_loss_normalization_is_refused_naming_the_key(tiny_base):
    with pytest.raises(ValueError, match=r"model.loss_normalization='tokens': expected one of \['global_tokens', 'micro_batch'\]"):
        LumenModule(net=net(tiny_base), optimizer={}, scheduler={}, loss_normalization="tokens")
