"""One FSDP2 process of tests/test_parallel.py (run by torchrun: 2 processes, gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_worker.py CASES.json OUT_DIR

For each case (``{"name", "net": ModelConfig fields, "max_norm", "param_dtype"}``) the process builds the model through
``models.parallel.build_sharded`` (meta device, sharded, rank 0 reads the weights; computing in ``param_dtype``,
null: float32), runs one forward and
backward on ``tests.helpers.model_inputs`` (the same batch on every rank, so the averaged gradient is
that batch's), clips by global norm, and writes ``OUT_DIR/<name>.rank<r>.pt`` for the test to compare
with one unsharded process. Every rank is seeded differently: only rank 0's initialisation of fresh
parts may reach the model.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX, CheckpointWrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from models.config import ModelConfig
from models.parallel import build_sharded, clip_grad_norm
from tests.helpers import model_inputs, model_labels

SEED = 0


def unit_trainability(model: torch.nn.Module) -> dict[str, list[bool]]:
    """FSDP unit name -> the requires_grad values of the parameters it shards (not its sub-units')."""
    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    owned: dict[str, set[bool]] = {unit: set() for unit in units}
    for name, parameter in model.named_parameters():
        owner = max((unit for unit in units if unit == "" or name.startswith(unit + ".")), key=len)
        owned[owner].add(parameter.requires_grad)
    return {unit.replace(_CHECKPOINT_PREFIX, ""): sorted(values) for unit, values in owned.items()}


def run_case(case: dict, mesh, out: Path) -> None:
    torch.manual_seed(SEED + dist.get_rank())
    param_dtype = getattr(torch, case["param_dtype"]) if case.get("param_dtype") else None
    model = build_sharded(ModelConfig(**case["net"]), mesh, param_dtype, torch.device("cpu"))
    fusion = {name: parameter.full_tensor().detach().clone() for name, parameter in model.fusion.named_parameters()}
    batch = model_inputs(model)
    loss = model(**batch, labels=model_labels(model, batch)).loss
    loss.backward()
    norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], case["max_norm"])
    saved = set(model.state_dict())
    result = {
        "loss": loss.detach(),
        "grad_norm": norm,
        "gradients": {name.replace(_CHECKPOINT_PREFIX, ""): parameter.grad.full_tensor()
                      for name, parameter in model.named_parameters() if parameter.grad is not None},
        "unsaved_buffers": {name.replace(_CHECKPOINT_PREFIX, ""): buffer.clone()
                            for name, buffer in model.named_buffers()
                            if name.replace(_CHECKPOINT_PREFIX, "") not in saved},
        "fusion": fusion,
        "units": unit_trainability(model),
        "checkpoint_wrappers": sum(isinstance(module, CheckpointWrapper) for module in model.modules()),
        "lm_head_is_embedding": model.llm.lm_head.weight is model.llm.get_input_embeddings().weight,
    }
    torch.save(result, out / f"{case['name']}.rank{dist.get_rank()}.pt")


def main() -> None:
    cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    for case in cases:
        run_case(case, mesh["data_parallel"], out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
