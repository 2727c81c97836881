"""Our training checkpoints: ``<save>/global_stepN/`` written by :class:`CheckpointManager` (DeepSpeed files
plus ``meta.json`` / ``manifest.json``). Read from any (tp, dp, ZeRO 0-3) layout; write any (tp, dp) layout
as a complete training checkpoint (ZeRO-1/2 optimizer state resharded when the source has it)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.experts import expert_slice
from megatron_glm.checkpoint.manager import (
    LATEST,
    META,
    list_checkpoints,
    read_meta,
    verified_checkpoints,
    verify_checkpoint,
    write_manifest,
)
from megatron_glm.checkpoint.reshard import merge_shards, split_full
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.checkpoint.stream import SourceInfo, iter_layers
from megatron_glm.checkpoint.zero import FrozenReader, ZeroReader
from megatron_glm.config import ModelConfig
from megatron_glm.dtypes import DTYPES
from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import ModelLayout, original_name

from . import native_experts
from .common import model_config_from_dict, tokenizer_files
from .native_experts import ExpertShards, expert_zero_state, save_expert_shards, target_groups, write_optimizer


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def find_step_dir(path: Path, log: Callable[[str], None] = _warn) -> Path:
    """``path`` itself when it is a step directory, else the newest complete checkpoint under it (a skipped
    one is said, and why, as training says it: :func:`verified_checkpoints`)."""
    if (path / META).is_file():
        return path
    if not list_checkpoints(path):
        raise CheckpointError(f"{path}: no megatron_glm checkpoint here (no {META} and no global_step* directory)")
    problems: list[str] = []
    for tag in verified_checkpoints(path, log, problems):
        return path / tag
    raise CheckpointError(f"{path}: no complete checkpoint: " + "; ".join(problems))


def model_file(step: Path, tp_rank: int, zero_stage: int, dp_rank: int = 0) -> Path:
    if zero_stage == 3:
        return step / f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_model_states.pt"
    return step / f"mp_rank_{tp_rank:02d}_model_states.pt"


def layer_file(step: Path, index: int, tp_rank: int) -> Path:
    """DeepSpeed's per-layer file of a pipeline checkpoint."""
    return step / f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"


def optim_files(step: Path, tp_rank: int, dp: int) -> list[Path]:
    """The ZeRO optimizer files of ``tp_rank`` (``bf16_`` prefixed ones under bf16 ZeRO-1)."""
    for prefix in ("", "bf16_"):
        files = [step / f"{prefix}zero_pp_rank_{d}_mp_rank_{tp_rank:02d}_optim_states.pt" for d in range(dp)]
        if any(f.is_file() for f in files):
            return files
    return []


def pipeline_zero_readers(step: Path, tp: int, pp: int, dp: int) -> list[ZeroReader]:
    """Per tensor-parallel rank, one reader over every pipeline stage's ZeRO-1 files (``[]`` without them).

    DeepSpeed numbers a pipeline checkpoint's model-parallel files stage-major (``mp_rank = stage x tp +
    tp_rank``); each stage's ``param_shapes`` carry the pipeline module's names (``{k}.`` or
    ``tied_modules.{key}.`` prefixed), mapped back to the original names here.
    """
    readers = []
    for t in range(tp):
        stages = []
        for s in range(pp):
            mp = s * tp + t
            files = optim_files(step, mp, dp)
            if not files or not all(f.is_file() for f in files):
                return []
            shapes = safe_torch_load(step / f"mp_rank_{mp:02d}_model_states.pt", mmap=True).get("param_shapes")
            if not shapes:
                return []
            renamed = [OrderedDict((original_name(n), v) for n, v in g.items()) for g in shapes]
            stages.append(ZeroReader(files, renamed))
        readers.append(StagedZeroReader(stages))
    return readers


class StagedZeroReader(ZeroReader):
    """The ZeRO readers of a pipeline's stages seen as one (a tensor is read from the first stage holding it;
    the tied word embedding, held by the first and last stage, is identical on both)."""

    def __init__(self, stages: list[ZeroReader]) -> None:  # the stages hold the files
        self.stages = stages
        self.files, self.stage, self.dp = stages[0].files, stages[0].stage, stages[0].dp
        self._owner = {}
        for reader in stages:
            for name in reader.names:
                self._owner.setdefault(name, reader)

    @property
    def names(self) -> list[str]:
        return list(self._owner)

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def release(self) -> None:
        for reader in self.stages:
            reader.release()

    def fp32(self, name: str, ranks: list[int] | None = None) -> torch.Tensor:
        return self._reader(name).fp32(name, ranks)

    def moments(self, name: str, ranks: list[int] | None = None) -> dict[str, torch.Tensor]:
        return self._reader(name).moments(name, ranks)

    def step(self) -> Any:
        return self.stages[0].step()

    def global_state(self) -> dict[str, Any]:
        return self.stages[0].global_state()

    def _reader(self, name: str) -> ZeroReader:
        if name not in self._owner:
            raise CheckpointError(f"{self.files[0].parent}: no pipeline stage's ZeRO state holds {name}")
        return self._owner[name]


class NativeSource:
    """A step directory of ours, read as full tensors (memory-mapped, merged one tensor at a time)."""

    def __init__(self, path: str | Path, *, check_manifest: bool = True) -> None:
        step = find_step_dir(Path(path))
        if check_manifest:
            reason = verify_checkpoint(step)
            if reason:
                raise CheckpointError(reason)
        meta = read_meta(step)
        layout = meta.get("layout") or {}
        model_fields = (meta.get("config") or {}).get("model")
        if not model_fields or not layout:
            raise CheckpointError(f"{step / META}: not a megatron_glm checkpoint (no layout/config.model)")
        config = model_config_from_dict(model_fields, str(step / META))
        tp, pp, dp = int(layout.get("tp", 1)), int(layout.get("pp", 1)), int(layout.get("dp", 1))
        zero_dp = int(layout.get("dp_x_cp", dp))  # the optimizer's partitions: dp x cp (DeepSpeed's dp group)
        stage = int(layout.get("zero_stage", 0))
        ep = int(layout.get("ep", 1))
        if pp > 1 and stage > 1:
            raise CheckpointError(f"{step}: pipeline checkpoint with ZeRO stage {stage} (DeepSpeed supports 0/1)")
        if meta.get("lora"):
            raise CheckpointError(
                f"{step}: a LoRA run's checkpoint (adapters only); merge them into the base first: "
                f"tools/convert_checkpoint.py --input {step} --output DIR --merge-lora"
            )
        tok = ((meta.get("config") or {}).get("data") or {}).get("tokenizer_model")
        self.info = SourceInfo(
            format="native",
            path=str(step),
            config=config,
            tp=tp,
            pp=pp,
            dp=dp,
            zero_stage=stage,
            meta=meta,
            tokenizer_files=tokenizer_files(tok),
        )
        self.step, self.ep = step, ep
        self.experts = ExpertShards(step, tp, ep, pp) if ep > 1 else None
        if pp > 1 and ep > 1:  # DeepSpeed saves a pipeline with expert parameters per stage (native_experts)
            wanted = [native_experts.stage_model_file(step, s, t, tp) for s in range(pp) for t in range(tp)]
        elif pp > 1:
            wanted = [layer_file(step, p.index, t) for t in range(tp) for p in self.info.layout.saved_pipe_layers]
        else:
            wanted = [model_file(step, t, stage) for t in range(tp)]
        missing = [f.name for f in wanted if not f.is_file()]
        if missing:
            raise CheckpointError(f"{step}: missing rank files: {', '.join(missing[:4])} (layout tp={tp} pp={pp})")
        self._models: dict[int, dict[str, Any]] = {}
        first = self._model(0)
        if "module" not in first:
            raise CheckpointError(f"{model_file(step, 0, stage)}: not a DeepSpeed model-states file (no 'module')")
        self.param_shapes = first.get("param_shapes")
        self.zero: list[ZeroReader] = []
        if stage > 0 and pp > 1:
            self.zero = pipeline_zero_readers(step, tp, pp, zero_dp)
        if stage > 0 and pp == 1:
            for t in range(tp):
                files = optim_files(step, t, zero_dp)
                absent = [f.name for f in files if not f.is_file()] if files else ["(none)"]
                if absent and files:
                    raise CheckpointError(f"{step}: missing ZeRO optimizer files: {', '.join(absent)}")
                if not files or not self.param_shapes:
                    if stage == 3:
                        raise CheckpointError(
                            f"{step}: ZeRO-3 checkpoint without its optimizer files (the weights live there)"
                        )
                    break
                self.zero.append(ZeroReader(files, self.param_shapes))
        ranks = range(zero_dp if stage == 3 else 0)  # ZeRO-3 saves each rank's part of a frozen parameter
        self.frozen = [FrozenReader([model_file(step, t, 3, d) for d in ranks]) for t in range(tp) if ranks]
        self.bf16_optimizer = bool(self.zero) and self.zero[0].files[0].name.startswith("bf16_")
        self.precision = ((meta.get("config") or {}).get("training") or {}).get("precision", "fp32")
        self._names = self.info.layout.names()
        module = first["module"]
        missing_t = [n for n in self._names if n not in module]
        if missing_t:
            raise CheckpointError(
                f"{model_file(step, 0, stage)}: not a GLM checkpoint ({len(missing_t)} tensors "
                f"missing, e.g. {missing_t[:3]})"
            )

    # ------------------------------------------------------------------ reading
    def _model(self, t: int) -> dict[str, Any]:
        if t not in self._models:
            if self.info.pp > 1 and self.ep > 1:
                self._models[t] = native_experts.read_stage_models(self.step, t, self.info.tp, self.info.pp)
            elif self.info.pp > 1:  # pipeline: one file per pipe layer, keys are already the original names
                module: dict[str, Any] = {}
                for p in self.info.layout.saved_pipe_layers:
                    module.update(safe_torch_load(layer_file(self.step, p.index, t), mmap=True))
                extras_file = self.step / "mp_rank_00_model_states.pt"
                extras = safe_torch_load(extras_file, mmap=True) if extras_file.is_file() else {}
                self._models[t] = {
                    **{k: v for k, v in extras.items() if k != "module"},
                    "module": module,
                    "param_shapes": None,
                }
            else:
                self._models[t] = safe_torch_load(model_file(self.step, t, self.info.zero_stage), mmap=True)
        return self._models[t]

    def names(self) -> list[str]:
        return list(self._names)

    def release(self) -> None:
        self._models.clear()
        if self.experts is not None:
            self.experts.release()
        for z in [*self.zero, *self.frozen]:
            z.release()

    def module_tensor(self, name: str) -> torch.Tensor:
        spec = self.info.layout[name]
        if self.experts is not None and spec.expert_dim is not None:
            return self.experts.tensor(spec)
        if self.info.zero_stage == 3 and self._optimized(name):
            dtype = DTYPES.get(self.precision, torch.float32) if spec.dtype == "params" else torch.float32
            return self.tensor(name).to(dtype)
        # ZeRO-3: a parameter without gradient (``router.expert_bias``) is not in ``module``
        parts = [f.tensor(name) for f in self.frozen] or [self._model(t)["module"][name] for t in range(self.info.tp)]
        full = merge_shards(spec, parts)
        if tuple(full.shape) != tuple(spec.shape):  # a file at odds with the config its meta.json records
            raise CheckpointError(
                f"{self.step}: {name} has shape {list(full.shape)}, expected {list(spec.shape)} (meta.json's config)"
            )
        return full

    def _optimized(self, name: str) -> bool:  # not a parameter without gradient (``router.expert_bias``)
        return bool(self.zero) and name in self.zero[0]

    def _zero_state(self, name: str, moments: bool) -> dict[str, torch.Tensor]:
        spec = self.info.layout[name]
        if self.ep > 1 and spec.expert_dim is not None:
            return expert_zero_state(self.zero, spec, self.ep, moments)
        per_rank = [{"fp32": z.fp32(name), **(z.moments(name) if moments else {})} for z in self.zero]
        return {k: merge_shards(spec, [r[k] for r in per_rank]) for k in per_rank[0]}

    def tensor(self, name: str) -> torch.Tensor:
        return self._zero_state(name, False)["fp32"] if self._optimized(name) else self.module_tensor(name)

    def optimizer_state(self, name: str) -> dict[str, torch.Tensor] | None:
        return self._zero_state(name, True) if self._optimized(name) and self.zero[0].has_moments else None

    def optimizer_note(self) -> str | None:
        """Why the optimizer state cannot be carried to a new layout (``None`` when it can)."""
        stage = self.info.zero_stage
        if stage == 0:
            return "ZeRO stage 0 keeps the optimizer inside the model files; resharding it is not implemented"
        if stage == 3:
            return "ZeRO-3 optimizer partitions are not resharded (fp32 weights are consolidated)"
        if self.bf16_optimizer:
            return "DeepSpeed's bf16 ZeRO-1 optimizer layout is not written by this tool"
        if not self.zero:
            return "the checkpoint has no ZeRO optimizer files"
        return None

    def model_extras(self) -> dict[str, Any]:
        """The DeepSpeed entries of tensor-parallel rank 0's model file other than the weights."""
        return {k: v for k, v in self._model(0).items() if k != "module"}

    def zero_globals(self) -> tuple[dict[str, Any], Any]:
        return self.zero[0].global_state(), self.zero[0].step()


@dataclasses.dataclass
class NativeTarget:
    """The layout to write."""

    tp: int
    dp: int
    config: ModelConfig
    carry_optimizer: bool
    pp: int = 1
    ep: int = 1


def _tmp_save(obj: Any, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    torch.save(obj, part)
    os.replace(part, path)


def write_native(
    src: NativeSource | Any,
    out: Path,
    target: NativeTarget,
    *,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write ``src`` as our training checkpoint ``out/<tag>/`` (+ ``out/latest``) in ``target``'s layout.

    ``transform(name, full)`` adapts a full tensor (vocab re-padding, dtype). Returns the meta written.
    """
    meta_in = copy.deepcopy(getattr(src.info, "meta", {}) or {})
    step_no = int(meta_in.get("step", 0))
    tag = f"global_step{step_no}"
    step = out / tag
    step.mkdir(parents=True, exist_ok=True)
    tp, dp, cfg = target.tp, target.dp, target.config
    layout = ModelLayout(cfg)
    extras = src.model_extras() if hasattr(src, "model_extras") else {}
    names = src.names()
    zero = getattr(src, "zero", None)  # without DeepSpeed's param_shapes (a pipeline's files): the optimized ones
    trained = [n for n in names if not zero or n in zero[0]]  # (an MoE router's correction bias is not)
    shapes_in = extras.get("param_shapes") or layout.param_groups(trained)
    src_ep = getattr(src, "ep", 1) if extras.get("param_shapes") or getattr(src, "ep", 1) == 1 else 0  # 0: unsplit
    groups = target_groups([[n for n in g if n in set(names)] for g in shapes_in], layout, names, src_ep, target.ep, dp)
    if target.pp > 1 and target.ep > 1:
        native_experts.write_stage_models(src, step, layout, target, transform, extras)
    elif target.pp > 1:
        _write_pipeline_layers(src, step, layout, target, transform)
    for t in range(tp if target.pp == 1 else 0):
        module: OrderedDict[str, torch.Tensor] = OrderedDict()
        experts: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {(0, t, e): {} for e in range(target.ep)}
        for _, run in iter_layers(names):
            for name in run:
                module[name] = split_full(layout[name], transform(name, src.module_tensor(name)), t, tp).clone()
                if target.ep > 1 and layout[name].expert_dim is not None:  # the model file: expert rank 0's
                    for e in range(target.ep):
                        experts[(0, t, e)][name] = expert_slice(layout[name], module[name], e, target.ep)
                    module[name] = experts[(0, t, 0)][name].clone()
            src.release()
        save_expert_shards(step, experts if target.ep > 1 else {})
        state = dict(extras)
        state.update(
            {
                "module": module,
                "param_shapes": [OrderedDict((n, torch.Size(module[n].shape)) for n in g) for g in groups.groups],
                "dp_world_size": dp,
                "mp_world_size": tp,
                "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": tp},
                "optimizer": None,
            }
        )
        state.setdefault("global_steps", step_no)
        state.setdefault("skipped_steps", 0)
        state.setdefault("buffer_names", [])
        _tmp_save(state, step / f"mp_rank_{t:02d}_model_states.pt")
        del module, state
    if target.carry_optimizer:
        write_optimizer(src, step, groups, layout, target, transform)
        src.release()
    same_layout = (src.info.tp, src.info.dp) == (tp, dp) and Path(src.info.path, "rng").is_dir()
    if same_layout:
        shutil.copytree(Path(src.info.path) / "rng", step / "rng")
    meta = _converted_meta(src, meta_in, step_no, target)
    (step / META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str), encoding="utf-8")
    write_manifest(step, tag)
    (out / LATEST).write_text(tag, encoding="utf-8")
    return meta


def _converted_meta(src: Any, meta_in: dict[str, Any], step_no: int, target: NativeTarget) -> dict[str, Any]:
    """``meta.json`` of the written checkpoint: the source's, with the new layout, architecture and provenance."""
    meta = meta_in
    meta.setdefault("step", step_no)
    meta.setdefault("consumed_samples", 0)
    # a weights-only checkpoint has no ZeRO files: its model files are laid out as under ZeRO 0-2
    meta["layout"] = {
        "tp": target.tp,
        "pp": target.pp,
        "dp": target.dp,
        "dp_x_cp": target.dp,  # written for runs without context parallelism
        "zero_stage": src.info.zero_stage if target.carry_optimizer else 0,
        **({"ep": target.ep} if target.ep > 1 else {}),
    }
    meta["weights_only"] = not target.carry_optimizer
    config = meta.setdefault("config", {})
    config["model"] = {**config.get("model", {}), **dataclasses.asdict(target.config)}
    par = config.setdefault("parallel", {})
    par.update(
        {
            "tensor_model_parallel_size": target.tp,
            "pipeline_model_parallel_size": target.pp,
            "data_parallel_size": target.dp,
            "expert_parallel_size": target.ep,
        }
    )
    data = config.setdefault("data", {})
    if not data.get("tokenizer_model") and src.info.tokenizer_files:  # an imported release's own tokenizer
        data["tokenizer_model"] = str(Path(src.info.tokenizer_files[0]).resolve())
    meta["converted_from"] = {
        "path": src.info.path,
        "format": src.info.format,
        "tp": src.info.tp,
        "pp": src.info.pp,
        "dp": src.info.dp,
        "zero_stage": src.info.zero_stage,
    }
    return meta


def _write_pipeline_layers(
    src: Any,
    step: Path,
    layout: ModelLayout,
    target: NativeTarget,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
) -> None:
    """Weights-only pipeline layout: DeepSpeed's ``layer_XX-model_YY`` files, one per pipe layer and TP rank."""
    for pipe in layout.saved_pipe_layers:
        full = {n: transform(n, src.module_tensor(n)) for n in pipe.names}
        for t in range(target.tp):
            shard = OrderedDict((n, split_full(layout[n], v, t, target.tp).clone()) for n, v in full.items())
            _tmp_save(shard, layer_file(step, pipe.index, t))
        src.release()
