"""Write a tiny GLM-4-shaped release the way its makers publish one: transformers' own ``GlmForCausalLM``
saved by ``save_pretrained`` (random weights), with a byte-level BPE ``tokenizer.json``.

The architecture is GLM-4-9B's (the ``-hf`` repos: ``model_type: glm``) at a tiny size: grouped-query attention
with 2 key/value groups, SwiGLU (``gate_up_proj`` packed), RMSNorm (GLM-4-9B's eps 1.5625e-07), bias on q/k/v
only, interleaved rotary on half of each head, an untied output head. The folder holds what a release holds:
``config.json``, ``model.safetensors``, ``generation_config.json`` (GLM-4's stop tokens: end of text,
``<|user|>``, ``<|observation|>``), ``tokenizer.json`` and ``tokenizer_config.json``; it loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` without remote code.

    python tools/train_tokenizer.py --type bpe --input pydoc.jsonl --vocab-size 2000 --model-prefix tok
    python examples/make_tiny_glm4_release.py --tokenizer tok.json --output tiny-glm-4-hf
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_glm.errors import DataError, run_cli

#: GLM-4-9B's architecture (its published config.json) at a tiny size: 4 heads of 16, 2 key/value groups.
TINY_GLM4 = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 172,
    "max_position_embeddings": 1024,
    "hidden_act": "silu",
    "attention_bias": True,
    "rms_norm_eps": 1.5625e-07,
    "partial_rotary_factor": 0.5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
#: GLM-4's stop tokens (its generation_config.json's ``eos_token_id``).
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a byte-level BPE tokenizer.json with GLM's special tokens")
    parser.add_argument("--output", required=True, help="the release folder to write (must not exist)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the random weights")
    parser.add_argument("--pad-vocab-to", type=int, default=128, help="the embedding rows are a multiple of this")
    return parser.parse_args(argv)


def load_tokenizer(path: str):
    """The tokenizer as a release ships it: ``PreTrainedTokenizerFast`` with GLM-4's end of text as eos and pad."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(path):
        raise DataError(f"--tokenizer {path}: no such file (train one with tools/train_tokenizer.py --type bpe)")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=path,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    missing = [t for t in STOP_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        raise DataError(f"--tokenizer {path}: no special token {', '.join(missing)} (train it with --type bpe)")
    return tokenizer


def build_model(tokenizer, seed: int, pad_to: int):
    import torch
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

    vocab = -(-len(tokenizer) // pad_to) * pad_to
    eos = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    config = GlmConfig(
        vocab_size=vocab, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, dtype="float32", **TINY_GLM4
    )
    torch.manual_seed(seed)
    model = GlmForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model


def _name_tokenizer_class(path: str) -> None:
    """``PreTrainedTokenizerFast``, as GLM-4's releases name it (transformers 5 writes its own ``TokenizersBackend``,
    which 4.x does not know)."""
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()
    if os.path.exists(args.output):
        raise DataError(f"--output {args.output} exists (the release is written once)")
    tokenizer = load_tokenizer(args.tokenizer)
    model = build_model(tokenizer, args.seed, args.pad_vocab_to)
    tmp = f"{args.output.rstrip('/')}.tmp{os.getpid()}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _name_tokenizer_class(os.path.join(tmp, "tokenizer_config.json"))
        os.replace(tmp, args.output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.output}: {type(model).__name__} (model_type {c.model_type}), {c.num_hidden_layers} layers, "
        f"hidden {c.hidden_size}, {c.num_attention_heads} heads / {c.num_key_value_heads} key-value groups, "
        f"FFN {c.intermediate_size} (SwiGLU), rotary on {c.rope_parameters['partial_rotary_factor']:g} of each "
        f"head, vocab {c.vocab_size} ({len(tokenizer)} tokens), {params:,} parameters; files: "
        f"{', '.join(sorted(os.listdir(args.output)))}"
    )


if __name__ == "__main__":
    run_cli(main)
