"""Padding-free packing: a micro-batch as one row with block-causal attention trains exactly as the
padded batch does, on the tiny real Qwen2 + SigLIP base."""

import pytest
import torch
import torch.nn.functional as F
import transformers.modeling_flash_attention_utils as flash_utils
from transformers.masking_utils import create_causal_mask

from bench.throughput import HostSyncs
from common.contract import IGNORE_INDEX
from common.tokenizer import load_tokenizer
from datamodules.collate import LumenCollator
from datamodules.datamodule import SampleDataset
from datamodules.sources import DiffVQASource
from models.config import ModelConfig
from models.factory import build_model, input_spec
from models.lumen import packed_attention
from models.lit_module import BATCH_INPUTS, PACKED_INPUTS
from tests.helpers import SUMMATION_ORDER_TOLERANCE, assert_same_up_to_summation_order, relative_difference
from run.cli import compose_config
from run.train import train

# Two-image and one-image samples alternating, so the padded batch has padding in most rows.
PATTERN = (True, False, True, True, False)


@pytest.fixture(scope="module")
def samples(world):
    source = DiffVQASource(str(world / "medical-diff-vqa"), str(world / "mimic-cxr-jpg"))
    loaded = source.load("train", use_prior=True)[0]
    two = [sample for sample in loaded if sample.has_prior]
    one = [sample for sample in loaded if not sample.has_prior]
    chosen = [(two if has_prior else one).pop() for has_prior in PATTERN]
    return [SampleDataset(chosen)[i] for i in range(len(chosen))]


def config(tiny_base, mode: str = "difference", attention: str = "sdpa") -> ModelConfig:
    return ModelConfig(base=str(tiny_base), vision={"type": "hf", "layer": -1}, fusion={"mode": mode},
                       attn_implementation=attention)


def collated(tiny_base, samples, mode: str = "difference") -> tuple[dict, dict]:
    """The same samples as a padded and as a packed batch."""
    spec = input_spec(config(tiny_base, mode))
    tokenizer = load_tokenizer(tiny_base / "llm")
    return LumenCollator(tokenizer, **spec)(samples), LumenCollator(tokenizer, **spec, packing=True)(samples)


def model_inputs(batch: dict) -> dict:
    return {key: batch[key] for key in (*BATCH_INPUTS, *PACKED_INPUTS, "labels") if key in batch}


def loss_and_gradients(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**model_inputs(batch)).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_a_packed_row_is_the_padded_rows_without_their_padding(tiny_base, samples):
    padded, packed = collated(tiny_base, samples)
    real = padded["attention_mask"].bool()
    lengths = real.sum(dim=1)
    total = int(lengths.sum())
    assert padded["input_ids"].numel() > total  # the padded batch does pad
    assert packed["input_ids"].shape == packed["labels"].shape == packed["position_ids"].shape == (1, total)
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][real])
    assert torch.equal(packed["attention_mask"], torch.ones(1, total, dtype=torch.long))
    assert packed["cu_seq_lens"].tolist() == [0, *lengths.cumsum(0).tolist()]
    assert packed["cu_seq_lens"].dtype == torch.int32
    assert torch.equal(packed["position_ids"][0], torch.cat([torch.arange(n) for n in lengths.tolist()]))
    # The loss is over exactly the same target tokens, in the same order.
    assert torch.equal(packed["labels"][packed["labels"] != IGNORE_INDEX], padded["labels"][padded["labels"] != IGNORE_INDEX])
    assert (packed["labels"][0, packed["cu_seq_lens"][:-1].long()] == IGNORE_INDEX).all()
    for key in ("current_images", "prior_images", "has_prior", "interval_days"):
        assert torch.equal(packed[key], padded[key])


def test_generation_batches_cannot_be_packed(tiny_base):
    with pytest.raises(ValueError, match="generation batches are left-padded"):
        LumenCollator(load_tokenizer(tiny_base / "llm"), **input_spec(config(tiny_base)), for_generation=True,
                      packing=True)


@pytest.mark.parametrize("mode", ["difference", "fused"])  # two token sets per two-image sample, or one
def test_visual_tokens_land_on_each_samples_image_positions_in_the_packed_row(tiny_base, samples, mode):
    padded, packed = collated(tiny_base, samples, mode)
    torch.manual_seed(0)
    model = build_model(config(tiny_base, mode))
    images = {key: padded[key] for key in ("current_images", "prior_images", "has_prior", "interval_days")}
    with torch.no_grad():
        rows = model.embed(padded["input_ids"], **images)[padded["attention_mask"].bool()]
        row = model.embed(packed["input_ids"], **images)[0]
    torch.testing.assert_close(row, rows, rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["difference", "fused"])
def test_a_packed_micro_batch_has_the_padded_batchs_loss_and_gradients(tiny_base, samples, mode, attention):
    padded, packed = collated(tiny_base, samples, mode)
    torch.manual_seed(0)
    model = build_model(config(tiny_base, mode, attention)).train()
    padded_loss, padded_gradients = loss_and_gradients(model, padded)
    packed_loss, packed_gradients = loss_and_gradients(model, packed)
    assert_same_up_to_summation_order(packed_loss, padded_loss)
    assert len(packed_gradients) > 40
    assert_same_up_to_summation_order(packed_gradients, padded_gradients)


def without_targets(batch: dict, sample: int) -> dict:
    """The batch with one sample's labels all IGNORE_INDEX (its row, or its span of the packed row)."""
    labels = batch["labels"].clone()
    if "cu_seq_lens" in batch:
        labels[0, int(batch["cu_seq_lens"][sample]):int(batch["cu_seq_lens"][sample + 1])] = IGNORE_INDEX
    else:
        labels[sample] = IGNORE_INDEX
    return dict(batch, labels=labels)


def full_logits_loss(model, batch: dict) -> torch.Tensor:
    """Hugging Face's causal LM loss over the logits of every position: what LumenModel computed before
    it ran the LM head at target positions only."""
    images = {key: batch[key] for key in ("current_images", "prior_images", "has_prior", "interval_days")}
    embeddings = model.embed(batch["input_ids"], **images)
    if "cu_seq_lens" in batch:
        attention = packed_attention(batch["cu_seq_lens"], batch["position_ids"], "sdpa", embeddings.dtype)
    else:
        attention = {"attention_mask": batch["attention_mask"]}
    return model.llm(inputs_embeds=embeddings, labels=batch["labels"], use_cache=False, **attention).loss


@pytest.mark.parametrize("no_targets", [(), (1, 3)], ids=["every-sample-has-targets", "two-samples-without"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_loss_at_target_positions_is_hugging_faces_full_logits_loss(tiny_base, samples, layout, no_targets):
    padded, packed = collated(tiny_base, samples)
    batch = padded if layout == "padded" else packed
    for sample in no_targets:
        batch = without_targets(batch, sample)
    torch.manual_seed(0)
    model = build_model(config(tiny_base)).train()
    output = model(**model_inputs(batch))
    assert output.logits is None
    loss, gradients = loss_and_gradients(model, batch)
    model.zero_grad()
    reference = full_logits_loss(model, batch)
    reference.backward()
    assert_same_up_to_summation_order(loss, reference.detach())
    reference_gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert len(gradients) > 40
    assert_same_up_to_summation_order(gradients, reference_gradients)


def test_the_summation_order_comparison_fails_when_one_samples_targets_are_left_out(tiny_base, samples):
    """What the comparisons above would see if the layouts really differed: the helper refuses, and every LLM
    gradient moves by more than a hundred times its tolerance."""
    padded, _ = collated(tiny_base, samples)
    torch.manual_seed(0)
    model = build_model(config(tiny_base)).train()
    _, gradients = loss_and_gradients(model, padded)
    _, changed = loss_and_gradients(model, without_targets(padded, 0))
    with pytest.raises(AssertionError, match="relative differences above"):
        assert_same_up_to_summation_order(changed, gradients)
    llm = [name for name in gradients if name.startswith("llm.")]
    assert len(llm) > 20
    assert min(relative_difference(changed[name], gradients[name]) for name in llm) > 100 * SUMMATION_ORDER_TOLERANCE


def test_the_lm_head_runs_only_where_a_target_follows(tiny_base, samples):
    padded, _ = collated(tiny_base, samples)
    model = build_model(config(tiny_base)).train()
    rows = []
    model.llm.get_output_embeddings().register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    model(**model_inputs(padded))
    targets = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert rows == [targets] and 0 < targets < padded["attention_mask"].sum() / 4


def test_a_sample_in_a_packed_row_sees_nothing_of_the_others(tiny_base, samples):
    _, packed = collated(tiny_base, samples)
    torch.manual_seed(0)
    model = build_model(config(tiny_base)).eval()
    first = slice(0, int(packed["cu_seq_lens"][1]))
    changed = dict(packed, input_ids=packed["input_ids"].clone(), current_images=packed["current_images"].clone())
    text = changed["input_ids"][0, first] != model.image_token_id
    changed["input_ids"][0, first][text] = changed["input_ids"][0, first][text].roll(1)  # sample 1's text...
    changed["current_images"][0] = -changed["current_images"][0]  # ...and its image
    rest = slice(first.stop, None)

    def logits(batch: dict, packed: bool = True) -> torch.Tensor:
        # Without labels: the logits of every position.
        dropped = ("labels",) if packed else ("labels", *PACKED_INPUTS)
        inputs = {key: value for key, value in model_inputs(batch).items() if key not in dropped}
        with torch.no_grad():
            return model(**inputs).logits[0]

    before, after = logits(packed), logits(changed)
    assert not torch.allclose(before[first], after[first])
    torch.testing.assert_close(after[rest], before[rest], rtol=0, atol=1e-6)
    # Plain causal attention over the same row would let the later samples see the first one.
    assert not torch.allclose(logits(packed, packed=False)[rest], logits(changed, packed=False)[rest])


def test_the_sdpa_mask_is_the_one_transformers_derives_from_restarting_positions(tiny_base, samples):
    _, packed = collated(tiny_base, samples)
    model = build_model(config(tiny_base))
    embeddings = torch.zeros(1, packed["input_ids"].shape[1], 8)
    reference = create_causal_mask(model.llm.config, embeddings, None, None, position_ids=packed["position_ids"])
    ours = packed_attention(packed["cu_seq_lens"], packed["position_ids"], "sdpa", torch.float32)["attention_mask"]
    assert ours.shape == reference.shape == (1, 1, embeddings.shape[1], embeddings.shape[1])
    assert torch.equal(ours, reference)


def reference_varlen_attention(calls: list):
    """flash_attn_varlen_func's contract in plain PyTorch: (T, heads, dim) tensors, one causal attention
    per [cu_seqlens[i], cu_seqlens[i + 1]) span. Records what it was called with."""

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):
        calls.append({"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k, "max_seqlen_q": max_seqlen_q,
                      "max_seqlen_k": max_seqlen_k, "causal": causal})
        groups = q.shape[1] // k.shape[1]
        spans = zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist())
        return torch.cat([
            F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1).repeat_interleave(groups, 0),
                                           v[a:b].transpose(0, 1).repeat_interleave(groups, 0), is_causal=causal,
                                           scale=softmax_scale).transpose(0, 1)
            for a, b in spans
        ])

    return flash_attn_varlen_func


def test_flash_attention_gets_the_sample_boundaries_and_no_mask(tiny_base, samples, monkeypatch):
    """flash-attn does not run on CPU: a plain-PyTorch kernel with flash_attn_varlen_func's contract stands
    in for it behind transformers' own flash-attention path, so what our model hands that path is checked."""
    padded, packed = collated(tiny_base, samples)
    torch.manual_seed(0)
    model = build_model(config(tiny_base)).train()
    padded_loss, padded_gradients = loss_and_gradients(model, padded)

    calls = []
    kernel = reference_varlen_attention(calls)
    monkeypatch.setattr(flash_utils, "_lazy_imports",
                        lambda *args, **kwargs: (None, kernel, None, flash_utils._pad_input, flash_utils._unpad_input))
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        monkeypatch.setattr(flash_utils, name, None)  # forget any loaded kernel; restored after the test
    monkeypatch.setattr(model.llm.config, "_attn_implementation", "flash_attention_2")
    packed_loss, packed_gradients = loss_and_gradients(model, packed)

    lengths = packed["cu_seq_lens"].diff()
    assert len(calls) == model.llm.config.num_hidden_layers
    for call in calls:
        assert torch.equal(call["cu_seqlens_q"], packed["cu_seq_lens"]) and torch.equal(call["cu_seqlens_k"], packed["cu_seq_lens"])
        assert call["max_seqlen_q"] == call["max_seqlen_k"] == int(lengths.max()) == packed["max_length"]
        assert call["causal"] is True
    assert_same_up_to_summation_order(packed_loss, padded_loss)
    assert_same_up_to_summation_order(packed_gradients, padded_gradients)


def test_the_flash_path_takes_the_longest_sample_from_the_collator_without_waiting_for_the_device(tiny_base, samples):
    _, packed = collated(tiny_base, samples)
    assert packed["max_length"] == int(packed["cu_seq_lens"].diff().max())
    arguments = packed["cu_seq_lens"], packed["position_ids"], "flash_attention_2", torch.float32
    with HostSyncs() as given:
        assert packed_attention(*arguments, max_length=packed["max_length"])["max_length_q"] == packed["max_length"]
    with HostSyncs() as read:
        assert packed_attention(*arguments)["max_length_q"] == packed["max_length"]
    assert (given.count, read.count) == (1, 2)  # both check where cu_seq_lens ends


def flash_attn_on_a_gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not flash_attn_on_a_gpu(), reason="needs a CUDA GPU with flash-attn (pip install -e '.[gpu]')")
def test_with_flash_attn_on_a_gpu_a_packed_batch_has_the_padded_batchs_loss(tiny_base, samples):
    padded, packed = collated(tiny_base, samples)
    torch.manual_seed(0)
    model = build_model(ModelConfig(base=str(tiny_base), vision={"type": "hf", "layer": -1},
                                    attn_implementation="flash_attention_2", dtype="bfloat16")).cuda()
    with torch.no_grad():
        padded_loss, packed_loss = (model(**{key: value.cuda() if torch.is_tensor(value) else value
                                             for key, value in model_inputs(batch).items()}).loss.float()
                                    for batch in (padded, packed))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-3, atol=1e-3)


def test_a_packed_row_without_positions_is_refused():
    with pytest.raises(ValueError, match=r"position_ids \(1, total\) must come with cu_seq_lens"):
        packed_attention(torch.tensor([0, 3, 5], dtype=torch.int32), None, "sdpa", torch.float32)
    with pytest.raises(ValueError, match="cu_seq_lens ends at 5 but the packed row holds 6 tokens"):
        packed_attention(torch.tensor([0, 3, 5], dtype=torch.int32), torch.zeros(1, 6, dtype=torch.long), "sdpa",
                         torch.float32)


def test_the_demo_trains_and_scores_validation_on_packed_batches(demo_overrides):
    trainer = train(compose_config("train", demo_overrides + ["data.packing=true", "trainer.max_steps=3",
                                                              "data.limit.val=8"]))
    assert trainer.global_step == 3
    assert "cu_seq_lens" in next(iter(trainer.datamodule.train_dataloader()))
    assert "cu_seq_lens" in next(iter(trainer.datamodule.val_dataloader()))
    [metrics] = trainer.validate(trainer.lightning_module, datamodule=trainer.datamodule)
    assert 0 < metrics["val/loss"] < 20


def test_the_papers_recipe_packs_ungrouped_micro_batches_and_the_demo_pads():
    lumen, demo = compose_config("train", ["experiment=lumen"]), compose_config("train", [])
    assert lumen.data.packing is True and lumen.data.group_batches == 1
    assert lumen.model.net.attn_implementation == "flash_attention_2"
    assert demo.data.packing is False and demo.data.group_batches > 1
