"""Shared fixtures: a small synthetic world and a tiny base model built from it, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from run.cli import compose_config
from datamodules.synthetic import ensure_world
from run.tiny_base import ensure_tiny_base
from tests.helpers import PLAIN, TINY_LLM, TINY_PRETRAIN_STEPS, TINY_VISION, WORLD_SUBJECTS
from run.train import train

# Numbers computed in this process must not depend on the machine's cores: the thread count decides how
# CPU kernels split their sums (and so their rounding) and how much scratch memory they take.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    return ensure_world(tmp_path_factory.mktemp("world") / "world", subjects=WORLD_SUBJECTS, seed=0)


@pytest.fixture(scope="session")
def tiny_base(world, tmp_path_factory) -> Path:
    return ensure_tiny_base(tmp_path_factory.mktemp("base") / "tiny-base", world, vision_tower="siglip", vision=TINY_VISION, llm=TINY_LLM,
                            vision_pretrain_steps=TINY_PRETRAIN_STEPS)


@pytest.fixture
def demo_overrides(world, tiny_base, tmp_path) -> list[str]:
    """Points the demo config at the session's world and base and keeps everything small."""
    return [
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.world_dir={world}",
        f"paths.tiny_base={tiny_base}",
        f"prepare.world.subjects={WORLD_SUBJECTS}",
        "prepare.tiny_base.vision_tower=siglip",
        f"+prepare.tiny_base.vision={TINY_VISION}".replace("'", ""),
        f"+prepare.tiny_base.llm={TINY_LLM}".replace("'", ""),
        f"prepare.tiny_base.vision_pretrain_steps={TINY_PRETRAIN_STEPS}",
        *PLAIN,
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "logger=csv",
    ]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, world, tiny_base) -> Path:
    """A short real training run (a few dozen steps) whose last checkpoint the eval tests load."""
    run = tmp_path_factory.mktemp("trained")
    overrides = [
        f"paths.output_dir={run}", f"paths.cache_dir={run / 'cache'}", f"paths.world_dir={world}",
        f"paths.tiny_base={tiny_base}", f"prepare.world.subjects={WORLD_SUBJECTS}", "prepare.tiny_base=null",
        *PLAIN, "logger=csv", "data.batch_size=8", "data.limit.val=16", "trainer.max_epochs=2",
    ]
    trainer = train(compose_config("train", overrides))
    assert trainer.global_step > 10
    return Path(trainer.checkpoint_callback.last_model_path)
