"""GLM configuration for ``transformers`` (remote code shipped with a megatron_glm export).

The keys and their meaning are those of THUDM's published GLM repositories (``num_layers``,
``max_sequence_length``, ``block_position_encoding``, ``*_dropout_prob``, ``output_predict``, ...), so a folder
works with either code. Two keys are ours and default to the original GLM's math when absent:
``layernorm_epsilon`` (THUDM's code fixes 1e-5) and ``gelu_approximate`` (``"tanh"``, the approximation GLM
was trained with; THUDM's HF code uses the exact erf GeLU, ``"none"``).

Self-contained: imports ``transformers`` only (never ``megatron_glm``).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class GLMConfig(PretrainedConfig):
    """GLM (Du et al. 2022): learned position and block-position embeddings, pre-LN layers, tied head."""

    model_type = "glm"
    attribute_map = {  # noqa: RUF012 (transformers reads it as a class attribute)
        "num_hidden_layers": "num_layers",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        num_layers: int = 24,
        vocab_size: int = 30592,
        hidden_size: int = 1024,
        num_attention_heads: int = 16,
        embedding_dropout_prob: float = 0.1,
        attention_dropout_prob: float = 0.1,
        output_dropout_prob: float = 0.1,
        max_sequence_length: int = 512,
        checkpoint_activations: bool = False,
        checkpoint_num_layers: int = 1,
        parallel_output: bool = True,
        relative_encoding: bool = False,
        block_position_encoding: bool = True,
        output_predict: bool = True,
        spell_length: int | None = None,
        spell_func: str = "lstm",
        attention_scale: float = 1.0,
        initializer_range: float = 0.02,
        pool_token: str = "cls",
        layernorm_epsilon: float = 1e-5,
        gelu_approximate: str = "tanh",
        **kwargs,
    ) -> None:
        self.num_layers = num_layers
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.embedding_dropout_prob = embedding_dropout_prob
        self.attention_dropout_prob = attention_dropout_prob
        self.output_dropout_prob = output_dropout_prob
        self.max_sequence_length = max_sequence_length
        self.checkpoint_activations = checkpoint_activations
        self.checkpoint_num_layers = checkpoint_num_layers
        self.parallel_output = parallel_output
        self.relative_encoding = relative_encoding
        self.block_position_encoding = block_position_encoding
        self.output_predict = output_predict
        self.spell_length = spell_length
        self.spell_func = spell_func
        self.attention_scale = attention_scale
        self.initializer_range = initializer_range
        self.pool_token = pool_token
        self.layernorm_epsilon = layernorm_epsilon
        self.gelu_approximate = gelu_approximate
        super().__init__(**kwargs)
