"""Batched greedy generation (left padding, KV cache) gives what one-at-a-time generation gives."""

import pytest
import torch

from datamodules.datamodule import LumenDataModule
from datamodules.sources import DiffVQASource
from models.checkpoints import load_checkpoint
from models.factory import build_model, input_spec

IMAGE_KEYS = ("current_images", "prior_images", "has_prior", "interval_days")


@pytest.fixture(scope="module")
def loaded(trained_checkpoint):
    return load_checkpoint(trained_checkpoint)


@pytest.fixture(scope="module")
def datamodule(loaded, world):
    # Six one-image and six two-image questions: prompts of different lengths in one batch.
    sources = {task: DiffVQASource(diffvqa=str(world / "medical-diff-vqa"), mimic_cxr_jpg=str(world / "mimic-cxr-jpg"),
                                   tasks=[task]) for task in ("diagnostic", "difference")}
    return LumenDataModule(
        sources=sources, tokenizer_dir=str(loaded.config.llm_dir), input_spec=input_spec(loaded.config),
        eval_batch_size=12, limit={"test": 6},
    )


def generate(model, batch: dict, tokenizer, max_new_tokens: int = 24) -> list[str]:
    new = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id, **{k: batch[k] for k in IMAGE_KEYS})
    return tokenizer.batch_decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def base_model(loaded):
    """The base weights with fresh fusion: an untrained model, whose greedy answers vary with the input
    (a briefly trained tiny model tends to give every sample the same answer)."""
    torch.manual_seed(0)  # the fusion's fresh weights
    return build_model(loaded.config).eval()


@pytest.mark.parametrize("which", ["trained", "base"])
def test_a_batch_generates_what_each_sample_generates_alone(loaded, base_model, datamodule, which):
    model = loaded.model if which == "trained" else base_model
    (batch,) = list(datamodule.generation_loader("test"))
    assert batch["has_prior"].any() and not batch["has_prior"].all()  # prompts of different lengths
    assert (batch["attention_mask"][:, 0] == 0).any()  # so some are left-padded
    batched = generate(model, batch, datamodule.tokenizer)
    dataset, collate = datamodule.dataset("test"), datamodule.generation_collator
    alone = [generate(model, collate([dataset[i]]), datamodule.tokenizer)[0] for i in range(len(dataset))]
    assert batched == alone
    if which == "base":
        assert len(set(batched)) > 1  # answers vary: the comparison is not vacuous


def test_generation_stops_at_the_end_token_and_respects_max_new_tokens(loaded, datamodule):
    (batch,) = list(datamodule.generation_loader("test"))
    tokenizer = datamodule.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    new = loaded.model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=3, eos_token_id=end,
                                pad_token_id=tokenizer.pad_token_id, **{k: batch[k] for k in IMAGE_KEYS})
    assert new.shape[1] <= 3
    long = loaded.model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=64, eos_token_id=end,
                                 pad_token_id=tokenizer.pad_token_id, **{k: batch[k] for k in IMAGE_KEYS})
    for row in long.tolist():
        if end in row:  # after the end token only padding follows
            assert set(row[row.index(end) + 1:]) <= {tokenizer.pad_token_id}
    assert any(end in row for row in long.tolist())


def test_greedy_decoding_with_the_cache_equals_decoding_without_it(loaded, datamodule):
    (batch,) = list(datamodule.generation_loader("test"))
    row = {k: (v[:1] if k != "prior_images" else v[: int(batch["has_prior"][0])]) for k, v in batch.items()
           if k in ("input_ids", "attention_mask", *IMAGE_KEYS)}
    tokenizer = datamodule.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cached = loaded.model.generate(row["input_ids"], row["attention_mask"], max_new_tokens=8, eos_token_id=end,
                                   pad_token_id=tokenizer.pad_token_id, **{k: row[k] for k in IMAGE_KEYS})[0].tolist()
    keep = row["attention_mask"][0].bool()
    embeddings = loaded.model.embed(row["input_ids"], **{k: row[k] for k in IMAGE_KEYS})[:, keep]
    recomputed = []
    with torch.no_grad():
        for _ in range(len(cached)):
            token = int(loaded.model.llm(inputs_embeds=embeddings, use_cache=False).logits[0, -1].argmax())
            recomputed.append(token)
            if token == end:
                break
            embeddings = torch.cat([embeddings, loaded.model.llm.get_input_embeddings()(torch.tensor([[token]]))], 1)
    assert cached[: len(recomputed)] == recomputed


def test_generation_in_bf16_casts_the_model_and_writes_its_answers(trained_checkpoint, datamodule, tmp_path):
    from evaluation.generation import generate_records
    from run.evaluate import generation_module

    module = generation_module(load_checkpoint(trained_checkpoint), max_new_tokens=8)
    samples = datamodule.dataset("test").samples
    records = generate_records(module, samples, datamodule.generation_collator, 4, 0, "cpu", tmp_path,
                               {"precision": "bf16-true"}, precision="bf16-true")
    assert [record["sample_id"] for record in records] == [sample.sample_id for sample in samples]
    assert {parameter.dtype for parameter in module.model.llm.parameters()} == {torch.bfloat16}
