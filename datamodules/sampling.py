"""Training batches over a weighted mixture of sources, grouped by length, sharded over ranks, and the
loader that remembers how far into the epoch training got (so that a resumed run continues there)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Sampler


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
    - Seeded by (``seed``, epoch): the same on every rank and in every worker. ``ResumableLoader``
      turns the epoch when a pass over the loader starts after the last one finished the epoch
      (Lightning's ``set_epoch`` reaches a loader's ``sampler`` and ``batch_sampler.sampler``, never
      its batch sampler itself).
    - Position: ``position`` is how many of the epoch's global batches have been trained on (the
      loader advances it as it hands batches out; checkpoints save it with ``state_dict``). Rank ``r``
      takes batches ``position + r``, ``position + r + world_size``, ... The global sequence
      (``batches()``) does not depend on the world size, so a position names the same data on any
      number of processes. ``len()`` stays the whole epoch's count per rank, which is what the trainer
      counts against; ``remaining()`` is what is left.
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
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Moves to ``epoch`` (from its beginning when it is another epoch than the current one)."""
        if epoch != self.epoch:
            self.position = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """The position, and what must be unchanged for it to name the same batches: the epoch's
        sequence itself (``sequence``, a digest) and, to say what changed, its main settings."""
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size,
                "sequence": self.sequence_digest(self.epoch), **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sequence"] != self.sequence_digest(state["epoch"]):
            saved = {key: state[key] for key in self._settings()}
            raise ValueError(
                f"the checkpoint's data position ({state['position']} batches into epoch {state['epoch']}) is in "
                f"another sequence of batches than this run's epoch {state['epoch']} (saved {saved}, here "
                f"{self._settings()}): resume with the same data.seed, data.batch_size, data.group_batches, sources, "
                "weights and data.limit.train, or start a new run from the checkpoint's weights "
                "(python -m models.checkpoints export CKPT DIR, then model.net.base=DIR)"
            )
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"the checkpoint's data position was saved by {state['world_size']} processes and this run has "
                f"{self.world_size}: the trainer's batch counters must be converted first, which "
                "models.callbacks.resumable_checkpoint.ResumableCheckpoint (callbacks.model_checkpoint) does when "
                "the run resumes"
            )
        self.epoch, self.position = state["epoch"], state["position"]

    def _settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "global_batches": self.global_batches()}

    def sequence_digest(self, epoch: int) -> str:
        """A digest of the epoch's global batch sequence, which a position indexes: anything that
        changes the sequence (samples, weights, lengths, seed, batch size, grouping) changes it."""
        digest = hashlib.sha256()
        for batch in self.batches(epoch):
            digest.update(batch.astype(np.int64).tobytes() + b"|")
        return digest.hexdigest()[:16]

    def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
        """This epoch's draws from every source, shuffled together."""
        drawn, offset = [], 0
        for size, weight in zip(self.source_sizes, self.weights):
            passes, fraction = int(weight), weight - int(weight)
            drawn += [offset + rng.permutation(size) for _ in range(passes)]
            drawn.append(offset + rng.choice(size, round(fraction * size), replace=False))
            offset += size
        return rng.permutation(np.concatenate(drawn))

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """All ranks' batches of this epoch (or of ``epoch``), in order."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        indices = self.epoch_indices(rng)
        group = self.batch_size * self.group_batches
        batches = []
        for start in range(0, len(indices), group):
            chunk = indices[start:start + group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def remaining(self) -> int:
        """How many batches each rank still takes this epoch: the global batches after ``position``,
        less the few that do not make a round of ``world_size``."""
        return (self.global_batches() - self.position) // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        batches, start = self.batches(), self.position
        for batch in batches[start + self.rank:start + self.remaining() * self.world_size:self.world_size]:
            yield batch.tolist()

    def global_batches(self) -> int:
        """The number of batches of an epoch, all ranks together (the same every epoch)."""
        drawn = sum(n * int(w) + round((w - int(w)) * n) for n, w in zip(self.source_sizes, self.weights))
        group = self.batch_size * self.group_batches
        full_groups, rest = divmod(drawn, group)
        return full_groups * self.group_batches + -(-rest // self.batch_size)

    def __len__(self) -> int:
        return self.global_batches() // self.world_size


class ResumableLoader(DataLoader):
    """The training DataLoader over a ``MixtureBatchSampler``, stateful the way Lightning expects.

    Lightning saves ``state_dict()`` of the training loader in every checkpoint (under
    ``loops.fit_loop.state_dict.combined_loader``) and, when a run resumes, calls ``load_state_dict``
    before the first batch. The sampler's position advances here, as each batch is handed to the
    training loop, not where the sampler is read: worker processes read it ahead (``prefetch_factor``
    batches each), and those batches have not been trained on. Lightning takes no batch ahead of the
    one it trains on when the loader has a length, so at a checkpoint the position is exactly the
    batches trained on.
    """

    def __iter__(self) -> Iterator[Any]:
        # A generator, so nothing is read before the first batch is asked for: an iterator Lightning
        # creates and drops before an epoch begins (also with workers) moves nothing.
        sampler = self.batch_sampler
        if sampler.remaining() == 0:
            # The last pass finished the epoch (or a checkpoint was saved at its end): this pass is the
            # next epoch. A pass that stopped early (limit_train_batches, max_steps) is continued instead.
            sampler.set_epoch(sampler.epoch + 1)
        for batch in super().__iter__():
            sampler.position += sampler.world_size  # every rank hands out one batch of the round
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)
