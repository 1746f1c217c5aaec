"""LumenModel: vision tower -> projector -> temporal fusion -> visual tokens spliced into a causal LLM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from common.contract import IGNORE_INDEX
from models.fusion import TemporalFusion
from models.projector import MLPDownsampleProjector
from models.vision import VisionTower


# Causal LM settings under which the model's forward does more to the head's output than return it.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # Gemma 2/3, Cohere, Granite


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, L): what position t predicts, ``labels[:, t + 1]`` (``IGNORE_INDEX`` at the end)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def target_count(labels: torch.Tensor) -> torch.Tensor:
    """The number of tokens the loss of ``labels`` is taken over (a 0-dim tensor on their device)."""
    return (shifted_targets(labels) != IGNORE_INDEX).sum()


class LumenModel(nn.Module):
    """A longitudinal VLM. Knows nothing about files, tokenizers or parallelism.

    Prompt layout contract with the collator: a sample with a prior study carries
    ``fusion.slots * tokens_per_image`` image-token ids (the context set -- prior or difference
    tokens -- first, then the current ones); a sample without one carries ``tokens_per_image``.
    """

    def __init__(
        self,
        vision: VisionTower,
        projector: MLPDownsampleProjector,
        fusion: TemporalFusion,
        llm: PreTrainedModel,
        image_token_id: int,
    ):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.fusion = fusion
        self.llm = llm
        self.image_token_id = image_token_id

    @property
    def tokens_per_image(self) -> int:
        return self.projector.tokens_per_image

    def visual_tokens(
        self,
        current_images: torch.Tensor,
        prior_images: torch.Tensor,
        has_prior: torch.Tensor,
        interval_days: torch.Tensor,
    ) -> torch.Tensor:
        """current_images (B, 3, H, W); prior_images (P, 3, H, W) for the P samples with
        ``has_prior``, in batch order (``embed`` checks that P is ``has_prior``'s count). Returns all
        visual tokens in prompt order, (T, D).

        No step waits for the device: every index is found with ``nonzero_static`` at a size the
        shapes give, not with ``nonzero`` or a boolean mask, whose data-dependent sizes make the host
        wait for the GPU to catch up."""
        batch, priors = current_images.shape[0], prior_images.shape[0]
        # One tower call for both visits: same weights, one kernel launch sequence.
        images = torch.cat([current_images, prior_images]).to(self.projector.layers[2].weight.dtype)
        projected = self.projector(self.vision(images))  # (B + P, N, D)
        prior_index = torch.nonzero_static(has_prior, size=priors)[:, 0]  # (P,)
        context, current = self.fusion(projected[:batch], projected[batch:], prior_index, interval_days[prior_index])
        if context is None:
            return current.flatten(0, 1)  # (B * N, D): one token set per sample
        # Per sample: [context tokens, current tokens] if it has a prior, else [current tokens].
        context = torch.zeros_like(current).index_copy(0, prior_index, context.to(current.dtype))  # (B, N, D), zeros unused
        both = torch.stack([context, current], dim=1).flatten(0, 1)  # (2B, N, D)
        keep = torch.stack([has_prior, torch.ones_like(has_prior)], dim=1).flatten()  # (2B,)
        return both.index_select(0, torch.nonzero_static(keep, size=batch + priors)[:, 0]).flatten(0, 1)  # (T, D)

    def embed(
        self,
        input_ids: torch.Tensor,
        current_images: torch.Tensor,
        prior_images: torch.Tensor,
        has_prior: torch.Tensor,
        interval_days: torch.Tensor,
    ) -> torch.Tensor:
        """Text embeddings with the visual tokens written over the image-token positions."""
        embeddings = self.llm.get_input_embeddings()(input_ids)
        image_positions = input_ids == self.image_token_id
        batch, priors = current_images.shape[0], prior_images.shape[0]
        visual = self.tokens_per_image * (batch + priors * (self.fusion.slots - 1))
        # Both counts in one host-device round trip; the message's details only when one is wrong.
        if not bool((image_positions.sum() == visual) & (has_prior.sum() == priors)):
            raise ValueError(count_mismatch(int(image_positions.sum()), visual, int(has_prior.sum()), priors,
                                            self.tokens_per_image))
        features = self.visual_tokens(current_images, prior_images, has_prior, interval_days).to(embeddings.dtype)
        # The image-token positions in row order, at the count just checked. Copying by index, unlike
        # masked_scatter, has a backward that does not wait for the device (masked_scatter's selects the
        # gradient with the boolean mask).
        index = torch.nonzero_static(image_positions.flatten(), size=visual)[:, 0]
        return embeddings.flatten(0, 1).index_copy(0, index, features).view_as(embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        max_length: int | None = None,
        loss_reduction: str = "mean",
        **images: torch.Tensor,
    ):
        """``images``: the four image arguments of ``embed``. A padded batch is (B, L) rows with their
        ``attention_mask``; a packed one (``LumenCollator(packing=True)``) is one (1, total) row of the
        samples end to end, with ``position_ids`` restarting at 0 per sample and ``cu_seq_lens``, the
        samples' boundaries (B + 1,), which make attention block-causal (its ``attention_mask`` is all
        ones and not needed), and ``max_length``, the longest sample (read from ``cu_seq_lens`` when
        not given, which makes the host wait for the device once more under flash-attention).

        Without ``labels``: the LLM output, logits at every position. With ``labels`` (``IGNORE_INDEX``, -100,
        where there is nothing to learn): a ``CausalLMOutputWithPast`` whose ``loss`` is Hugging Face's
        causal LM loss (``ForCausalLMLoss``: position t predicts ``labels[:, t + 1]``, mean cross-entropy
        in float32 over the targets; ``loss_reduction="sum"``: their sum, for a caller that divides by a
        larger batch's target count, see ``target_count``) and whose ``logits`` are None: the LM head runs only at the
        positions that have a target (the decoder's hidden states there). In a training batch most
        positions are prompt and image tokens, so this skips most of the head's matmul and, at
        NVILA-8B's 152k vocabulary, never holds the (tokens x vocabulary) logits and their gradient."""
        inputs_embeds = self.embed(input_ids, **images)
        if cu_seq_lens is None:
            attention = {"attention_mask": attention_mask}
        else:
            attention = packed_attention(
                cu_seq_lens, position_ids, self.llm.config._attn_implementation, inputs_embeds.dtype, max_length
            )
        if labels is None:
            return self.llm(inputs_embeds=inputs_embeds, use_cache=False, **attention)
        targets = shifted_targets(labels)
        # The positions with a target, found once (the one wait for the device this adds): selecting
        # with them, rather than with the boolean mask, has a backward that does not wait again.
        target_index = (targets != IGNORE_INDEX).flatten().nonzero()[:, 0]
        if any(getattr(self.llm.config, key, None) for key in LOGIT_TRANSFORMS):
            # The LLM's forward changes its head's output (softcapping, scaling): use it whole.
            logits = self.llm(inputs_embeds=inputs_embeds, use_cache=False, **attention).logits
            target_logits = logits.flatten(0, 1).index_select(0, target_index)
        else:
            hidden = self.llm.get_decoder()(inputs_embeds=inputs_embeds, use_cache=False, **attention).last_hidden_state
            target_logits = self.llm.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, target_index))
        loss = F.cross_entropy(target_logits.float(), targets.flatten()[target_index], reduction=loss_reduction)
        return CausalLMOutputWithPast(loss=loss)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
        **images: torch.Tensor,
    ) -> torch.Tensor:
        """Batched greedy decoding of left-padded prompts with the KV cache (positions follow the
        attention mask, so padding does not shift them); a sample that emits ``eos_token_id`` is padded
        from then on. Returns only the new tokens, (B, <= max_new_tokens)."""
        return self.llm.generate(
            inputs_embeds=self.embed(input_ids, **images),
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )


def count_mismatch(image_tokens: int, visual_tokens: int, marked_priors: int, prior_images: int,
                   per_image: int) -> str:
    """Why a batch's prompts, images and ``has_prior`` do not fit together."""
    if marked_priors != prior_images:
        return (f"has_prior marks {marked_priors} samples but the batch holds {prior_images} prior images: "
                "prior_images must be the images of exactly the samples that have a prior")
    return (f"the prompts hold {image_tokens} image tokens but the images give {visual_tokens} visual tokens "
            f"({per_image} per image): the collator and the model disagree on tokens per image")


def packed_attention(cu_seq_lens: torch.Tensor, position_ids: torch.Tensor | None, implementation: str,
                     dtype: torch.dtype, max_length: int | None = None) -> dict:
    """The LLM arguments that keep the samples of a packed row apart: a token attends only to the
    earlier tokens of its own sample (block-causal attention), and positions restart per sample."""
    if position_ids is None or position_ids.shape[0] != 1:
        raise ValueError("a packed batch is one row: position_ids (1, total) must come with cu_seq_lens")
    total = position_ids.shape[1]
    if int(cu_seq_lens[-1]) != total:
        raise ValueError(f"cu_seq_lens ends at {int(cu_seq_lens[-1])} but the packed row holds {total} tokens")
    lengths = cu_seq_lens.diff()
    if implementation == "flash_attention_2":
        # transformers hands these to flash_attn_varlen_func as they are (no mask is built, nothing is
        # unpadded). attention_mask must be None: with one, it would unpad by the mask and let every
        # token of the row see every earlier one.
        longest = int(lengths.max()) if max_length is None else max_length
        return {"attention_mask": None, "position_ids": position_ids, "cu_seq_lens_q": cu_seq_lens,
                "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"packed batches need attn_implementation sdpa, eager or flash_attention_2, not {implementation!r}")
    # A 4D mask reaches the attention as it is (transformers builds none of its own).
    sample = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seq_lens.device), lengths.long(),
                                     output_size=total)  # (T,) which sample each token belongs to
    position = torch.arange(total, device=cu_seq_lens.device)
    visible = (sample[:, None] == sample[None, :]) & (position[:, None] >= position[None, :])  # (T, T) query x key
    if implementation == "sdpa":
        return {"attention_mask": visible[None, None], "position_ids": position_ids}
    additive = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)
    return {"attention_mask": additive[None, None], "position_ids": position_ids}
