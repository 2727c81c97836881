"""The end-to-end conversion tests reuse the training fixtures (tiny corpus and tokenizer)."""

from tests.training.conftest import tiny_corpus  # noqa: F401
