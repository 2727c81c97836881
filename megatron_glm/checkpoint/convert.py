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

from megatron_glm.checkpoint.formats.base import CheckpointFormat, Transform, WriteJob, Written
from megatron_glm.checkpoint.formats.registry import FORMATS, REGISTRY, format_named, open_source
from megatron_glm.checkpoint.lora_merge import MergedSource, open_merged
from megatron_glm.checkpoint.reshard import check_divisible, resize_vocab
from megatron_glm.checkpoint.stream import OPTIMIZER_KEYS, ModelSource
from megatron_glm.checkpoint.verify import compare_checksums, source_logits, stream_checksums
from megatron_glm.config import pad_vocab_size
from megatron_glm.config.moe import dense_only_first_stage
from megatron_glm.config.sections import opt
from megatron_glm.dtypes import DTYPES, SHORT_NAMES
from megatron_glm.errors import CheckpointError


@dataclasses.dataclass(kw_only=True)
class ConvertOptions:
    """What to write (the ``convert`` section of ``tools/convert_checkpoint.py``'s options)."""

    format: str = opt(
        "native",
        "; ".join(f"{f.name}: {f.help}" for f in REGISTRY) + ".",
        choices=FORMATS,
    )
    target_tp: int = opt(1, "Tensor-parallel size of the output.")
    target_pp: int = opt(1, "Pipeline-parallel size of the output (native format only).")
    target_dp: int = opt(0, "native: data-parallel size of the output (0: keep the world size when it divides).")
    target_ep: int = opt(1, "native: expert-parallel size of the output (ZeRO-1/2 state resharded); divides target_dp.")
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
        "hf (and peft: the native class the adapters are for): the published layout to write (empty: "
        "transformers' own class when one holds the model, GlmForCausalLM / Glm4ForCausalLM, else the family's "
        "remote-code layout: glm, chatglm-6b, chatglm2-6b).",
    )
    merge_lora: bool = opt(
        False,
        "The input is a LoRA run's checkpoint (adapters only, any layout and ZeRO stage): merge its adapters into "
        "the base it records (W + alpha/r B A in fp32 from the fp32 master copy where the checkpoint holds one, "
        "cast to the base's dtype; the base must be unchanged) and write a plain model in the chosen format and "
        "layout. (--format peft exports the adapters unmerged.)",
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
            "target_ep",
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
    "--merge-lora": ("convert.merge_lora", True),
    # the training scripts' spellings of the parallel sizes, with --target- in front
    **{
        f"--target-{kind}-parallel-size": (f"convert.target_{short}", None)
        for kind, short in (("tensor", "tp"), ("pipeline", "pp"), ("data", "dp"), ("expert", "ep"))
    },
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


def _target_vocab(
    src: ModelSource, opts: ConvertOptions, notes: list[str], open_tokenizer: Callable[[str], Any] | None
) -> int:
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
            + (" (new rows are zeros)" if vocab > cfg.vocab_size else f" (rows from {vocab} on dropped)")
        )
    return vocab


def _check_target(src: ModelSource, opts: ConvertOptions) -> CheckpointFormat:
    """The target format, once ``opts`` is checked against it and the source's model."""
    fmt = format_named(opts.format)
    if opts.hf_layout and fmt.name != "hf" and not fmt.adapters:
        raise CheckpointError(f"--hf-layout {opts.hf_layout}: only the hf format has layouts (got --format {fmt.name})")
    if opts.target_pp != 1 and not fmt.pipelined:
        raise CheckpointError(f"--target-pp {opts.target_pp}: only the native format has pipeline layouts")
    if opts.target_pp < 1 or src.info.config.num_layers % opts.target_pp:
        raise CheckpointError(f"--target-pp {opts.target_pp} does not divide the {src.info.config.num_layers} layers")
    if not fmt.sharded and opts.target_tp != 1:
        raise CheckpointError(f"the {opts.format} format is unsharded: use --target-tp 1")
    if opts.vocab_size < 0 or opts.max_shard_bytes < 1:
        raise CheckpointError(
            f"--vocab-size must be >= 0 (0: keep) and --max-shard-size positive, got {opts.vocab_size} and "
            f"{opts.max_shard_bytes}"
        )
    if opts.target_ep < 1 or opts.target_dp < 0:
        raise CheckpointError(
            f"--target-ep must be >= 1 and --target-dp >= 0 (0: keep), got {opts.target_ep} and {opts.target_dp}"
        )
    if opts.target_ep != 1 and fmt.name != "native":
        raise CheckpointError(f"--target-ep {opts.target_ep}: only native checkpoints split experts")
    if opts.target_ep > 1:
        experts = getattr(src.info.config, "num_experts", 0)
        if not experts:
            raise CheckpointError(f"--target-ep {opts.target_ep}: the model is dense (no experts to split); use 1")
        check_divisible("number of experts", experts, opts.target_ep, "choose a --target-ep that divides it")
        if per_stage := dense_only_first_stage(src.info.config, opts.target_pp):
            raise CheckpointError(
                f"--target-pp {opts.target_pp} --target-ep {opts.target_ep}: pipeline stage 0 would hold dense layers "
                f"only ({per_stage} layers, first_k_dense_replace {src.info.config.first_k_dense_replace}), which "
                "training with expert parallelism refuses; use fewer stages"
            )
    cfg = src.info.config
    tp = opts.target_tp
    check_divisible("number of attention heads", cfg.num_attention_heads, tp, "choose a --target-tp that divides it")
    check_divisible("MLP size", cfg.ffn_size, tp)
    fmt.check(cfg, opts)
    if opts.dtype and opts.dtype not in SHORT_NAMES:
        raise CheckpointError(f"unknown dtype {opts.dtype!r} (fp32, bf16, fp16)")
    return fmt


def _target_dtype(fmt: CheckpointFormat, opts: ConvertOptions) -> torch.dtype | None:
    """The cast the conversion applies to every tensor (``None``: none), as the format treats ``--dtype``."""
    if fmt.dtype == "keep":
        return None
    if opts.dtype:
        return DTYPES[opts.dtype]
    return torch.float32 if fmt.dtype == "fp32" else None


def _new_report(
    src: ModelSource, output: Path, fmt: CheckpointFormat, opts: ConvertOptions, notes: list[str]
) -> tuple[ConvertReport, int]:
    """The report of converting ``src`` and the target's data-parallel size."""
    info = src.info
    world = info.tp * info.pp * info.dp
    per_replica = opts.target_tp * opts.target_pp
    target_dp = opts.target_dp or (world // per_replica if world % per_replica == 0 else 1)
    report = ConvertReport(
        output=str(output),
        source=f"{info.format} {info.path}",
        source_layout=f"tp={info.tp} pp={info.pp} dp={info.dp} zero={info.zero_stage}",
        target_layout=fmt.target_layout(opts, target_dp),
        notes=notes,
    )
    return report, target_dp


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
    blocker = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CheckpointError(f"{output}: {blocker} is a file, not a directory; choose another output directory")
    src = _open_input(input_path, opts)
    fmt = _check_target(src, opts)
    notes = list(src.info.notes)
    if opts.merge_lora:
        notes.append(
            f"merged the LoRA adapters of {input_path} in fp32, cast to the base's dtype; read from {src.origin}"
        )
    vocab = src.info.config.vocab_size if fmt.adapters else _target_vocab(src, opts, notes, open_tokenizer)
    dtype = _target_dtype(fmt, opts)
    layout = src.info.layout

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        t = resize_vocab(name, t, vocab)
        spec = layout.tensors.get(name)  # an fp32 tensor (the router's correction bias) stays fp32 under --dtype
        return t if dtype is None else t.float() if spec is not None and spec.dtype == "fp32" else t.to(dtype)

    report, target_dp = _new_report(src, output, fmt, opts, notes)
    if isinstance(src, MergedSource):
        report.source = f"LoRA {src.lora.step} on {report.source}"
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        tcfg = dataclasses.replace(src.info.config, vocab_size=vocab)
        job = WriteJob(src, tmp, opts, tcfg, transform, dtype, target_dp, notes, log, open_tokenizer)
        written = fmt.write(job)
        report.optimizer = written.optimizer
        report.tensors = written.tensors if fmt.adapters else len(src.names())
        if opts.verify:
            report.verified = written.verified if fmt.adapters else _verify(src, tmp, fmt, transform, written)
        if opts.verify_logits:
            report.logits_max_diff = _logits_diff(src, tmp, vocab)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - started
    return report


def _open_input(input_path: str | Path, opts: ConvertOptions) -> ModelSource:
    """The input as a full-tensor source: a LoRA checkpoint merged into its base for ``--merge-lora`` and for an
    adapters format (which writes ``src.adapters``), else the detected format's reader."""
    heads = opts.num_attention_heads or None
    adapters = format_named(opts.format).adapters
    if adapters and opts.merge_lora:
        raise CheckpointError(
            f"--merge-lora with --format {opts.format}: that format holds the adapters themselves; drop --merge-lora"
        )
    if adapters and opts.verify_logits:
        raise CheckpointError(f"--verify-logits: --format {opts.format} holds adapters, not a model")
    if opts.merge_lora or adapters:
        flag = "--merge-lora" if opts.merge_lora else f"--format {opts.format}"
        return open_merged(input_path, lambda p: open_source(p, num_attention_heads=heads), flag)
    return open_source(input_path, num_attention_heads=heads)


def _logits_diff(src: ModelSource, out: Path, vocab: int) -> float:
    """Max |difference| of the logits of a fixed input before (``src``) and after (``out``) the conversion."""
    rows = min(src.info.config.vocab_size, vocab)
    before = source_logits(src, rows)
    after = source_logits(open_source(out, num_attention_heads=src.info.config.num_attention_heads), rows)
    return float((before - after).abs().max())


def _verify(src: ModelSource, out: Path, fmt: CheckpointFormat, transform: Transform, written: Written) -> int:
    """Re-read the written checkpoint, merge it, and compare every tensor's shape, dtype and sha256."""
    dst = open_source(out, num_attention_heads=src.info.config.num_attention_heads)
    read = src.module_tensor if fmt.module_tensors else src.tensor
    expected = stream_checksums(src, lambda n: transform(n, read(n)))
    actual = stream_checksums(dst, dst.module_tensor)
    compare_checksums(expected, actual, f"{out.name} weights")
    count = len(expected)
    if written.carry:
        rows = dst.info.config.vocab_size  # optimizer states follow the weight's re-padding
        for key in OPTIMIZER_KEYS:  # a parameter without gradient (an MoE router's correction bias) has none
            exp = stream_checksums(src, lambda n, k=key: _state(src, n, k, lambda t: resize_vocab(n, t, rows)))
            act = stream_checksums(dst, lambda n, k=key: _state(dst, n, k, lambda t: t))
            compare_checksums(exp, act, f"{out.name} optimizer {key}")
            count += len(exp)
    return count


def _state(src: ModelSource, name: str, key: str, adapt: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    state = src.optimizer_state(name)
    return None if state is None else adapt(state[key])
