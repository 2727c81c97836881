"""GLM-4.5's MoE layer with expert parallelism (all-to-all dispatch) equals one process: EP=2 on 2 ranks and
TP=2 x EP=2 on 4 ranks (also with LoRA adapters), fp32, losses and gradients (every data-parallel rank its own
batch)."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.config import LoraConfig
from megatron_glm.model import GLMModel, ModelLayout, full_state_dict, load_full_state_dict
from megatron_glm.model.lora import attach_lora
from megatron_glm.model.moe import MoEMLP
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.parallel.expert_dispatch import ExpertDispatcher
from megatron_glm.parallel.lora import is_lora_name
from megatron_glm.testing import run_distributed
from tests.model.helpers import make_batch
from tests.model.test_moe import _loss_grads, moe_config

LORA = LoraConfig(
    rank=4, alpha=8.0, targets=["attention.query_key_value,attention.dense,mlp.dense_h_to_4h,mlp.dense_4h_to_h"]
)


def _lora(model: GLMModel, cfg, ps: ParallelState) -> GLMModel:
    """``model`` with LoRA on every linear (per-expert adapters on the experts), ``B`` random (the same full
    tensors for any layout), so the adapters change the model."""
    attach_lora(model, LORA, ModelLayout(cfg), seed=3)
    g = torch.Generator().manual_seed(4)
    full = ParallelState()
    ref = GLMModel(cfg, seed=3)
    attach_lora(ref, LORA, ModelLayout(cfg), seed=3)
    adapters = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in full_state_dict(ref, full).items()
                if k.endswith(".lora.B")}  # fmt: skip
    load_full_state_dict(model, adapters, ps, strict=False)
    return model


def _ep_check(ps: ParallelState, lora: bool) -> dict:
    cfg = moe_config(moe_aux_loss_coeff=0.01)
    adapt = (lambda m, s: _lora(m, cfg, s)) if lora else (lambda m, s: m)
    model = adapt(GLMModel(cfg, ps, seed=3), ps).train()
    moe = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert moe and all(isinstance(m.dispatcher, ExpertDispatcher) for m in moe)
    got = _loss_grads(model, make_batch(10 + ps.dp_rank, batch=2), ps)
    # one process, every expert: each data-parallel rank's batch alone
    one = ParallelState()
    refs = [_loss_grads(adapt(GLMModel(cfg, seed=3), one).train(), make_batch(10 + d, batch=2), one) for d in range(2)]
    experts = {s.name for s in model.layout if s.expert_dim is not None}
    experts |= {n for n in got if ".mlp.experts." in n and is_lora_name(n)}  # the experts' adapters
    diffs, scale = {}, {}
    for name, want in refs[ps.dp_rank].items():
        if name in experts:  # an expert's gradient sums the tokens of every rank routed to it
            want = refs[0][name] + refs[1][name]
        diffs[name] = (got[name] - want).abs().max().item()
        scale[name] = want.abs().max().item()
    return {
        "diffs": diffs,
        "scale": scale,
        "experts": sorted(experts),
        "local": tuple(moe[0].experts.dense_h_to_4h.weight.shape),
    }


def _ep_checks(rank: int, world: int, tp: int) -> dict:
    ps = initialize_parallel_state(tp_size=tp, ep_size=world // tp)
    return {lora: _ep_check(ps, lora) for lora in ((False, True) if tp == 2 else (False,))}


@pytest.mark.parametrize("tp", [1, 2])
def test_expert_parallel_equals_one_process(tp: int) -> None:
    """TP = 2 also with LoRA on every linear: the experts' adapters split over EP and TP like the experts."""
    world = 2 * tp
    for rank, results in enumerate(run_distributed(_ep_checks, world, tp)):
        assert len(results) == tp
        for lora, res in results.items():
            assert len(res["experts"]) == 4 * (3 if lora else 1)  # 2 MoE layers x 2 expert tensors (+ A, B each)
            assert res["local"] == (4, 2 * 32 // tp, 64)  # 8 experts over EP 2, F split over TP
            assert max(res["scale"][n] for n in res["experts"]) > 1e-4
            assert not lora or min(res["scale"][n] for n in res["experts"] if ".lora." in n) > 0  # adapters train
            bad = {n: d for n, d in res["diffs"].items() if not d <= 1e-5 * max(1.0, res["scale"][n])}
            assert not bad, f"rank {rank}, lora {lora}: {bad}"
