"""FSDP2 on a CUDA GPU (skipped without one; CI has none): the meta-device build and rank-0 load over
NCCL, bf16 compute with float32 master weights and float32 gradients, accumulation and clipping."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from models.config import ModelConfig
from models.factory import build_model
from models.lit_module import BATCH_INPUTS
from models.lit_module import LumenLitModule as LumenModule
from models.parallel import FSDP2Strategy
from tests.helpers import model_inputs, model_labels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOWER = {"type": "hf", "layer": -1}


class FirstStepProbe(L.Callback):
    """What the first training step computes in, keeps and reduces, and its first micro-batch's loss."""

    def __init__(self):
        self.seen: dict[str, torch.dtype] = {}
        self.losses: list[torch.Tensor] = []

    def on_fit_start(self, trainer, module):
        def record(layer, inputs, output):
            self.seen.setdefault("compute", (output if torch.is_tensor(output) else output[0]).dtype)
        module.model.llm.model.layers[0].register_forward_hook(record)

    def on_before_optimizer_step(self, trainer, module, optimizer):
        parameter = next(p for p in module.model.parameters() if p.grad is not None)
        self.seen.setdefault("master", parameter.dtype)
        self.seen.setdefault("gradient", parameter.grad.dtype)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
        # Lightning hands back the loss divided by the accumulation steps: with the default
        # model.loss_normalization=global_tokens, the micro-batch's summed token loss.
        self.losses.append(outputs["loss"].detach().float().cpu() * trainer.accumulate_grad_batches)


def training_batches(model, count: int) -> list[dict]:
    batch = model_inputs(model)
    return [{**batch, "labels": model_labels(model, batch), "sample_ids": ["a", "b"]} for _ in range(count)]


def fit(base, root, param_dtype: str | None, batches: list[dict]):
    torch.manual_seed(0)
    module = LumenModule(net={"base": str(base), "vision": TOWER},
                         optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
                         scheduler={"warmup_ratio": 0.0}, fsdp={"param_dtype": param_dtype})
    probe = FirstStepProbe()
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=FSDP2Strategy(), precision="32-true",
                        max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[probe], default_root_dir=root)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return trainer, probe.seen, probe.losses[0]


@pytest.mark.parametrize(("param_dtype", "compute", "rtol"), [(None, torch.float32, 1e-3), ("bfloat16", torch.bfloat16, 3e-2)])
def test_fsdp_on_a_gpu_computes_in_the_policy_dtype_and_keeps_float32_weights_and_gradients(
        tiny_base, tmp_path, param_dtype, compute, rtol):
    torch.manual_seed(0)
    reference = build_model(ModelConfig(base=str(tiny_base), vision=TOWER)).train()
    batches = training_batches(reference, count=4)
    with torch.no_grad():
        expected = reference(**{k: batches[0][k] for k in BATCH_INPUTS}, labels=batches[0]["labels"],
                             loss_reduction="sum").loss
    trainer, seen, loss = fit(tiny_base, tmp_path, param_dtype, batches)
    assert seen == {"compute": compute, "master": torch.float32, "gradient": torch.float32}
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=0)
    assert trainer.global_step == 2  # 4 micro-batches, 2 per step
    assert torch.isfinite(trainer.callback_metrics["train/grad_norm"])
