"""Checkpoint formats: each one reads into the full-tensor stream and writes from it, and is one entry of
``registry.REGISTRY`` (a ``base.CheckpointFormat``: detect, open, check, write).

- ``native``: our training checkpoints (DeepSpeed step directories with meta.json and manifest.json).
- ``universal``: DeepSpeed's universal checkpoint (resumable on another tp/dp/ZeRO-1-2 layout).
- ``glm_original``: the original GLM release format (``mp_rank_XX_model_states.pt`` with ``{"module": ...}``).
- ``sat``: GLM-130B's SwissArmyTransformer ``mp_rank`` files.
- ``hf``: a HuggingFace folder in THUDM's published layout, with our ``transformers`` code (``megatron_glm/hf``).
- ``standalone``: ``model.safetensors`` (+ index when sharded), ``config.json`` and the tokenizer.
"""
