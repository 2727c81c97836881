"""Task losses on the rows of :mod:`megatron_glm.finetune.encode`, for the plain and the pipeline engine.

- seq2seq: GLM's masked cross entropy over the target tokens (label smoothing while training).
- chat: the same over the assistant tokens of causal rows (:mod:`.packing`).
- cloze: each choice's score is the sum (or mean) of its tokens' log-probabilities in the blank; the loss
  is the cross entropy of the example's scores against its label (mean over examples), as GLM trains
  multiple-choice tasks. The returned :class:`~megatron_glm.model.loss.GLMLoss` then has one "token" per
  example, held by the example's first row, so the trainer's loss sums and counts stay exact averages.

:class:`TaskLoss` implements the model's one loss protocol (``loss(output, batch) -> GLMLoss``, see
:mod:`megatron_glm.model.objective`), on the plain model and on the pipeline's last stage alike.
In evaluation mode it also counts cloze predictions (a confusion matrix over choice
indices) for accuracy and macro F1; :meth:`TaskLoss.pop_counts` hands them over.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megatron_glm.finetune.encode import ROW_ANSWER, ROW_PAD
from megatron_glm.model.loss import GLMLoss
from megatron_glm.model.objective import LossBatch, ModelOutput, head_loss, with_aux
from megatron_glm.parallel import ParallelState

_EXCLUDED = -1.0e4  # score of a padding choice: finite (no NaN gradients), never chosen


def choice_scores(
    token_loss: GLMLoss, objective: torch.Tensor, num_choices: int, scoring: str = "sum"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores [b, C], target [b], has_answer [b])`` from the per-row cross entropy of a cloze batch."""
    logp = -token_loss.sample_sum
    if scoring == "mean":
        logp = logp / token_loss.sample_tokens.clamp(min=1.0)
    b = objective.shape[0] // num_choices
    valid = (objective != ROW_PAD).view(b, num_choices)
    scores = torch.where(valid, logp.view(b, num_choices), torch.full_like(logp.view(b, num_choices), _EXCLUDED))
    answer = (objective == ROW_ANSWER).view(b, num_choices)
    return scores, answer.float().argmax(dim=1), answer.any(dim=1)


def cloze_loss(
    token_loss: GLMLoss, objective: torch.Tensor, num_choices: int, scoring: str = "sum"
) -> tuple[GLMLoss, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, scores, target, has_answer)``: cross entropy over the choices, mean over real examples."""
    scores, target, has = choice_scores(token_loss, objective, num_choices, scoring)
    per_example = F.cross_entropy(scores, target, reduction="none") * has.float()
    count = has.float()
    loss = per_example.sum() / count.sum().clamp(min=1.0)
    first = lambda t: F.pad(t.detach().unsqueeze(1), (0, num_choices - 1)).reshape(-1)
    return GLMLoss(loss, token_loss.per_token, first(per_example), first(count)), scores, target, has


class TaskLoss:
    """The task's loss, a :class:`~megatron_glm.model.objective.LossFunction`: ``loss(output, batch)`` as the
    model's loss (``GLMModel.forward(..., loss=task_loss)``, :meth:`forward`) and the pipeline's
    (``build_pipeline_model(..., loss=task_loss)``). The head's ``training`` flag selects training behaviour
    (label smoothing; no counting).
    """

    def __init__(
        self, task: str, ps: ParallelState, *, num_choices: int = 0, scoring: str = "sum", label_smoothing: float = 0.0
    ) -> None:
        self.task, self.ps, self.num_choices, self.scoring = task, ps, num_choices, scoring
        self.label_smoothing = label_smoothing
        self.confusion = torch.zeros(max(num_choices, 1), max(num_choices, 1), dtype=torch.float64)
        self.last_scores: torch.Tensor | None = None

    def __call__(self, output: ModelOutput, batch: LossBatch) -> GLMLoss:
        training = bool(output.head.training)
        smoothing = self.label_smoothing if self.task in ("seq2seq", "chat") and training else 0.0
        base = head_loss(output, batch, smoothing)
        if self.task == "cloze":
            base = self._cloze(base, batch.objective, training)
        return with_aux(base, output, batch)

    def _cloze(self, base: GLMLoss, objective: torch.Tensor, training: bool) -> GLMLoss:
        out, scores, target, has = cloze_loss(base, objective, self.num_choices, self.scoring)
        self.last_scores = scores.detach()  # [examples, choices] of the latest batch
        if not training:
            predicted = scores.detach().argmax(dim=1)
            for t, p in zip(target[has].tolist(), predicted[has].tolist()):
                self.confusion[t, p] += 1
        return out

    def forward(self, model: Any, batch: dict[str, Any]) -> GLMLoss:
        """Loss of a batch dict on a ``GLMModel`` (or the engine wrapping one); the head runs on the loss positions
        only (the trainer's host-found ``loss_rows`` when the batch has them: no device sync)."""
        return model(
            batch["input_ids"],
            batch["position_ids"],
            batch["sep"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
            loss_rows=batch.get("loss_rows"),
            objective=batch["objective"],
            loss=self,
        )

    def pop_counts(self) -> torch.Tensor:
        """The cloze confusion matrix ``[label, prediction]`` counted since the last call."""
        out = self.confusion
        self.confusion = torch.zeros_like(out)
        return out
