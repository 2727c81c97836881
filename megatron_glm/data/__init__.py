"""megatron_glm.data."""
