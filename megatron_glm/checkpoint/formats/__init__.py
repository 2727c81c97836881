"""Checkpoint formats: each one reads into the full-tensor stream and writes from it.

- ``native``: our training checkpoints (DeepSpeed step directories with meta.json and manifest.json).
- ``glm_original``: the original GLM release format (``mp_rank_XX_model_states.pt`` with ``{"module": ...}``).
- ``hf``: a HuggingFace folder in THUDM's published layout, with our ``transformers`` code (``megatron_glm/hf``).
- ``standalone``: ``model.safetensors`` (+ index when sharded), ``config.json`` and the tokenizer.
"""
