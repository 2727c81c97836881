"""Expert parameters under DeepSpeed ZeRO-1/2: DP=4 with EP=2 (expert gradients reduced over the
expert-data-parallel group) takes the same steps as EP=1, on a toy MoE with the real all-to-all dispatcher."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_glm.errors import CheckpointError, ConfigError
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.parallel.expert_dispatch import ExpertDispatcher
from megatron_glm.testing import run_distributed
from megatron_glm.training.expert_parallel import MARKER, check_zero_stage, prepare_expert_parallel

E, K, H, FF, B = 4, 2, 6, 5, 8  # experts, top-k, hidden, expert intermediate, tokens per micro-batch


class ToyMoE(torch.nn.Module):
    """A dense projection, a softmax top-k router and SwiGLU experts (this rank's slice of them)."""

    def __init__(self, ps: ParallelState) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.dense = torch.nn.Parameter(torch.randn(H, H, generator=g) * 0.4)
        self.router = torch.nn.Parameter(torch.randn(E, H, generator=g))
        w1, w2 = torch.randn(E, 2 * FF, H, generator=g) * 0.4, torch.randn(E, H, FF, generator=g) * 0.4
        local = slice(ps.ep_rank * E // ps.ep_size, (ps.ep_rank + 1) * E // ps.ep_size)
        self.experts_w1 = torch.nn.Parameter(w1[local].clone())
        self.experts_w2 = torch.nn.Parameter(w2[local].clone())
        self.dispatcher = ExpertDispatcher(E, ps)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = x @ self.dense.t()
        weights, ids = torch.softmax(h @ self.router.t(), dim=-1).topk(K, dim=-1)
        xg, counts, handle = self.dispatcher.dispatch(h, ids)
        out = []
        for e, rows in enumerate(torch.split(xg, counts.tolist())):
            gate, up = (rows @ self.experts_w1[e].t()).chunk(2, dim=-1)
            out.append((F.silu(gate) * up) @ self.experts_w2[e].t())
        y = self.dispatcher.combine(torch.cat(out), handle, weights)
        return ((y + h - target) ** 2).mean()


def _engine(ep: int, stage: int, bf16: bool = False) -> tuple[ToyMoE, object]:
    import deepspeed

    from megatron_glm.checkpoint import safe_checkpoint_engine
    from megatron_glm.training.distributed import DeepSpeedMPU

    ps = initialize_parallel_state(ep_size=ep)
    model = ToyMoE(ps)
    groups = [{"params": [model.dense, model.experts_w1]}, {"params": [model.router, model.experts_w2]}]
    groups = prepare_expert_parallel(model, groups, lambda n: n.startswith("experts_"), ps, E)
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.05,  # below the gradient norm: clipping (the norm of sharded experts) is exercised
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "bf16": {"enabled": bf16},
    }
    opt = torch.optim.SGD(groups, lr=0.5)  # the update is the gradient itself (Adam would hide its scale)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds, mpu=DeepSpeedMPU(ps))
    engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
    return model, engine


def _steps(engine: object, dp_rank: int, steps: int) -> list[float]:
    g = torch.Generator().manual_seed(100 + dp_rank)
    norms, dtype = [], torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    for micro in range(steps * 2):
        loss = engine(torch.randn(B, H, generator=g).to(dtype), torch.randn(B, H, generator=g).to(dtype))
        engine.backward(loss)
        engine.step()
        if micro % 2:
            norms.append(float(engine.get_global_grad_norm()))
    return norms


def _train(ep: int, stage: int, steps: int = 3, bf16: bool = False) -> dict:
    model, engine = _engine(ep, stage, bf16)
    norms = _steps(engine, dist.get_rank(), steps)
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    moe_groups = [grp.get("moe", False) for grp in optimizer.param_groups]
    state = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {
        "params": state,
        "norms": norms,
        "moe": engine.has_moe_layers,
        "moe_groups": moe_groups,
        "marker": hasattr(model, MARKER),
        "dtype": next(model.parameters()).dtype,
        "optimizer": type(engine.optimizer).__name__,
    }


def _both(rank: int, world: int, stage: int, bf16: bool = False) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return {ep: _train(ep, stage, bf16=bf16) for ep in (1, 2)}


@pytest.mark.parametrize("stage,bf16", [(1, False), (2, False), (1, True)])
def test_ep2_dp4_takes_the_steps_of_ep1(stage: int, bf16: bool) -> None:
    """fp32: the same weights (1e-6) and gradient norms (1e-6). bf16 (``ds_configs/zero1_bf16.json``'s set-up:
    DeepSpeed's ZeRO-1 optimizer over bf16 weights and activations, fp32 master weights): the same bf16 weights to
    one bf16 step of their magnitude (2^-7 relative; measured: identical) and gradient norms to 1e-3 relative
    (measured: 2.3e-4)."""
    results = run_distributed(_both, 4, stage, bf16, timeout=900)
    one = results[0][1]
    assert one["dtype"] == (torch.bfloat16 if bf16 else torch.float32)
    assert results[0][2]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert not one["moe"] and not one["marker"] and not any(one["moe_groups"])
    assert all(n > 0.05 for n in one["norms"]) and len(one["norms"]) == 3
    for rank, res in enumerate(results):
        ref, two = res[1], res[2]
        assert two["moe"] and two["marker"] and sorted(two["moe_groups"]) == [False, False, True, True]
        ep_rank, local = rank % 2, E // 2
        for name, want in ref["params"].items():
            if name.startswith("experts_"):
                want = want[ep_rank * local : (ep_rank + 1) * local]
            atol = float(want.abs().max()) * 2**-7 if bf16 else 1e-6
            torch.testing.assert_close(two["params"][name], want, rtol=0, atol=atol, msg=f"rank {rank} {name}")
        assert max(abs(a - b) / (b if bf16 else 1.0) for a, b in zip(ref["norms"], two["norms"])) < (
            1e-3 if bf16 else 1e-6
        )
    # the experts moved, and differently on the two expert-parallel ranks (they are different experts)
    start = ToyMoE(ParallelState()).experts_w1.detach()
    assert (results[0][2]["params"]["experts_w1"] - start[:2]).abs().max() > 1e-3
    torch.testing.assert_close(results[0][2]["params"]["experts_w1"], results[2][2]["params"]["experts_w1"])


def test_zero0_and_zero3_with_expert_parallelism_are_refused() -> None:
    with pytest.raises(ConfigError, match="ds.json: ZeRO stage 3 cannot be used with expert parallelism"):
        check_zero_stage(ParallelState(dp_size=2, ep_size=2), 3, "ds.json")
    with pytest.raises(ConfigError, match="ZeRO stage 0 cannot be used with expert parallelism .* use ZeRO stage 1"):
        check_zero_stage(ParallelState(dp_size=2, ep_size=2), 0, "--zero-stage")
    check_zero_stage(ParallelState(dp_size=2, ep_size=2), 2, "ds.json")
    check_zero_stage(ParallelState(dp_size=2), 3, "ds.json")


def _save_and_resume(rank: int, world: int, save_dir: str) -> dict:
    import deepspeed

    from megatron_glm.checkpoint import CheckpointManager

    deepspeed.init_distributed(dist_backend="gloo")
    model, engine = _engine(2, 1)
    _steps(engine, rank, 2)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    manager = CheckpointManager(save_dir, log=lambda _m: None)
    path = manager.save(engine, 2, {"step": 2, "layout": {"tp": 1, "pp": 1, "dp": 4, "ep": 2}}, {})
    with pytest.raises(CheckpointError, match="saved with ep=2 but this run has ep=1"):
        manager.load(engine, save_dir, expect={"dp": 4, "ep": 1})
    fresh_model, fresh = _engine(2, 1)
    with torch.no_grad():
        for p in fresh_model.parameters():
            p.add_(1.0)  # nothing of the fresh start survives the load
    manager.load(fresh, save_dir, expect={"dp": 4, "ep": 2})
    loaded = {n: p.detach().clone() for n, p in fresh_model.named_parameters()}
    after = (_steps(engine, rank, 1), _steps(fresh, rank, 1))  # and the optimizer state resumes too
    return {
        "saved": saved,
        "loaded": loaded,
        "next": after,
        "files": sorted(str(p.relative_to(path)) for p in (path / "experts").iterdir()),
        "same_next": all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters())),
    }


def test_expert_shards_are_saved_per_expert_rank_and_restored(tmp_path) -> None:
    results = run_distributed(_save_and_resume, 4, str(tmp_path / "ckpt"), timeout=900)  # 4 DeepSpeed ranks, 2 cores
    for rank, res in enumerate(results):
        for name, want in res["saved"].items():
            assert torch.equal(res["loaded"][name], want), (rank, name)
        assert res["files"] == ["experts/pp00_tp00_ep00.pt", "experts/pp00_tp00_ep01.pt"]
        assert res["next"][0] == res["next"][1] and res["same_next"]
    # the two expert-parallel ranks hold different experts, each restored from its own file
    assert not torch.equal(results[0]["loaded"]["experts_w1"], results[1]["loaded"]["experts_w1"])
