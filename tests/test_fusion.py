"""The temporal-difference fusion: token budget per mode, zero-init, missing priors, the interval."""

import pytest
import torch

from models.fusion import IntervalEmbedding, TemporalFusion

MODES = ["concat", "difference", "fused"]
DIM, TOKENS = 8, 4


def inputs(has_prior=(True, False, True), days=(10.0, 400.0), seed=0):
    """(current (B, N, D), prior (P, N, D), prior_index (P,), interval_days (P,)): the fusion's arguments
    for a batch whose samples have a prior where ``has_prior`` says, with ``days`` their intervals."""
    generator = torch.Generator().manual_seed(seed)
    prior_index = torch.tensor(has_prior).nonzero()[:, 0]
    return (torch.randn(len(has_prior), TOKENS, DIM, generator=generator),
            torch.randn(len(prior_index), TOKENS, DIM, generator=generator), prior_index,
            torch.tensor(days, dtype=torch.float32))


def trained(fusion: TemporalFusion) -> TemporalFusion:
    """Moves every zero-initialised parameter away from zero, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in fusion.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return fusion


@pytest.mark.parametrize("mode", MODES)
def test_at_initialisation_current_tokens_pass_through_unchanged(mode):
    current, *rest = inputs()
    _, fused = TemporalFusion(DIM, TOKENS, mode)(current, *rest)
    torch.testing.assert_close(fused, current)


def test_at_initialisation_concat_shows_the_prior_tokens_unchanged():
    current, prior, prior_index, days = inputs()
    context, _ = TemporalFusion(DIM, TOKENS, "concat")(current, prior, prior_index, days)
    torch.testing.assert_close(context, prior)


def test_at_initialisation_difference_tokens_are_zero():
    context, _ = TemporalFusion(DIM, TOKENS, "difference")(*inputs())
    assert context.shape == (2, TOKENS, DIM) and context.abs().max() == 0


@pytest.mark.parametrize(("mode", "slots"), [("concat", 2), ("difference", 2), ("fused", 1)])
def test_token_budget_per_mode(mode, slots):
    fusion = TemporalFusion(DIM, TOKENS, mode)
    context, current = fusion(*inputs())
    assert fusion.slots == slots
    assert current.shape == (3, TOKENS, DIM)
    assert (context is None) == (slots == 1)
    if context is not None:
        assert context.shape == (2, TOKENS, DIM)  # one set per sample with a prior


@pytest.mark.parametrize("mode", MODES)
def test_a_sample_without_a_prior_gets_its_current_tokens_and_the_type_embedding(mode):
    fusion = trained(TemporalFusion(DIM, TOKENS, mode))
    current, prior, prior_index, days = inputs(has_prior=(True, False, True))
    _, fused = fusion(current, prior, prior_index, days)
    torch.testing.assert_close(fused[1], current[1] + fusion.current_type)


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_without_priors_runs_every_branch_on_empty_tensors(mode):
    """DDP and FSDP need every parameter in every rank's graph, even when its batch has no prior."""
    fusion = trained(TemporalFusion(DIM, TOKENS, mode))
    current, prior, prior_index, days = inputs(has_prior=(False, False), days=())
    current.requires_grad_(True)
    context, fused = fusion(current, prior, prior_index, days)
    assert prior.shape[0] == 0 and (context is None or context.shape[0] == 0)
    torch.testing.assert_close(fused, current + fusion.current_type)
    (fused.sum() + (context.sum() if context is not None else 0)).backward()
    assert [name for name, parameter in fusion.named_parameters() if parameter.grad is None] == []


@pytest.mark.parametrize("mode", MODES)
def test_a_sample_is_fused_with_its_own_prior_and_interval(mode):
    """Running a batch gives each sample with a prior what running it alone gives."""
    fusion = trained(TemporalFusion(DIM, TOKENS, mode))
    current, prior, prior_index, days = inputs(has_prior=(True, False, True))
    context, fused = fusion(current, prior, prior_index, days)
    for row, sample in enumerate(prior_index.tolist()):
        alone_context, alone = fusion(current[sample:sample + 1], prior[row:row + 1], torch.tensor([0]), days[row:row + 1])
        torch.testing.assert_close(fused[sample], alone[0])
        if context is not None:
            torch.testing.assert_close(context[row], alone_context[0])


@pytest.mark.parametrize("mode", MODES)
def test_outputs_depend_on_the_prior(mode):
    fusion = trained(TemporalFusion(DIM, TOKENS, mode))
    current, prior, prior_index, days = inputs(has_prior=(True, False), days=(30.0,))
    a = [t for t in fusion(current, prior, prior_index, days) if t is not None]
    b = [t for t in fusion(current, prior + 1.0, prior_index, days) if t is not None]
    assert any(not torch.allclose(x[0], y[0]) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", MODES)
def test_the_interval_changes_the_tokens_unless_switched_off(mode):
    current, prior, prior_index, _ = inputs(has_prior=(True,), days=(1.0,))
    for use_interval, should_change in ((True, True), (False, False)):
        fusion = trained(TemporalFusion(DIM, TOKENS, mode, use_interval=use_interval))
        assert fusion.use_interval == use_interval
        short = fusion(current, prior, prior_index, torch.tensor([7.0]))
        long = fusion(current, prior, prior_index, torch.tensor([700.0]))
        changed = any(not torch.allclose(s, l) for s, l in zip(short, long) if s is not None)
        assert changed == should_change


def test_interval_embedding_separates_intervals():
    embedding = IntervalEmbedding(dim=8)
    vectors = embedding(torch.tensor([1.0, 30.0, 365.0]))
    assert vectors.shape == (3, 8)
    assert not torch.allclose(vectors[0], vectors[1])
    assert not torch.allclose(vectors[1], vectors[2])


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="model.net.fusion.mode='stack'"):
        TemporalFusion(DIM, TOKENS, "stack")


@pytest.mark.parametrize("mode", ["difference", "fused"])
def test_at_initialisation_the_alignment_finds_each_tokens_counterpart_by_content(mode):
    """The alignment starts as the identity on queries, keys, values and output: a current token's counterpart
    is the prior token most like it (here the same token, in another order), not a random map of the prior."""
    fusion = TemporalFusion(DIM, TOKENS, mode)
    current = 10 * torch.eye(DIM)[:TOKENS].unsqueeze(0)  # (1, N, D): distinct tokens
    prior = current[:, torch.tensor([2, 0, 3, 1])]
    counterpart, _ = fusion.align(current, prior, prior, need_weights=False)
    torch.testing.assert_close(counterpart, current)
