"""The temporal fusion of a prior study: the interval embedding and the fusion of prior and current tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.contract import FUSION_MODES, IMAGE_SLOTS


class IntervalEmbedding(nn.Module):
    """Days between two studies -> a D-dim vector: ``log1p(days)`` -> sinusoids -> MLP.

    The log compresses 1 day .. 10 years into a range a few frequencies can resolve. Only samples
    with a prior have an interval; the fusion never asks for one otherwise.
    """

    def __init__(self, dim: int, frequencies: int = 16, max_log_days: float = math.log1p(3650.0)):
        super().__init__()
        # Periods from ~2x the full log range down to a small fraction of it.
        periods = torch.logspace(math.log10(2 * max_log_days), math.log10(max_log_days / 64), frequencies)
        self.register_buffer("angular_frequency", 2 * math.pi / periods, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, interval_days: torch.Tensor) -> torch.Tensor:
        """(P,) days -> (P, D)."""
        phase = torch.log1p(interval_days.clamp(min=0).float())[:, None] * self.angular_frequency
        features = torch.cat([phase.sin(), phase.cos()], dim=-1).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class TemporalFusion(nn.Module):
    """Turns the projected current and prior tokens of a batch into what the LLM sees.

    ``mode`` sets the token budget of a two-image sample (N = tokens per image):

    - ``concat`` (2N): [prior tokens, current tokens] -- NVILA's multi-image prompt, with type
      embeddings, and the interval embedding added to the prior tokens;
    - ``difference`` (2N): [difference tokens, current tokens];
    - ``fused`` (N): current tokens + the gated difference, one token set carrying both.

    The difference branch: each current token attends over the prior tokens to find its counterpart
    (a few pixels of mis-registration between visits do not read as change); the normalised
    difference to it is FiLM-modulated by the interval embedding and passed through an MLP, then scaled
    by a gate that the interval also drives.

    Everything that involves a prior runs on the P samples that have one, and nothing else: a sample
    without a prior gets its current tokens plus the current-type embedding, exactly, at the cost of
    that addition. With P = 0, ``every_parameter_every_step`` (the default) still runs the prior
    branches, on empty tensors, so every parameter is in every step's graph with a zero gradient:
    DDP/FSDP ranks must agree on the graph whatever their batches hold. One process need not; there
    (``LumenLitModule.configure_model`` sets it from the world size) a batch without priors skips them
    and their parameters get no gradient that step, as if the batch had not touched them.
    The alignment starts as the identity on queries, keys, values and output (``__init__``). The last layers
    of the difference and interval branches and all type embeddings start at zero: a
    model initialised from NVILA first computes exactly NVILA's tokens for the current image (and, in
    ``concat``, for the prior image).
    """

    def __init__(self, dim: int, tokens_per_image: int, mode: str = "difference", heads: int = 1,
                 use_interval: bool = True):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"model.net.fusion.mode={mode!r}: expected one of {FUSION_MODES}")
        self.mode = mode
        self.every_parameter_every_step = True
        # The ablation (use_interval=false) has no interval embedding: the layers it feeds get zeros, so
        # what they add is their learned bias, the same for every interval.
        self.interval = IntervalEmbedding(dim) if use_interval else None
        self.current_type = nn.Parameter(torch.zeros(dim))
        if mode == "concat":
            self.prior_type = nn.Parameter(torch.zeros(dim))
            self.interval_to_prior = nn.Linear(dim, dim)
            zero_init = [self.interval_to_prior]
        else:
            self.position = nn.Parameter(torch.randn(tokens_per_image, dim) * 0.02)
            self.align = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.difference_norm = nn.LayerNorm(dim)
            self.film = nn.Linear(dim, 2 * dim)
            self.difference_mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
            self.gate = nn.Linear(dim, 1)
            zero_init = [self.film, self.difference_mlp[-1]]
            if mode == "difference":
                self.difference_type = nn.Parameter(torch.zeros(dim))
        for layer in zero_init:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if mode != "concat":
            # The alignment starts as a content match: its query, key, value and output maps are the identity, so
            # a current token's counterpart is the prior tokens averaged by their similarity to it, and their
            # difference is what changed, not the token minus a random map of the prior. From the default random
            # maps the demo's difference questions came out less often right (docs/results.md, 2026-12-05; the
            # value-and-output identity alone scored about the same).
            with torch.no_grad():
                self.align.in_proj_weight.copy_(torch.eye(dim).repeat(3, 1))
                self.align.in_proj_bias.zero_()
                self.align.out_proj.weight.copy_(torch.eye(dim))
                self.align.out_proj.bias.zero_()

    @property
    def use_interval(self) -> bool:
        return self.interval is not None

    @property
    def slots(self) -> int:
        """Token sets a two-image sample shows the LLM (a single-image sample always shows one): one per
        image slot of the prompt (``common.contract.IMAGE_SLOTS``)."""
        return len(IMAGE_SLOTS[self.mode])

    def difference(self, current: torch.Tensor, prior: torch.Tensor, interval: torch.Tensor) -> torch.Tensor:
        """(P, N, D) current and prior tokens, (P, D) interval embedding -> (P, N, D) difference tokens."""
        if prior.shape[0] == 0:
            # CUDA's attention kernels return no tensor for an empty batch (torch 2.11). The alignment's
            # value path, empty as well, keeps its parameters in the graph with zero gradients.
            values = F.linear(prior + self.position, self.align.in_proj_weight, self.align.in_proj_bias)
            counterpart = self.align.out_proj(values.chunk(3, dim=-1)[2])
        else:
            counterpart, _ = self.align(current + self.position, prior + self.position, prior, need_weights=False)
        difference = self.difference_norm(current - counterpart)
        scale, shift = self.film(interval)[:, None, :].chunk(2, dim=-1)
        return self.difference_mlp(difference * (1 + scale) + shift)

    def forward(
        self,
        current: torch.Tensor,
        prior: torch.Tensor,
        prior_index: torch.Tensor,
        interval_days: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """current: (B, N, D), every sample's tokens; prior: (P, N, D), the tokens of the P samples that
        have a prior, which are ``current[prior_index]``'s samples ((P,) long, increasing); interval_days:
        (P,), theirs. Returns (context, current): context is the (P, N, D) prior (``concat``) or
        difference (``difference``) token set of those samples, or None (``fused``, or no prior in the
        batch and its branches skipped); current is (B, N, D)."""
        if prior.shape[0] == 0 and not self.every_parameter_every_step:
            return None, current + self.current_type
        if self.interval is None:
            interval = prior.new_zeros(prior.shape[0], prior.shape[-1])
        else:
            interval = self.interval(interval_days).to(prior.dtype)
        if self.mode == "concat":
            return prior + self.prior_type + self.interval_to_prior(interval)[:, None, :], current + self.current_type
        gate = torch.sigmoid(self.gate(interval))[:, None, :]  # (P, 1, 1)
        difference = gate * self.difference(current.index_select(0, prior_index), prior, interval)
        if self.mode == "difference":
            return difference + self.difference_type, current + self.current_type
        current = current + self.current_type
        return None, current.index_add(0, prior_index, difference.to(current.dtype))  # (autocast: bf16 difference)
