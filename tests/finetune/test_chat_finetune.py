"""finetune_glm.py --task chat end to end on a tiny GLM-4-shaped release: LoRA at TP=2 equals TP=1 (fp32, 1e-5),
metrics.jsonl holds the held-out loss before and after and greedy replies, a malformed line is a one-line error
that leaves an existing run untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.finetune.conftest import finetune, read_metrics

pytestmark = pytest.mark.slow

STEPS = 3
LORA = ("--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "attention.query_key_value,mlp.dense_h_to_4h")


def _args(setup: dict, save: Path, *extra: str) -> list[str]:
    return [
        *("--task", "chat", "--train-data", str(setup["train"]), "--valid-data", str(setup["valid"])),
        *("--load", str(setup["release"]), "--save", str(save), "--chat-length", "256", "--target-length", "8"),
        *("--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "5e-3", "--train-iters", str(STEPS)),
        *("--log-interval", "1", "--eval-interval", "0", "--seed", "5"),
        *extra,
    ]


@pytest.fixture(scope="module")
def chat_runs(chat_setup: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("chat_runs")
    out = finetune(_args(chat_setup, d / "tp1", *LORA))
    assert "chat template: the built-in GLM-4" in out.stdout and "(packed)" in out.stdout, out.stdout[-3000:]
    finetune(_args(chat_setup, d / "tp2", *LORA, "--tensor-model-parallel-size", "2"), nproc=2)
    return {"tp1": d / "tp1", "tp2": d / "tp2"}


def test_chat_lora_tp2_equals_tp1_with_held_out_loss_and_replies(chat_runs: dict) -> None:
    (train1, eval1), (train2, eval2) = read_metrics(chat_runs["tp1"]), read_metrics(chat_runs["tp2"])
    assert sorted(train1) == sorted(train2) == list(range(1, STEPS + 1))
    losses1, losses2 = [train1[s]["loss"] for s in train1], [train2[s]["loss"] for s in train2]
    assert max(abs(a - b) for a, b in zip(losses1, losses2)) < 1e-5, (losses1, losses2)
    assert sorted(eval1) == sorted(eval2) == [0, STEPS]  # before the first step, and at the end
    for step in (0, STEPS):
        assert abs(eval1[step]["valid_loss"] - eval2[step]["valid_loss"]) < 1e-5
        assert eval1[step]["reply_1"] == eval2[step]["reply_1"]  # greedy: the same tokens
        assert isinstance(eval1[step]["reply_2"], str) and "reply_3" not in eval1[step]
    assert eval1[STEPS]["valid_loss"] < eval1[0]["valid_loss"]  # LoRA learned (lr 5e-3, 3 steps)


def test_a_malformed_conversation_is_one_line_and_the_run_is_untouched(chat_setup: dict, chat_runs: dict) -> None:
    save = chat_runs["tp1"]
    before = {p: p.read_bytes() for p in sorted(save.rglob("*")) if p.is_file()}
    bad = save.parent / "bad.jsonl"
    lines = chat_setup["train"].read_text().splitlines()[:3]
    lines.insert(2, json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}))
    bad.write_text("\n".join(lines) + "\n")
    args = _args(chat_setup, save, *LORA)
    args[args.index("--train-data") + 1] = str(bad)
    args[args.index("--train-iters") + 1] = str(STEPS + 2)
    proc = finetune(args, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert f"{bad}:3: message 1 has role 'bot'" in errors[0]
    assert {p: p.read_bytes() for p in sorted(save.rglob("*")) if p.is_file()} == before
