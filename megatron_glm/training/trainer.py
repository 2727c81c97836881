"""The training loop: DeepSpeed steps, per-objective logging, evaluation, non-finite skips, checkpoints, signals."""

from __future__ import annotations

import resource
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.batch import OBJECTIVE_NAMES, Batch
from megatron_glm.checkpoint import CheckpointManager
from megatron_glm.checkpoint.lora import check_lora_resume
from megatron_glm.config import GLMConfig, config_to_dict
from megatron_glm.config.ranges import in_ranges, parse_iteration_ranges
from megatron_glm.errors import CheckpointError, GLMError
from megatron_glm.model.glm import loss_rows
from megatron_glm.model.loss import group_sums_dict, group_sums_tensor
from megatron_glm.model.masks import CAUSAL, batch_attention_mask, is_causal_sep
from megatron_glm.parallel import ParallelState, RNGStatesTracker
from megatron_glm.parallel.context_parallel import ContextParallel, reduce_loss, split_batch
from megatron_glm.training.drift import identity_drift
from megatron_glm.training.evaluation import accumulate_losses, summarize_losses
from megatron_glm.training.expert_load import ExpertLoad
from megatron_glm.training.metrics import MetricsLogger
from megatron_glm.training.pipeline import StageLoss, pipeline_batch
from megatron_glm.training.rng import get_rng_state, set_rng_state
from megatron_glm.training.step_stats import StepStats, loss_part_names, part_means

LOSS_ROWS = "loss_rows"
"""The key under which :meth:`Trainer._to_device` adds the batch's host-computed loss rows."""


@dataclass
class TrainState:
    """Where the run is: resumable from a checkpoint's meta."""

    step: int = 0
    consumed_samples: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0


class Trainer:
    """Runs ``cfg.training.train_iters`` optimizer steps on a DeepSpeed engine wrapping a GLM model.

    ``rng_tracker``: the model's tensor-parallel dropout stream (saved with checkpoints). ``pipeline_loss``:
    the pipeline engine's loss function (it keeps the per-objective sums, see :class:`StageLoss`); ``None``
    without pipelining.
    """

    def __init__(
        self,
        cfg: GLMConfig,
        parallel_state: ParallelState,
        engine: Any,
        device: torch.device,
        *,
        rng_tracker: RNGStatesTracker,
        pipeline_loss: StageLoss | None = None,
        train_batches: Callable[[int], Iterator[Batch]],
        valid_batches: Callable[[], Iterator[Batch]] | None,
        accumulation_steps: int,
        global_batch_size: int,
        flops_per_sample: float,
        peak_flops: float,
        checkpoints: CheckpointManager,
        logger: MetricsLogger,
        log: Callable[[str], None] = print,
        started: float | None = None,
    ) -> None:
        self.cfg, self.ps, self.engine, self.device = cfg, parallel_state, engine, device
        self.train_batches, self.valid_batches = train_batches, valid_batches
        self.accum, self.global_batch = accumulation_steps, global_batch_size
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self.checkpoints, self.logger, self.log = checkpoints, logger, log
        self.rng_tracker, self.pipeline_loss = rng_tracker, pipeline_loss
        self.cp = ContextParallel.of(parallel_state)  # this rank's positions of every sequence, the loss reduced
        self.state = TrainState()
        self.started = time.perf_counter() if started is None else started  # for exit_duration_in_mins
        self.skip_ranges = parse_iteration_ranges(cfg.training.skip_train_iteration_range)
        self._stop_signal = 0
        self._last_saved = -1
        self.identity: dict[str, Any] = {}
        """What a resume must share with this run (:func:`~megatron_glm.training.drift.run_identity`)."""
        self.expert_load = ExpertLoad.of(cfg.model)
        """The MoE routers' per-expert load of the last step, logged over every stage's layers."""
        self.lora: dict[str, Any] = {}
        """A LoRA run's record (:func:`~megatron_glm.checkpoint.lora.lora_record`): saved, checked on resume."""

    # ----------------------------------------------------------------- helpers
    @property
    def model(self) -> Any:
        """The module the engine wraps (a ``GLMModel`` or this rank's pipeline stage)."""
        return self.engine.module

    def _to_device(self, batch: Batch) -> Batch:
        """The batch on the device, with its loss rows found on the host first (the device would wait for them);
        under context parallelism this rank's positions of the sequence (``split_batch``: the mask stays global)."""
        if self.cp is not None:
            batch = split_batch(batch, self.cp.size, self.cp.rank)
        moved: dict[str, Any] = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if "loss_mask" in batch:
            moved[LOSS_ROWS] = loss_rows(batch["loss_mask"]).to(self.device, non_blocking=True)
        if "sep" in batch and "doc_ids" not in batch:
            moved[CAUSAL] = is_causal_sep(batch["sep"])  # causal attention kernels for a causal batch
        return moved

    def _forward(self, batch: Batch) -> Any:
        """The model's loss (its :class:`~megatron_glm.model.objective.LossFunction`) of a batch on the device."""
        self._set_head_grad_scale()
        # The model runs the head on Part B (loss) rows only (fused with the loss when model.head_chunk_size > 0).
        out = self.engine(
            batch["input_ids"],
            batch["position_ids"],
            batch_attention_mask(batch),
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
            loss_rows=batch.get(LOSS_ROWS),
            objective=batch.get("objective"),
        )
        return out if self.cp is None else reduce_loss(out, self.cp)  # the whole sequence's loss, as one rank's

    def _set_head_grad_scale(self) -> None:
        """Under fp16, tell the head (the model, or the pipeline's head stage) what backward will multiply the mean
        loss by: the fused head rounds its fp16 gradient at that scale."""
        if self.cfg.training.precision != "fp16":
            return
        opt = self.engine.optimizer
        scale = float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0))) / self.accum
        for module in self.model.modules():
            if hasattr(module, "head_grad_scale"):
                module.head_grad_scale = scale

    def _all_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every rank: the one host synchronisation of a micro-batch."""
        flag = torch.isfinite(value).all().to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _world_sum(self, values: list[float]) -> list[float]:
        """Sum over all ranks. Ratios of such sums are exact averages: tensor-parallel ranks hold copies
        (numerator and denominator scale alike) and pipeline stages without a loss contribute zeros."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # ----------------------------------------------------------------- state
    def meta(self) -> dict[str, Any]:
        ps = self.ps
        return {
            "step": self.state.step,
            "consumed_samples": self.state.consumed_samples,
            "nonfinite_total": self.state.nonfinite_total,
            "layout": {
                "tp": ps.tp_size,
                "pp": ps.pp_size,
                "dp": ps.dp_size,
                "cp": ps.cp_size,
                "dp_x_cp": ps.grad_dp_size,
                **({"ep": ps.ep_size} if ps.ep_size > 1 else {}),
                "zero_stage": self.engine.zero_optimization_stage(),
            },
            "config": config_to_dict(self.cfg),
            "identity": self.identity,
            **({"lora": self.lora} if self.lora else {}),
        }

    def save(self) -> None:
        """Save a checkpoint; never while a run of non-finite losses goes on (nor of non-finite weights)."""
        if self.state.nonfinite_streak:
            self.checkpoints.require_finite(self.engine, self.state.step)
            self.log(
                f"warning: step {self.state.step}: not saving (nor pruning) during {self.state.nonfinite_streak} "
                f"consecutive step(s) with non-finite loss"
            )
            return
        path = self.checkpoints.save(self.engine, self.state.step, self.meta(), get_rng_state(self.rng_tracker))
        self._last_saved = self.state.step
        self.log(f"saved checkpoint {path}")

    def resume(self, load_dir: str) -> bool:
        """Load the newest usable checkpoint of ``load_dir``; False when there is none."""
        ps = self.ps
        expect = {"tp": ps.tp_size, "pp": ps.pp_size, "dp": ps.dp_size, "ep": ps.ep_size}
        if self.engine.zero_optimization_stage() > 0 or self.cfg.training.precision == "bf16":
            expect["dp_x_cp"] = ps.grad_dp_size  # the optimizer's shards (ZeRO, DeepSpeed's bf16 optimizer)
        loaded = self.checkpoints.load(self.engine, load_dir, expect=expect)
        if loaded is None:
            self.log(f"warning: no checkpoint in {load_dir}; starting from scratch")
            return False
        meta, rng = loaded
        check_lora_resume(meta, self.lora, load_dir)
        self._check_drift(load_dir, meta)
        self.state = TrainState(
            step=int(meta["step"]),
            consumed_samples=int(meta["consumed_samples"]),
            nonfinite_total=int(meta.get("nonfinite_total", 0)),
        )
        set_rng_state(rng, self.rng_tracker)
        self.logger.rewind(self.state.step)
        self._last_saved = self.state.step
        self.log(f"resumed from {load_dir} at step {self.state.step} ({self.state.consumed_samples} samples)")
        return True

    def _check_drift(self, load_dir: str, meta: dict[str, Any]) -> None:
        """Refuse to resume a different run (other data, tokenizer, seq length, batch, seed or split)."""
        if not self.identity:
            return
        drift = identity_drift(meta, self.identity)
        if not drift:
            return
        if self.cfg.checkpoint.override_config:
            self.log(
                f"warning: resuming {load_dir} although it differs ({'; '.join(drift)}): "
                f"--override-checkpoint-config given"
            )
            return
        raise CheckpointError(
            f"{load_dir}: this run differs from the checkpoint's: {'; '.join(drift)}; resume "
            f"with the same settings, or pass --override-checkpoint-config to continue anyway"
        )

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = self._stop_signal or signum  # the first one (Ctrl-C, then the launcher's SIGTERM)

    def _stop_reason(self) -> str:
        """Why to save and stop after this step ("" to go on); one collective, so every rank agrees."""
        t = self.cfg.training
        minutes = (time.perf_counter() - self.started) / 60.0
        over_time = bool(t.exit_duration_in_mins) and minutes > t.exit_duration_in_mins
        flags = torch.tensor([float(self._stop_signal), 1.0 if over_time else 0.0], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item() > 0:
            return f"received signal {self._stop_signal or 'on another rank'}"
        if flags[1].item() > 0:
            return f"exit duration of {t.exit_duration_in_mins:g} min reached"
        if t.exit_interval and self.state.step % t.exit_interval == 0 and self.state.step < t.train_iters:
            return f"exit interval {t.exit_interval} reached"
        return ""

    def skip_step(self, batches: Iterator[Any]) -> None:
        """Consume one step's micro-batches without a forward pass or an update (bad-data ranges)."""
        for _ in range(self.accum):
            next(batches)

    # ----------------------------------------------------------------- loop
    @property
    def pipelined(self) -> bool:
        return self.pipeline_loss is not None

    def _pipeline_step(self, batches: Iterator[Any]) -> StepStats:
        """One step of DeepSpeed's pipeline schedule (1F1B over ``accum`` micro-batches)."""
        stats = StepStats(lr=float(self.engine.optimizer.param_groups[0]["lr"]))
        self._set_head_grad_scale()
        loss = self.engine.train_batch(data_iter=batches)
        self._balance_experts()
        stats.micro_batches = self.accum
        if self._all_finite(loss.detach().float()):
            stats.loss_sum = loss.detach().double() * self.accum  # the engine's mean over micro-batches and DP ranks
            stats.parts = self.pipeline_loss.pop_parts()  # the last stage's (the other stages count none)
            stats.objectives = group_sums_tensor(self.pipeline_loss.pop(), self.device)
        else:  # the pipeline engine cannot skip a micro-batch: the step is counted, not undone
            stats.nonfinite = self.accum
            self.pipeline_loss.pop()
        return stats

    def train_step(self, batches: Iterator[Any]) -> StepStats:
        """One optimizer step over ``accum`` micro-batches."""
        if self.pipelined:
            return self._pipeline_step(batches)
        stats = StepStats()
        self.engine.train()
        for _ in range(self.accum):
            batch = self._to_device(next(batches))
            out = self._forward(batch)
            if self._all_finite(out.loss):
                self.engine.backward(out.loss)
                stats.loss_sum += out.loss.detach().double()
                stats.add_objectives(out.group_sums(batch["objective"]))
                stats.parts.add(out.parts)
            else:  # skip this micro-batch's contribution: zero gradients, same collective pattern
                stats.nonfinite += 1
                zero = sum(p.sum() for p in self.engine.module.parameters() if p.requires_grad) * 0.0
                self.engine.backward(zero)
            stats.micro_batches += 1
            stats.lr = float(self.engine.optimizer.param_groups[0]["lr"])  # the rate this step applies
            self.engine.step()
        self._balance_experts()
        return stats

    def _balance_experts(self) -> None:
        """After the step: the MoE routers' aux-loss-free bias update (loads summed over data-parallel ranks,
        so every rank applies the same one); their per-expert loads are logged with the next step's metrics."""
        if self.cfg.model.num_experts:
            self.expert_load.update(self.model, self.ps.dp_group)

    def train(self) -> TrainState:
        cfg, st = self.cfg, self.state
        t = cfg.training
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        batches = self.train_batches(st.consumed_samples)
        if self.pipelined:
            batches = map(partial(pipeline_batch, cp=self.cp), batches)
        window_start, window_steps, window = time.perf_counter(), 0, StepStats()
        compiling = t.compile  # the first step of this process compiles: timed apart from the steady state
        try:
            while st.step < t.train_iters:
                if in_ranges(st.step + 1, self.skip_ranges):
                    self.skip_step(batches)
                    st.step += 1
                    st.consumed_samples += self.global_batch
                    self.log(
                        f"step {st.step}: skipped (training.skip_train_iteration_range), "
                        f"{self.global_batch} samples consumed"
                    )
                    if not window_steps:
                        window_start = time.perf_counter()
                else:
                    self._train_and_log(self.train_step(batches), window)
                    window_steps += 1
                    if compiling:
                        compiling = False
                        self.log(
                            f"first step (includes torch.compile): {time.perf_counter() - window_start:.1f} s; "
                            f"excluded from step times"
                        )
                        if st.step % cfg.logging.log_interval and st.step != t.train_iters:
                            window_start, window_steps = time.perf_counter(), 0
                if window_steps and (st.step % cfg.logging.log_interval == 0 or st.step == t.train_iters):
                    elapsed = time.perf_counter() - window_start
                    self._log_step(window, elapsed / window_steps)
                    window_start, window_steps, window = time.perf_counter(), 0, StepStats()
                if self.valid_batches and t.eval_interval and st.step % t.eval_interval == 0:
                    self.evaluate()
                    window_start = time.perf_counter()
                if cfg.checkpoint.save and cfg.checkpoint.save_interval and st.step % cfg.checkpoint.save_interval == 0:
                    self.save()
                    window_start = time.perf_counter()
                reason = self._stop_reason()
                if reason:
                    self.log(f"{reason}: saving and stopping at step {st.step}")
                    break
            if cfg.checkpoint.save and self._last_saved != st.step:
                self.save()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return st

    def _train_and_log(self, stats: StepStats, window: StepStats) -> None:
        """Account one trained step: position, window of logged stats, the non-finite streak."""
        st, t = self.state, self.cfg.training
        st.step += 1
        st.consumed_samples += self.global_batch
        window.merge(stats)
        if stats.nonfinite:
            st.nonfinite_total += stats.nonfinite
            st.nonfinite_streak += 1
            self.log(f"warning: step {st.step}: {stats.nonfinite} non-finite micro-batch loss(es) skipped")
            if st.nonfinite_streak >= t.max_nonfinite_steps:
                raise GLMError(
                    f"{st.nonfinite_streak} consecutive steps with non-finite loss (limit "
                    f"training.max_nonfinite_steps={t.max_nonfinite_steps}); lower the "
                    f"learning rate or check the data"
                )
        else:
            st.nonfinite_streak = 0

    def _log_step(self, stats: StepStats, step_time: float) -> None:
        """Log the averages of a window of steps (loss, the total, and its parts: means over its micro-batches and
        DP ranks; :mod:`~megatron_glm.training.step_stats`)."""
        names, loads = loss_part_names(self.cfg.model), self.expert_load.values()  # the loads: every stage's layers
        summed = self._world_sum(
            [float(stats.loss_sum), stats.micro_batches - stats.nonfinite, *stats.parts.values(names), *loads]
        )
        loss_sum, micro, parts = summed[0], summed[1], summed[2 : len(summed) - len(loads)]
        values: dict[str, Any] = {"loss": loss_sum / micro if micro else float("nan"), **part_means(names, parts)}
        summary = summarize_losses(group_sums_dict(stats.objectives), self._world_sum)
        values.update({f"loss_{n}": summary[f"loss_{n}"] for n in OBJECTIVE_NAMES if f"loss_{n}" in summary})
        opt = self.engine.optimizer
        values["lr"] = stats.lr
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            values["grad_norm"] = float(norm)
        if self.cfg.training.precision == "fp16":
            values["loss_scale"] = float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)))
        samples_per_s = self.global_batch / step_time
        tokens_per_s = samples_per_s * self.cfg.data.seq_length
        values.update(
            {
                "step_time_s": step_time,
                "samples_per_s": samples_per_s,
                "tokens_per_s": tokens_per_s,
                "mfu": self.flops_per_sample * samples_per_s / self.peak_flops if self.peak_flops else 0.0,
                "peak_mem_mb": peak_memory_mb(self.device),
                "consumed_samples": self.state.consumed_samples,
            }
        )
        values.update(self.expert_load.metrics(summed[len(summed) - len(loads) :]))
        if self.state.nonfinite_total:
            values["nonfinite_total"] = self.state.nonfinite_total
        self.logger.log(self.state.step, values)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity (overall and per objective) over ``eval_iters`` micro-batches."""
        assert self.valid_batches is not None
        self.engine.eval()
        batches = self.valid_batches()
        if self.pipelined:
            self.pipeline_loss.pop()
            batches = map(partial(pipeline_batch, cp=self.cp), batches)
            self.engine.eval_batch(batches, num_micro_batches=self.cfg.training.eval_iters)
            sums = self.pipeline_loss.pop()
        else:
            sums = accumulate_losses(lambda b: self._forward(self._to_device(b)), batches, self.cfg.training.eval_iters)
        summary = summarize_losses(sums, self._world_sum)
        values = {f"valid_{k}": v for k, v in summary.items() if k != "tokens"}
        self.logger.log(self.state.step, values, prefix="[eval] ")
        self.engine.train()
        return values


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or the resident-set peak on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
