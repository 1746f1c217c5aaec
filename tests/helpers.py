"""Sizes shared by the tests."""

# Small enough to build in seconds, big enough for a few batches of every question type.
WORLD_SUBJECTS = 16
TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64}
TINY_LLM = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64}
TINY_PRETRAIN_STEPS = 5
