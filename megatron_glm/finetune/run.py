"""``finetune(cfg, task)``: what ``finetune_glm.py`` runs. The pretraining trainer with a task loss.

Start: the model architecture and tokenizer come from the checkpoint ``cfg.checkpoint.load`` (any layout or
format we read), its weights are loaded with a fresh optimizer and schedule. When ``cfg.checkpoint.save``
already holds a checkpoint of this fine-tuning run, the run resumes from it exactly instead (data position,
optimizer, schedule, RNG), so re-running the same command continues an interrupted run.

Evaluation (every ``--eval-interval`` steps and at the end) logs one ``[eval]`` line and one JSON object in
``<save>/metrics.jsonl`` with ``step``, ``valid_loss`` and the task metrics: ``accuracy`` (and
``f1_macro`` when every example has the same choices) for cloze; ``rouge1``, ``rouge2``, ``rougeL``,
``bleu`` for seq2seq (generated with beam search; not under pipeline parallelism, where
``tools/evaluate.py`` scores the saved checkpoint); ``reply_1 ..`` for chat (:mod:`.chat_run`; not under
pipeline parallelism either), which is also evaluated once before the first step.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_glm.checkpoint.manager import list_checkpoints
from megatron_glm.config import GLMConfig, ModelConfig, config_to_dict, validate
from megatron_glm.config.architecture import adopt_architecture
from megatron_glm.config.validate import local_device_type
from megatron_glm.data.tokenizer import open_tokenizer, tokenizer_fingerprint
from megatron_glm.errors import ConfigError
from megatron_glm.fileio import file_sha256
from megatron_glm.finetune.chat_run import chat_data, chat_replies
from megatron_glm.finetune.chat_template import ChatTemplate
from megatron_glm.finetune.config import FinetuneConfig
from megatron_glm.finetune.encode import TaskDataset, TaskEncoder, encode_examples, num_choices, task_batches
from megatron_glm.finetune.evaluate import gather_strings, generate_targets, generation_config
from megatron_glm.finetune.loss import TaskLoss
from megatron_glm.finetune.metrics import classification_metrics, generation_metrics
from megatron_glm.finetune.tasks import read_task_file
from megatron_glm.model import flops_per_token
from megatron_glm.parallel.launch import launcher_log, launcher_world_size
from megatron_glm.training.bootstrap import batch_streams, new_trainer, open_save_dir, start_run, train_and_finish
from megatron_glm.training.rng import seed_everything
from megatron_glm.training.setup import build_engine, build_model, load_lora_base
from megatron_glm.training.trainer import Trainer, TrainState


def source_model(load: str) -> tuple[ModelConfig, str]:
    """``(model config, tokenizer path)`` of the checkpoint to fine-tune from."""
    from megatron_glm.checkpoint.formats.registry import open_source

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
    if cfg.parallel.context_parallel_size > 1:  # --dry-run included
        raise ConfigError("fine-tuning runs without context parallelism: drop --context-parallel-size")
    if cfg.lora.base and os.path.abspath(cfg.lora.base) != os.path.abspath(cfg.checkpoint.load):
        raise ConfigError(
            f"--lora-base {cfg.lora.base}: fine-tuning puts the adapters on --load ({cfg.checkpoint.load}); "
            "drop --lora-base"
        )
    model, tokenizer = source_model(cfg.checkpoint.load)
    cfg = adopt_architecture(cfg, model.architecture(), cfg.checkpoint.load, log)
    m = cfg.model
    tok = cfg.data.tokenizer_model or tokenizer
    if not tok:
        raise ConfigError(f"{cfg.checkpoint.load} does not name its tokenizer: pass --tokenizer-model PATH.model")
    if task.task == "chat" and task.chat_length > m.max_sequence_length:
        raise ConfigError(f"--chat-length {task.chat_length} exceeds the model's {m.max_sequence_length} positions")
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
        chat: ChatTemplate | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.chat = chat
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
        keep = ("valid_loss",) if self.task.task == "cloze" else ("valid_loss", "valid_ppl")  # ppl: per token
        values: dict[str, Any] = {k: base[k] for k in keep if k in base}
        metrics = {"cloze": self._cloze_metrics, "seq2seq": self._seq2seq_metrics, "chat": self._chat_metrics}
        values.update(metrics[self.task.task]())
        self.logger.log(self.state.step, values, prefix="[eval] ")
        self.last_eval_step = self.state.step
        return values

    def _cloze_metrics(self) -> dict[str, float]:
        counts = self.task_loss.pop_counts().to(self.device)
        dist.all_reduce(counts)  # tensor-parallel ranks hold copies; other pipeline stages add zeros
        return classification_metrics(counts.cpu() / self.ps.tp_size, classes=self.classes)

    def _no_generation(self) -> bool:
        """Under pipeline parallelism: generation is left out (noted once)."""
        if self.pipelined and not self._warned:
            hint = (
                "; run tools/evaluate.py --task seq2seq on the saved checkpoint" if self.task.task == "seq2seq" else ""
            )
            self.log(f"note: {self.task.task} generation metrics are not computed under pipeline parallelism{hint}")
            self._warned = True
        return self.pipelined

    def _chat_metrics(self) -> dict[str, Any]:
        if self._no_generation() or self.chat is None or not self.task.chat_replies:
            return {}
        conversations = self.valid_examples[: self.task.chat_replies]
        out = chat_replies(self.model, self.chat, conversations, self.task.target_length, self.vocab_rows, self.ps)
        self.engine.train()
        return out

    def _seq2seq_metrics(self) -> dict[str, float]:
        if self._no_generation():
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


@dataclasses.dataclass
class TaskData:
    """The task's examples and their encoded datasets."""

    train: TaskDataset
    valid: TaskDataset | None
    valid_examples: list[Any]
    choices: int  # rows per example (cloze: the most choices; seq2seq: 1)
    classes: bool  # every example has the same choices (classification metrics apply)
    summary: str
    chat: ChatTemplate | None = None


def task_data(cfg: GLMConfig, task: FinetuneConfig, tokenizer: Any) -> TaskData:
    """Read and encode the task files (a malformed one is reported before any distributed set-up)."""
    if task.task == "chat":
        chat = chat_data(task, tokenizer, cfg.data.tokenizer_model, cfg.training.seed)
        return TaskData(chat.train, chat.valid, chat.valid_conversations, 1, False, chat.summary, chat.template)
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
    summary = (
        f"{len(train_examples)} training / {len(valid_examples)} held-out examples, {choices} row(s) of "
        f"{task.seq_length} tokens each"
    )
    return TaskData(train_ds, valid_ds, valid_examples, choices, classes, summary)


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
    data = task_data(cfg, task, tokenizer)  # before distributed, model and engine set-up
    run = start_run(cfg, started)
    ps, log, mbs = run.ps, run.log, cfg.training.micro_batch_size
    eval_steps = -(-(data.valid.num_examples if data.valid is not None else 0) // (mbs * ps.dp_size))
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, eval_iters=max(eval_steps, 1)))
    open_save_dir(run, cfg, {**config_to_dict(cfg), "finetune": dataclasses.asdict(task)})
    seed_everything(cfg.training.seed, ps.pp_rank)
    log(
        f"megatron_glm finetune ({task.task}): world {run.env.world_size} = tp {ps.tp_size} x pp {ps.pp_size} x "
        f"dp {ps.dp_size}; {data.summary}; from {cfg.checkpoint.load}"
    )

    task_loss = TaskLoss(
        task.task, ps, num_choices=data.choices, scoring=task.cloze_scoring, label_smoothing=task.label_smoothing
    )
    resuming = bool(cfg.checkpoint.save and list_checkpoints(cfg.checkpoint.save))
    weights = None if resuming or cfg.lora.rank > 0 else cfg.checkpoint.load  # LoRA: the base, below
    built = build_model(cfg, ps, run.device, weights=weights, resume=resuming, log=log, loss=task_loss)
    model = built.module
    lora = load_lora_base(model, cfg, ps, cfg.checkpoint.load, log)  # LoRA: the frozen base, at every start
    engine, accum, global_batch = build_engine(cfg, ps, model)
    trainer = new_trainer(
        FinetuneTrainer,
        cfg,
        run,
        engine,
        built,
        streams=batch_streams(task_batches, data.train, data.valid, run, mbs),
        pipeline_loss=built.loss,
        accumulation_steps=accum,
        global_batch_size=global_batch,
        flops_per_sample=flops_per_token(cfg.model, task.seq_length) * task.seq_length * data.choices,
        task=task,
        task_loss=task_loss,
        encoder=TaskEncoder(tokenizer, task, task.valid_data),
        valid_examples=data.valid_examples,
        classes=data.classes,
        vocab_rows=cfg.model.vocab_size,
        chat=data.chat,
    )
    trainer.identity = task_identity(cfg, task, global_batch)
    trainer.lora = lora
    if resuming:
        trainer.resume(cfg.checkpoint.save)
    elif task.task == "chat" and data.valid is not None:
        trainer.evaluate()  # the held-out loss and replies before fine-tuning

    def final_evaluation(state: TrainState) -> None:
        if data.valid is not None and trainer.last_eval_step != state.step:
            trainer.evaluate()

    return train_and_finish(run, trainer, "examples", then=final_evaluation)
