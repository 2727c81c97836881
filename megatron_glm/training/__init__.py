"""megatron_glm.training."""
