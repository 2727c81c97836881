"""Pipeline parallelism on DeepSpeed's engine: equality with PP=1, tied embeddings, resume, refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_glm.config import build_config
from megatron_glm.errors import ConfigError
from megatron_glm.testing import run_distributed
from megatron_glm.training.deepspeed_config import build_deepspeed_config
from tests.training.conftest import ROOT, launch, metrics, train_args


def _losses(save: Path) -> list[float]:
    m = metrics(save)
    return [m[s]["loss"] for s in sorted(m)]


def _grad_norms(save: Path) -> list[float]:
    m = metrics(save)
    return [m[s].get("grad_norm", float("nan")) for s in sorted(m)]


@pytest.mark.slow
def test_pp2_tp2xpp2_pp2xdp2_match_pp1(tiny_corpus: dict, tmp_path: Path) -> None:
    """Same global batches (8 samples as 4 micro-batches of 2), fp32, clipping on every step: every layout gives
    PP=1's losses and logs its gradient norm. PP=2 and TP2xPP2 run fp32 ZeRO-0, whose DeepSpeed clipping counts
    each parameter once only through :mod:`megatron_glm.training.grad_clip`; PP=2xDP=2 runs ZeRO-1 (its optimizer's
    norm)."""
    clip = 0.05  # below every step's norm: clipping acts
    common = [
        "--train-iters",
        "5",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--eval-interval",
        "5",
        "--eval-iters",
        "2",
        "--clip-grad",
        str(clip),
    ]
    runs = {
        "pp1": ([], 1),
        "pp2": (["--pipeline-model-parallel-size", "2", "--zero-stage", "0"], 2),
        "tp2pp2": (
            ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2", "--zero-stage", "0"],
            4,
        ),
        "pp2dp2": (["--pipeline-model-parallel-size", "2"], 4),
    }
    for name, (extra, nproc) in runs.items():
        launch(train_args(tiny_corpus, *common, *extra, "--save", str(tmp_path / name)), nproc=nproc)
    ref, ref_norms = _losses(tmp_path / "pp1"), _grad_norms(tmp_path / "pp1")
    assert len(ref) == 5 and min(ref_norms) > clip, ref_norms
    for name in ("pp2", "tp2pp2", "pp2dp2"):
        got, norms = _losses(tmp_path / name), _grad_norms(tmp_path / name)
        assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) < 1e-5, (name, ref, got)
        assert max(abs(a / b - 1) for a, b in zip(ref_norms, norms, strict=True)) < 1e-5, (name, ref_norms, norms)
    valid = {
        n: [r for r in (tmp_path / n / "metrics.jsonl").read_text().splitlines() if "valid_loss" in r] for n in runs
    }
    assert all(len(v) == 1 for v in valid.values())


def _tied_after_training(rank: int, world: int) -> dict:
    import deepspeed

    from megatron_glm.parallel import initialize_parallel_state
    from megatron_glm.training.pipeline import build_pipeline_model, pipeline_batch

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = build_config({"model.size": "glm-tiny", "model.vocab_size": 128, "model.hidden_dropout": 0.0})
    ps = initialize_parallel_state(1, 2)
    module = build_pipeline_model(cfg.model, ps, seed=3).module
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(0, 128, (2, 16), generator=g)
            yield pipeline_batch(
                {
                    "input_ids": ids,
                    "labels": ids,
                    "loss_mask": torch.ones(2, 16),
                    "position_ids": torch.arange(16).expand(2, 2, 16).clone(),
                    "sep": torch.tensor([5, 9]),
                    "objective": torch.zeros(2, dtype=torch.long),
                }
            )

    it = batches()
    before = module.tied_modules["word_embeddings"].word_embeddings.weight.detach().clone()
    for _ in range(3):
        engine.train_batch(data_iter=it)
    weight = module.tied_modules["word_embeddings"].word_embeddings.weight.detach().clone()
    copies = [torch.empty_like(weight) for _ in range(world)]
    dist.all_gather(copies, weight)
    return {"changed": float((weight - before).abs().max()), "diff": float((copies[0] - copies[1]).abs().max())}


@pytest.mark.slow
def test_tied_embedding_identical_on_first_and_last_stage() -> None:
    res = run_distributed(_tied_after_training, 2, timeout=600)
    assert all(r["changed"] > 1e-4 for r in res)  # the weights trained ...
    assert all(r["diff"] == 0.0 for r in res)  # ... and the two copies stayed identical


@pytest.mark.slow
def test_pipeline_resume_after_kill(tiny_corpus: dict, tmp_path: Path) -> None:
    common = [
        "--train-iters",
        "8",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--pipeline-model-parallel-size",
        "2",
    ]
    straight = tmp_path / "straight"
    launch(train_args(tiny_corpus, *common, "--save", str(straight)), nproc=2)
    save = tmp_path / "killed"
    args = train_args(tiny_corpus, *common, "--save", str(save), "--save-interval", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "pretrain_glm.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (save / "latest").exists():
        assert job.poll() is None and time.monotonic() < deadline, "no checkpoint before the job ended"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    launch([*args, "--load", str(save)], nproc=2)
    assert _losses(save) == _losses(straight)


def test_bf16_zero0_pipeline_is_refused() -> None:
    cfg = build_config(
        {"parallel.pipeline_model_parallel_size": 2, "training.precision": "bf16", "training.zero_stage": 0}
    )
    with pytest.raises(ConfigError, match="bf16 with ZeRO stage 0 and pipeline parallelism is refused"):
        build_deepspeed_config(cfg, 1)
    ok = build_config({"parallel.pipeline_model_parallel_size": 2, "training.precision": "bf16"})
    assert build_deepspeed_config(ok, 1)["zero_optimization"]["stage"] == 1
