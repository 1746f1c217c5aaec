"""bench/memory.py's memory plan: NVILA-8B's published shapes, and the predicted peak of a training step
against the live tensor bytes measured on CPU (one FSDP2 process, bf16 compute) for a tiny model."""

import pytest
import torch
import torch.distributed as dist

from bench.memory import NVILA_8B, TINY, Setup, Workload, build_model, plan, profile_steps


def test_the_plan_builds_nvila_8b_with_qwen2_7b_and_siglip_so400m_shapes():
    with torch.device("meta"):
        model = build_model(NVILA_8B, checkpointing=False)
    # Qwen2.5-7B-Instruct has 7,615,616,512 parameters with its padded 152,064-row vocabulary; NVILA-8B
    # stores 151,648 rows: 416 fewer in the embeddings and in the LM head.
    assert sum(p.numel() for p in model.llm.parameters()) == 7_615_616_512 - 2 * 416 * 3584
    assert len(model.vision.blocks) == 26  # so400m's 27 layers, read at the second-to-last
    assert model.tokens_per_image == 256 and model.projector.mm_hidden_size == 3 * 1152


@pytest.fixture
def one_process_group():
    """A gloo group of this process alone, rendezvousing through an in-memory store: no port to find free."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no checkpointing", "checkpointing"])
def test_the_predicted_peak_is_within_15_percent_of_the_measured_one(one_process_group, checkpointing):
    work, setup = Workload(micro_batch=4, text_tokens=48), Setup(gpus=1, checkpointing=checkpointing,
                                                                   flash_attention=False, accumulation=1)
    predicted, measured = plan(TINY, work, setup), profile_steps(TINY, work, setup)
    assert predicted["batch"] + predicted["parameters"] + predicted["optimizer state"] == pytest.approx(
        measured["start"], rel=0.01)
    assert 0.95 < measured["peak"] / predicted["peak"] < 1.15


def test_the_measured_peak_does_not_depend_on_the_threads_of_the_machine(one_process_group):
    work, setup = Workload(micro_batch=4, text_tokens=48), Setup(gpus=1, checkpointing=True, flash_attention=False,
                                                                   accumulation=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        many = profile_steps(TINY, work, setup)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert many == profile_steps(TINY, work, setup)
