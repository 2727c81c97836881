"""Fine-tuning GLM on tasks read from JSON lines: seq2seq (a ``[gMASK]`` blank), cloze / multiple choice, chat.

- :mod:`.config`: :class:`FinetuneConfig` (the task options next to the pretraining config).
- :mod:`.tasks`: reading task files (one-line, line-numbered errors).
- :mod:`.encode`: examples -> fixed-length GLM rows (Part A / Part B), datasets, collation.
- :mod:`.loss`: the task losses (seq2seq cross entropy with label smoothing, cross entropy over choices).
- :mod:`.metrics`: accuracy / macro F1, ROUGE (``rouge-score``), BLEU (``sacrebleu``).
- :mod:`.evaluate`: cloze scoring, seq2seq generation, overlapping-window perplexity.
- :mod:`.chat_template`, :mod:`.chat`, :mod:`.packing`, :mod:`.chat_run`: chat data (the template, the assistant
  tokens, truncation, packing with document isolation, held-out replies).
- :mod:`.run`: ``finetune(cfg, task_cfg)``, what ``finetune_glm.py`` runs.
"""
