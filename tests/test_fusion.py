"""The temporal-difference fusion: token budget per mode, zero-init, missing priors, the interval."""

import pytest
import torch

from models.projector import IntervalEmbedding, TemporalFusion

MODES = ["concat", "difference", "fused"]
DIM, TOKENS = 8, 4


def inputs(has_prior=(True, False, True), days=(10.0, 0.0, 400.0), seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = len(has_prior)
    return (torch.randn(batch, TOKENS, DIM, generator=generator), torch.randn(batch, TOKENS, DIM, generator=generator),
            torch.tensor(has_prior), torch.tensor(days))


def trained(fusion: TemporalFusion) -> TemporalFusion:
    """Moves every zero-initialised parameter away from zero, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in fusion.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return fusion


@pytest.mark.parametrize("mode", MODES)
def test_at_initialisation_current_tokens_pass_through_unchanged(mode):
    current, prior, has_prior, days = inputs()
    _, fused = TemporalFusion(DIM, TOKENS, mode)(current, prior, has_prior, days)
    torch.testing.assert_close(fused, current)


def test_at_initialisation_concat_shows_the_prior_tokens_unchanged():
    current, prior, has_prior, days = inputs()
    context, _ = TemporalFusion(DIM, TOKENS, "concat")(current, prior, has_prior, days)
    torch.testing.assert_close(context[has_prior], prior[has_prior])


def test_at_initialisation_difference_tokens_are_zero():
    current, prior, has_prior, days = inputs()
    context, _ = TemporalFusion(DIM, TOKENS, "difference")(current, prior, has_prior, days)
    assert context.abs().max() == 0


@pytest.mark.parametrize(("mode", "slots"), [("concat", 2), ("difference", 2), ("fused", 1)])
def test_token_budget_per_mode(mode, slots):
    fusion = TemporalFusion(DIM, TOKENS, mode)
    context, current = fusion(*inputs())
    assert fusion.slots == slots
    assert current.shape == (3, TOKENS, DIM)
    assert (context is None) == (slots == 1)


@pytest.mark.parametrize("mode", MODES)
def test_a_missing_prior_gives_finite_tokens_that_ignore_the_prior_rows(mode):
    fusion = trained(TemporalFusion(DIM, TOKENS, mode))
    current, prior, has_prior, days = inputs(has_prior=(False, False), days=(0.0, 0.0))
    nan_prior = torch.full_like(prior, float("nan"))
    a = fusion(current, prior, has_prior, days)
    b = fusion(current, nan_prior, has_prior, days)
    for first, second in zip(a, b):
        if first is not None:
            assert torch.isfinite(first).all()
            torch.testing.assert_close(first, second)


@pytest.mark.parametrize("mode", ["difference", "fused"])
def test_the_gate_is_shut_without_a_prior(mode):
    fusion = trained(TemporalFusion(DIM, TOKENS, mode))
    current, prior, _, days = inputs(has_prior=(False,), days=(0.0,))
    context, fused = fusion(current, prior, torch.tensor([False]), days)
    if mode == "fused":
        torch.testing.assert_close(fused, current + fusion.current_type)
    else:
        torch.testing.assert_close(context, fusion.difference_type.expand_as(context))


@pytest.mark.parametrize("mode", MODES)
def test_outputs_depend_on_the_prior_only_when_present(mode):
    fusion = trained(TemporalFusion(DIM, TOKENS, mode))
    current, prior, has_prior, days = inputs(has_prior=(True, False), days=(30.0, 0.0))
    other_prior = prior + 1.0
    a = [t for t in fusion(current, prior, has_prior, days) if t is not None]
    b = [t for t in fusion(current, other_prior, has_prior, days) if t is not None]
    assert any(not torch.allclose(x[0], y[0]) for x, y in zip(a, b))
    for x, y in zip(a, b):
        torch.testing.assert_close(x[1], y[1])


@pytest.mark.parametrize("mode", MODES)
def test_the_interval_changes_the_tokens_unless_switched_off(mode):
    current, prior, has_prior, _ = inputs(has_prior=(True,), days=(1.0,))
    for use_interval, should_change in ((True, True), (False, False)):
        fusion = trained(TemporalFusion(DIM, TOKENS, mode, use_interval=use_interval))
        short = fusion(current, prior, has_prior, torch.tensor([7.0]))
        long = fusion(current, prior, has_prior, torch.tensor([700.0]))
        changed = any(not torch.allclose(s, l) for s, l in zip(short, long) if s is not None)
        assert changed == should_change


def test_interval_embedding_separates_intervals_and_missing_prior():
    embedding = IntervalEmbedding(dim=8)
    vectors = embedding(torch.tensor([1.0, 30.0, 365.0, 0.0]), torch.tensor([True, True, True, False]))
    assert not torch.allclose(vectors[0], vectors[1])
    assert not torch.allclose(vectors[1], vectors[2])
    torch.testing.assert_close(vectors[3], embedding.no_interval)


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="model.net.fusion.mode='stack'"):
        TemporalFusion(DIM, TOKENS, "stack")
