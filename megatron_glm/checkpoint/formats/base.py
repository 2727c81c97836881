"""What a checkpoint format is to the converter and every reader: one :class:`CheckpointFormat` value (detect,
open, check, write), listed in :data:`megatron_glm.checkpoint.formats.registry.REGISTRY`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from megatron_glm.checkpoint.stream import ModelSource
from megatron_glm.config import ModelConfig

if TYPE_CHECKING:
    from megatron_glm.checkpoint.convert import ConvertOptions

Transform = Callable[[str, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class WriteJob:
    """One conversion's target, as a format's ``write`` receives it."""

    source: ModelSource
    out: Path  # the temporary directory to write into (renamed into place when verified)
    opts: ConvertOptions
    config: ModelConfig  # the target's architecture (vocab re-padded)
    transform: Transform  # vocab re-padding and the --dtype cast (see CheckpointFormat.dtype)
    dtype: torch.dtype | None  # the cast ``transform`` applies (None: none)
    target_dp: int
    notes: list[str]  # the report's notes: append what the user should know
    log: Callable[[str], None]
    open_tokenizer: Callable[[str], Any] | None  # a tokenizer read from a file (None: not available)


@dataclasses.dataclass
class Written:
    """What ``write`` did beyond the weights."""

    carry: bool = False  # the optimizer state was written (and is verified)
    optimizer: str = ""  # the report's optimizer line (empty: not applicable)
    tensors: int = 0  # an adapters format: the tensors written
    verified: int = 0  # an adapters format: the tensors its writer re-read and found equal


def no_check(config: ModelConfig, opts: ConvertOptions) -> None:
    """Any architecture and target options the generic checks accept."""


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint format: how to recognise, read, check and write it.

    ``detect(path)``: cheap (file names, a config key), no error for a folder of another format.
    ``open(path, num_attention_heads)``: the folder as a :class:`~megatron_glm.checkpoint.stream.ModelSource`
    (``num_attention_heads``: for formats whose files do not record it; ``None``: the format's default).
    ``check(config, opts)``: refuse (``CheckpointError``) a model or target option this format cannot hold.
    ``write(job)``: write ``job.source`` into ``job.out``.
    ``dtype``: what ``--dtype`` does: ``keep`` (ignored: the stored dtypes), ``given`` (cast when given),
    ``fp32`` (cast when given, else fp32). ``sharded``: writes ``--target-tp`` > 1; ``pipelined``: writes
    ``--target-pp`` > 1; ``module_tensors``: holds the weights as the model held them (verified against
    :meth:`~megatron_glm.checkpoint.stream.ModelSource.module_tensor`, else against ``tensor``).
    ``layout(opts, target_dp)``: the report's target layout (``None``: ``"<name> tp=.. pp=.."``).
    ``adapters``: writes a LoRA run's adapters, not a model: the converter opens the input as a LoRA checkpoint
    (:func:`~megatron_glm.checkpoint.lora_merge.open_merged`: ``job.source.adapters``) and the writer verifies
    what it wrote (``Written.verified``).
    """

    name: str
    help: str
    detect: Callable[[Path], bool]
    open: Callable[[Path, int | None], ModelSource]
    write: Callable[[WriteJob], Written]
    check: Callable[[ModelConfig, ConvertOptions], None] = no_check
    dtype: Literal["keep", "given", "fp32"] = "given"
    sharded: bool = True
    pipelined: bool = False
    module_tensors: bool = False
    layout: Callable[[ConvertOptions, int], str] | None = None
    adapters: bool = False

    def target_layout(self, opts: ConvertOptions, target_dp: int) -> str:
        if self.layout is not None:
            return self.layout(opts, target_dp)
        return f"{self.name} tp={opts.target_tp} pp={opts.target_pp}"
