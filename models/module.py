"""LumenModule: training, validation and generation around a LumenModel, with FSDP2 applied from outside."""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import get_cosine_schedule_with_warmup

from models.checkpoints import DTYPES, ModelConfig, build_model
from models.lumen import LumenModel
from models.parallel import shard

BATCH_INPUTS = ("input_ids", "attention_mask", "current_images", "prior_images", "has_prior", "interval_days")


def parameter_groups(
    model: LumenModel, lr: float, weight_decay: float, vision_lr: float | None = None,
    projector_lr: float | None = None, llm_lr: float | None = None,
) -> list[dict]:
    """One group per (component, decay) of the trainable parameters: NVILA's separate vision-tower and
    projector learning rates and one for the LLM (``None`` = the base ``lr``; the fusion counts as
    projector), and no weight decay on norms, biases, embeddings and learned tokens."""
    rates = {"vision": vision_lr or lr, "projector": projector_lr or lr, "fusion": projector_lr or lr,
             "llm": llm_lr or lr}
    groups: dict[tuple[str, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        component = name.split(".", 1)[0]
        is_embedding = "embed" in name or name.endswith(("_tokens", "_type", "position", "no_interval"))
        decays = parameter.ndim >= 2 and not is_embedding
        groups.setdefault((component, decays), []).append(parameter)
    return [
        {"params": params, "lr": rates[component], "weight_decay": weight_decay if decays else 0.0,
         "name": f"{component}{'' if decays else '/no_decay'}"}
        for (component, decays), params in groups.items()
    ]


class LumenModule(L.LightningModule):
    """``net`` is a plain ``ModelConfig`` dict; ``optimizer`` a partial ``_target_`` node;
    ``scheduler`` holds ``warmup_ratio``; ``fsdp`` holds ``param_dtype`` (e.g. bfloat16 on GPU, or null)."""

    def __init__(
        self,
        net: DictConfig | dict,
        optimizer: DictConfig | dict,
        scheduler: DictConfig | dict,
        fsdp: DictConfig | dict | None = None,
        max_new_tokens: int = 64,
    ):
        super().__init__()
        # Plain containers only, so checkpoints load with torch.load(weights_only=True). Loggers get the
        # whole resolved config from train.py instead.
        self.save_hyperparameters(
            {
                "net": _plain(net),
                "optimizer": _plain(optimizer),
                "scheduler": _plain(scheduler),
                "fsdp": _plain(fsdp or {}),
                "max_new_tokens": max_new_tokens,
            },
            logger=False,
        )
        self.config = ModelConfig(**self.hparams.net)
        self.model: LumenModel | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        _check_precision(self.config.dtype, self.trainer.precision if self._trainer is not None else None)
        # from_pretrained returns modules in eval mode; training starts in train mode.
        self.model = build_model(self.config).train()
        if self.device_mesh is not None:
            param_dtype = self.hparams.fsdp.get("param_dtype")
            shard(self.model, self.device_mesh["data_parallel"], DTYPES[param_dtype] if param_dtype else None)

    def forward(self, batch: dict) -> Any:
        return self.model(**{key: batch[key] for key in BATCH_INPUTS}, labels=batch.get("labels"))

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["sample_ids"]))
        return loss

    def validation_step(self, batch: dict, batch_index: int) -> None:
        loss = self(batch).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["sample_ids"]))

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


def _plain(config: DictConfig | dict) -> dict:
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
