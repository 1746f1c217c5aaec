"""How a LumenModel is sharded (FSDP2), kept apart from what the model is."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from models.lumen import LumenModel


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


def shard(model: LumenModel, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    """FSDP2: one unit per vision block and per LLM decoder layer, one each for the projector and the
    fusion, then the root (embeddings, LM head, final norm). Gradients are reduced in float32."""
    options = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)}
    for block in model.vision.blocks:
        fully_shard(block, **options)
    for layer in model.llm.model.layers:
        fully_shard(layer, **options)
    fully_shard(model.projector, **options)
    fully_shard(model.fusion, **options)
    fully_shard(model, **options)
