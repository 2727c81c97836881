"""Every checkpoint format we read and write, in one table (:data:`REGISTRY`), and the detection over it.

Adding a format is one :class:`~megatron_glm.checkpoint.formats.base.CheckpointFormat` value (here or in the
format's module) and its place in :data:`REGISTRY`; the converter's ``--format`` choices and help, the
detection (:func:`open_source`, used by every reader: weights-only starts, fine-tuning, generation,
evaluation, conversion) and the target checks come from the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_glm.checkpoint.formats.base import CheckpointFormat, WriteJob, Written
from megatron_glm.checkpoint.formats.glm_original import GLMOriginalSource, find_rank_dir, write_glm_original
from megatron_glm.checkpoint.formats.hf import HFSource, family_for, is_hf, write_hf
from megatron_glm.checkpoint.formats.native import NativeSource, NativeTarget, find_step_dir, write_native
from megatron_glm.checkpoint.formats.peft import adapter_config, is_peft, peft_tensors, write_peft
from megatron_glm.checkpoint.formats.sat import SATSource, check_sat_architecture, is_sat, write_sat
from megatron_glm.checkpoint.formats.standalone import StandaloneSource, is_standalone, write_standalone
from megatron_glm.checkpoint.formats.universal import UniversalSource, is_universal, write_universal
from megatron_glm.checkpoint.manager import META, list_checkpoints, read_meta
from megatron_glm.checkpoint.stream import ModelSource
from megatron_glm.config import ModelConfig
from megatron_glm.errors import CheckpointError

if TYPE_CHECKING:
    from megatron_glm.checkpoint.convert import ConvertOptions


def _ours(path: Path) -> bool:
    return (path / META).is_file() or bool(list_checkpoints(path))


def _universal(path: Path) -> bool:
    if not _ours(path):
        return False
    try:
        return is_universal(read_meta(find_step_dir(path, log=lambda _: None)))
    except CheckpointError:
        return False  # no complete step: the native reader says why


def _open_universal(path: Path) -> UniversalSource:
    step = find_step_dir(path)
    return UniversalSource(step, read_meta(step))


def _write_native(job: WriteJob) -> Written:
    src, opts = job.source, job.opts
    note = src.optimizer_note() if isinstance(src, NativeSource) else "the source has no optimizer state"
    if opts.target_pp > 1 and note is None:
        note = "pipeline targets are written with model weights only"
    carry = opts.keep_optimizer and note is None
    if not opts.keep_optimizer:
        note = "dropped on request (--no-optimizer)"
    if opts.dtype:
        job.notes.append("--dtype is ignored for the native format (weights keep the training dtype)")
    target = NativeTarget(
        tp=opts.target_tp,
        dp=job.target_dp,
        config=job.config,
        carry_optimizer=carry,
        pp=opts.target_pp,
        ep=opts.target_ep,
    )
    write_native(src, job.out, target, transform=job.transform, log=job.log)
    if carry:
        return Written(carry=True, optimizer="resharded (ZeRO-1/2 partitions for the new layout)")
    return Written(
        optimizer=f"NOT carried: {note}; wrote a model-only checkpoint (start from it with "
        f"--checkpoint.load_weights_only true)"
    )


def _write_universal(job: WriteJob) -> Written:
    src = job.source
    note = src.optimizer_note() if hasattr(src, "optimizer_note") else "the source has no optimizer state"
    if note is not None:
        raise CheckpointError(
            f"{src.info.path}: cannot write a universal checkpoint: {note}; use --format native "
            f"--no-optimizer for the weights alone"
        )
    write_universal(src, job.out, job.config, transform=job.transform)
    return Written(carry=True, optimizer="carried in full (DeepSpeed partitions it for the loading run's layout)")


def _step(job: WriteJob) -> int:
    return int(getattr(job.source.info, "meta", {}).get("step", 0))


def _write_glm(job: WriteJob) -> Written:
    write_glm_original(
        job.source, job.out, job.opts.target_tp, job.config, iteration=_step(job), transform=job.transform
    )
    return Written()


def _write_sat(job: WriteJob) -> Written:
    write_sat(job.source, job.out, job.opts.target_tp, job.config, iteration=_step(job), transform=job.transform)
    return Written()


def _check_family(config: ModelConfig, opts: ConvertOptions) -> None:
    family_for(config, opts.hf_layout)  # a model outside the published layouts is refused, naming what differs


def _tokenizer_files(job: WriteJob) -> list[str]:
    return [job.opts.tokenizer_model] if job.opts.tokenizer_model else job.source.info.tokenizer_files


def _write_hf(job: WriteJob) -> Written:
    model_file = next((t for t in _tokenizer_files(job) if not t.endswith(".vocab")), None)
    family = family_for(job.config, job.opts.hf_layout)
    if not family.tokenizer_class:
        code = sorted(set(v.split(".")[0] + ".py" for v in family.auto_map.values()))
        job.notes.append(
            f"{family.name} layout: weights and config.json only; copy THUDM's published model and tokenizer "
            f"files ({', '.join(code)}, tokenizer) into the folder to load it with trust_remote_code"
        )
        model_file = None
    elif model_file is None or job.open_tokenizer is None:
        job.notes.append("no tokenizer found: the hf export has no tokenizer files and generate() needs token ids")
        model_file = None
    tokenizer = job.open_tokenizer(model_file) if model_file and job.open_tokenizer else None
    write_hf(
        job.source,
        job.out,
        job.config,
        tokenizer=tokenizer,
        max_new_tokens=job.opts.max_new_tokens,
        family=family,
        notes=job.notes,
        **_shard_options(job),
    )
    return Written()


def _write_standalone(job: WriteJob) -> Written:
    write_standalone(job.source, job.out, job.config, tokenizer_files=_tokenizer_files(job), **_shard_options(job))
    return Written()


def _write_peft(job: WriteJob) -> Written:
    src = job.source  # the LoRA checkpoint with its base (the converter opens an adapters format's input so)
    tensors, targets = peft_tensors(src.adapters, job.config, family_for(job.config, job.opts.hf_layout))
    family = getattr(src.base, "family", None)
    base = str(src.lora.base_path) if family is not None and family.native else None
    if base is None:
        job.notes.append(
            f"base_model_name_or_path is unset: the LoRA base {src.lora.base_path} is not a transformers folder "
            "(export it with --format hf and load the adapters onto that)"
        )
    job.notes.append(f"adapters read from {src.origin}")
    rank = int(src.lora.record["rank"])
    fields = adapter_config(rank=rank, alpha=src.alpha, dropout=src.lora.dropout, targets=targets, base=base)
    n = write_peft(job.out, tensors, fields, job.dtype)
    return Written(tensors=n, verified=n if job.opts.verify else 0)


def _shard_options(job: WriteJob) -> dict[str, Any]:
    """The safetensors writers' common keywords."""
    return {"transform": job.transform, "dtype": job.dtype, "max_shard_bytes": job.opts.max_shard_bytes}


NATIVE = CheckpointFormat(
    name="native",
    help="training checkpoint (resumable) in the --target-* layout",
    detect=lambda path: _ours(path) and not _universal(path),
    open=lambda path, heads: NativeSource(path),
    write=_write_native,
    dtype="keep",
    pipelined=True,
    module_tensors=True,
    layout=lambda opts, dp: (
        f"native tp={opts.target_tp} pp={opts.target_pp} dp={dp}"
        + (f" ep={opts.target_ep}" if opts.target_ep > 1 else "")
    ),
)
UNIVERSAL = CheckpointFormat(
    name="universal",
    help="DeepSpeed's universal checkpoint with the optimizer state, resumable by a run of any tp/dp/ZeRO-1-2 "
    "layout without pipelining",
    detect=_universal,
    open=lambda path, heads: _open_universal(path),
    write=_write_universal,
    dtype="keep",
    layout=lambda opts, dp: "universal (any tp/dp/ZeRO-1-2 layout without pipelining)",
)
HF = CheckpointFormat(
    name="hf",
    help="HuggingFace folder: transformers' own GlmForCausalLM / Glm4ForCausalLM / Glm4MoeForCausalLM for GLM-4 and "
    "GLM-4.5-shaped models (no remote code), else THUDM's published layout of the model's family (GLM with its "
    "transformers code; ChatGLM-6B, ChatGLM2-6B; see --hf-layout)",
    detect=is_hf,
    open=lambda path, heads: HFSource(path),
    write=_write_hf,
    check=_check_family,
    dtype="fp32",
    sharded=False,
)
SAFETENSORS = CheckpointFormat(
    name="safetensors",
    help="standalone model for megatron_glm.checkpoint.load_pretrained",
    detect=is_standalone,  # after hf: both have config.json
    open=lambda path, heads: StandaloneSource(path),
    write=_write_standalone,
    dtype="fp32",
    sharded=False,
)
SAT = CheckpointFormat(
    name="sat",
    help="GLM-130B's SwissArmyTransformer mp_rank files",
    detect=is_sat,
    open=lambda path, heads: SATSource(path, num_attention_heads=heads),
    write=_write_sat,
    check=lambda config, opts: check_sat_architecture(config),
)
GLM = CheckpointFormat(
    name="glm",
    help="original GLM mp_rank files",
    detect=lambda path: find_rank_dir(path) is not None,  # after sat: both have mp_rank files
    open=lambda path, heads: GLMOriginalSource(path, num_attention_heads=heads),
    write=_write_glm,
)
PEFT = CheckpointFormat(
    name="peft",
    help="a LoRA run's adapters for HuggingFace peft on transformers' own GlmForCausalLM / Glm4ForCausalLM "
    "(adapter_config.json, adapter_model.safetensors; the input is a LoRA checkpoint; written, not read)",
    detect=is_peft,
    open=lambda path, heads: _unreadable(path),
    write=_write_peft,
    check=_check_family,
    dtype="fp32",
    sharded=False,
    adapters=True,
    layout=lambda opts, dp: "peft LoRA adapters",
)


def _unreadable(path: Path) -> ModelSource:
    raise CheckpointError(
        f"{path}: peft LoRA adapters, not a model: load them onto their base with peft's PeftModel.from_pretrained "
        "(convert the LoRA run's own checkpoint with --merge-lora for a merged model)"
    )


#: Every format, in detection order (the first whose ``detect`` accepts a folder opens it).
REGISTRY: tuple[CheckpointFormat, ...] = (NATIVE, UNIVERSAL, HF, SAFETENSORS, SAT, GLM, PEFT)

#: The ``--format`` choices.
FORMATS = tuple(f.name for f in REGISTRY)


def format_named(name: str) -> CheckpointFormat:
    """The registered format ``name`` (one-line error listing the known ones otherwise)."""
    for fmt in REGISTRY:
        if fmt.name == name:
            return fmt
    raise CheckpointError(f"unknown format {name!r} (choose from {', '.join(FORMATS)})")


def detect_format(path: str | Path) -> CheckpointFormat:
    """The format of the checkpoint at ``path``: the first entry of :data:`REGISTRY` that recognises it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    for fmt in REGISTRY:
        if fmt.detect(path):
            return fmt
    raise CheckpointError(
        f"{path}: not a checkpoint we can read (known formats: {', '.join(FORMATS)}; see "
        f"tools/convert_checkpoint.py --help)"
    )


def open_source(path: str | Path, *, num_attention_heads: int | None = None) -> ModelSource:
    """Detect the format of ``path`` and open it as a full-tensor stream."""
    path = Path(path)
    return detect_format(path).open(path, num_attention_heads)
