"""Named GLM model sizes, as data (published layers / hidden / heads / positions / padded vocab)."""

from __future__ import annotations

from types import MappingProxyType

MODEL_SIZES = MappingProxyType(
    {
        "glm-tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, max_sequence_length=512),
        "glm-base": dict(
            num_layers=12, hidden_size=768, num_attention_heads=12, max_sequence_length=512, vocab_size=30592
        ),
        "glm-large": dict(
            num_layers=24, hidden_size=1024, num_attention_heads=16, max_sequence_length=512, vocab_size=30592
        ),
        "glm-large-chinese": dict(
            num_layers=24, hidden_size=1024, num_attention_heads=16, max_sequence_length=1024, vocab_size=50048
        ),
        "glm-2b": dict(
            num_layers=36, hidden_size=2048, num_attention_heads=32, max_sequence_length=1024, vocab_size=50304
        ),
        "glm-10b": dict(
            num_layers=48, hidden_size=4096, num_attention_heads=64, max_sequence_length=1024, vocab_size=50304
        ),
    }
)
"""Published sizes. ``vocab_size`` is the padded vocab of the released checkpoints; a run with its own
tokenizer overrides it (``model.vocab_size: 0`` derives it from the tokenizer)."""
