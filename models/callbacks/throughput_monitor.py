"""Training throughput and MFU, logged as ``throughput/...`` by Lightning's ThroughputMonitor.

Logged every ``trainer.log_every_n_steps`` once ``window_size`` micro-batches have been seen (rates
are rolling averages over that window, from rank 0's clock and batches):

    throughput/tokens_per_sec, samples_per_sec, batches_per_sec   all processes (rank 0's x world size)
    throughput/device/tokens_per_sec, samples_per_sec, ...        one process (one GPU)
    throughput/device/flops_per_sec, throughput/flops_per_sec     model FLOPs done (models/flops.py)
    throughput/mfu                                                device flops_per_sec / peak_flops
    throughput/device/tokens, throughput/device/samples           running totals on rank 0
    throughput/time                                               seconds of training measured

Tokens are real tokens (``attention_mask`` sum: padding excluded, every token of a packed batch);
samples are samples, not rows (a packed row holds several). Validation time is excluded from the
training clock and validation throughput is not logged.

MFU needs the peak FLOP/s of one device at the compute dtype: ``peak_flops`` when given, else the
dense bf16/fp16 tensor-core peak of the GPU found (``DENSE_PEAK_FLOPS``). On CPU, on a GPU not in the
table, or when training computes in float32, no peak is assumed and MFU is not logged (the FLOP/s
still are).
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

from models.flops import StepFlops, measure_step_flops, real_tokens

log = logging.getLogger(__name__)

# Dense (not 2:4-sparse) bf16/fp16 tensor-core peak of one GPU, FLOP/s, from NVIDIA's datasheets (which
# print the sparse figure, twice these). First match of the lower-cased device name wins.
DENSE_PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h200 nvl", 835e12),
    ("h100", 989.5e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h200", 989.5e12),  # SXM: "NVIDIA H200"
    ("a100", 312e12),
)
HALF_PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true")


def table_peak_flops(device_name: str) -> float | None:
    """``DENSE_PEAK_FLOPS`` for a CUDA device name (``torch.cuda.get_device_name``), or None."""
    name = device_name.lower()
    return next((peak for chip, peak in DENSE_PEAK_FLOPS if chip in name), None)


def device_peak_flops(device: torch.device, half_precision: bool) -> float | None:
    """The table's peak for ``device`` computing in bf16/fp16, or None (CPU, float32, unknown GPU)."""
    if device.type != "cuda" or not half_precision:
        return None
    return table_peak_flops(torch.cuda.get_device_name(device))


class LumenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for a LumenLitModule: samples, real tokens and measured model FLOPs
    of every batch (``StepFlops``, measured once in ``setup``), and the peak that MFU is taken against.

    ``peak_flops``: FLOP/s of one device (null = ``DENSE_PEAK_FLOPS`` for the GPU found).
    ``window_size``: micro-batches the rates are averaged over.
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 32):
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"callbacks.throughput.peak_flops={peak_flops}: give one device's peak FLOP/s "
                             "(e.g. 989.5e12 for an H100 SXM in bf16), or null to look the GPU up")
        if window_size < 2:
            raise ValueError(f"callbacks.throughput.window_size={window_size}: rates need a window of at least 2 batches")
        super().__init__(batch_size_fn=lambda batch: len(batch["sample_ids"]), length_fn=real_tokens,
                         window_size=window_size)
        self.peak_flops = peak_flops
        self.step_flops: StepFlops | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # FSDP2 computes in its param_dtype under a 32-true trainer; otherwise the precision plugin decides.
        half = (pl_module.hparams.get("fsdp") or {}).get("param_dtype") in ("bfloat16", "float16") \
            or trainer.precision in HALF_PRECISIONS
        self.available_flops = self.peak_flops or device_peak_flops(trainer.strategy.root_device, half)
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops
        if stage == "fit" and trainer.is_global_zero:
            self.step_flops = measure_step_flops(pl_module.config)
            peak = f"{self.available_flops:.4g} FLOP/s" if self.available_flops else "none known (MFU not logged)"
            log.info("training FLOPs (forward + backward): %s; peak per device: %s", self.step_flops, peak)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning's monitor reads the module's flops_per_batch after each batch.
        if self.step_flops is not None:
            pl_module.flops_per_batch = self.step_flops.of_batch(batch)

    def _compute(self, trainer, iter_num: int | None = None) -> None:
        """Lightning's, with token names and a ``throughput/`` prefix, for training batches only."""
        if trainer.state.stage != RunningStage.TRAINING or not trainer._logger_connector.should_update_logs:
            return
        throughput = self._throughputs[RunningStage.TRAINING]
        computed = throughput.compute()
        metrics = {}
        for key, value in computed.items():
            key = key.replace("items", "tokens")
            if key in ("samples", "lengths"):
                key = "device/" + ("tokens" if key == "lengths" else key)
            metrics[key] = value
        for key in [key for key in metrics if key.startswith("device/") and key.endswith("_per_sec")]:
            # Lightning leaves the totals out for one process; they equal the device's then.
            metrics.setdefault(key.removeprefix("device/"), metrics[key] * throughput.world_size)
        if "device/mfu" in metrics:
            metrics["mfu"] = metrics.pop("device/mfu")
        metrics.pop("batches", None)
        trainer._logger_connector.log_metrics({f"throughput/{key}": value for key, value in metrics.items()},
                                              step=iter_num)
