"""GLM-4.5's MoE layer with expert parallelism (all-to-all dispatch) equals one process: EP=2 on 2 ranks and
TP=2 x EP=2 on 4 ranks, fp32, losses and gradients (every data-parallel rank its own batch)."""

from __future__ import annotations

import pytest

from megatron_glm.model import GLMModel
from megatron_glm.model.moe import MoEMLP
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.parallel.expert_dispatch import ExpertDispatcher
from megatron_glm.testing import run_distributed
from tests.model.helpers import make_batch
from tests.model.test_moe import _loss_grads, moe_config


def _ep_checks(rank: int, world: int, tp: int) -> dict:
    ps = initialize_parallel_state(tp_size=tp, ep_size=world // tp)
    cfg = moe_config(moe_aux_loss_coeff=0.01)
    model = GLMModel(cfg, ps, seed=3).train()
    moe = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert moe and all(isinstance(m.dispatcher, ExpertDispatcher) for m in moe)
    got = _loss_grads(model, make_batch(10 + ps.dp_rank, batch=2), ps)
    # one process, every expert: each data-parallel rank's batch alone
    refs = [_loss_grads(GLMModel(cfg, seed=3).train(), make_batch(10 + d, batch=2), ParallelState()) for d in range(2)]
    experts = {s.name for s in model.layout if s.expert_dim is not None}
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


@pytest.mark.parametrize("tp", [1, 2])
def test_expert_parallel_equals_one_process(tp: int) -> None:
    world = 2 * tp
    for rank, res in enumerate(run_distributed(_ep_checks, world, tp)):
        assert len(res["experts"]) == 4  # two MoE layers x two expert tensors
        assert res["local"] == (4, 2 * 32 // tp, 64)  # 8 experts over EP 2, F split over TP
        assert max(res["scale"][n] for n in res["experts"]) > 1e-4
        bad = {n: d for n, d in res["diffs"].items() if not d <= 1e-5 * max(1.0, res["scale"][n])}
        assert not bad, f"rank {rank}: {bad}"
