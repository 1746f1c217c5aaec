"""bench/throughput.py: the Llava it times computes our model's loss, and how often each step waits for the device
(counted on CPU; on a GPU, checked against CUDA's own report)."""

from __future__ import annotations

import warnings

import pytest
import torch

from bench.throughput import DeviceWork, HostSyncs, counted_operators, counted_syncs, llava_like, llava_loss, ours_loss
from models.config import ModelConfig
from models.factory import build_model
from tests.helpers import assert_same_up_to_summation_order, model_inputs, model_labels


def test_only_the_operators_that_read_the_device_count_as_waits():
    x = torch.randn(6, requires_grad=True)
    with HostSyncs() as counter:
        x[torch.tensor([0, 2])].sum().backward()  # integer indices, forward and backward
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        torch.nonzero_static(x > 0, size=2)
        torch.zeros(8).index_copy(0, torch.tensor([1, 5]), x[:2]).sum().backward()
    assert counter.count == 0
    with HostSyncs() as counter:
        x[x > 0].sum().backward()  # the mask's entries are found in the forward and in the backward
        torch.repeat_interleave(torch.tensor([1, 2]))
        float(x.detach().sum())
        # masked_scatter's backward selects the gradient at the mask (masked_select, inside it)
        torch.zeros(8).masked_scatter(torch.arange(8) % 3 == 0, x).sum().backward()
    assert counter.count == 5


def test_views_and_allocations_run_no_work_on_the_device():
    x = torch.randn(4, 6)
    with DeviceWork() as counter:
        x.view(6, 4).t()[1:, 0].detach()
        torch.empty(3)
    assert counter.count == 0
    with DeviceWork() as counter:
        (x + 1).sum()
        torch.zeros(3)
    assert counter.count == 3


def test_the_optimizer_step_is_counted_as_cudas_foreach_adamw_launches_it():
    model = torch.nn.Sequential(*(torch.nn.Linear(3, 3) for _ in range(4)))  # 8 parameters
    batch = {"x": torch.randn(2, 3)}
    optimizer = torch.optim.AdamW(model.parameters())  # foreach=None: parameter by parameter on CPU

    def loss(model, batch):
        return model(batch["x"]).sum()

    for _ in range(2):  # the first step also creates the optimizer's state
        every, launching, stepping = counted_operators(model, loss, optimizer, batch)
    assert optimizer.param_groups[0]["foreach"] is None  # as it was
    assert every > launching > 0
    loss(model, batch).backward()
    with DeviceWork() as looped:
        optimizer.step()
        optimizer.zero_grad()
    # The same few list operators whatever the number of parameters, against several per parameter.
    assert 0 < stepping <= 10
    assert looped.count > 3 * 8


def labelled(model, has_prior) -> dict:
    batch = model_inputs(model, has_prior)
    return batch | {"labels": model_labels(model, batch)}


@pytest.mark.parametrize("layer", [-1, -2])
def test_llava_built_from_our_components_computes_our_loss_and_gradients_and_waits_less(tiny_base, layer):
    ours = build_model(ModelConfig(base=str(tiny_base), vision={"layer": layer})).train()
    ours.fusion.every_parameter_every_step = False  # as one training process sets it
    llava = llava_like(ours)
    batch = labelled(ours, has_prior=(False, False))  # Llava has no prior image
    ours_value, llava_value = ours_loss(ours, batch), llava_loss(llava, batch)
    assert_same_up_to_summation_order(llava_value, ours_value)
    (ours_value + llava_value).backward()
    # The gradients reach the projector and the tower through each model's splice of the visual tokens.
    pairs = [(ours.projector, llava.model.multi_modal_projector), (ours.vision.model, llava.model.vision_tower)]
    for own, theirs in pairs:
        theirs_by_name = dict(zip((name for name, _ in own.named_parameters()), theirs.parameters(), strict=True))
        assert_same_up_to_summation_order({name: other.grad for name, other in theirs_by_name.items()},
                                          {name: parameter.grad for name, parameter in own.named_parameters()})
    ours.zero_grad()
    llava.zero_grad()
    # Llava splices with masked_scatter, whose backward waits; ours copies by index.
    assert counted_syncs(ours_loss, ours, batch) == counted_syncs(llava_loss, llava, batch) - 1


@pytest.mark.parametrize("mode", ["concat", "difference", "fused"])
@pytest.mark.parametrize("has_prior", [(True, False), (False, False)])
def test_a_training_step_waits_for_the_device_twice_beyond_its_llm(tiny_base, mode, has_prior):
    """Once to check the batch's image-token and prior counts, once to find the positions with a target;
    the others are the LLM's own (transformers reading the attention mask)."""
    model = build_model(ModelConfig(base=str(tiny_base), fusion={"mode": mode})).train()
    batch = labelled(model, has_prior)
    assert counted_syncs(ours_loss, model, batch) == counted_syncs(llm_alone(model, batch), model.llm, batch) + 2


def llm_alone(model, batch: dict):
    """A loss function running only ``model``'s decoder, on the embeddings ``model`` gives ``batch``."""
    images = {key: batch[key] for key in ("current_images", "prior_images", "has_prior", "interval_days")}
    embeddings = model.embed(batch["input_ids"], **images).detach()

    def loss(llm, batch):
        decoder = llm.get_decoder()
        return decoder(inputs_embeds=embeddings, attention_mask=batch["attention_mask"]).last_hidden_state.sum()

    return loss


def test_prior_images_that_has_prior_does_not_mark_are_a_clear_error(tiny_base):
    model = build_model(ModelConfig(base=str(tiny_base)))
    batch = model_inputs(model, has_prior=(True, False))
    batch["has_prior"] = torch.tensor([True, True])
    with pytest.raises(ValueError, match="has_prior marks 2 samples but the batch holds 1 prior images"):
        model(**batch)


def cuda_syncs(loss_fn, model, batch: dict) -> int:
    """The synchronisations CUDA itself reports (``torch.cuda.set_sync_debug_mode``) in one forward and
    backward of ``model`` on ``batch``, after one unreported to warm up. Autograd replays the warnings of
    its device threads on the calling thread."""
    loss_fn(model, batch).backward()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss_fn(model, batch).backward()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    model.zero_grad()
    return sum("synchronizing CUDA operation" in str(warning.message) for warning in caught)


def on_gpu(batch: dict) -> dict:
    return {key: value.cuda() for key, value in batch.items()}


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("has_prior", [(True, False), (False, False)])
def test_on_a_gpu_a_step_waits_twice_beyond_its_llm(tiny_base, has_prior):
    """The CPU count above, checked against CUDA's own report, which also sees device-to-host copies."""
    model = build_model(ModelConfig(base=str(tiny_base))).train().cuda()
    model.fusion.every_parameter_every_step = False
    batch = on_gpu(labelled(model, has_prior))
    assert cuda_syncs(ours_loss, model, batch) == cuda_syncs(llm_alone(model, batch), model.llm, batch) + 2


@needs_gpu
def test_on_a_gpu_a_step_waits_less_often_than_llavas(tiny_base):
    """masked_scatter's backward, in Llava, waits (masked_select); ours copies by index."""
    ours = build_model(ModelConfig(base=str(tiny_base))).train()
    ours.fusion.every_parameter_every_step = False
    llava = llava_like(ours).cuda()
    batch = on_gpu(labelled(ours, has_prior=(False, False)))
    assert cuda_syncs(ours_loss, ours.cuda(), batch) < cuda_syncs(llava_loss, llava, batch)
