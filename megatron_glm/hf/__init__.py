"""HuggingFace ``transformers`` code shipped inside an export (``tools/convert_checkpoint.py --format hf``).

The files here (``configuration_glm.py``, ``modeling_glm.py``, ``tokenization_glm.py``) are package data: the
exporter copies them next to the weights and ``config.json`` registers them through ``auto_map``, so
``transformers`` loads the folder with ``trust_remote_code=True``. They are self-contained (they import
``transformers``, ``torch`` and ``sentencepiece`` only, never ``megatron_glm``) and are never imported by the
library itself: importing this package does not import ``transformers``.
"""

from __future__ import annotations

from pathlib import Path

#: The remote-code files of the GLM (2021) family, copied into every GLM export.
GLM_CODE_FILES = ("configuration_glm.py", "modeling_glm.py", "tokenization_glm.py")


def code_file(name: str) -> Path:
    """The path of one shipped remote-code file."""
    return Path(__file__).with_name(name)
