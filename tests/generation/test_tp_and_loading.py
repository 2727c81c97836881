"""Tensor parallelism (TP = 2 ranks agree and match TP = 1) and loading training checkpoints (TP shards)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from megatron_glm.checkpoint.manager import write_manifest
from megatron_glm.generation import GenerationConfig, generate
from megatron_glm.generation.loading import load_model
from megatron_glm.model import ModelLayout, full_state_dict
from megatron_glm.parallel import initialize_parallel_state, shard
from megatron_glm.testing import run_distributed
from tests.generation.helpers import PROMPTS, TOKENS, full_weights, tiny_model
from tests.model.helpers import tiny_config

CONFIGS = {
    "greedy": {},
    "sample": dict(strategy="sample", top_k=20, temperature=0.8, seed=5),
    "beam": dict(strategy="beam", num_beams=2),
}


def write_checkpoint(root: Path, weights: dict[str, torch.Tensor], tp: int, step: int = 7) -> Path:
    """A training-checkpoint layout (``global_stepN/mp_rank_XX_model_states.pt`` + meta.json + latest)."""
    step_dir = root / f"global_step{step}"
    step_dir.mkdir(parents=True)
    layout = ModelLayout(tiny_config())
    for r in range(tp):
        module = {}
        for name, t in weights.items():
            spec = layout[name].partition
            module[name] = shard(t, spec[0], r, tp, spec[1]) if spec else t
        torch.save({"module": module}, step_dir / f"mp_rank_{r:02d}_model_states.pt")
    meta = {
        "step": step,
        "layout": {"tp": tp, "pp": 1, "dp": 1},
        "config": {"model": dataclasses.asdict(tiny_config()), "data": {"tokenizer_model": ""}},
    }
    (step_dir / "meta.json").write_text(json.dumps(meta))
    write_manifest(step_dir, step_dir.name)
    (root / "latest").write_text(step_dir.name)
    return root


def _answers(model, config, ps=None):
    return [r.answers for r in generate(model, PROMPTS, TOKENS, config, ps)]


def _tp_generate(rank: int, world: int, weights: dict[str, torch.Tensor], ckpt: str) -> dict:
    torch.set_num_threads(1)
    ps = initialize_parallel_state(tp_size=world)
    par, ref = tiny_model(weights, ps), tiny_model(weights)
    loaded, _ = load_model(ckpt, ps)  # saved at TP 2: this rank's shard only
    out = {}
    for name, kw in CONFIGS.items():
        cfg = GenerationConfig(max_new_tokens=5, **kw)
        out[name] = {
            "cached": _answers(par, cfg, ps),
            "recomputed": _answers(par, dataclasses.replace(cfg, use_cache=False), ps),
            "loaded": _answers(loaded, cfg, ps),
            "tp1": _answers(ref, cfg),
        }
    return out


def test_tp2_ranks_agree_and_match_tp1(tmp_path: Path) -> None:
    weights = full_weights()
    ckpt = write_checkpoint(tmp_path / "ckpt", weights, tp=2)
    ranks = run_distributed(_tp_generate, 2, weights, str(ckpt))
    assert ranks[0] == ranks[1]
    for name, got in ranks[0].items():
        assert got["cached"] == got["recomputed"] == got["loaded"] == got["tp1"], name


def test_load_merges_tp_shards(tmp_path: Path) -> None:
    weights = full_weights()
    model, meta = load_model(write_checkpoint(tmp_path / "ckpt", weights, tp=2))
    assert meta["step"] == 7 and meta["step_dir"].endswith("global_step7") and not model.training
    got = full_state_dict(model)
    assert all(torch.equal(got[k], weights[k]) for k in weights)
    # A step directory can be named directly; output equals the in-memory model's.
    again, _ = load_model(tmp_path / "ckpt" / "global_step7")
    cfg = GenerationConfig(max_new_tokens=4)
    assert _answers(again, cfg) == _answers(tiny_model(weights), cfg)
