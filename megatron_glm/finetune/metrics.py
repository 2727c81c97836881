"""Task metrics: accuracy and macro F1 from a confusion matrix; ROUGE (``rouge-score``) and BLEU (``sacrebleu``).

ROUGE-1/2/L are mean F-measures (stemmed, as in the CNN/DM and XSum literature) and BLEU is corpus BLEU;
all are reported in percent. ``rouge-score`` and ``sacrebleu`` come with the ``finetune`` extra
(``pip install .[finetune]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_glm.errors import GLMError


def classification_metrics(confusion: torch.Tensor, *, classes: bool) -> dict[str, float]:
    """``accuracy`` and ``count`` from a ``[label, prediction]`` count matrix; ``f1_macro`` over the labels
    that occur (as true labels or predictions) when the choice indices are classes."""
    confusion = confusion.double()
    total = float(confusion.sum())
    out = {"accuracy": float(confusion.diag().sum()) / total if total else 0.0, "count": total}
    if classes:
        tp = confusion.diag()
        support = confusion.sum(dim=1) + confusion.sum(dim=0)
        present = support > 0
        f1 = torch.where(present, 2 * tp / support.clamp(min=1e-12), torch.zeros_like(tp))
        out["f1_macro"] = float(f1[present].mean()) if bool(present.any()) else 0.0
    return out


def generation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``rouge1``, ``rouge2``, ``rougeL`` (mean F1, percent) and ``bleu`` (corpus BLEU) of the hypotheses."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise GLMError(
            "seq2seq metrics need rouge-score and sacrebleu: pip install '.[finetune]' "
            "(or pip install -r requirements-finetune.txt)"
        ) from None
    names = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    sums = dict.fromkeys(names, 0.0)
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)
        for name in names:
            sums[name] += scores[name].fmeasure
    n = max(len(hypotheses), 1)
    out = {name: 100.0 * sums[name] / n for name in names}
    out["bleu"] = float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score) if hypotheses else 0.0
    out["count"] = float(len(hypotheses))
    return out
