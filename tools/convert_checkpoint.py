"""Convert GLM checkpoints between parallel layouts and formats (reshard TP, consolidate ZeRO, export/import).

Examples (run from the repository root):

    python tools/convert_checkpoint.py --input ckpt/run --output ckpt/run_tp1 --format native --target-tp 1
    python tools/convert_checkpoint.py --input ckpt/run --output export/glm --format safetensors --verify-logits
    python tools/convert_checkpoint.py --input blocklm-large-blank --output ckpt/imported --format native

    python tools/convert_checkpoint.py --input glm-130b-sat --output ckpt/glm130b --format native --target-tp 8
    python tools/convert_checkpoint.py --input ckpt/chatglm --output chatglm-hf --format hf --dtype fp16
    python tools/convert_checkpoint.py --input glm-4-9b-0414 --output ckpt/glm4 --format native --target-tp 2
    python tools/convert_checkpoint.py --input ckpt/glm4 --output glm4-hf --format hf --dtype bf16   # no remote code
    python tools/convert_checkpoint.py --input ckpt/lora --output merged-hf --format hf --merge-lora  # LoRA merged
    python tools/convert_checkpoint.py --input ckpt/lora --output adapter --format peft   # LoRA for HF peft

The input format is detected: one of our training checkpoints (a --save directory or one global_stepN
directory), an original GLM checkpoint (mp_rank_XX_model_states.pt), GLM-130B's SwissArmyTransformer
checkpoint (mp_rank files with SAT's names / model_config.json), a standalone model (config.json +
model.safetensors), or a HuggingFace folder of the family (GLM, ChatGLM-6B, ChatGLM2/3, GLM-4-9B's remote code,
transformers' GlmForCausalLM / Glm4ForCausalLM; --format hf writes transformers' own class when one holds the model,
else the layout of the model's family; --hf-layout picks one). Every conversion re-reads what it wrote and compares
shapes, dtypes and checksums.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_glm.checkpoint.convert import CONVERT_FLAGS, ConvertRun, convert_checkpoint
from megatron_glm.config import help_text, load_config
from megatron_glm.data.tokenizer import open_tokenizer
from megatron_glm.errors import ConfigError, run_cli


def parse_size(text: str) -> int:
    """``2GB`` / ``500MB`` / ``64KB`` / a plain byte count -> bytes."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for suffix, mult in units.items():
        if text.upper().endswith(suffix):
            try:
                return int(float(text[:-2]) * mult)
            except ValueError:
                break
    if not text.isdigit():
        raise ConfigError(f"--max-shard-size: expected a size like 2GB, 500MB or a byte count, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(help_text(ConvertRun, CONVERT_FLAGS))
        return 0
    for i, token in enumerate(argv[:-1]):  # sizes with units ("2GB") become bytes
        if token == "--max-shard-size":
            argv[i + 1] = str(parse_size(argv[i + 1]))
    run = load_config(argv, root=ConvertRun, aliases=CONVERT_FLAGS)
    if not run.input or not run.output:
        raise ConfigError("--input and --output are required (see --help)")
    opts = run.convert
    r = convert_checkpoint(run.input, run.output, opts, open_tokenizer=open_tokenizer)
    print(
        f"converted {r.source} ({r.source_layout}) -> {r.output} ({r.target_layout}): {r.tensors} tensors "
        f"in {r.seconds:.1f} s"
    )
    if r.optimizer:
        print(f"optimizer state: {r.optimizer}")
    print(f"verified: {r.verified} merged tensors (shape, dtype, sha256)" if r.verified else "verification skipped")
    if r.logits_max_diff is not None:
        print(f"logits max |diff| before/after: {r.logits_max_diff:.3g}")
    for note in r.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    run_cli(main)
