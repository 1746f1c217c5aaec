"""bench/throughput.py: the Llava it times computes our model's loss, and how often each step waits for the device."""

from __future__ import annotations

import pytest
import torch

from bench.throughput import HostSyncs, counted_syncs, llava_like, llava_loss, ours_loss
from models.checkpoints import ModelConfig, build_model
from tests.helpers import model_inputs, model_labels


def test_only_the_operators_that_read_the_device_count_as_waits():
    x = torch.randn(6, requires_grad=True)
    with HostSyncs() as counter:
        x[torch.tensor([0, 2])].sum().backward()  # integer indices, forward and backward
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        torch.nonzero_static(x > 0, size=2)
    assert counter.count == 0
    with HostSyncs() as counter:
        x[x > 0].sum().backward()  # the mask's entries are found in the forward and in the backward
        torch.repeat_interleave(torch.tensor([1, 2]))
        float(x.detach().sum())
    assert counter.count == 4


def labelled(model, has_prior) -> dict:
    batch = model_inputs(model, has_prior)
    return batch | {"labels": model_labels(model, batch)}


@pytest.mark.parametrize("layer", [-1, -2])
def test_llava_built_from_our_components_computes_our_loss_and_waits_as_often(tiny_base, layer):
    ours = build_model(ModelConfig(base=str(tiny_base), vision={"layer": layer})).train()
    ours.fusion.every_parameter_every_step = False  # as one training process sets it
    llava = llava_like(ours)
    batch = labelled(ours, has_prior=(False, False))  # Llava has no prior image
    torch.testing.assert_close(llava_loss(llava, batch), ours_loss(ours, batch))
    assert counted_syncs(ours_loss, ours, batch) <= counted_syncs(llava_loss, llava, batch)


@pytest.mark.parametrize("mode", ["concat", "difference", "fused"])
@pytest.mark.parametrize("has_prior", [(True, False), (False, False)])
def test_a_training_step_waits_for_the_device_twice_beyond_its_llm(tiny_base, mode, has_prior):
    """Once to check the batch's image-token and prior counts, once to find the positions with a target;
    the others are the LLM's own (transformers reading the attention mask)."""
    model = build_model(ModelConfig(base=str(tiny_base), fusion={"mode": mode})).train()
    batch = labelled(model, has_prior)
    images = {key: batch[key] for key in ("current_images", "prior_images", "has_prior", "interval_days")}
    embeddings = model.embed(batch["input_ids"], **images).detach()

    def llm_alone(llm, batch):
        decoder = llm.get_decoder()
        return decoder(inputs_embeds=embeddings, attention_mask=batch["attention_mask"]).last_hidden_state.sum()

    assert counted_syncs(ours_loss, model, batch) == counted_syncs(llm_alone, model.llm, batch) + 2


def test_prior_images_that_has_prior_does_not_mark_are_a_clear_error(tiny_base):
    model = build_model(ModelConfig(base=str(tiny_base)))
    batch = model_inputs(model, has_prior=(True, False))
    batch["has_prior"] = torch.tensor([True, True])
    with pytest.raises(ValueError, match="has_prior marks 2 samples but the batch holds 1 prior images"):
        model(**batch)
