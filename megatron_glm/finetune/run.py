"""``finetune(cfg, task)``: what ``finetune_glm.py`` runs. The pretraining trainer with a task loss.

Start: the model architecture and tokenizer come from the checkpoint ``cfg.checkpoint.load`` (any layout or
format we read), its weights are loaded with a fresh optimizer and schedule. When ``cfg.checkpoint.save``
already holds a checkpoint of this fine-tuning run, the run resumes from it exactly instead (data position,
optimizer, schedule, RNG), so re-running the same command continues an interrupted run.

Evaluation (every ``--eval-interval`` steps and at the end) logs one ``[eval]`` line and one JSON object in
``<save>/metrics.jsonl`` with ``step``, ``valid_loss`` and the task metrics: ``accuracy`` (and
``f1_macro`` when every example has the same choices) for cloze; ``rouge1``, ``rouge2``, ``rougeL``,
``bleu`` for seq2seq (generated with beam search; not under pipeline parallelism, where
``tools/evaluate.py`` scores the saved checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from megatron_glm.checkpoint import check_save_dir
from megatron_glm.checkpoint.manager import list_checkpoints, write_text_atomic
from megatron_glm.checkpoint.weights import load_model_weights
from megatron_glm.config import GLMConfig, config_to_dict, validate
from megatron_glm.config.architecture import adopt_architecture
from megatron_glm.config.validate import local_device_type
from megatron_glm.data.tokenizer import open_tokenizer, tokenizer_fingerprint
from megatron_glm.errors import CheckpointError, ConfigError
from megatron_glm.fileio import file_sha256
from megatron_glm.finetune.config import FinetuneConfig
from megatron_glm.finetune.encode import TaskDataset, TaskEncoder, encode_examples, num_choices, task_batches
from megatron_glm.finetune.evaluate import gather_strings, generate_targets, generation_config
from megatron_glm.finetune.loss import TaskLoss
from megatron_glm.finetune.metrics import classification_metrics, generation_metrics
from megatron_glm.finetune.tasks import read_task_file
from megatron_glm.model import flops_per_token
from megatron_glm.parallel import initialize_parallel_state
from megatron_glm.parallel.launch import launcher_log, launcher_world_size
from megatron_glm.training.determinism import apply_determinism
from megatron_glm.training.distributed import finish_distributed, init_distributed
from megatron_glm.training.lifeline import die_with_parent, launched_by_launcher
from megatron_glm.training.rng import seed_everything
from megatron_glm.training.run import trainer_services
from megatron_glm.training.setup import build_engine, build_model
from megatron_glm.training.trainer import Trainer, TrainState


def source_model(load: str) -> tuple[Any, str]:
    """``(model config, tokenizer path)`` of the checkpoint to fine-tune from."""
    from megatron_glm.checkpoint.convert import open_source

    src = open_source(Path(load))
    meta = getattr(src.info, "meta", None) or {}
    tokenizer = meta.get("config", {}).get("data", {}).get("tokenizer_model", "")
    if not tokenizer and src.info.tokenizer_files:
        tokenizer = src.info.tokenizer_files[0]
    config = src.info.config
    src.release()
    return config, tokenizer


def task_config(cfg: GLMConfig, task: FinetuneConfig, log: Callable[[str], None] = print) -> GLMConfig:
    """``cfg`` with the checkpoint's architecture (the whole of it: a command line that contradicts it is refused,
    :func:`~megatron_glm.config.architecture.adopt_architecture`) and tokenizer and the task's row length."""
    if not cfg.checkpoint.load:
        raise ConfigError("--load CKPT is required: the checkpoint to fine-tune (any layout or format we read)")
    model, tokenizer = source_model(cfg.checkpoint.load)
    cfg = adopt_architecture(cfg, model.architecture(), cfg.checkpoint.load, log)
    m = cfg.model
    tok = cfg.data.tokenizer_model or tokenizer
    if not tok:
        raise ConfigError(f"{cfg.checkpoint.load} does not name its tokenizer: pass --tokenizer-model PATH.model")
    if task.seq_length > m.max_sequence_length:
        raise ConfigError(
            f"--source-length {task.source_length} + --target-length {task.target_length} + 3 = "
            f"{task.seq_length} exceeds the model's {m.max_sequence_length} positions"
        )
    data = dataclasses.replace(cfg.data, seq_length=task.seq_length, tokenizer_model=tok, num_workers=0)
    return dataclasses.replace(
        cfg, model=m, data=data, checkpoint=dataclasses.replace(cfg.checkpoint, load_weights_only=True)
    )


def task_identity(cfg: GLMConfig, task: FinetuneConfig, global_batch: int) -> dict[str, Any]:
    """What a resumed fine-tuning run must share with the run that saved (the training file by sha256 in
    place of a dataset; see :mod:`megatron_glm.training.drift`)."""
    return {
        "data": [[1.0, os.path.abspath(task.train_data), file_sha256(task.train_data)]],
        "tokenizer_sha256": tokenizer_fingerprint(cfg.data.tokenizer_model),
        "seq_length": cfg.data.seq_length,
        "global_batch_size": int(global_batch),
        "seed": cfg.training.seed,
        "split": cfg.data.split,
    }


class _Capture:
    """Stands in for the metrics logger while the base evaluation runs (its values are merged and logged
    once, with the task metrics)."""

    def log(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        self.values = values


class FinetuneTrainer(Trainer):
    """:class:`Trainer` whose loss is a :class:`TaskLoss` and whose evaluation adds the task metrics."""

    def __init__(
        self,
        *args: Any,
        task: FinetuneConfig,
        task_loss: TaskLoss,
        encoder: TaskEncoder,
        valid_examples: list[Any],
        classes: bool,
        vocab_rows: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.task, self.task_loss, self.encoder = task, task_loss, encoder
        self.valid_examples, self.classes, self.vocab_rows = valid_examples, classes, vocab_rows
        self.last_eval_step = -1
        self._warned = False

    def evaluate(self) -> dict[str, float]:
        self.task_loss.pop_counts()
        logger, self.logger = self.logger, _Capture()
        try:
            base = super().evaluate()
        finally:
            self.logger = logger
        keep = ("valid_loss", "valid_ppl") if self.task.task == "seq2seq" else ("valid_loss",)  # ppl: per token
        values: dict[str, Any] = {k: base[k] for k in keep if k in base}
        values.update(self._cloze_metrics() if self.task.task == "cloze" else self._seq2seq_metrics())
        self.logger.log(self.state.step, values, prefix="[eval] ")
        self.last_eval_step = self.state.step
        return values

    def _cloze_metrics(self) -> dict[str, float]:
        counts = self.task_loss.pop_counts().to(self.device)
        dist.all_reduce(counts)  # tensor-parallel ranks hold copies; other pipeline stages add zeros
        return classification_metrics(counts.cpu() / self.ps.tp_size, classes=self.classes)

    def _seq2seq_metrics(self) -> dict[str, float]:
        if self.pipelined:
            if not self._warned:
                self.log(
                    "note: seq2seq generation metrics are not computed under pipeline parallelism; run "
                    "tools/evaluate.py --task seq2seq on the saved checkpoint"
                )
                self._warned = True
            return {}
        examples = self.valid_examples[: self.task.eval_generate or None]
        ps = self.ps
        mine = list(range(ps.dp_rank, len(examples), ps.dp_size))
        config = generation_config(self.task, self.encoder.tokenizer, self.vocab_rows)
        texts = generate_targets(self.model, self.encoder, [examples[i] for i in mine], config, ps)
        pairs = gather_strings(list(zip(mine, texts)))
        hypotheses = [text for _, text in pairs]
        self.engine.train()
        return generation_metrics(hypotheses, [ex.target for ex in examples])


def finetune(cfg: GLMConfig, task: FinetuneConfig) -> TrainState:
    """Fine-tune as configured; returns the final state. One process per device (deepspeed/torchrun)."""
    task.check(need_train=True)
    started = time.perf_counter()
    cfg = task_config(cfg, task, log=launcher_log)
    validate(cfg, launcher_world_size(), local_device_type())  # once, before any process group starts
    tokenizer = open_tokenizer(cfg.data.tokenizer_model)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {cfg.data.tokenizer_model} has {tokenizer.vocab_size} tokens, more than the "
            f"checkpoint's {cfg.model.vocab_size} embedding rows"
        )
    # Data first: a malformed task file is reported before distributed, model and engine set-up.
    train_examples = read_task_file(task.train_data, task.task)
    valid_examples = read_task_file(task.valid_data, task.task) if task.valid_data else []
    choices = num_choices(train_examples + valid_examples) if task.task == "cloze" else 1
    classes = task.task == "cloze" and len({ex.choices for ex in train_examples + valid_examples}) == 1
    rows = dict(rows_per_example=choices, seq_length=task.seq_length, pad=tokenizer.pad_id)
    train_ds = TaskDataset(
        encode_examples(TaskEncoder(tokenizer, task, task.train_data), train_examples, task.task, choices),
        shuffle=True,
        seed=cfg.training.seed,
        **rows,
    )
    valid_ds = None
    if valid_examples:
        valid_ds = TaskDataset(
            encode_examples(TaskEncoder(tokenizer, task, task.valid_data), valid_examples, task.task, choices),
            shuffle=False,
            **rows,
        )

    if launched_by_launcher():
        die_with_parent()  # a killed launcher takes its workers down (no orphans writing checkpoints)
    t = cfg.training
    apply_determinism(t.deterministic)  # before CUDA starts (cuBLAS reads its workspace setting once)
    env, heartbeat = init_distributed(t.local_rank, t.distributed_timeout_minutes, t.heartbeat_timeout)
    p = cfg.parallel
    ps = initialize_parallel_state(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    is_logger = env.rank == 0
    log = print if is_logger else (lambda *_: None)
    mbs = cfg.training.micro_batch_size
    eval_steps = -(-len(valid_examples) // (mbs * ps.dp_size))
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, eval_iters=max(eval_steps, 1)))
    if cfg.checkpoint.save:  # every rank: a read-only or full save directory is reported by all, at once
        save_dir = check_save_dir(cfg.checkpoint.save)
        if is_logger:
            doc = {**config_to_dict(cfg), "finetune": dataclasses.asdict(task)}
            try:
                write_text_atomic(save_dir / "config.yaml", yaml.safe_dump(doc, sort_keys=False))
            except OSError as exc:
                raise CheckpointError(f"--save {save_dir}: cannot write config.yaml ({exc.strerror or exc})") from None
    seed_everything(cfg.training.seed, ps.pp_rank)
    log(
        f"megatron_glm finetune ({task.task}): world {env.world_size} = tp {ps.tp_size} x pp {ps.pp_size} x dp "
        f"{ps.dp_size}; {len(train_examples)} training / {len(valid_examples)} held-out examples, "
        f"{choices} row(s) of {task.seq_length} tokens each; from {cfg.checkpoint.load}"
    )

    task_loss = TaskLoss(
        task.task, ps, num_choices=choices, scoring=task.cloze_scoring, label_smoothing=task.label_smoothing
    )
    built = build_model(cfg, ps, env.device, loss=task_loss)  # the model's (or last stage's) loss
    model = built.module
    resuming = bool(cfg.checkpoint.save and list_checkpoints(cfg.checkpoint.save))
    if not resuming:
        loaded = load_model_weights(model, cfg.checkpoint.load, ps.tp_size, ps.tp_rank)
        log(f"loaded model weights from {loaded}; optimizer and schedule start fresh")
    engine, accum, global_batch = build_engine(cfg, ps, model)

    def train_batches(consumed: int):
        return task_batches(
            train_ds,
            consumed_samples=consumed,
            micro_batch_size=mbs,
            dp_rank=ps.dp_rank,
            dp_size=ps.dp_size,
            pin_memory=env.device.type == "cuda",
        )

    def valid_batches():
        return task_batches(
            valid_ds,
            consumed_samples=0,
            micro_batch_size=mbs,
            dp_rank=ps.dp_rank,
            dp_size=ps.dp_size,
            pin_memory=env.device.type == "cuda",
        )

    flops_sample = flops_per_token(cfg.model, task.seq_length) * task.seq_length * choices
    services = trainer_services(cfg, env.device, is_logger, log)
    trainer = FinetuneTrainer(
        cfg,
        ps,
        engine,
        env.device,
        rng_tracker=built.rng_tracker,
        pipeline_loss=built.loss,
        train_batches=train_batches,
        valid_batches=valid_batches if valid_ds is not None else None,
        accumulation_steps=accum,
        global_batch_size=global_batch,
        flops_per_sample=flops_sample,
        started=started,
        **services,
        task=task,
        task_loss=task_loss,
        encoder=TaskEncoder(tokenizer, task, task.valid_data),
        valid_examples=valid_examples,
        classes=classes,
        vocab_rows=cfg.model.vocab_size,
    )
    trainer.identity = task_identity(cfg, task, global_batch)
    if resuming:
        trainer.resume(cfg.checkpoint.save)
    log(
        f"set-up took {time.perf_counter() - started:.1f} s; training {cfg.training.train_iters} steps of "
        f"{global_batch} examples (micro-batch {mbs} x accumulation {accum} x dp {ps.dp_size})"
    )
    state = trainer.train()
    if valid_ds is not None and trainer.last_eval_step != state.step:
        trainer.evaluate()
    services["logger"].close()
    log(f"done: step {state.step}, {state.consumed_samples} examples, {time.perf_counter() - started:.1f} s")
    finish_distributed(heartbeat)
    return state
