"""FLOPs of one LumenModel training step (forward + backward): measured once per part, scaled to each batch.

Model FLOPs, the numerator of MFU (PaLM, appendix B): the matrix multiplications of the forward and
backward pass of the model as configured -- not the recomputation of activation checkpointing, not
padding tokens, not norms, activations or the loss (a few FLOPs per element, where a matmul costs
thousands). Backward costs twice the forward for a trained weight (gradients for its input and for
itself); a frozen part costs its forward, plus one more forward's worth when a part before it is
trained and needs the gradient passed through.

**Measured** (what training logs). ``measure_step_flops`` builds the configured model on the meta
device (no weights read, nothing allocated) and counts with Lightning's ``measure_flops``
(``torch.utils.flop_counter.FlopCounterMode``) one forward + backward of each part, attention in
PyTorch's math form, which counts QK^T and AV and their gradients without the recomputation of
flash kernels:

- the vision tower + projector on one image -> ``per_image``;
- the temporal fusion of one sample with a prior -> ``per_prior`` (a sample without one only gets
  the current-type embedding added: no matmul);
- the LLM's decoder (embeddings, layers, final norm) on one sequence of n1 and of n2 tokens; its FLOPs are
  ``per_token * n + per_token_pair * n^2`` exactly (weights once per token, attention once per pair of
  tokens), so two lengths give both;
- the LM head on one position -> ``per_target``: a training step runs it only at the positions that
  have a target (``LumenModel.forward`` with labels), not at prompt, image or padding tokens.

A batch then costs (``StepFlops.of_batch``, no re-measuring)::

    images * per_image + priors * per_prior + sum over sequences (per_token * n + per_token_pair * n^2)
        + targets * per_target

with images = current + prior images, priors = the prior images, n the real tokens of each
sequence: a padded row's ``attention_mask`` sum, or in a packed row each sample's span (its
``position_ids`` restart at 0), and targets the positions with a next-token label. Padding is computed
but is not model FLOPs; packing removes it.

**Formula** (``formula_flops``; every part trained, as in the paper's recipe), per the torchtitan /
PaLM count of 6 N per token plus attention::

    LLM, a sequence of n tokens:   6 N_llm n + 12 L d n^2     N_llm: decoder parameters without the
                                                                input embedding; L layers; d = query
                                                                heads x head dim (12 L d n per token)
    LM head, one target:           6 N_head                    N_head = vocabulary x hidden size
    vision tower, one image:       6 N_vis P + 12 L_v d_v P^2  N_vis: parameters of its blocks; P patches
    projector, one image:          6 N_proj T                  T visual tokens per image
    fusion, one sample with a      6 N_fus T + 12 D T^2        (the attention term in difference/fused
      prior:                                                    modes, whose tokens attend over the prior's)

It leaves out what the measurement keeps (the patch embedding, pixels needing no gradient, the
per-sample layers of the fusion counted as per-token) and counts norms and biases as weights;
tests/test_flops.py checks the two agree within ``FORMULA_TOLERANCE``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from lightning.fabric.utilities.throughput import measure_flops
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.contract import IGNORE_INDEX
from models.config import ModelConfig
from models.factory import build_model, input_spec
from models.lumen import LumenModel

# Relative difference allowed between formula_flops and the measurement on the tests' tiny models, where the
# formula comes out 1-2% low (the patch embedding it leaves out weighs most at tiny widths); at full size the
# LLM term dominates and the two agree more closely.
FORMULA_TOLERANCE = 0.03
# Any two distinct lengths identify the LLM's linear and quadratic terms.
MEASURE_LENGTHS = (16, 32)


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs (forward + backward) of a LumenModel, per unit of work."""

    per_image: int  # vision tower + projector, one image
    per_prior: int  # temporal fusion, one sample with a prior
    per_token: int  # LLM, weights: once per token
    per_token_pair: int  # LLM, attention: once per (query, key) pair of a sequence (causal or not)
    per_target: int  # LM head, once per position with a target

    def __call__(self, images: int, priors: int, sequence_lengths: Sequence[int] | torch.Tensor,
                 targets: int) -> int:
        lengths = torch.as_tensor(sequence_lengths, dtype=torch.long)
        return (images * self.per_image + priors * self.per_prior + self.per_token * int(lengths.sum())
                + self.per_token_pair * int((lengths * lengths).sum()) + targets * self.per_target)

    def __str__(self) -> str:
        return (f"{self.per_image:.3g} per image, {self.per_prior:.3g} per prior, {self.per_token:.3g} per token, "
                f"{self.per_token_pair:.3g} per token pair, {self.per_target:.3g} per target")

    def of_batch(self, batch: dict) -> int:
        """The FLOPs of training on a collated batch (padded or packed), from its shapes, masks and labels."""
        priors = batch["prior_images"].shape[0]
        return self(batch["current_images"].shape[0] + priors, priors, sequence_lengths(batch), target_tokens(batch))


def sequence_lengths(batch: dict) -> torch.Tensor:
    """Real tokens of each sequence of a batch: per row, the ``attention_mask`` sum; in a packed row
    (``position_ids`` restarting at 0 for every sample), each sample's span."""
    real = batch["attention_mask"].bool()
    if "position_ids" not in batch:
        return real.sum(dim=1)
    positions = batch["position_ids"][real]  # the real tokens, row after row
    starts = (positions == 0).nonzero()[:, 0]
    return torch.diff(starts, append=starts.new_tensor([positions.numel()]))


def target_tokens(batch: dict) -> int:
    """Positions of a batch that predict a target token, where the LM head runs: the labels, shifted by
    one as the causal loss does, that are not ``IGNORE_INDEX``."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def real_tokens(batch: dict) -> int:
    """Non-padding tokens of a batch (every token of a packed one)."""
    return int(batch["attention_mask"].sum())


def _count(part: torch.nn.Module, forward: Callable[[], torch.Tensor], trains: bool) -> int:
    """Forward (+ backward when something in it is trained) FLOPs of ``part``, attention in its math form."""
    with sdpa_kernel(SDPBackend.MATH):
        return measure_flops(part, forward, torch.Tensor.sum if trains else None)


def _trains(*parts: torch.nn.Module) -> bool:
    return any(parameter.requires_grad for part in parts for parameter in part.parameters())


def meta_model(config: ModelConfig) -> LumenModel:
    """The configured architecture on the meta device, as trained: eager attention (the same matmuls as
    sdpa or flash attention; its mask needs no data-dependent check) and no activation checkpointing
    (recomputation is not model FLOPs)."""
    config = dataclasses.replace(config, attn_implementation="eager", gradient_checkpointing=False)
    with torch.device("meta"):
        return build_model(config, weights=False).train()


def measure_step_flops(config: ModelConfig) -> StepFlops:
    """Measures ``StepFlops`` for the model ``config`` builds (see the module docstring); seconds for an
    8B model, as nothing is computed."""
    model = meta_model(config)
    dtype = model.projector.layers[2].weight.dtype
    size = input_spec(config).image_size
    tokens, width = model.tokens_per_image, model.llm.config.hidden_size
    vision_trains = _trains(model.vision, model.projector)
    with torch.device("meta"):
        image = torch.empty(1, 3, size, size, dtype=dtype)
        per_image = _count(model, lambda: model.projector(model.vision(image)), vision_trains)

        current, prior = (torch.empty(1, tokens, width, dtype=dtype, requires_grad=vision_trains) for _ in range(2))
        prior_index, interval = torch.zeros(1, dtype=torch.long), torch.ones(1)
        # Both token sets (the context set is None in fused mode), so every branch gets its backward.
        per_prior = _count(model.fusion, lambda: sum(tokens.sum() for tokens in model.fusion(
            current, prior, prior_index, interval) if tokens is not None), vision_trains or _trains(model.fusion))

        # The LLM's input embeddings need a gradient when the embedding table or any visual part trains.
        embeddings_train = vision_trains or _trains(model.fusion, model.llm.get_input_embeddings())
        decoder, head = model.llm.get_decoder(), model.llm.get_output_embeddings()
        hidden_trains = embeddings_train or _trains(decoder)
        llm_flops = []
        for length in MEASURE_LENGTHS:
            embeddings = torch.empty(1, length, width, dtype=dtype, requires_grad=embeddings_train)
            mask = torch.ones(1, length, dtype=torch.long)
            llm_flops.append(_count(
                decoder, lambda: decoder(inputs_embeds=embeddings, attention_mask=mask, use_cache=False).last_hidden_state,
                hidden_trains))
        hidden = torch.empty(1, width, dtype=dtype, requires_grad=hidden_trains)
        per_target = _count(head, lambda: head(hidden), hidden_trains or _trains(head))
    (n1, n2), (f1, f2) = MEASURE_LENGTHS, llm_flops
    # f = a n + b n^2 at two lengths -> b = (f2 n1 - f1 n2) / (n1 n2 (n2 - n1)), a = f1 / n1 - b n1 (exact integers).
    per_token_pair = (f2 * n1 - f1 * n2) // (n1 * n2 * (n2 - n1))
    per_token = (f1 - per_token_pair * n1 * n1) // n1
    return StepFlops(per_image, per_prior, per_token, per_token_pair, per_target)


def formula_flops(model: LumenModel, images: int, priors: int, sequence_lengths: Sequence[int],
                  targets: int) -> int:
    """The closed-form estimate of the module docstring for a fully trained ``model`` (any device)."""

    def count(module: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    llm = model.llm.config
    head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
    llm_weights = count(model.llm.get_decoder()) - count(model.llm.get_input_embeddings())
    patches = model.vision.grid[0] * model.vision.grid[1]
    tokens, width = model.tokens_per_image, llm.hidden_size
    per_image = (6 * sum(count(block) for block in model.vision.blocks) * patches
                 + 12 * len(model.vision.blocks) * model.vision.hidden_size * patches ** 2
                 + 6 * count(model.projector) * tokens)
    per_prior = 6 * count(model.fusion) * tokens + (12 * width * tokens ** 2 if hasattr(model.fusion, "align") else 0)
    per_sequence = [6 * llm_weights * n + 12 * llm.num_hidden_layers * llm.num_attention_heads * head_dim * n * n for n in sequence_lengths]
    per_target = 6 * count(model.llm.get_output_embeddings())
    return images * per_image + priors * per_prior + sum(per_sequence) + targets * per_target
