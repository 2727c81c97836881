"""Convert a checkpoint between formats and parallel layouts (what ``tools/convert_checkpoint.py`` runs).

Any source (our training checkpoints in any tp/dp/ZeRO layout, the original GLM format, the standalone
safetensors format, a HuggingFace folder in THUDM's layout) is read as a stream of full tensors and written in
the target format and layout. The output is written to a temporary directory next to ``output`` and renamed
when complete and verified.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.formats.glm_original import GLMOriginalSource, find_rank_dir, write_glm_original
from megatron_glm.checkpoint.formats.hf import HFSource, family_for, is_hf, write_hf
from megatron_glm.checkpoint.formats.native import NativeSource, NativeTarget, find_step_dir, write_native
from megatron_glm.checkpoint.formats.sat import SATSource, check_sat_architecture, is_sat, write_sat
from megatron_glm.checkpoint.formats.standalone import StandaloneSource, is_standalone, write_standalone
from megatron_glm.checkpoint.formats.universal import UniversalSource, is_universal, write_universal
from megatron_glm.checkpoint.manager import META, list_checkpoints, read_meta
from megatron_glm.checkpoint.reshard import check_divisible, resize_vocab
from megatron_glm.checkpoint.stream import OPTIMIZER_KEYS
from megatron_glm.checkpoint.verify import compare_checksums, source_logits, stream_checksums
from megatron_glm.config import pad_vocab_size
from megatron_glm.config.sections import opt
from megatron_glm.dtypes import DTYPES, SHORT_NAMES
from megatron_glm.errors import CheckpointError

FORMATS = ("native", "universal", "glm", "safetensors", "hf", "sat")


@dataclasses.dataclass(kw_only=True)
class ConvertOptions:
    """What to write (the ``convert`` section of ``tools/convert_checkpoint.py``'s options)."""

    format: str = opt(
        "native",
        "native: training checkpoint (resumable) in the --target-* layout; universal: DeepSpeed's universal "
        "checkpoint with the optimizer state, resumable by a run of any tp/dp/ZeRO-1-2 layout without "
        "pipelining; glm: original GLM mp_rank files; safetensors: standalone model for "
        "megatron_glm.checkpoint.load_pretrained; hf: HuggingFace folder: transformers' own GlmForCausalLM / "
        "Glm4ForCausalLM for GLM-4-shaped models (no remote code), else THUDM's published layout of the "
        "model's family (GLM with its transformers code; ChatGLM-6B, ChatGLM2-6B; see --hf-layout); sat: "
        "GLM-130B's SwissArmyTransformer mp_rank files.",
        choices=FORMATS,
    )
    target_tp: int = opt(1, "Tensor-parallel size of the output.")
    target_pp: int = opt(1, "Pipeline-parallel size of the output (native format only).")
    target_dp: int = opt(0, "native: data-parallel size of the output (0: keep the world size when it divides).")
    vocab_size: int = opt(0, "Re-pad the vocabulary to this many rows (0: keep).")
    dtype: str = opt(
        "",
        "Weights dtype for glm/sat/safetensors/hf (empty: fp32 master weights for safetensors/hf, as stored for "
        "glm/sat).",
        choices=("", *SHORT_NAMES),
    )
    keep_optimizer: bool = opt(True, "native: carry the optimizer state when the layout allows (false: weights only).")
    verify: bool = opt(True, "Re-read the output and compare every tensor's shape, dtype and sha256.")
    verify_logits: bool = opt(
        False, "Also run a forward pass on a fixed input before and after and report the max difference."
    )
    num_attention_heads: int = opt(
        0, "For original GLM / SAT checkpoints without config.json / model_config.json (0: hidden / 64, SAT: / 128)."
    )
    tokenizer_model: str = opt("", "Tokenizer to check the vocab against and to export (empty: the checkpoint's).")
    max_shard_bytes: int = opt(
        2 * 2**30, "safetensors/hf: largest shard in bytes (the tool's --max-shard-size also takes 2GB, 500MB, ...)."
    )
    max_new_tokens: int = opt(32, "hf: answer length per blank written to generation_config.json ([eop] forced after).")
    hf_layout: str = opt(
        "",
        "hf: the published layout to write (empty: transformers' own class when one holds the model, "
        "GlmForCausalLM / Glm4ForCausalLM, else the family's remote-code layout: glm, chatglm-6b, chatglm2-6b).",
    )


@dataclasses.dataclass(kw_only=True)
class ConvertRun:
    """``tools/convert_checkpoint.py``'s options: what to read, where to write, and how."""

    input: str = opt("", "Checkpoint to read (format detected).")
    output: str = opt("", "Directory to create (must not exist).")
    convert: ConvertOptions = dataclasses.field(default_factory=ConvertOptions)


#: The converter's flag spellings -> (dotted path, constant for valueless flags or None).
CONVERT_FLAGS: dict[str, tuple[str, object]] = {
    **{
        f"--{name.replace('_', '-')}": (f"convert.{name}", None)
        for name in (
            "format",
            "target_tp",
            "target_pp",
            "target_dp",
            "vocab_size",
            "dtype",
            "num_attention_heads",
            "tokenizer_model",
            "max_new_tokens",
            "hf_layout",
        )
    },
    "--no-optimizer": ("convert.keep_optimizer", False),
    "--no-verify": ("convert.verify", False),
    "--verify-logits": ("convert.verify_logits", True),
    "--max-shard-size": ("convert.max_shard_bytes", None),
}


@dataclasses.dataclass
class ConvertReport:
    """What was done, for the tool's summary."""

    output: str
    source: str
    source_layout: str
    target_layout: str
    tensors: int = 0
    optimizer: str = ""
    verified: int = 0
    logits_max_diff: float | None = None
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)


def open_source(path: str | Path, *, num_attention_heads: int | None = None) -> Any:
    """Detect the format of ``path`` and open it as a full-tensor stream."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if (path / META).is_file() or list_checkpoints(path):
        step = find_step_dir(path)
        meta = read_meta(step)
        return UniversalSource(step, meta) if is_universal(meta) else NativeSource(path)
    if is_hf(path):
        return HFSource(path)
    if is_standalone(path):
        return StandaloneSource(path)
    if is_sat(path):
        return SATSource(path, num_attention_heads=num_attention_heads)
    if find_rank_dir(path) is not None:
        return GLMOriginalSource(path, num_attention_heads=num_attention_heads)
    raise CheckpointError(
        f"{path}: not a checkpoint we can read (neither a megatron_glm training checkpoint, an "
        f"original GLM or SAT checkpoint with mp_rank_XX_model_states.pt, a standalone model, nor a HuggingFace "
        f"folder of the GLM family)"
    )


def _target_vocab(src: Any, opts: ConvertOptions, notes: list[str], open_tokenizer: Callable[[str], Any] | None) -> int:
    cfg = src.info.config
    tok_vocab = None
    tok = opts.tokenizer_model or (src.info.tokenizer_files[0] if src.info.tokenizer_files else None)
    if tok and open_tokenizer is not None:
        tok_vocab = open_tokenizer(tok).vocab_size
    vocab = opts.vocab_size or cfg.vocab_size
    if tok_vocab is not None and vocab < tok_vocab:
        raise CheckpointError(f"vocab size {vocab} is too small for the tokenizer ({tok_vocab} tokens, {tok})")
    if tok_vocab is None:
        notes.append("no tokenizer found: the vocab size was not checked against a tokenizer")
    if vocab % opts.target_tp:
        padded = pad_vocab_size(max(tok_vocab or 0, cfg.vocab_size), cfg.make_vocab_size_divisible_by, opts.target_tp)
        raise CheckpointError(
            f"vocab size {vocab} is not divisible by the target tensor-parallel size "
            f"{opts.target_tp}; re-pad it with --vocab-size {padded}"
        )
    if vocab != cfg.vocab_size:
        notes.append(
            f"vocab re-padded {cfg.vocab_size} -> {vocab} rows"
            + (" (new rows are zeros)" if vocab > cfg.vocab_size else "")
        )
    return vocab


def _check_target(src: Any, opts: ConvertOptions) -> None:
    if opts.format not in FORMATS:
        raise CheckpointError(f"unknown format {opts.format!r} (choose from {', '.join(FORMATS)})")
    if opts.target_pp != 1 and opts.format != "native":
        raise CheckpointError(f"--target-pp {opts.target_pp}: only the native format has pipeline layouts")
    if opts.target_pp < 1 or src.info.config.num_layers % opts.target_pp:
        raise CheckpointError(f"--target-pp {opts.target_pp} does not divide the {src.info.config.num_layers} layers")
    if opts.format in ("safetensors", "hf") and opts.target_tp != 1:
        raise CheckpointError(f"the {opts.format} format is unsharded: use --target-tp 1")
    cfg = src.info.config
    tp = opts.target_tp
    check_divisible("number of attention heads", cfg.num_attention_heads, tp, "choose a --target-tp that divides it")
    check_divisible("MLP size", cfg.ffn_size, tp)
    if opts.format == "sat":
        check_sat_architecture(cfg)
    if opts.format == "hf":
        family_for(cfg, opts.hf_layout)
    if opts.dtype and opts.dtype not in SHORT_NAMES:
        raise CheckpointError(f"unknown dtype {opts.dtype!r} (fp32, bf16, fp16)")


def convert_checkpoint(
    input_path: str | Path,
    output: str | Path,
    opts: ConvertOptions,
    log: Callable[[str], None] = print,
    *,
    open_tokenizer: Callable[[str], Any] | None = None,
) -> ConvertReport:
    """Convert ``input_path`` into ``output`` (which must not exist); verify; return a report.

    ``open_tokenizer(path)``: a tokenizer read from a file, with ``vocab_size`` and ``command_token_ids`` (the
    entry point passes the data package's ``GLMTokenizer``); with it the target vocab is checked against the
    checkpoint's tokenizer and an hf export carries the command-token ids."""
    started = time.perf_counter()
    output = Path(output)
    if output.exists() and any(output.iterdir()) if output.is_dir() else output.exists():
        raise CheckpointError(f"{output}: already exists; choose a new output directory")
    src = open_source(input_path, num_attention_heads=opts.num_attention_heads or None)
    _check_target(src, opts)
    info = src.info
    notes = list(info.notes)
    vocab = _target_vocab(src, opts, notes, open_tokenizer)
    tcfg = dataclasses.replace(info.config, vocab_size=vocab)
    dtype = DTYPES[opts.dtype] if opts.dtype else None

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        t = resize_vocab(name, t, vocab)
        return t.to(dtype) if dtype is not None else t

    world = info.tp * info.pp * info.dp
    per_replica = opts.target_tp * opts.target_pp
    target_dp = opts.target_dp or (world // per_replica if world % per_replica == 0 else 1)
    if opts.format == "universal":
        target_layout = "universal (any tp/dp/ZeRO-1-2 layout without pipelining)"
    else:
        target_layout = f"{opts.format} tp={opts.target_tp} pp={opts.target_pp}" + (
            f" dp={target_dp}" if opts.format == "native" else ""
        )
    report = ConvertReport(
        output=str(output),
        source=f"{info.format} {info.path}",
        source_layout=f"tp={info.tp} pp={info.pp} dp={info.dp} zero={info.zero_stage}",
        target_layout=target_layout,
        notes=notes,
    )
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        carry = False
        if opts.format == "native":
            note = src.optimizer_note() if isinstance(src, NativeSource) else "the source has no optimizer state"
            if opts.target_pp > 1 and note is None:
                note = "pipeline targets are written with model weights only"
            carry = opts.keep_optimizer and note is None
            if not opts.keep_optimizer:
                note = "dropped on request (--no-optimizer)"
            report.optimizer = (
                "resharded (ZeRO-1/2 partitions for the new layout)"
                if carry
                else f"NOT carried: {note}; wrote a model-only checkpoint (start from it with "
                f"--checkpoint.load_weights_only true)"
            )
            if dtype is not None:
                notes.append("--dtype is ignored for the native format (weights keep the training dtype)")
                dtype = None
            write_native(
                src,
                tmp,
                NativeTarget(tp=opts.target_tp, dp=target_dp, config=tcfg, carry_optimizer=carry, pp=opts.target_pp),
                transform=transform,
                log=log,
            )
        elif opts.format == "universal":
            note = src.optimizer_note() if hasattr(src, "optimizer_note") else "the source has no optimizer state"
            if note is not None:
                raise CheckpointError(
                    f"{info.path}: cannot write a universal checkpoint: {note}; use --format native "
                    f"--no-optimizer for the weights alone"
                )
            carry, dtype = True, None
            report.optimizer = "carried in full (DeepSpeed partitions it for the loading run's layout)"
            write_universal(src, tmp, tcfg, transform=transform)
        elif opts.format in ("glm", "sat"):  # one model state file per tensor-parallel rank
            write_ranks = write_glm_original if opts.format == "glm" else write_sat
            step = int(getattr(info, "meta", {}).get("step", 0))
            write_ranks(src, tmp, opts.target_tp, tcfg, iteration=step, transform=transform)
        elif opts.format == "hf":
            tok = [opts.tokenizer_model] if opts.tokenizer_model else info.tokenizer_files
            model_file = next((t for t in tok if not t.endswith(".vocab")), None)
            family = family_for(tcfg, opts.hf_layout)
            if not family.tokenizer_class:
                notes.append(
                    f"{family.name} layout: weights and config.json only; copy THUDM's published model and tokenizer "
                    f"files ({', '.join(sorted(set(v.split('.')[0] + '.py' for v in family.auto_map.values())))}, "
                    f"tokenizer) into the folder to load it with trust_remote_code"
                )
                model_file = None
            elif model_file is None or open_tokenizer is None:
                notes.append("no tokenizer found: the hf export has no tokenizer files and generate() needs token ids")
                model_file = None
            write_hf(
                src,
                tmp,
                tcfg,
                transform=transform,
                dtype=dtype or torch.float32,
                tokenizer=open_tokenizer(model_file) if model_file else None,
                max_shard_bytes=opts.max_shard_bytes,
                max_new_tokens=opts.max_new_tokens,
                family=family,
                notes=notes,
            )
        else:
            tok = [opts.tokenizer_model] if opts.tokenizer_model else info.tokenizer_files
            if dtype is None:
                dtype = torch.float32
            write_standalone(
                src,
                tmp,
                tcfg,
                transform=transform,
                dtype=dtype,
                tokenizer_files=tok,
                max_shard_bytes=opts.max_shard_bytes,
            )
        report.tensors = len(src.names())
        if opts.verify:
            report.verified = _verify(src, tmp, opts, transform, carry)
        if opts.verify_logits:
            before = source_logits(src, min(info.config.vocab_size, vocab))
            after = source_logits(
                open_source(tmp, num_attention_heads=info.config.num_attention_heads),
                min(info.config.vocab_size, vocab),
            )
            report.logits_max_diff = float((before - after).abs().max())
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - started
    return report


def _verify(
    src: Any, out: Path, opts: ConvertOptions, transform: Callable[[str, torch.Tensor], torch.Tensor], carry: bool
) -> int:
    """Re-read the written checkpoint, merge it, and compare every tensor's shape, dtype and sha256."""
    native = opts.format == "native"
    dst = open_source(out, num_attention_heads=src.info.config.num_attention_heads)
    get_src = (lambda n: transform(n, src.module_tensor(n))) if native else (lambda n: transform(n, src.tensor(n)))
    if opts.format in ("safetensors", "hf") and not opts.dtype:
        get_src = lambda n: transform(n, src.tensor(n)).to(torch.float32)
    expected = stream_checksums(src, get_src)
    actual = stream_checksums(dst, dst.module_tensor)
    compare_checksums(expected, actual, f"{out.name} weights")
    count = len(expected)
    if carry:
        rows = dst.info.config.vocab_size  # optimizer states follow the weight's re-padding
        for key in OPTIMIZER_KEYS:
            exp = stream_checksums(src, lambda n, k=key: resize_vocab(n, src.optimizer_state(n)[k], rows))
            act = stream_checksums(dst, lambda n, k=key: dst.optimizer_state(n)[k])
            compare_checksums(exp, act, f"{out.name} optimizer {key}")
            count += len(exp)
    return count
