"""Convert GLM checkpoints between parallel layouts and formats (reshard TP, consolidate ZeRO, export/import).

Examples (run from the repository root):

    python tools/convert_checkpoint.py --input ckpt/run --output ckpt/run_tp1 --format native --target-tp 1
    python tools/convert_checkpoint.py --input ckpt/run --output export/glm --format safetensors --verify-logits
    python tools/convert_checkpoint.py --input blocklm-large-blank --output ckpt/imported --format native

The input format is detected: one of our training checkpoints (a --save directory or one global_stepN
directory), an original GLM checkpoint (mp_rank_XX_model_states.pt), or a standalone model (config.json +
model.safetensors). Every conversion re-reads what it wrote and compares shapes, dtypes and checksums.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_glm.checkpoint.convert import FORMATS, ConvertOptions, convert_checkpoint
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.errors import run_cli


def parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for suffix, mult in units.items():
        if text.upper().endswith(suffix):
            return int(float(text[:-2]) * mult)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="Checkpoint to read (format detected).")
    p.add_argument("--output", required=True, help="Directory to create (must not exist).")
    p.add_argument("--format", choices=FORMATS, default="native",
                   help="native: training checkpoint (resumable); glm: original GLM mp_rank files; "
                        "safetensors: standalone model for megatron_glm.checkpoint.load_pretrained.")
    p.add_argument("--target-tp", type=int, default=1, help="Tensor-parallel size of the output.")
    p.add_argument("--target-pp", type=int, default=1, help="Pipeline-parallel size of the output (1 for now).")
    p.add_argument("--target-dp", type=int, default=None,
                   help="native: data-parallel size of the output (default: keeps the world size when it divides).")
    p.add_argument("--vocab-size", type=int, default=None, help="Re-pad the vocabulary to this many rows.")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="Weights dtype for glm/safetensors (default: fp32 master weights for safetensors, "
                        "as stored for glm).")
    p.add_argument("--no-optimizer", action="store_true", help="native: write model weights only.")
    p.add_argument("--no-verify", action="store_true", help="Skip re-reading and checksumming the output.")
    p.add_argument("--verify-logits", action="store_true",
                   help="Also run a forward pass on a fixed input before and after and report the max difference.")
    p.add_argument("--num-attention-heads", type=int, default=None,
                   help="For original GLM checkpoints without config.json (default: hidden / 64).")
    p.add_argument("--tokenizer-model", default=None, help="Tokenizer to check the vocab against and to export.")
    p.add_argument("--max-shard-size", type=parse_size, default=2 * 2**30, help="safetensors shard size (e.g. 2GB).")
    args = p.parse_args(argv)
    opts = ConvertOptions(format=args.format, target_tp=args.target_tp, target_pp=args.target_pp,
                          target_dp=args.target_dp, vocab_size=args.vocab_size, dtype=args.dtype,
                          keep_optimizer=not args.no_optimizer, verify=not args.no_verify,
                          verify_logits=args.verify_logits, num_attention_heads=args.num_attention_heads,
                          tokenizer_model=args.tokenizer_model, max_shard_bytes=args.max_shard_size)
    r = convert_checkpoint(args.input, args.output, opts, tokenizer_vocab=lambda p: GLMTokenizer(p).vocab_size)
    print(f"converted {r.source} ({r.source_layout}) -> {r.output} ({r.target_layout}): {r.tensors} tensors "
          f"in {r.seconds:.1f} s")
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
