"""Vision-to-LLM projection: NVILA's 2x2 token merge + MLP, and the temporal fusion of a prior study."""

from __future__ import annotations

import math

import torch
from torch import nn


class Merge2x2(nn.Module):
    """Concatenates each 2x2 block of neighbouring tokens, in NVILA's channel order.

    Token (i, j) becomes [x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)] -- einops
    ``b (h 2) (w 2) c -> b h w (2 2 c)``, which is not ``pixel_unshuffle`` order.
    """

    def __init__(self, grid: tuple[int, int]):
        super().__init__()
        rows, cols = grid
        if rows % 2 or cols % 2:
            raise ValueError(f"a 2x2 merge needs an even token grid, got {rows}x{cols}")
        self.grid = grid

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, channels = tokens.shape
        rows, cols = self.grid
        # (B, rows*cols, C) -> (B, rows/2, 2, cols/2, 2, C) -> (B, rows/2, cols/2, 2, 2, C)
        blocks = tokens.view(batch, rows // 2, 2, cols // 2, 2, channels).permute(0, 1, 3, 2, 4, 5)
        # -> (B, rows*cols/4, 4C)
        return blocks.reshape(batch, (rows // 2) * (cols // 2), 4 * channels)


class MLPDownsampleProjector(nn.Module):
    """NVILA's ``mlp_downsample``: 2x2 merge, LayerNorm(4C), Linear(4C->D), GELU, Linear(D->D).

    Kept as one ``nn.Sequential`` named ``layers`` so the state-dict keys (``layers.1.*``,
    ``layers.2.*``, ``layers.4.*``) are those of NVILA's ``mm_projector``.
    """

    def __init__(self, grid: tuple[int, int], vision_size: int, llm_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            Merge2x2(grid),
            nn.LayerNorm(4 * vision_size),
            nn.Linear(4 * vision_size, llm_size),
            nn.GELU(),
            nn.Linear(llm_size, llm_size),
        )
        self.tokens_per_image = (grid[0] // 2) * (grid[1] // 2)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(B, rows*cols, C) -> (B, rows*cols/4, D)."""
        return self.layers(patch_tokens)


class IntervalEmbedding(nn.Module):
    """Days between two studies -> a D-dim vector: ``log1p(days)`` -> sinusoids -> MLP.

    The log compresses 1 day .. 10 years into a range a few frequencies can resolve; studies without
    a prior get their own learned vector instead of a fake interval.
    """

    def __init__(self, dim: int, frequencies: int = 16, max_log_days: float = math.log1p(3650.0)):
        super().__init__()
        # Periods from ~2x the full log range down to a small fraction of it.
        periods = torch.logspace(math.log10(2 * max_log_days), math.log10(max_log_days / 64), frequencies)
        self.register_buffer("angular_frequency", 2 * math.pi / periods, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.no_interval = nn.Parameter(torch.zeros(dim))

    def forward(self, interval_days: torch.Tensor, has_prior: torch.Tensor) -> torch.Tensor:
        """(B,) days, (B,) bool -> (B, D)."""
        phase = torch.log1p(interval_days.clamp(min=0).float())[:, None] * self.angular_frequency
        features = torch.cat([phase.sin(), phase.cos()], dim=-1).to(self.no_interval.dtype)
        return torch.where(has_prior[:, None], self.mlp(features), self.no_interval)


class TemporalFusion(nn.Module):
    """Adds what changed since the prior study to the current study's visual tokens.

    For each current token, attention over the prior tokens finds its counterpart (so a few pixels of
    mis-registration between visits do not read as change); the difference to that counterpart,
    modulated by the interval embedding (FiLM), becomes a residual on the current tokens, scaled by a
    gate that the interval also drives and the has-prior mask forces shut. Samples without a prior
    use learned no-prior tokens, so every parameter is in every step's graph (DDP/FSDP ranks agree).

    The residual's last layer and the type embeddings start at zero: at initialisation the current
    tokens pass through unchanged, i.e. the model computes what the single-image model computes.
    """

    def __init__(self, dim: int, tokens_per_image: int, heads: int = 1, use_interval: bool = True):
        super().__init__()
        self.use_interval = use_interval
        self.interval = IntervalEmbedding(dim)
        self.no_prior_tokens = nn.Parameter(torch.randn(tokens_per_image, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(tokens_per_image, dim) * 0.02)
        self.align = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.difference_norm = nn.LayerNorm(dim)
        self.film = nn.Linear(dim, 2 * dim)
        self.difference_mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.gate = nn.Linear(dim, 1)
        self.current_type = nn.Parameter(torch.zeros(dim))
        self.prior_type = nn.Parameter(torch.zeros(dim))
        for layer in (self.film, self.difference_mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        current: torch.Tensor,
        prior: torch.Tensor,
        has_prior: torch.Tensor,
        interval_days: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """current, prior: (B, N, D) (prior rows of samples without one are ignored);
        has_prior (B,) bool; interval_days (B,). Returns (current tokens, prior tokens), each (B, N, D).
        """
        prior = torch.where(has_prior[:, None, None], prior, self.no_prior_tokens.to(prior.dtype))
        interval = self.interval(interval_days, has_prior)
        if not self.use_interval:
            # The ablation keeps the module's parameters in the graph but removes the information.
            interval = interval * 0 + self.interval.no_interval
        query = current + self.position
        counterpart, _ = self.align(query, prior + self.position, prior, need_weights=False)
        difference = self.difference_norm(current - counterpart)  # (B, N, D)
        scale, shift = self.film(interval)[:, None, :].chunk(2, dim=-1)
        difference = self.difference_mlp(difference * (1 + scale) + shift)
        gate = torch.sigmoid(self.gate(interval))[:, None, :] * has_prior[:, None, None]  # (B, 1, 1)
        fused_current = current + self.current_type + gate * difference
        return fused_current, prior + self.prior_type
