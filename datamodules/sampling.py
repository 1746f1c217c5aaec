"""Training batches over a weighted mixture of sources, grouped by length, sharded over ranks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class MixtureBatchSampler(Sampler[list[int]]):
    """Batches of indices into the sources laid end to end, one epoch at a time.

    - Weights: each sample of source ``i`` is drawn ``weights[i]`` times per epoch on average: the
      integer part as whole passes over the source, the fraction as a random subset without
      replacement. The epoch's size is therefore the same every epoch.
    - Length grouping: the shuffled epoch is cut into groups of ``group_batches`` batches, each group
      is sorted by ``lengths`` (longest first) and cut into batches, and the batches are shuffled, so
      a batch wastes little padding while batch order stays random.
    - Ranks: rank ``r`` of ``world_size`` takes every ``world_size``-th batch; the last few batches
      are dropped so that every rank runs the same number of steps.
    - Seeded by (``seed``, epoch): the same on every rank and in every worker; Lightning calls
      ``set_epoch`` before each epoch.
    """

    def __init__(self, source_sizes: Sequence[int], weights: Sequence[float], lengths: Sequence[int],
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, group_batches: int = 32):
        if len(source_sizes) != len(weights):
            raise ValueError(f"{len(source_sizes)} sources but {len(weights)} weights")
        if any(weight < 0 for weight in weights) or not any(w * n for w, n in zip(weights, source_sizes)):
            raise ValueError(f"weights {list(weights)}: must be non-negative and select at least one sample")
        if len(lengths) != sum(source_sizes):
            raise ValueError(f"{len(lengths)} lengths for {sum(source_sizes)} samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.source_sizes, self.weights = list(source_sizes), list(weights)
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.group_batches = group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        """This epoch's draws from every source, shuffled together."""
        drawn, offset = [], 0
        for size, weight in zip(self.source_sizes, self.weights):
            passes, fraction = int(weight), weight - int(weight)
            drawn += [offset + rng.permutation(size) for _ in range(passes)]
            drawn.append(offset + rng.choice(size, round(fraction * size), replace=False))
            offset += size
        return rng.permutation(np.concatenate(drawn))

    def batches(self) -> list[np.ndarray]:
        """All ranks' batches of this epoch, in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        indices = self.epoch_indices(rng)
        group = self.batch_size * self.group_batches
        batches = []
        for start in range(0, len(indices), group):
            chunk = indices[start:start + group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        for batch in batches[self.rank:len(self) * self.world_size:self.world_size]:
            yield batch.tolist()

    def __len__(self) -> int:
        drawn = sum(n * int(w) + round((w - int(w)) * n) for n, w in zip(self.source_sizes, self.weights))
        group = self.batch_size * self.group_batches
        full_groups, rest = divmod(drawn, group)
        batches = full_groups * self.group_batches + -(-rest // self.batch_size)
        return batches // self.world_size
