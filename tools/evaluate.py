"""Evaluate a GLM checkpoint: validation loss / perplexity per objective, and LAMBADA-style cloze accuracy.

Usage::

    python tools/evaluate.py --load runs/quickstart/checkpoints                      # held-out loss
    python tools/evaluate.py --load CKPT --split-name test --eval-iters 50 --micro-batch-size 8
    python tools/evaluate.py --load CKPT --cloze lambada.jsonl [--cloze-blank "[gMASK]"] [--no-loss]
    torchrun --nproc_per_node 2 tools/evaluate.py --load CKPT                         # tensor parallel 2
    python tools/evaluate.py --task cloze --valid-data F.jsonl --load CKPT --output R.json   # choice accuracy
    python tools/evaluate.py --task seq2seq --valid-data F.jsonl --load CKPT --num-beams 4 --output R.json
    python tools/evaluate.py --task ppl --valid-data wiki.txt --load CKPT --overlap 32 --output R.json

The loss uses the checkpoint's own data config (data path, split, sequence length, objective mixture,
seed), so the held-out samples are exactly those training validated on; ``--data-path``,
``--tokenizer-model``, ``--split`` and ``--seq-length`` override it. ``--cloze`` reads JSON lines
``{"context": ..., "target": ...}`` and reports the share of targets predicted exactly (greedy). Prints
a human summary and, with ``--json``, one JSON line.

``--task`` evaluates a fine-tuning task file instead (the format of ``finetune_glm.py``, the same metric
names: ``accuracy`` / ``f1_macro`` / ``valid_loss`` for cloze, ``rouge1`` / ``rouge2`` / ``rougeL`` /
``bleu`` / ``valid_loss`` for seq2seq), or, with ``ppl``, the perplexity of a raw text file over
overlapping windows (``ppl_token``, ``ppl_word``). ``--output`` writes the results as one JSON object.
Options may also come from ``--config FILE.yaml`` (keys as listed below) and dotted flags
(``--finetune.num_beams 2``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_glm.config import GLMConfig, build_config, help_text, load_config
from megatron_glm.config.loader import leaf_paths
from megatron_glm.data.loader import SPLITS, build_data_iterator, build_pretraining_datasets
from megatron_glm.data.tokenizer import TokenizerBase, open_tokenizer
from megatron_glm.errors import ConfigError, DataError, GLMError, run_cli
from megatron_glm.finetune.eval_options import EVALUATE_FLAGS, EvaluateRun
from megatron_glm.generation.evaluate import cloze_accuracy, evaluate_loss, read_cloze_jsonl
from megatron_glm.generation.loading import init_inference, load_model


def parse_args(argv: list[str]) -> EvaluateRun:
    """The typed options from the command line (flags, ``--config FILE.yaml``, dotted paths)."""
    run = load_config(argv, root=EvaluateRun, aliases=EVALUATE_FLAGS)
    run.check()
    return run


def task_results(args: EvaluateRun, model, tokenizer: TokenizerBase, ps) -> dict[str, float]:
    """``--task``: cloze / seq2seq metrics of ``--valid-data``, or its perplexity (``ppl``)."""
    from megatron_glm.finetune.evaluate import evaluate_task, perplexity

    valid_data = args.finetune.valid_data
    if args.task == "ppl":
        try:
            text = Path(valid_data).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{valid_data}: cannot read the text file ({exc})") from None
        ids = tokenizer.encode(text, allow_special=False)
        if not ids:
            raise DataError(f"{valid_data}: no text to evaluate")
        window = args.window or model.config.max_sequence_length
        if not 4 <= window <= model.config.max_sequence_length or not 0 <= args.overlap <= window - 4:
            raise ConfigError(
                f"--window must be in [4, {model.config.max_sequence_length}] and --overlap in "
                f"[0, window - 4], got {window} and {args.overlap}"
            )
        return perplexity(
            model,
            tokenizer,
            ids,
            len(text.split()),
            window=window,
            overlap=args.overlap,
            batch_size=args.micro_batch_size or 8,
            ps=ps,
        )
    cfg = args.task_config()
    if cfg.seq_length > model.config.max_sequence_length:
        raise ConfigError(
            f"--source-length + --target-length + 3 = {cfg.seq_length} exceeds the model's "
            f"{model.config.max_sequence_length} positions"
        )
    return evaluate_task(model, tokenizer, cfg, valid_data, micro_batch_size=args.micro_batch_size or 8, ps=ps)


def write_json_atomic(path: str, values: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(values, out, indent=1, default=str)
        out.write("\n")
    os.replace(tmp, path)


def data_config(meta: dict, args: EvaluateRun, tokenizer_path: str) -> GLMConfig:
    """The run's config from ``meta.json`` with this tool's overrides (unknown saved keys ignored)."""
    known = leaf_paths()
    flat: dict[str, object] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".")
            elif path in known and path != "model.size":
                flat[path] = value

    walk(meta.get("config", {}), "")
    if args.data_path:
        flat["data.data_path"] = args.data_path
    if args.split:
        flat["data.split"] = args.split
    if args.seq_length:
        flat["data.seq_length"] = args.seq_length
    if args.micro_batch_size:
        flat["training.micro_batch_size"] = args.micro_batch_size
    flat["data.tokenizer_model"] = tokenizer_path
    flat["training.eval_iters"] = args.eval_iters
    flat["data.num_workers"] = 0
    cfg = build_config(flat, "checkpoint meta.json")
    if not cfg.data.data_path:
        raise ConfigError("no data path in the checkpoint: pass --data-path PREFIX")
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(help_text(EvaluateRun, EVALUATE_FLAGS))
        return 0
    args = parse_args(argv)
    ps, device = init_inference()
    model, meta = load_model(args.load, ps, device=device)
    tokenizer_path = args.tokenizer_model or meta.get("config", {}).get("data", {}).get("tokenizer_model", "")
    if not tokenizer_path:
        raise GLMError("the checkpoint does not name its tokenizer: pass --tokenizer-model")
    tokenizer = open_tokenizer(tokenizer_path)
    speak = ps.tp_rank == 0 and ps.dp_rank == 0
    results: dict[str, object] = {"checkpoint": meta.get("step_dir"), "step": meta.get("step")}
    if args.task:
        data = args.finetune.valid_data
        results.update({"task": args.task, "data": data, **task_results(args, model, tokenizer, ps)})
        if speak:
            print(
                f"{args.task} ({data}): "
                + "  ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
            )
            if args.output:
                write_json_atomic(args.output, results)
            if args.json:
                print(json.dumps(results, default=str))
        return 0
    if args.loss:
        cfg = data_config(meta, args, tokenizer_path)
        if cfg.data.seq_length > model.config.max_sequence_length:
            raise ConfigError(
                f"seq length {cfg.data.seq_length} exceeds the model's {model.config.max_sequence_length} positions"
            )
        datasets = build_pretraining_datasets(cfg, tokenizer, dp_size=ps.dp_size, is_rank0=False)
        dataset = datasets[SPLITS.index(args.split_name)]
        if dataset is None:
            raise GLMError(f"split {args.split_name!r} of {cfg.data.split!r} is empty in {cfg.data.data_path}")
        batches = build_data_iterator(
            dataset,
            consumed_samples=0,
            micro_batch_size=cfg.training.micro_batch_size,
            dp_rank=ps.dp_rank,
            dp_size=ps.dp_size,
        )
        loss = evaluate_loss(model, batches, args.eval_iters, ps)
        results[args.split_name] = loss
        if speak:
            parts = [
                f"{args.split_name}: loss {loss.get('loss', float('nan')):.4f} "
                f"ppl {loss.get('ppl', float('nan')):.2f} ({int(loss['tokens'])} target tokens)"
            ]
            parts += [
                f"  {k.removeprefix('loss_')}: loss {v:.4f} ppl {loss['ppl_' + k[5:]]:.2f}"
                for k, v in loss.items()
                if k.startswith("loss_")
            ]
            print("\n".join(parts))
    if args.cloze:
        examples = read_cloze_jsonl(args.cloze)
        cloze = cloze_accuracy(model, tokenizer, examples, blank=args.cloze_blank, parallel_state=ps)
        results["cloze"] = cloze
        if speak:
            print(
                f"cloze ({args.cloze}): accuracy {cloze['accuracy']:.4f} over {int(cloze['count'])} examples "
                f"(token accuracy {cloze['token_accuracy']:.4f})"
            )
    if speak and args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    run_cli(main)
