"""LumenLitModule: training, validation and generation around a LumenModel, with FSDP2 applied from outside."""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import get_cosine_schedule_with_warmup

from models.config import DTYPES, ModelConfig
from models.factory import build_model
from models.lumen import LumenModel, target_count
from models.parallel import apply_activation_checkpointing, build_sharded, clip_grad_norm, scale_gradients

BATCH_INPUTS = ("input_ids", "attention_mask", "current_images", "prior_images", "has_prior", "interval_days")
# What a packed batch (data.packing) adds: each sample's positions and the samples' boundaries.
PACKED_INPUTS = ("position_ids", "cu_seq_lens", "max_length")
# What one optimizer step's loss is a mean over (model.loss_normalization): every target token of all its
# micro-batches on all processes, or each micro-batch's own tokens (the mean of those means).
LOSS_NORMALIZATIONS = ("global_tokens", "micro_batch")


def parameter_groups(
    model: LumenModel, lr: float, weight_decay: float, vision_lr: float | None = None,
    projector_lr: float | None = None, llm_lr: float | None = None,
) -> list[dict]:
    """The trainable parameters grouped by (learning rate, weight decay): NVILA's separate vision-tower and
    projector learning rates and one for the LLM (``None`` = the base ``lr``; the fusion counts as
    projector), and no weight decay on norms, biases, embeddings and learned tokens.

    Components with the same settings share a group, named after them (``vision``,
    ``projector+fusion/no_decay``, ``vision+projector+fusion+llm`` when all rates are equal and there is
    no weight decay): the optimizer launches its kernels once per group, which is much of a small
    model's step on a GPU."""
    rates = {"vision": vision_lr or lr, "projector": projector_lr or lr, "fusion": projector_lr or lr,
             "llm": llm_lr or lr}
    groups: dict[tuple[float, float], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        component = name.split(".", 1)[0]
        is_embedding = "embed" in name or name.endswith(("_type", "position"))
        decays = parameter.ndim >= 2 and not is_embedding
        settings = (rates[component], weight_decay if decays else 0.0)
        group = groups.setdefault(settings, {"params": [], "components": {}})
        group["params"].append(parameter)
        group["components"][component] = None  # an ordered set
    return [
        {"params": group["params"], "lr": rate, "weight_decay": decay,
         "name": "+".join(group["components"]) + ("/no_decay" if weight_decay and not decay else "")}
        for (rate, decay), group in groups.items()
    ]


class LumenLitModule(L.LightningModule):
    """``net`` is a plain ``ModelConfig`` dict; ``optimizer`` a partial ``_target_`` node;
    ``scheduler`` holds ``warmup_ratio``; ``fsdp`` holds ``param_dtype`` (e.g. bfloat16 on GPU, or null).

    ``loss_normalization``: ``global_tokens`` (default) trains each optimizer step on the mean
    cross-entropy over all target tokens of its micro-batches on every process, so the gradient of a
    global batch is the same however it is cut into micro-batches and processes (torchtitan's and, since
    4.46, Hugging Face's Trainer's normalisation). ``micro_batch`` is the mean of each micro-batch's own
    token mean, as the LLaVA/NVILA trainers of the paper's time computed it: a token in a micro-batch of
    short answers then weighs more than one in a micro-batch of long answers.
    """

    def __init__(
        self,
        net: DictConfig | dict,
        optimizer: DictConfig | dict,
        scheduler: DictConfig | dict,
        fsdp: DictConfig | dict | None = None,
        max_new_tokens: int = 64,
        loss_normalization: str = "global_tokens",
    ):
        super().__init__()
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"model.loss_normalization={loss_normalization!r}: expected one of {list(LOSS_NORMALIZATIONS)}")
        # Plain containers only, so checkpoints load with torch.load(weights_only=True). Loggers get the
        # whole resolved config from train.py instead.
        self.save_hyperparameters(
            {
                "net": _plain(net),
                "optimizer": _plain(optimizer),
                "scheduler": _plain(scheduler),
                "fsdp": _plain(fsdp or {}),
                "max_new_tokens": max_new_tokens,
                "loss_normalization": loss_normalization,
            },
            logger=False,
        )
        self.config = ModelConfig(**self.hparams.net)
        self.model: LumenModel | None = None
        # global_tokens: the summed loss and target tokens of the optimizer step's micro-batches so far.
        self.step_totals: torch.Tensor | None = None
        # The summed loss and target tokens of the validation batches so far.
        self.validation_totals: torch.Tensor | None = None

    def configure_model(self) -> None:
        """One process: the model as ``build_model`` loads it. Under a device mesh (``FSDP2Strategy``):
        built on the meta device, sharded, and filled with the base's weights read by rank 0 only
        (``models.parallel.build_sharded``). ``model.net.gradient_checkpointing`` wraps the vision blocks
        and decoder layers the same way on both paths."""
        if self.model is not None:
            return
        _check_precision(self.config.dtype, self.trainer.precision if self._trainer is not None else None)
        if self.device_mesh is None:
            model = build_model(self.config)
            if self.config.gradient_checkpointing:
                apply_activation_checkpointing(model)
        else:
            model = build_sharded(self.config, self.device_mesh["data_parallel"], _param_dtype(self.hparams.fsdp),
                                  self.trainer.strategy.root_device)
        # Several processes must agree on the graph of every step (TemporalFusion); one need not.
        model.fusion.every_parameter_every_step = self._trainer is None or self.trainer.world_size > 1
        # from_pretrained returns modules in eval mode; training starts in train mode.
        self.model = model.train()

    def forward(self, batch: dict, loss_reduction: str = "mean") -> Any:
        packed = {key: batch[key] for key in PACKED_INPUTS if key in batch}
        return self.model(**{key: batch[key] for key in BATCH_INPUTS}, **packed, labels=batch.get("labels"),
                          loss_reduction=loss_reduction)

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        if self.hparams.loss_normalization == "micro_batch":
            loss = self(batch).loss
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["sample_ids"]))
            return loss
        # The sum over this micro-batch's target tokens; on_before_optimizer_step divides the step's
        # gradient by the step's target tokens once all of its micro-batches have been seen.
        summed = self(batch, loss_reduction="sum").loss
        totals = torch.stack([summed.detach(), target_count(batch["labels"]).to(summed.dtype)])
        # A new accumulation window starts where Lightning zeroes the gradients: totals of a window left
        # unfinished (a run stopped mid-window and fitted again) do not carry over.
        window_starts = batch_index % self.trainer.accumulate_grad_batches == 0
        self.step_totals = totals if window_starts or self.step_totals is None else self.step_totals + totals
        return summed

    def on_before_optimizer_step(self, optimizer) -> None:
        """global_tokens: makes the step's gradient that of the mean over all its target tokens. Lightning
        divided each micro-batch's summed loss by ``accumulate_grad_batches`` and data parallelism averaged
        the gradients over the processes, so the gradient is scaled by both and divided by the step's
        target tokens on all processes (one all-reduce, which also gives the logged ``train/loss``). Runs
        before clipping and the optimizer; callbacks' ``on_before_optimizer_step`` run before it and see
        the unnormalised gradient."""
        if self.hparams.loss_normalization != "global_tokens" or self.step_totals is None:
            return
        loss_sum, targets = self.trainer.strategy.reduce(self.step_totals, reduce_op="sum")
        self.step_totals = None
        targets = targets.clamp(min=1)
        scale_gradients(list(self.parameters()), self.trainer.accumulate_grad_batches * self.trainer.world_size / targets)
        self.log("train/loss", loss_sum / targets, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self.validation_totals = torch.zeros(2, device=self.device)

    def validation_step(self, batch: dict, batch_index: int) -> None:
        """``val/loss`` is the mean over every target token of the validation samples on all processes
        (whatever ``loss_normalization`` says of training steps), logged when the epoch ends."""
        summed = self(batch, loss_reduction="sum").loss
        self.validation_totals += torch.stack([summed, target_count(batch["labels"]).to(summed.dtype)])

    def on_validation_epoch_end(self) -> None:
        loss_sum, targets = self.trainer.strategy.reduce(self.validation_totals, reduce_op="sum")
        self.log("val/loss", loss_sum / targets.clamp(min=1), prog_bar=True)

    def predict_step(self, batch: dict, batch_index: int) -> dict:
        """Greedy answers as token ids (decoding to text is the caller's, who owns the tokenizer)."""
        new_tokens = self.model.generate(
            **{key: batch[key] for key in BATCH_INPUTS},
            max_new_tokens=self.hparams.max_new_tokens,
            eos_token_id=self.model.llm.generation_config.eos_token_id,
            pad_token_id=self.model.llm.generation_config.pad_token_id,
        )
        return {"sample_ids": batch["sample_ids"], "tokens": new_tokens.cpu()}

    def configure_optimizers(self):
        optimizer_config = _plain(self.hparams.optimizer)
        groups = parameter_groups(
            self.model,
            lr=optimizer_config["lr"],
            weight_decay=optimizer_config.pop("weight_decay", 0.0),
            vision_lr=optimizer_config.pop("vision_lr", None),
            projector_lr=optimizer_config.pop("projector_lr", None),
            llm_lr=optimizer_config.pop("llm_lr", None),
        )
        optimizer = hydra.utils.instantiate(optimizer_config)(groups)
        total_steps = self.trainer.estimated_stepping_batches
        warmup_steps = int(self.hparams.scheduler["warmup_ratio"] * total_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, max(total_steps, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clips by the global norm of all gradients (``trainer.gradient_clip_val``; null: no clipping),
        correct under FSDP2's sharded gradients, and logs the norm before clipping as ``train/grad_norm``.
        Called once per optimizer step, after the last accumulated micro-batch."""
        if gradient_clip_algorithm not in (None, "norm"):
            name = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)  # Lightning passes an enum
            raise ValueError(
                f"trainer.gradient_clip_algorithm={name}: lumen clips by global norm; "
                "remove the key (or set it to norm)"
            )
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        norm = clip_grad_norm(parameters, gradient_clip_val or None)
        self.log("train/grad_norm", norm)


def _check_precision(dtype: str, precision: str | None) -> None:
    """bf16-mixed keeps fp32 master weights (the autocast/FSDP policy computes in bf16); bf16-true
    stores the weights themselves in bf16. The model's dtype must match the trainer's precision."""
    if precision is None:
        return
    expected = {"bf16-true": "bfloat16", "16-true": "float16"}.get(precision, "float32")
    if dtype != expected:
        raise ValueError(
            f"model.net.dtype={dtype} does not fit trainer.precision={precision}: use model.net.dtype={expected} "
            "(fp32 master weights for mixed precision, bf16 weights for bf16-true)"
        )


def _param_dtype(fsdp: dict) -> torch.dtype | None:
    name = fsdp.get("param_dtype")
    if name is not None and name not in DTYPES:
        raise ValueError(f"model.fsdp.param_dtype={name!r}: expected one of {sorted(DTYPES)} or null (the weights' own)")
    return DTYPES[name] if name is not None else None


def _plain(config: DictConfig | dict) -> dict:
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
