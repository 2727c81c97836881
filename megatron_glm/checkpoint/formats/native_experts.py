"""The expert shards of an expert-parallel native checkpoint (``experts/pp{P}_tp{T}_ep{E}.pt``, written by the
checkpoint manager: :mod:`megatron_glm.checkpoint.experts`), read as full tensors and written for a target EP.

An expert tensor's full value is, along its ``expert_dim``, the concatenation over expert-parallel ranks of each
rank's tensor-parallel shards merged (as TP's ``split_dim``); the model-states files hold expert rank 0's only.
The ZeRO-1/2 optimizer state of the expert groups is read and written too (section below).

Pipeline checkpoints with expert parallelism: DeepSpeed's pipeline engine saves a model holding expert
parameters as one model-states file per stage and tensor rank (``mp_rank_{stage x tp + t}``, the stage's module
under its pipe-prefixed names, as without pipelining), not as per-layer files; each stage's expert ranks write
``experts/pp{stage}_...``. Both are read here under the original names (section at the end), and written for a
pipeline target (weights only, as every pipeline target: the stage of each pipe layer by the uniform partition).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.experts import expert_file, expert_slice
from megatron_glm.checkpoint.reshard import merge_shards, split_full
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.checkpoint.zero import ZeroReader, write_zero12_file
from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import ModelLayout, PipeLayer, original_name
from megatron_glm.model.memory import stage_of
from megatron_glm.model.tensor_spec import TensorSpec
from megatron_glm.training.expert_parallel import expert_group_name
from megatron_glm.training.pipeline import TIED_KEY


class ExpertShards:
    """The expert files of a step directory saved with ``tp`` x ``ep`` ranks on ``pp`` pipeline stages
    (memory-mapped, cached; names mapped back to the original ones)."""

    def __init__(self, step: Path, tp: int, ep: int, pp: int = 1) -> None:
        self.step, self.tp, self.ep, self.pp = step, tp, ep, pp
        self._files: dict[tuple[int, int, int], dict[str, Any]] = {}
        self._stage: dict[str, int] = {}
        missing = [expert_file((s, t, e, 0)) for s in range(pp) for t in range(tp) for e in range(ep)]
        missing = [m for m in missing if not (step / m).is_file()]
        if missing:
            raise CheckpointError(
                f"{step}: missing expert shards {', '.join(missing[:4])} (layout tp={tp} pp={pp} ep={ep})"
            )

    def _file(self, s: int, t: int, e: int) -> dict[str, Any]:
        if (s, t, e) not in self._files:
            path = self.step / expert_file((s, t, e, 0))
            saved = safe_torch_load(path, mmap=True)
            if not isinstance(saved, dict) or not all(torch.is_tensor(v) for v in saved.values()):
                raise CheckpointError(f"{path}: not an expert shard (a dict of tensors by name)")
            self._files[(s, t, e)] = {original_name(n): v for n, v in saved.items()}
        return self._files[(s, t, e)]

    def _stage_of(self, name: str) -> int:
        if not self._stage:
            self._stage = {n: s for s in reversed(range(self.pp)) for n in self._file(s, 0, 0)}
        return self._stage.get(name, 0)

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        parts, s = [], self._stage_of(spec.name)
        for e in range(self.ep):
            shards = [self._file(s, t, e).get(spec.name) for t in range(self.tp)]
            if any(x is None for x in shards):
                raise CheckpointError(f"{self.step}: expert shard of ep rank {e} has no {spec.name}")
            want = list(spec.shard_shape(self.tp, self.ep))
            for t, x in enumerate(shards):
                if list(x.shape) != want:
                    raise CheckpointError(
                        f"{self.step / expert_file((s, t, e, 0))}: {spec.name} has shape {list(x.shape)}, expected "
                        f"{want} (tp={self.tp} ep={self.ep})"
                    )
            parts.append(merge_shards(spec, shards))
        return torch.cat(parts, dim=spec.expert_dim)

    def release(self) -> None:
        self._files.clear()


def save_expert_shards(step: Path, shards: dict[tuple[int, int, int], dict[str, torch.Tensor]]) -> None:
    """Write ``shards[(stage, tp_rank, ep_rank)]`` (name -> tensor) as the manager's expert files (temp name,
    rename)."""
    for (s, t, e), tensors in shards.items():
        path = step / expert_file((s, t, e, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        _save({n: v.clone() for n, v in tensors.items()}, path)


def _save(obj: Any, path: Path) -> None:
    part = path.with_name(f".{path.name}.part")
    torch.save(obj, part)
    os.replace(part, path)


# ----------------------------------------------------------------------------- optimizer state
# ZeRO-1/2 under expert parallelism (DeepSpeed's MoE groups): the optimizer groups are the dense groups, then
# one expert group per dense group holding expert tensors (``split_params_into_different_moe_groups_for_optimizer``,
# named ``ep_size_<ep>``, ``moe`` True, cut at ``MAX_GROUP_NUMEL`` elements). A dense group is partitioned over
# the data-parallel ranks; an expert group over the expert-data-parallel ranks of data-parallel rank ``d``'s
# expert rank ``d % ep`` (``edp_rank = d // ep``: :mod:`megatron_glm.parallel.state`), holding that rank's experts.

MAX_GROUP_NUMEL = 178956971  # DeepSpeed's max_group_size for the split expert groups


def expert_zero_state(zero: list[ZeroReader], spec: TensorSpec, ep: int, moments: bool) -> dict[str, torch.Tensor]:
    """The full fp32 master weight (and Adam moments) of expert tensor ``spec`` from ZeRO-1/2 readers (one per
    tensor-parallel rank) of a run with ``ep`` expert-parallel ranks."""
    dp = zero[0].dp
    per_ep = []
    for e in range(ep):
        ranks = [e + k * ep for k in range(dp // ep)]  # expert rank e's files, in expert-data-parallel order
        per_tp = [{"fp32": z.fp32(spec.name, ranks), **(z.moments(spec.name, ranks) if moments else {})} for z in zero]
        per_ep.append({k: merge_shards(spec, [r[k] for r in per_tp]) for k in per_tp[0]})
    return {k: torch.cat([p[k] for p in per_ep], dim=spec.expert_dim) for k in per_ep[0]}


@dataclasses.dataclass
class TargetGroups:
    """The target's optimizer groups (names in group order), which are expert groups, and the index of the
    model's plain parameter group (``ModelLayout.param_groups``) each comes from (``None``: the source's own)."""

    groups: list[list[str]]
    expert: list[bool]
    origin: list[int] | None = None


def _is_expert(layout: ModelLayout, name: str) -> bool:
    return layout[name].expert_dim is not None


def target_groups(
    groups: list[list[str]], layout: ModelLayout, names: list[str], src_ep: int, ep: int, dp: int
) -> TargetGroups:
    """The source's optimizer ``groups`` regrouped for ``ep`` expert-parallel ranks (unchanged for the same EP)."""
    if dp % ep:
        raise CheckpointError(f"--target-ep {ep} does not divide the target's data-parallel size {dp} (--target-dp)")
    if src_ep == ep:
        return TargetGroups(groups, [ep > 1 and bool(g) and all(_is_expert(layout, n) for n in g) for g in groups])
    held = {n for g in groups for n in g}
    base = [[n for n in g if n in held] for g in layout.param_groups(names)]
    if ep == 1:
        return TargetGroups(base, [False] * len(base), list(range(len(base))))
    out = TargetGroups([], [], [])
    for i, g in enumerate(base):
        dense = [n for n in g if not _is_expert(layout, n)]
        if dense:
            out.groups.append(dense), out.expert.append(False), out.origin.append(i)
    for i, g in enumerate(base):
        cur: list[str] = []
        size = 0
        for n in (n for n in g if _is_expert(layout, n)):
            numel = math.prod(layout[n].shard_shape(1)) // ep  # a rank's share at TP=1 (the largest cut)
            if cur and size + numel > MAX_GROUP_NUMEL:
                out.groups.append(cur), out.expert.append(True), out.origin.append(i)
                cur, size = [], 0
            cur, size = [*cur, n], size + numel
        if cur:
            out.groups.append(cur), out.expert.append(True), out.origin.append(i)
    return out


def target_param_groups(entries: list[dict[str, Any]] | None, groups: TargetGroups, ep: int) -> Any:
    """DeepSpeed's per-group hyperparameters (the optimizer state's ``param_groups``) for ``groups``."""
    if not entries or groups.origin is None:
        return entries
    plain = [e for e in entries if not e.get("moe")]  # the model's own groups (an EP source's split ones dropped)
    if max(groups.origin) >= len(plain):
        raise CheckpointError(f"the optimizer state has {len(plain)} parameter groups; the model needs more")
    return [
        {**plain[i], "name": expert_group_name(ep), "moe": True} if ex else plain[i]
        for i, ex in zip(groups.origin, groups.expert, strict=True)
    ]


def _local_shape(layout: ModelLayout, name: str, tp: int, ep: int) -> torch.Size:
    shape = list(layout[name].shard_shape(tp))
    if ep > 1 and _is_expert(layout, name):
        shape[layout[name].expert_dim] //= ep
    return torch.Size(shape)


def write_optimizer(
    src: Any,
    step: Path,
    groups: TargetGroups,
    layout: ModelLayout,
    target: Any,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
) -> None:
    """ZeRO-1/2 files for every (dp, tp) rank of ``target`` (a ``NativeTarget``: tp, dp, ep), from the source's
    full per-parameter state; expert groups partitioned over the expert-data-parallel ranks."""
    global_state, step_count = src.zero_globals()
    global_state = {
        **global_state,
        "param_groups": target_param_groups(global_state.get("param_groups"), groups, target.ep),
    }
    ds_config = src.model_extras().get("ds_config")
    cache: dict[str, dict[str, torch.Tensor]] = {}
    ep, dp = target.ep, target.dp

    def full_state(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            cache.clear()
            state = src.optimizer_state(name)
            if state is None:
                raise CheckpointError(f"{src.info.path}: no optimizer state for {name}")
            cache[name] = {k: transform(name, v).to(torch.float32) for k, v in state.items()}  # vocab re-padding
        return cache[name]

    for t in range(target.tp):
        shard_groups = [[(n, _local_shape(layout, n, target.tp, ep)) for n in g] for g in groups.groups]
        for d in range(dp):

            def state_of(name: str, t: int = t, d: int = d) -> dict[str, torch.Tensor]:
                spec = layout[name]
                out = {k: split_full(spec, v, t, target.tp) for k, v in full_state(name).items()}
                if ep > 1 and _is_expert(layout, name):
                    out = {k: expert_slice(spec, v, d % ep, ep) for k, v in out.items()}
                return out

            parts = [(d // ep, dp // ep) if ex else (d, dp) for ex in groups.expert]
            write_zero12_file(
                step / f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt",
                shard_groups,
                d,
                dp,
                state_of,
                global_state,
                step_count,
                ds_config,
                parts,
            )
            src.release()
            cache.clear()


# ----------------------------------------------------------------------------- pipeline stages with experts


def stage_model_file(step: Path, stage: int, tp_rank: int, tp: int) -> Path:
    """DeepSpeed's model-states file of pipeline stage ``stage``, tensor rank ``tp_rank`` (stage-major)."""
    return step / f"mp_rank_{stage * tp + tp_rank:02d}_model_states.pt"


def read_stage_models(step: Path, tp_rank: int, tp: int, pp: int) -> dict[str, Any]:
    """Tensor rank ``tp_rank``'s model-states files of every stage as one: stage 0's entries, and ``module`` the
    union of the stages' modules under the original names (the tied word embedding: the first stage's)."""
    module: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for s in range(pp):
        path = stage_model_file(step, s, tp_rank, tp)
        state = safe_torch_load(path, mmap=True)
        if not isinstance(state.get("module"), dict):
            raise CheckpointError(f"{path}: not a stage's model-states file (no 'module' of the stage's tensors)")
        for n, v in state["module"].items():
            module.setdefault(original_name(n), v)
        extras = extras or {k: v for k, v in state.items() if k != "module"}
    return {**extras, "module": module, "param_shapes": None}


def _pipe_prefix(pipe: PipeLayer, layout: ModelLayout) -> str:
    """The prefix DeepSpeed's ``PipelineModule`` gives pipe layer ``pipe``'s parameters (``build_pipeline_model``)."""
    if pipe.kind == "word_embedding" or (pipe.kind == "head" and layout.tied_head):
        return f"tied_modules.{TIED_KEY}."
    return f"{pipe.index}."


def write_stage_models(
    src: Any,
    step: Path,
    layout: ModelLayout,
    target: Any,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    extras: dict[str, Any],
) -> None:
    """A weights-only pipeline checkpoint with expert parallelism (``target``: a ``NativeTarget``), as the
    pipeline engine saves one: per stage and tensor rank, the stage's model-states file (expert rank 0's
    experts) and every expert rank's expert file."""
    tp, pp, ep = target.tp, target.pp, target.ep
    base = {k: v for k, v in extras.items() if k not in ("module", "optimizer", "param_shapes")}
    for s in range(pp):
        modules: list[OrderedDict[str, torch.Tensor]] = [OrderedDict() for _ in range(tp)]
        experts: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {
            (s, t, e): {} for t in range(tp) for e in range(ep)
        }
        for pipe in (p for p in layout.saved_pipe_layers if stage_of(p, target.config, pp) == s):
            for name in pipe.names:
                spec, key = layout[name], _pipe_prefix(pipe, layout) + name
                full = transform(name, src.module_tensor(name))
                for t in range(tp):
                    shard = split_full(spec, full, t, tp)
                    if spec.expert_dim is not None:
                        for e in range(ep):
                            experts[(s, t, e)][key] = expert_slice(spec, shard, e, ep)
                        shard = experts[(s, t, 0)][key]
                    modules[t][key] = shard.clone()
            src.release()
        save_expert_shards(step, experts)
        for t in range(tp):
            dims = {"pp_degree": pp, "tp_degree": tp}
            state = {**base, "module": modules[t], "dp_world_size": target.dp, "mp_world_size": pp * tp}
            _save({**state, "checkpoint_parallel_dimensions": dims}, stage_model_file(step, s, t, tp))
