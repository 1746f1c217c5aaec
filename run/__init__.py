"""What the entry points (train.py, eval.py), bench/ and the tests share: composing and checking a run's
config (``cli``), the cached preparation steps' tiny base builder (``tiny_base``), and the training and
evaluation runs themselves (``train``, ``evaluate``). Nothing imports an entry point."""
