"""How a LumenModel is sharded (FSDP2), checkpointed and clipped, kept apart from what the model is.

Under Lightning's ModelParallelStrategy (``FSDP2Strategy``) ``LumenLitModule.configure_model`` calls
``build_sharded``: the model is built on the meta device (no weights read, nothing allocated), its
blocks are wrapped for activation checkpointing if configured, it is sharded, materialised empty on the
process's device, and filled from the full model that only rank 0 builds from the base directory.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX, CheckpointWrapper, checkpoint_wrapper,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing as wrap_for_checkpointing,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.nn.modules.batchnorm import _BatchNorm

from models.config import ModelConfig
from models.factory import build_model
from models.lumen import LumenModel

log = logging.getLogger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure data parallelism: every process is one FSDP2 shard.

    (Its own ``"auto"`` sizes mean one data-parallel group per node and tensor parallelism within a
    node, which is not what a data-parallel fine-tune wants.)
    """

    def __init__(self, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def accumulation(global_batch_size: int | None, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches each process accumulates per optimizer step, so that one step sees
    ``global_batch_size`` samples: ``global / (micro x world)``. ``None`` = no accumulation (1)."""
    if global_batch_size is None:
        return 1
    per_step = micro_batch_size * world_size
    if global_batch_size < 1 or global_batch_size % per_step:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not a positive multiple of data.batch_size="
            f"{micro_batch_size} x world size {world_size} (trainer.devices x trainer.num_nodes) = {per_step}: "
            f"set data.global_batch_size to a multiple of {per_step}, or change data.batch_size or the "
            "number of processes (data.global_batch_size=null: no accumulation)"
        )
    return global_batch_size // per_step


def decoder_layers(model: LumenModel) -> nn.ModuleList:
    """The LLM's transformer layers (Hugging Face Llama/Qwen2 layout)."""
    return model.llm.model.layers


def checkpoint_blocks(root: nn.Module, blocks: Iterable[nn.Module]) -> None:
    """Wraps each of ``blocks`` (submodules of ``root``, wherever they sit: a list's items, a ResNet's
    ``layer1``...) in torch's non-reentrant ``checkpoint_wrapper`` in place: its activations are recomputed in
    the backward pass instead of kept. State-dict keys are unchanged (the wrapper strips its prefix)."""
    chosen = set(blocks)
    wrap_for_checkpointing(root, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda module: module in chosen)
    wrapped = sum(isinstance(module, CheckpointWrapper) for module in root.modules())
    if wrapped < len(chosen):
        raise ValueError(f"{len(chosen) - wrapped} of the {len(chosen)} blocks to checkpoint are not modules of "
                         f"{type(root).__name__}")


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(inner, _BatchNorm) for inner in module.modules())


def apply_activation_checkpointing(model: LumenModel) -> None:
    """Checkpoints every vision block and LLM decoder layer: the one mechanism behind
    ``model.net.gradient_checkpointing``, in one process and under FSDP2 (applied before sharding, so
    each FSDP unit is one checkpointed block). Hugging Face's own gradient checkpointing stays off.
    Blocks with batch norm (a convnet tower's) are not checkpointed: recomputing one in training mode
    would update its running statistics a second time."""
    blocks = [block for block in model.vision.blocks if not has_batch_norm(block)]
    if len(blocks) < len(model.vision.blocks):
        log.info("activation checkpointing: %d of the tower's %d blocks hold batch norm and are not checkpointed",
                 len(model.vision.blocks) - len(blocks), len(model.vision.blocks))
    checkpoint_blocks(model, [*blocks, *decoder_layers(model)])


def shard(model: LumenModel, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    """FSDP2 units: one per vision block and per LLM decoder layer; the vision tower's remainder
    (embeddings, unused final norm) in its own unit, so a frozen tower never shares one with trained
    parameters; the projector; the fusion; the root last, holding the LLM's token embeddings, final norm
    and LM head (one unit, so tied embeddings stay tied; ``LumenModel.embed`` calls the embeddings
    outside the LLM's forward). Parameters compute in ``param_dtype`` (None: their own); gradients are
    reduced in float32."""
    # The tower's patch tokens and the projector's Linear output are views; FSDP2 warns that an in-place
    # op on them would skip its backward hook. LumenModel never writes into them in place.
    warnings.filterwarnings(
        "ignore", message=r"FSDP2-wrapped module \(FSDP(\w+VisionTower|MLPDownsampleProjector)\) returned a view tensor"
    )
    options = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)}
    # A convnet tower's batch norms keep float32 weights, as under autocast: their running statistics are float32,
    # which batch norm refuses to combine with bfloat16 weights; they take the activations in whatever dtype.
    for module in model.vision.modules():
        if isinstance(module, _BatchNorm):
            fully_shard(module, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32,
                                                                          cast_forward_inputs=False))
    for block in model.vision.blocks:
        fully_shard(block, **options)
    fully_shard(model.vision, **options)
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model.projector, **options)
    fully_shard(model.fusion, **options)
    fully_shard(model, **options)


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """The names of each parameter registered under more than one name (tied embeddings)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name.replace(_CHECKPOINT_PREFIX, ""))
    return sorted(sorted(group) for group in names.values() if len(group) > 1)


def load_from_rank0(model: LumenModel, reference: LumenModel | None, device: torch.device) -> None:
    """Materialises a sharded meta-device ``model`` on ``device`` and gives it the values of
    ``reference``, the full model on CPU that only rank 0 has (``None`` on the others).

    Parameters and persistent buffers travel by DCP's ``broadcast_from_rank0``; buffers outside the state
    dict (rotary ``inv_freq``, position ids, the interval embedding's frequencies), which ``to_empty``
    leaves as uninitialised memory, are broadcast as they are. Parts the base does not hold (a new
    fusion) thus get rank 0's initialisation on every rank.
    """
    # Checked on rank 0 and raised on every rank, so none is left waiting in a collective.
    problem = [None]
    if reference is not None and tied_parameters(model) != tied_parameters(reference):
        problem = [
            f"the model built from the base's configuration ties {tied_parameters(model)} but the one loaded "
            f"with its weights ties {tied_parameters(reference)}: llm/config.json's tie_word_embeddings "
            "disagrees with the checkpoint (transformers unties them when it holds a different lm_head.weight); "
            "make them agree"
        ]
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ValueError(problem[0])
    model.to_empty(device=device)
    full_state = reference.state_dict() if reference is not None else {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    unsaved = [None]
    if reference is not None:
        unsaved = [{name: buffer for name, buffer in reference.named_buffers() if name not in full_state}]
    dist.broadcast_object_list(unsaved, src=0)
    buffers = {name.replace(_CHECKPOINT_PREFIX, ""): buffer for name, buffer in model.named_buffers()}
    with torch.no_grad():
        for name, value in unsaved[0].items():
            buffers[name].copy_(value)


def build_sharded(config: ModelConfig, mesh: DeviceMesh, param_dtype: torch.dtype | None,
                  device: torch.device) -> LumenModel:
    """The LumenModel of ``config`` sharded over ``mesh``, with the base's weights read by rank 0 only."""
    with torch.device("meta"):
        model = build_model(config, weights=False)
    if config.gradient_checkpointing:
        apply_activation_checkpointing(model)
    shard(model, mesh, param_dtype)
    reference = build_model(config) if dist.get_rank() == 0 else None
    load_from_rank0(model, reference, device)
    return model.train()


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clips the gradients of ``parameters`` to a global L2 norm of ``max_norm`` (None: only measures)
    and returns the norm before clipping.

    Under FSDP2 each process holds a shard of every gradient (a DTensor): ``clip_grad_norm_`` reduces
    the shards' norms over the mesh, so the norm and the scale are those of the whole gradient.
    """
    norm = torch.nn.utils.clip_grad_norm_(parameters, math.inf if max_norm is None else max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def scale_gradients(parameters: list[nn.Parameter], factor: torch.Tensor) -> None:
    """Multiplies the gradients of ``parameters`` by ``factor`` (a 0-dim tensor, the same on every process),
    in one foreach launch. Under FSDP2 the gradients are DTensor shards, and the factor multiplies each
    shard as a replicated value."""
    gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
    with implicit_replication():
        torch._foreach_mul_(gradients, factor)
