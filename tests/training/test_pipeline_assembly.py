"""The pipeline stage runs the model's own forward steps: sequence parallelism with PP, auxiliary losses carried
from stage to stage, one loss protocol on the last stage; losses and gradients equal the single-process model's."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_glm.config import build_config
from megatron_glm.config.validate import problems
from megatron_glm.errors import ConfigError
from megatron_glm.model import GLMModel, GLMPart, LanguageModelLoss, LossBatch, ModelOutput, full_state_dict
from megatron_glm.model.context import ForwardContext
from megatron_glm.model.loss import GLMLoss
from megatron_glm.model.mlp import ParallelMLP
from megatron_glm.model.router import routers, update_expert_bias
from megatron_glm.testing import run_distributed
from megatron_glm.training.deepspeed_config import build_deepspeed_config
from megatron_glm.training.setup import expert_groups

VOCAB, SEQ, MICRO, ACCUM = 128, 16, 2, 2
AUX_NAMES = ("const", "fake")
CONST = 0.25


class AuxMLP(ParallelMLP):
    """Test only: an MLP whose layer adds two auxiliary loss terms, a known constant and a term with gradients (of
    the weights: a term of the outputs would see the loss rows only in the last layer, ``last_layer_loss_rows``)."""

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        y = super().forward(x, ctx)
        ctx.add_aux("const", torch.tensor(CONST))
        ctx.add_aux("fake", 0.5 * self.dense_4h_to_h.weight.float().pow(2).sum())
        return y


def add_fake_aux(module: torch.nn.Module) -> int:
    """Turn every MLP of ``module`` into an :class:`AuxMLP` (same parameters and names); how many."""
    mlps = [m for m in module.modules() if isinstance(m, ParallelMLP)]
    for m in mlps:
        m.__class__ = AuxMLP
    return len(mlps)


class RecordingLoss(LanguageModelLoss):
    """The pretraining loss, remembering each micro-batch's auxiliary terms and total."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, float]] = []

    def __call__(self, output: ModelOutput, batch: LossBatch) -> GLMLoss:
        out = super().__call__(output, batch)
        fused = not out.per_token.requires_grad  # the fused head's per-token losses carry no gradient
        self.seen.append(
            {"loss": float(out.loss.detach()), "fused": fused, **{k: float(v.detach()) for k, v in out.aux.items()}}
        )
        return out


def _config(tp: int, pp: int, cp: int = 1, ep: int = 1, **model: object):
    fields = {
        "model.size": "glm-tiny",
        "model.vocab_size": VOCAB,
        "model.hidden_dropout": 0.0,
        "model.attention_dropout": 0.0,
        "data.seq_length": SEQ,
        "training.micro_batch_size": MICRO,
        "training.global_batch_size": MICRO * ACCUM * ep,  # data-parallel size = ep in these tests
        "optimizer.clip_grad": 0.0,
        "training.zero_stage": 1 if ep > 1 else 0,  # expert parallelism runs under ZeRO-1/2
        "parallel.tensor_model_parallel_size": tp,
        "parallel.pipeline_model_parallel_size": pp,
        "parallel.context_parallel_size": cp,
        "parallel.expert_parallel_size": ep,
    }
    fields.update({f"model.{k}": v for k, v in model.items()})
    return build_config(fields)


def _micro_batches(dp_rank: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(dp_rank)
    out = []
    for _ in range(ACCUM):
        ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
        sep = torch.tensor([5, 9])
        pos = torch.arange(SEQ).expand(MICRO, SEQ).clone()
        block = torch.where(pos >= sep[:, None], pos - sep[:, None] + 1, torch.zeros_like(pos))
        loss_mask = (pos >= sep[:, None]).float()
        out.append(
            {
                "input_ids": ids,
                "labels": torch.roll(ids, -1, 1),
                "loss_mask": loss_mask,
                "position_ids": torch.stack([torch.minimum(pos, sep[:, None]), block], dim=1),
                "sep": sep,
                "objective": torch.zeros(MICRO, dtype=torch.long),
            }
        )
    return out


def _pipeline_step(
    rank: int, world: int, tp: int, pp: int, model_fields: dict, aux: bool, cp: int = 1, ep: int = 1
) -> dict:
    """One SGD step (lr 1, no clipping) of the pipelined model: the loss, the gradients (weights before - after,
    unsharded, original names) and what the last stage's loss saw. ``cp``: context parallelism, each micro-batch
    split per rank as the trainer splits it (``pipeline_batch``). ``ep``: expert parallelism over ``ep``
    data-parallel ranks (each its own micro-batches; ZeRO-1, the trainer's expert groups), then the routers'
    correction-bias update as the trainer applies it (loads summed over the stage's data-parallel group)."""
    import deepspeed

    from megatron_glm.parallel import initialize_parallel_state
    from megatron_glm.training.pipeline import build_pipeline_model, pipeline_batch

    deepspeed.init_distributed(dist_backend="gloo")
    from megatron_glm.parallel.context_parallel import ContextParallel

    cfg = _config(tp, pp, cp, ep, **model_fields)
    assert not problems(cfg, world)  # sequence parallelism (and context parallelism) with PP is no longer refused
    ps = initialize_parallel_state(tp, pp, ep, cp)
    loss = RecordingLoss()
    built = build_pipeline_model(cfg.model, ps, seed=3, loss=loss, aux_names=AUX_NAMES if aux else None)
    module = built.module
    if aux:
        assert add_fake_aux(module) > 0
    parts = [m for m in module.modules() if isinstance(m, GLMPart)]
    assert all(p.sequence_parallel == bool(model_fields.get("sequence_parallel") and tp > 1) for p in parts)
    hidden_shapes: list[list[int]] = []
    outputs: list[tuple[int, list[int]]] = []  # (layer, the shape of its hidden output)
    for p in parts:
        if p.pipe.kind == "layer":
            p.register_forward_pre_hook(lambda _m, args: hidden_shapes.append(list(args[0][0].shape)))
            p.register_forward_hook(lambda m, _a, out: outputs.append((m.pipe.layer, list(out[0].shape))))

    def weights() -> dict[str, torch.Tensor]:
        return {k: v for p in parts for k, v in full_state_dict(p, ps).items()}

    before = weights()
    opt = torch.optim.SGD(expert_groups(cfg, ps, module, [{"params": list(module.parameters())}]), lr=1.0)
    ds = build_deepspeed_config(cfg, ps.dp_size, ps.cp_size)
    assert ds["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    ds["zero_allow_untested_optimizer"] = True  # SGD under ZeRO-1 (expert parallelism): the update is the gradient
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds)
    assert engine.dp_world_size == ps.grad_dp_size  # the pipeline's data-parallel axis spans dp x cp
    split = ContextParallel.of(ps)
    mean = engine.train_batch(data_iter=iter([pipeline_batch(b, split) for b in _micro_batches(ps.dp_rank)]))
    loads = torch.stack([r.load for r in routers(module)] or [torch.zeros(0)])
    dist.all_reduce(loads, group=ps.dp_group)  # every token copy this stage's routers sent to an expert
    update_expert_bias(module, ps.dp_group)
    after = weights()
    grads = {k: before[k] - after[k] for k in before}
    dist.barrier()
    return {
        "loss": float(mean),
        "grads": grads,
        "seen": loss.seen,
        "stage": ps.pp_rank,
        "hidden": hidden_shapes,
        "outputs": outputs,
        "loads": loads.sum(-1).tolist(),
        "moe": engine.has_moe_layers,
    }


def _reference(model_fields: dict, aux: bool, dp: int = 1) -> dict:
    """The same step's loss and gradients on one process (no tensor, pipeline or sequence parallelism, the unfused
    head), over the micro-batches of ``dp`` data-parallel ranks; the routers' correction-bias update after it."""
    fields = {k: v for k, v in model_fields.items() if k not in ("sequence_parallel", "head_chunk_size")}
    cfg = _config(1, 1, **fields)
    model = GLMModel(cfg.model, seed=3).train()
    if aux:
        add_fake_aux(model)
    loss = RecordingLoss()
    total = 0.0
    for b in [b for d in range(dp) for b in _micro_batches(d)]:
        out = model(
            b["input_ids"], b["position_ids"], b["sep"], labels=b["labels"], loss_mask=b["loss_mask"], loss=loss
        )
        (out.loss / (ACCUM * dp)).backward()
        total += float(out.loss.detach()) / (ACCUM * dp)
    bias = {k: v for k, v in full_state_dict(model).items() if k.endswith("expert_bias")}
    update_expert_bias(model)
    return {
        "loss": total,
        "grads": full_state_dict(model, grads=True),
        "bias": {k: v - bias[k] for k, v in full_state_dict(model).items() if k in bias},  # the update
        "seen": loss.seen,
        "layers": cfg.model.num_layers,
    }


def _merged_grads(results: list[dict]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for r in results:
        for k, v in r["grads"].items():
            if k in out:  # the tied word embedding on the first and last stage, tensor-parallel copies
                assert torch.equal(out[k], v), k
            out[k] = v
    return out


def _compare(results: list[dict], ref: dict) -> None:
    grads = _merged_grads(results)
    for name, update in ref["bias"].items():  # before - after: minus the bias update, the same on every stage
        assert torch.equal(grads[name], -update) and update.abs().max() > 0, name
        grads[name] = ref["grads"][name]
    assert set(grads) == set(ref["grads"])
    assert all(abs(r["loss"] - ref["loss"]) < 1e-5 for r in results), ([r["loss"] for r in results], ref["loss"])
    worst = max(float((grads[k] - ref["grads"][k]).abs().max()) for k in grads)
    assert worst < 1e-5, worst
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-3  # the step really trained something


@pytest.mark.slow
def test_pp2_tp2_sequence_parallel_equals_one_process() -> None:
    """PP=2 x TP=2 with sequence parallelism and the fused head (a rotary model: the activations keep their shape)
    on 4 processes: the loss and every gradient equal the single-process model's (fp32, 1e-5)."""
    fields = {"sequence_parallel": True, "position_embedding_type": "rope", "head_chunk_size": 8}
    results = run_distributed(_pipeline_step, 4, 2, 2, fields, False, timeout=900)
    _compare(results, _reference(fields, False))
    hidden = [shape for r in results for shape in r["hidden"]]
    assert hidden and all(shape == [MICRO, SEQ // 2, 64] for shape in hidden)  # sequence shards between stages
    last = [r for r in results if r["stage"] == 1]
    assert all(len(r["seen"]) == ACCUM for r in last)  # the model's loss ran on the last stage, once a micro-batch
    assert all(seen["fused"] for r in last for seen in r["seen"])  # with the fused head


@pytest.mark.slow
def test_pp2_carries_auxiliary_losses_to_the_last_stage() -> None:
    """A test-only layer adds a known constant and a term with gradients on every layer; the accumulator carries
    them from stage to stage: PP=2's totals, terms and gradients equal PP=1's."""
    results = run_distributed(_pipeline_step, 2, 1, 2, {}, True, timeout=900)
    ref = _reference({}, True)
    _compare(results, ref)
    seen = next(r["seen"] for r in results if r["stage"] == 1)
    assert len(seen) == len(ref["seen"]) == ACCUM
    for got, want in zip(seen, ref["seen"]):
        assert got["const"] == want["const"] == CONST * ref["layers"]  # every layer's term, both stages
        assert abs(got["fake"] - want["fake"]) < 1e-6 and got["fake"] > 0
        assert abs(got["loss"] - want["loss"]) < 1e-5
    without = _reference({}, False)["seen"]
    for got, base in zip(seen, without):  # the total is the plain loss plus the terms
        assert abs(got["loss"] - (base["loss"] + got["const"] + got["fake"])) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("rotary", [False, True])
def test_pp2_last_layer_runs_on_the_loss_rows(rotary: bool) -> None:
    """PP=2 with ``last_layer_loss_rows``: the loss rows reach the last stage in the activations and its last layer
    computes them only ([n, H], a hook sees it; every other layer the whole [b, s, H]); the loss and every gradient
    equal the single-process model's (fp32, 1e-5)."""
    fields = {"last_layer_loss_rows": True, **({"position_embedding_type": "rope"} if rotary else {})}
    results = run_distributed(_pipeline_step, 2, 1, 2, fields, False, timeout=900)
    ref = _reference(fields, False)
    _compare(results, ref)
    last, n_rows = ref["layers"] - 1, int(sum(b["loss_mask"].sum() for b in _micro_batches()))
    outputs = [(layer, shape) for r in results for layer, shape in r["outputs"]]
    on_rows = [shape for layer, shape in outputs if layer == last]
    assert len(on_rows) == ACCUM and sum(shape[0] for shape in on_rows) == n_rows
    assert all(len(shape) == 2 for shape in on_rows)  # [n, H]: the rows path was taken on the last stage
    assert all(shape == [MICRO, SEQ, 64] for layer, shape in outputs if layer != last)
    assert {layer for layer, _ in outputs} == set(range(ref["layers"]))


@pytest.mark.slow
def test_pp2_cp2_equals_one_process() -> None:
    """PP=2 x CP=2 on 4 processes with GLM's blank-infilling batches (Part A bidirectional, Part B causal): each
    micro-batch split zigzag per context-parallel rank, the last stage's loss reduced over the group, gradients
    averaged over dp x cp; the loss and every gradient equal the single-process model's (fp32, 1e-5)."""
    results = run_distributed(_pipeline_step, 4, 1, 2, {}, False, 2, timeout=900)
    _compare(results, _reference({}, False))
    hidden = [shape for r in results for shape in r["hidden"]]
    assert hidden and all(shape == [MICRO, SEQ // 2, 64] for shape in hidden)  # each rank: half of every sequence
    last = [r for r in results if r["stage"] == 1]
    assert len(last) == 2 and all(len(r["seen"]) == ACCUM for r in last)
    # the two ranks' local losses differ (different positions); the reduced loss is the whole sequence's
    assert any(a["loss"] != b["loss"] for a, b in zip(last[0]["seen"], last[1]["seen"]))


MOE_FIELDS = {
    **{"activation": "swiglu", "normalization": "RMSNorm", "add_bias_linear": False, "num_layers": 4},
    **{"position_embedding_type": "rope", "untie_embeddings_and_output_weights": True, "num_experts": 4},
    **{"moe_top_k": 2, "moe_intermediate_size": 32, "num_shared_experts": 1, "first_k_dense_replace": 1},
    **{"moe_aux_loss_coeff": 0.01, "moe_bias_update_rate": 0.01},
}


@pytest.mark.slow
def test_pp2_ep2_equals_one_process() -> None:
    """PP=2 x EP=2 on 4 processes (ZeRO-1, each data-parallel rank its own micro-batches, experts split over the
    two data-parallel ranks of each stage): the loss, every gradient (expert ones reduced over the
    expert-data-parallel group), the balance loss carried through the stages and the correction-bias update
    equal one process's over both ranks' micro-batches (fp32, 1e-5); every token copy reached an expert."""
    results = run_distributed(_pipeline_step, 4, 1, 2, MOE_FIELDS, False, 1, 2, timeout=900)
    ref = _reference(MOE_FIELDS, False, dp=2)
    _compare(results, ref)
    assert all(r["moe"] for r in results)  # DeepSpeed's pipeline engine saw the expert parameters
    assert sum(len(r["seen"]) for r in results) == 2 * ACCUM  # the last stage's two data-parallel ranks
    assert all(seen["moe_aux"] > 0 for r in results for seen in r["seen"])  # the balance loss reached the loss
    copies = MICRO * SEQ * ACCUM * 2 * MOE_FIELDS["moe_top_k"]  # tokens x top-k over both data-parallel ranks
    per_stage = {r["stage"]: r["loads"] for r in results}
    assert per_stage == {0: [copies], 1: [copies, copies]}, per_stage  # MoE layers 1 | 2, 3: no token dropped


def test_undeclared_auxiliary_term_is_refused() -> None:
    from megatron_glm.model import ModelLayout

    cfg = _config(1, 1).model
    layer = next(p for p in ModelLayout(cfg).pipe_layers if p.kind == "layer")
    part = GLMPart(layer, cfg, seed=3)
    add_fake_aux(part)
    b = _micro_batches()[0]
    h = torch.randn(MICRO, SEQ, cfg.hidden_size)
    with pytest.raises(ValueError, match=r"auxiliary loss term\(s\) \['const', 'fake'\] not among the model's \[\]"):
        part((h, torch.zeros(1), b["position_ids"], b["sep"]))


def test_a_stage_without_moe_layers_is_refused_with_expert_parallelism() -> None:
    """DeepSpeed's MoE engine needs an expert group on every stage: a stage of dense layers only is one line in the
    config check (uniform partition) and at set-up (any partition)."""
    from megatron_glm.parallel import ParallelState
    from megatron_glm.training.expert_parallel import prepare_expert_parallel

    dense_first = {**MOE_FIELDS, "first_k_dense_replace": 2}  # 4 layers over 2 stages: stage 0 = layers 0, 1
    assert problems(_config(1, 2, 1, 2, **dense_first), 8) == [
        "parallel.expert_parallel_size (2) with pipeline_model_parallel_size (2): pipeline stage 0 would hold dense "
        "layers only (2 layers, model.first_k_dense_replace 2); every stage needs MoE layers (fewer stages or more "
        "layers)"
    ]
    assert not problems(_config(1, 2, 1, 2, **MOE_FIELDS), 8)
    ps = ParallelState(pp_size=2, dp_size=2, ep_size=2)
    with pytest.raises(ConfigError, match="^expert_parallel_size 2: pipeline stage 0 holds no expert .MoE. layer; "):
        prepare_expert_parallel(torch.nn.Linear(2, 2), [], lambda _n: False, ps, 4)
