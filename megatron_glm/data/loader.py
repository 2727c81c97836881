"""From a config to batches: the GLM dataset, the resumable distributed batch sampler and collate.

The training code calls::

    train, valid, test = build_pretraining_datasets(cfg, tokenizer, dp_size=dp, is_rank0=rank == 0,
                                                    barrier=dist.barrier)
    train_iter = build_data_iterator(train, consumed_samples=consumed, micro_batch_size=mbs,
                                     dp_rank=dp_rank, dp_size=dp, num_workers=cfg.data.num_workers)

(or :func:`build_pretraining_data` for all three iterators at once). Every sample is a pure function
of (seed, global sample index): sample ``i`` draws from a generator keyed by (seed, epoch, i), and
the objective of its micro-batch (``i // micro_batch_size``, or ``i`` with ``per_sample``) from one
keyed by (seed, micro-batch). Global batches are consecutive ranges of sample indices;
data-parallel rank ``r`` takes micro-batch ``r`` of every ``dp_size`` consecutive micro-batches.
So the same index gives the same sample on any rank, worker count or restart.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from megatron_glm.config import GLMConfig, batch_sizes
from megatron_glm.data.blank_infilling import SpecialTokens
from megatron_glm.data.blending import BlendedWindows
from megatron_glm.data.char_boundaries import CharBoundaries
from megatron_glm.data.dataset_meta import check_dataset_tokenizer
from megatron_glm.data.indexed_dataset import IndexedDataset
from megatron_glm.data.keyed_rng import TAG_GROUP, TAG_SAMPLE, KeyedRNG
from megatron_glm.data.objective_choice import (
    CAUSAL,
    SENTENCE,
    ObjectiveChoice,
    check_objective_tokens,
    uses_blank_infilling,
)
from megatron_glm.data.objectives import Objectives
from megatron_glm.data.samples import DocumentWindows, parse_data_path, split_ranges
from megatron_glm.data.tokenizer import tokenizer_fingerprint
from megatron_glm.errors import DataError
from megatron_glm.training.lifeline import die_with_parent

__all__ = [
    "SPLITS",
    "GLMDataset",
    "MicroBatchSampler",
    "build_data_iterator",
    "build_pretraining_data",
    "build_pretraining_datasets",
    "build_windows",
    "collate",
    "loader_generator",
    "split_num_samples",
]

SPLITS = ("train", "valid", "test")

Windows = DocumentWindows | BlendedWindows


class GLMDataset(torch.utils.data.Dataset):
    """Map-style dataset: index ``i`` -> one GLM sample (dict of numpy arrays, see ``collate``).

    ``group_size`` is the micro-batch size: samples ``i`` with the same ``i // group_size`` share
    one objective (the original chose it per batch); ``per_sample`` makes every sample choose. A window
    from a dataset in ``causal_sources`` (prefixes) always takes the causal objective.
    """

    def __init__(
        self,
        windows: Windows,
        sampler: Objectives,
        *,
        seed: int,
        group_size: int = 1,
        per_sample: bool = False,
        num_samples: int = 0,
        causal_sources: Sequence[str] = (),
    ) -> None:
        self.windows = windows
        self.sampler = sampler
        self.causal_sources = frozenset(causal_sources)
        self.seed = int(seed)
        self.group_size = 1 if per_sample else max(1, int(group_size))
        self.num_samples = int(num_samples)
        self._rng = KeyedRNG()
        self._group: tuple[int, ObjectiveChoice] | None = None

    def __len__(self) -> int:
        return self.num_samples or 2**62

    def choice(self, index: int) -> ObjectiveChoice:
        """The objective of sample ``index`` (shared by its micro-batch)."""
        group = int(index) // self.group_size
        if self._group is None or self._group[0] != group:
            self._group = (group, self.sampler.choose(self._rng(self.seed, 0, group, TAG_GROUP)))
        return self._group[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            raise IndexError(f"sample index {index} is negative")
        choice = self.choice(index)
        window = self.windows.window(index, sentences=choice.objective == SENTENCE)
        if window.source in self.causal_sources:
            choice = ObjectiveChoice(CAUSAL)
        rng = self._rng(self.seed, window.epoch, index, TAG_SAMPLE)
        sample = self.sampler.sample(window.tokens, rng, choice, window.sentence_starts)
        sample["index"] = index
        return sample


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into the batch interface.

    ``input_ids, labels [b, s] long``, ``loss_mask [b, s] float``, ``position_ids [b, 2, s] long``,
    ``sep [b] long`` (Part A length) and ``objective [b] long`` (0 token, 1 sentence, 2 document, 3 causal); with
    document isolation (``reset_attention_mask``) also ``doc_ids [b, s] long``.
    """
    batch = {
        "input_ids": torch.from_numpy(np.stack([s["input_ids"] for s in samples])),
        "labels": torch.from_numpy(np.stack([s["labels"] for s in samples])),
        "loss_mask": torch.from_numpy(np.stack([s["loss_mask"] for s in samples])),
        "position_ids": torch.from_numpy(np.stack([s["position_ids"] for s in samples])),
        "sep": torch.tensor([s["sep"] for s in samples], dtype=torch.long),
        "objective": torch.tensor([s["objective"] for s in samples], dtype=torch.long),
    }
    if "doc_ids" in samples[0]:
        batch["doc_ids"] = torch.from_numpy(np.stack([s["doc_ids"] for s in samples]))
    return batch


class MicroBatchSampler:
    """This data-parallel rank's sample indices, one list per micro-batch, from ``consumed_samples``.

    Each step of ``micro_batch_size * dp_size`` samples covers the next consecutive indices; rank
    ``r`` takes ``[start + r * mbs, start + (r + 1) * mbs)``. ``total_samples`` (None: endless)
    stops before a step that would not fit. Resuming at ``consumed_samples`` yields exactly what an
    uninterrupted run yields from there.
    """

    def __init__(
        self,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        total_samples: int | None = None,
    ) -> None:
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need micro_batch_size > 0 and 0 <= dp_rank ({dp_rank}) < dp_size ({dp_size})")
        step = micro_batch_size * dp_size
        if consumed_samples < 0 or consumed_samples % step:
            raise DataError(
                f"consumed_samples {consumed_samples} is not a multiple of micro_batch_size "
                f"({micro_batch_size}) x data-parallel size ({dp_size}) = {step}"
            )
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size, self.dp_rank, self.dp_size = int(micro_batch_size), int(dp_rank), int(dp_size)
        self.total_samples = total_samples

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        start = self.consumed_samples
        while self.total_samples is None or start + step <= self.total_samples:
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += step

    def __len__(self) -> int:
        if self.total_samples is None:
            raise TypeError("an endless sampler has no length")
        step = self.micro_batch_size * self.dp_size
        return max(0, (self.total_samples - self.consumed_samples) // step)


def build_data_iterator(
    dataset: GLMDataset,
    *,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_workers: int = 0,
    total_samples: int | None = None,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterator of this rank's micro-batches (dicts of tensors), resumed at ``consumed_samples``.

    Building it draws nothing from the global RNG: the DataLoader's base seed (worker seeds) comes from
    its own generator keyed by (dataset seed, consumed_samples, dp_rank). So a resumed run, which builds its
    iterator after restoring the RNG state, sees the same dropout masks as an uninterrupted one.
    """
    sampler = MicroBatchSampler(consumed_samples, micro_batch_size, dp_rank, dp_size, total_samples)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        generator=loader_generator(getattr(dataset, "seed", 0), consumed_samples, dp_rank),
        worker_init_fn=_worker_init if num_workers else None,
    )
    return iter(loader)


def _worker_init(_worker_id: int) -> None:
    """A DataLoader worker leaves SIGINT / SIGTERM to its trainer and dies with it.

    Launchers signal a worker's whole process group or process tree (torchrun's ``killpg``, Ctrl-C, the
    deepspeed launcher): a data worker killed first aborts the trainer's step, so the trainer could not save.
    SIGTERM from the trainer itself (multiprocessing's ``terminate()`` when it exits) still ends the worker.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True).start()
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()


def _exit_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def loader_generator(seed: int, consumed_samples: int, dp_rank: int) -> torch.Generator:
    """A private generator for a DataLoader, a pure function of where the iterator starts."""
    key = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(consumed_samples), int(dp_rank)])
    return torch.Generator().manual_seed(int(key.generate_state(1, np.uint64)[0] >> 1))


# -- building from the config --------------------------------------------------------------------


def split_num_samples(cfg: GLMConfig, dp_size: int) -> tuple[int, int, int]:
    """Samples training asks of the train, valid and test splits (what the index caches cover)."""
    t = cfg.training
    gbs = batch_sizes(cfg, dp_size)[2]
    evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval > 0 else 1
    eval_samples = t.eval_iters * t.micro_batch_size * dp_size
    return t.train_iters * gbs, evals * eval_samples, eval_samples


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def build_windows(
    data: Any,
    special: SpecialTokens,
    *,
    seed: int,
    num_samples: Sequence[int] = (0, 0, 0),
    build_cache: bool = True,
    vocab_size: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[Windows | None]:
    """Windows of the train, valid and test splits of ``data`` (a :class:`DataConfig`); None if empty.

    ``vocab_size`` (the tokenizer's) bounds the token ids: checked on open and in every window. A dataset whose
    sidecar records another tokenizer than ``data.tokenizer_model`` is refused; ``log`` (default: stderr) gets
    the warning for a dataset that cannot be verified.
    """
    pairs = parse_data_path(data.data_path)
    datasets = [(w, IndexedDataset(prefix)) for w, prefix in pairs]
    if data.tokenizer_model:
        fingerprint = tokenizer_fingerprint(data.tokenizer_model)
        for _, prefix in pairs:
            warning = check_dataset_tokenizer(prefix, fingerprint, data.tokenizer_model)
            if warning:
                (log or _stderr)(warning)
    out: list[Windows | None] = []
    for split_index, name in enumerate(SPLITS):
        parts: list[tuple[float, DocumentWindows]] = []
        for weight, ds in datasets:
            lo, hi = split_ranges(ds.num_documents, data.split)[split_index]
            if hi <= lo:
                continue
            windows = DocumentWindows(
                ds,
                (lo, hi),
                data.seq_length,
                cls_id=special.cls,
                eos_id=special.eos,
                pack=data.pack_documents,
                seed=seed,
                name=name,
                cache_dir=data.cache_dir,
                num_samples=int(num_samples[split_index] * weight) + 1,
                build_cache=build_cache,
                vocab_size=vocab_size,
            )
            if len(windows):
                parts.append((weight, windows))
        if not parts:
            if name == "train":
                raise DataError(
                    f"split {data.split!r} leaves no training documents with text in {', '.join(p for _, p in pairs)}"
                )
            out.append(None)
        elif len(parts) == 1:
            out.append(parts[0][1])
        else:
            out.append(
                BlendedWindows(
                    [p for _, p in parts],
                    [w for w, _ in parts],
                    num_samples[split_index],
                    cache_dir=data.cache_dir,
                    build_cache=build_cache,
                )
            )
    _check_sentences(data, out)
    return out


def _check_sentences(data: Any, windows: Sequence[Windows | None]) -> None:
    """The sentence objective needs sentence boundaries in every dataset it can be drawn for."""
    ob = data.objective
    if ob.gap_sentence_prob <= 0:
        return
    for split in windows:
        parts = [] if split is None else split.datasets if isinstance(split, BlendedWindows) else [split]
        for part in parts:
            if part.prefix not in ob.causal_datasets and not part.has_sentences:
                raise DataError(
                    f"{part.prefix}: the sentence objective (gap_sentence_prob > 0) needs sentence boundaries: "
                    "preprocess the corpus with sentence splitting (one sequence per sentence)"
                )


def build_pretraining_datasets(
    cfg: GLMConfig,
    tokenizer: Any,
    *,
    dp_size: int = 1,
    is_rank0: bool = True,
    barrier: Callable[[], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[GLMDataset | None]:
    """Train, valid and test :class:`GLMDataset` (None for an empty split) from a config.

    ``tokenizer`` is a :class:`~megatron_glm.data.tokenizer.GLMTokenizer` or a :class:`SpecialTokens`.
    Rank 0 (``is_rank0``) writes the index caches; every rank then calls ``barrier`` (e.g.
    ``torch.distributed.barrier``) and the others memory-map them.
    """
    special = tokenizer if isinstance(tokenizer, SpecialTokens) else SpecialTokens.from_tokenizer(tokenizer, ("cls",))
    objective = cfg.data.objective
    prefixes = [p for _, p in parse_data_path(cfg.data.data_path)]
    check_objective_tokens(objective, special, uses_blank_infilling(objective, prefixes), cfg.data.tokenizer_model)
    num_samples = split_num_samples(cfg, dp_size)
    windows = build_windows(
        cfg.data,
        special,
        seed=cfg.training.seed,
        num_samples=num_samples,
        build_cache=is_rank0,
        vocab_size=int(getattr(tokenizer, "vocab_size", 0)),
        log=log,
    )
    if barrier is not None:
        barrier()
    chars = None if isinstance(tokenizer, SpecialTokens) else CharBoundaries.from_tokenizer(tokenizer)
    sampler = Objectives(objective, special, cfg.data.seq_length, chars)
    return [
        None
        if w is None
        else GLMDataset(
            w,
            sampler,
            seed=cfg.training.seed + k,
            group_size=cfg.training.micro_batch_size,
            per_sample=objective.per_sample,
            num_samples=n,
            causal_sources=objective.causal_datasets,
        )
        for k, (w, n) in enumerate(zip(windows, num_samples))
    ]


def build_pretraining_data(
    cfg: GLMConfig,
    tokenizer: Any,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    consumed_train_samples: int = 0,
    consumed_valid_samples: int = 0,
    is_rank0: bool = True,
    barrier: Callable[[], None] | None = None,
) -> list[Iterator[dict[str, torch.Tensor]] | None]:
    """Train, valid and test batch iterators for this data-parallel rank (None for an empty split).

    All three are endless; the train iterator resumes at ``consumed_train_samples``, the valid one at
    ``consumed_valid_samples``, the test one starts at 0.
    """
    datasets = build_pretraining_datasets(cfg, tokenizer, dp_size=dp_size, is_rank0=is_rank0, barrier=barrier)
    consumed = (consumed_train_samples, consumed_valid_samples, 0)
    return [
        None
        if ds is None
        else build_data_iterator(
            ds,
            consumed_samples=c,
            micro_batch_size=cfg.training.micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            num_workers=cfg.data.num_workers,
        )
        for ds, c in zip(datasets, consumed)
    ]
