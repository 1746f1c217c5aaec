"""Loading a tokenizer with the image placeholder, as the collator and the model factory both need it."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from common.contract import IMAGE_TOKEN


def load_tokenizer(directory: str | Path, image_token: str = IMAGE_TOKEN):
    """A Hugging Face tokenizer with the image placeholder as a special token (NVILA's ``<image>``),
    added if the directory's tokenizer lacks it."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    return tokenizer
