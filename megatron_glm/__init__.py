"""megatron_glm: pretrain GLM (autoregressive blank infilling) models with tensor, pipeline and data parallelism."""

__version__ = "0.1.0"
