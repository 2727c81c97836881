"""Sequence parallelism: TP2 + SP gives the TP1 loss and gradients (with every other lever too)."""

from __future__ import annotations

import torch

from megatron_glm.config import load_config, problems
from megatron_glm.model import GLMModel, batch_attention_mask, full_state_dict
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.testing import run_distributed
from tests.model.helpers import make_batch, tiny_config

VARIANTS = {
    "sp": {},
    "sp+full": {"checkpoint_activations": True},
    "sp+selective": {"recompute_granularity": "selective"},
    "sp+fused": {"head_chunk_size": 5},
}


def _loss_grads(model: GLMModel, batch: dict, ps: ParallelState) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    mask = batch_attention_mask(batch)  # sep, or the document mask when the batch has doc_ids
    res = model(batch["input_ids"], batch["position_ids"], mask, labels=batch["labels"], loss_mask=batch["loss_mask"])
    res.loss.backward()
    return {"loss": res.loss.detach(), "per_token": res.per_token.detach(), **full_state_dict(model, ps, grads=True)}


def _sp_checks(rank: int, world: int) -> dict[str, float]:
    ps = initialize_parallel_state(tp_size=world)
    batch = make_batch(11)  # seq 16, divisible by 2
    ref = _loss_grads(GLMModel(tiny_config(), seed=3).train(), batch, ParallelState())
    assert ref["loss"] > 1.0
    out = {}
    for name, fields in VARIANTS.items():
        model = GLMModel(tiny_config(sequence_parallel=True, **fields), ps, seed=3).train()
        assert model.sequence_parallel
        got = _loss_grads(model, batch, ps)
        out[name] = max((got[k] - v).abs().max().item() for k, v in ref.items())
    # Document isolation: the [b, 1, s, s] document mask under SP (the attention sees the gathered sequence).
    docs = {**batch, "doc_ids": (torch.arange(16) // 6).expand(batch["input_ids"].shape[0], 16).contiguous()}
    ref_docs = _loss_grads(GLMModel(tiny_config(), seed=3).train(), docs, ParallelState())
    assert abs(float(ref_docs["loss"]) - float(ref["loss"])) > 1e-4  # the documents do change what is seen
    got = _loss_grads(GLMModel(tiny_config(sequence_parallel=True), ps, seed=3).train(), docs, ps)
    out["sp+documents"] = max((got[k] - v).abs().max().item() for k, v in ref_docs.items())
    # With dropout: full recomputation replays the sequence-shard dropout masks exactly.
    runs = []
    for ckpt in (False, True):
        cfg = tiny_config(
            sequence_parallel=True, hidden_dropout=0.2, attention_dropout=0.1, checkpoint_activations=ckpt
        )
        model = GLMModel(cfg, ps, seed=3).train()
        torch.manual_seed(9)
        runs.append(_loss_grads(model, batch, ps))
    out["dropout/recompute"] = max((runs[1][k] - v).abs().max().item() for k, v in runs[0].items())
    return out


def test_tp2_sequence_parallel_matches_tp1() -> None:
    for rank, diffs in enumerate(run_distributed(_sp_checks, 2)):
        bad = {k: v for k, v in diffs.items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: {bad}"


def test_sequence_parallel_is_off_at_tp1_and_validated() -> None:
    assert not GLMModel(tiny_config(sequence_parallel=True)).sequence_parallel
    cfg = load_config(
        [
            "--sequence-parallel",
            "--tensor-model-parallel-size",
            "4",
            "--seq-length",
            "30",
            "--model.num_attention_heads",
            "4",
        ]
    )
    assert (
        "model.sequence_parallel needs data.seq_length (30) divisible by "
        "parallel.tensor_model_parallel_size (4)" in problems(cfg)
    )
