"""Throughput and MFU logging: real tokens and samples per batch, measured FLOPs, the peak it is taken against."""

import csv

import lightning as L
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from run.cli import compose_config
from models.callbacks.throughput_monitor import LumenThroughput, device_peak_flops, table_peak_flops
from run.train import train


class BatchRecorder(L.Callback):
    """Keeps the samples, real tokens and the batch itself of every training batch."""

    def __init__(self):
        self.samples, self.tokens, self.batches = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.samples.append(len(batch["sample_ids"]))
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.batches.append(batch)


def counted_flops(model, batch: dict) -> int:
    """The training FLOPs of a padded batch's real tokens, counted by torch's FlopCounterMode (attention in
    math form, the convention): a forward and backward of each sample alone, cut from the batch without its
    padding."""
    priors = torch.cumsum(batch["has_prior"].long(), 0) - batch["has_prior"].long()  # each sample's first prior
    total = 0
    for i, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        prior = batch["prior_images"][priors[i]:priors[i] + int(batch["has_prior"][i])]
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            model(input_ids=batch["input_ids"][i:i + 1, :length], attention_mask=batch["attention_mask"][i:i + 1, :length],
                  labels=batch["labels"][i:i + 1, :length], current_images=batch["current_images"][i:i + 1],
                  prior_images=prior, has_prior=batch["has_prior"][i:i + 1],
                  interval_days=batch["interval_days"][i:i + 1]).loss.backward()
        total += counter.get_total_flops()
    return total


def logged(csv_path) -> dict[str, list[float]]:
    """Every non-empty value of each column of a CSVLogger metrics file, in order."""
    with open(csv_path) as file:
        rows = list(csv.DictReader(file))
    return {column: [float(row[column]) for row in rows if row[column]] for column in rows[0]}


def test_a_cpu_run_logs_tokens_samples_flops_and_mfu_against_the_given_peak(demo_overrides):
    cfg = compose_config("train", demo_overrides + [
        "trainer.max_steps=5", "trainer.log_every_n_steps=1", "callbacks.throughput.window_size=3",
        "callbacks.throughput.peak_flops=1e12", "data.limit.val=4",
        "+callbacks.recorder._target_=tests.test_throughput.BatchRecorder"])
    trainer = train(cfg)
    recorder = next(c for c in trainer.callbacks if isinstance(c, BatchRecorder))
    metrics = logged(trainer.loggers[0].experiment.metrics_file_path)

    assert metrics["throughput/device/samples"][-1] == sum(recorder.samples) == 5 * 4
    assert metrics["throughput/device/tokens"][-1] == sum(recorder.tokens)
    for rate in ("tokens_per_sec", "samples_per_sec", "flops_per_sec", "device/tokens_per_sec",
                 "device/samples_per_sec", "device/flops_per_sec"):
        assert len(metrics[f"throughput/{rate}"]) == 3  # steps 3, 4 and 5 fill a window of 3
        assert all(value > 0 for value in metrics[f"throughput/{rate}"])
    # One process: the totals are the device's; MFU is the device's FLOP/s over the peak.
    assert metrics["throughput/tokens_per_sec"] == metrics["throughput/device/tokens_per_sec"]
    assert metrics["throughput/mfu"] == pytest.approx([f / 1e12 for f in metrics["throughput/device/flops_per_sec"]])
    # A window of 3 times the last 2 batches: FLOP/s over tokens/s is their model FLOPs per real token.
    flops = [counted_flops(trainer.lightning_module.model, batch) for batch in recorder.batches]
    expected = [sum(flops[end - 2:end]) / sum(recorder.tokens[end - 2:end]) for end in (3, 4, 5)]
    per_token = [f / t for f, t in zip(metrics["throughput/flops_per_sec"], metrics["throughput/tokens_per_sec"])]
    assert per_token == pytest.approx(expected)


def test_no_peak_is_assumed_on_cpu_or_in_float32():
    assert device_peak_flops(torch.device("cpu"), half_precision=True) is None
    assert device_peak_flops(torch.device("cuda", 0), half_precision=False) is None


@pytest.mark.parametrize(("device_name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H200", 989.5e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None),
])
def test_the_dense_bf16_peak_of_known_gpus(device_name, peak):
    assert table_peak_flops(device_name) == peak


@pytest.mark.parametrize(("key", "value"), [("peak_flops", 0), ("peak_flops", -1e12), ("window_size", 1)])
def test_a_bad_setting_names_its_key(key, value):
    with pytest.raises(ValueError, match=f"callbacks.throughput.{key}"):
        LumenThroughput(**{key: value})


@pytest.mark.parametrize("experiment", ["demo", "lumen"])
def test_throughput_is_logged_by_default_and_in_the_papers_recipe(experiment):
    cfg = compose_config("train", [f"experiment={experiment}"])
    assert cfg.callbacks.throughput._target_ == "models.callbacks.throughput_monitor.LumenThroughput"
    assert cfg.callbacks.throughput.peak_flops is None
