"""GLM-4.5's MoE MLP: the router and the layer against an fp64 reference written from the published equations,
tensor parallelism (and sequence parallelism) against one process, aux-loss-free balancing, the config errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_glm.config import load_config, problems
from megatron_glm.model import GLMModel, batch_attention_mask, full_state_dict
from megatron_glm.model.context import ForwardContext
from megatron_glm.model.moe import looped_linear
from megatron_glm.model.router import update_expert_bias
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.testing import run_distributed
from tests.model.helpers import make_batch, tiny_config

MOE = dict(
    activation="swiglu",
    normalization="RMSNorm",
    add_bias_linear=False,
    position_embedding_type="rope",
    rotary_percent=0.5,
    untie_embeddings_and_output_weights=True,
    num_layers=3,
    num_experts=8,
    moe_top_k=3,
    moe_intermediate_size=32,
    num_shared_experts=1,
    first_k_dense_replace=1,
    moe_routed_scaling_factor=2.5,
)


def moe_config(**kw):
    return tiny_config(**{**MOE, **kw})


def reference_moe(x, w_gate, bias, w1, w2, s1, s2, *, k, score, normalize, scale):
    """fp64, token by token, from the published equations (glm-family.md; DeepSeek-V3 / Glm4Moe)."""
    x = x.double()
    out = torch.zeros_like(x)
    chosen = []
    for t in range(x.shape[0]):
        logits = w_gate.double() @ x[t]
        s = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, 0)
        ids = sorted(torch.topk(s + bias.double(), k).indices.tolist())
        chosen.append(ids)
        w = s[ids]
        if normalize:
            w = w / w.sum()
        w = w * scale
        for j, e in enumerate(ids):
            g, u = (w1[e].double() @ x[t]).chunk(2)
            out[t] += w[j] * (w2[e].double() @ (torch.nn.functional.silu(g) * u))
        g, u = (s1.double() @ x[t]).chunk(2)
        out[t] += s2.double() @ (torch.nn.functional.silu(g) * u)
    return out, chosen


def _layer_and_reference(score: str, normalize: bool, bias: torch.Tensor):
    cfg = moe_config(moe_router_score=score, moe_norm_topk_prob=normalize)
    mlp = GLMModel(cfg, seed=7).transformer.layers["1"].mlp.eval()
    with torch.no_grad():
        mlp.router.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        mlp.router.expert_bias.copy_(bias)
    x = torch.randn(2, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    got = mlp(x, ForwardContext(mask=None))
    routing = mlp.router(x.reshape(-1, cfg.hidden_size))
    ref, chosen = reference_moe(
        x.reshape(-1, cfg.hidden_size),
        mlp.router.weight,
        mlp.router.expert_bias,
        mlp.experts.dense_h_to_4h.weight,
        mlp.experts.dense_4h_to_h.weight,
        mlp.shared_experts.dense_h_to_4h.weight,
        mlp.shared_experts.dense_4h_to_h.weight,
        k=cfg.moe_top_k,
        score=score,
        normalize=normalize,
        scale=cfg.moe_routed_scaling_factor,
    )
    return got.reshape(ref.shape), ref, routing, chosen


@pytest.mark.parametrize("score,normalize", [("sigmoid", True), ("softmax", False), ("softmax", True)])
def test_moe_layer_equals_the_fp64_reference(score: str, normalize: bool) -> None:
    bias = torch.zeros(8)
    got, ref, routing, chosen = _layer_and_reference(score, normalize, bias)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert [sorted(r) for r in routing.expert_ids.tolist()] == chosen


def test_the_bias_chooses_experts_but_does_not_weigh_them() -> None:
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0])  # experts 6 and 7 always chosen
    got, ref, routing, chosen = _layer_and_reference("sigmoid", True, bias)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert all(6 in c and 7 in c for c in chosen)
    _, _, unbiased, _ = _layer_and_reference("sigmoid", True, torch.zeros(8))
    assert not all(6 in c and 7 in c for c in [r.tolist() for r in unbiased.expert_ids])  # the bias did choose
    # the weights are the unbiased scores of the chosen experts, normalised, times the scaling factor
    s = routing.scores.gather(1, routing.expert_ids)
    assert torch.allclose(routing.weights, 2.5 * s / s.sum(-1, keepdim=True), rtol=1e-6)


def test_grouped_matmul_equals_a_loop_over_experts_with_gradients() -> None:
    from megatron_glm.model.moe import grouped_linear

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        x = torch.randn(10, 16, generator=g).to(dtype).requires_grad_()
        w = torch.randn(4, 8, 16, generator=g).to(dtype).requires_grad_()
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        a, b = grouped_linear(x, w, counts), looped_linear(x2, w2, counts)
        a.sum().backward()  # an expanded incoming gradient
        b.sum().backward()
        for p, q in ((a, b), (x.grad, x2.grad), (w.grad, w2.grad)):
            assert (p.float() - q.float()).abs().max().item() <= tol * max(1.0, q.float().abs().max().item())


def _loss_grads(model, batch, ps):
    model.zero_grad(set_to_none=True)
    res = model(
        batch["input_ids"],
        batch["position_ids"],
        batch_attention_mask(batch),
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    res.loss.backward()
    grads = {k: v for k, v in full_state_dict(model, ps, grads=True).items() if not k.endswith("expert_bias")}
    return {"loss": res.loss.detach().reshape(1), "aux": res.aux.get("moe_aux", res.loss).detach().reshape(1), **grads}


def _tp_checks(rank: int, world: int) -> dict[str, float]:
    ps = initialize_parallel_state(tp_size=world)
    batch = make_batch(4)
    cfg = moe_config(moe_aux_loss_coeff=0.01)
    ref = _loss_grads(GLMModel(cfg, seed=3).train(), batch, ParallelState())
    scale = max(v.abs().max().item() for k, v in ref.items() if "experts" in k)
    assert scale > 1e-4
    out = {}
    for name, kw in {"tp": {}, "tp+sp": {"sequence_parallel": True}}.items():
        model = GLMModel(moe_config(moe_aux_loss_coeff=0.01, **kw), ps, seed=3).train()
        got = _loss_grads(model, batch, ps)
        assert set(got) == set(ref)
        out[name] = max((got[k] - v).abs().max().item() for k, v in ref.items())
    return out


def test_tensor_and_sequence_parallel_match_one_process() -> None:
    for rank, diffs in enumerate(run_distributed(_tp_checks, 2)):
        bad = {k: v for k, v in diffs.items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: {bad}"


def _imbalance(load: torch.Tensor) -> float:
    return (load.max() / load.float().mean()).item()


def test_aux_loss_free_balancing_evens_a_skewed_load() -> None:
    """Skewed tokens (a shared direction the router favours for experts 0-1): the bias update alone, every step
    over a fresh batch, brings the largest expert load from ~3x the even share close to it."""
    cfg = moe_config(moe_bias_update_rate=0.01)
    model = GLMModel(cfg, seed=7).train()
    mlps = [model.transformer.layers[str(i)].mlp for i in (1, 2)]
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(cfg.hidden_size, generator=g)
    with torch.no_grad():
        for m in mlps:
            m.router.weight.normal_(0, 0.05, generator=g)
            m.router.weight[:2] += direction / direction.norm()
    ratios = []
    for _step in range(40):
        x = torch.randn(4, 16, cfg.hidden_size, generator=g) * 0.5 + direction / direction.norm() * 3.0
        with torch.no_grad():
            for m in mlps:
                m(x, ForwardContext(mask=None))
        loads = update_expert_bias(model)
        ratios.append(max(float(f.max() * f.numel()) for f in loads))
    print(f"max load / even share: step 1 {ratios[0]:.2f}, step 10 {ratios[9]:.2f}, step 40 {ratios[-1]:.2f}")
    assert ratios[0] > 2.0 and ratios[-1] < 1.5 and ratios[-1] < ratios[0] / 1.8
    assert all(m.router.load.sum() == 0 for m in mlps)  # counts reset after each update
    assert mlps[0].router.expert_bias[:2].max() < 0 < mlps[0].router.expert_bias[2:].max()


def test_logged_loads_name_every_moe_layer_when_split_over_stages() -> None:
    """Each router knows its place among the model's MoE layers (the MTP layer's last); two "stages" holding half
    the routers each, their :meth:`ExpertLoad.values` summed (the trainer's world sum) log what the whole model
    logs, every layer named."""
    from megatron_glm.model.router import load_metrics, routers
    from megatron_glm.training.expert_load import ExpertLoad

    cfg = moe_config(num_nextn_predict_layers=1)
    model = GLMModel(cfg, seed=7).train()
    assert [r.position for r in routers(model)] == [0, 1, 2]  # layers 1, 2 and the MTP layer
    for j, r in enumerate(routers(model)):
        r.load += torch.arange(cfg.num_experts) * (j + 1) + 1
    whole = ExpertLoad.of(cfg)
    whole.update(model)
    assert whole.layers == 3 and sorted(whole.fractions) == [0, 1, 2]
    stages = [ExpertLoad.of(cfg), ExpertLoad.of(cfg)]
    stages[0].fractions = {0: whole.fractions[0]}
    stages[1].fractions = {j: whole.fractions[j] for j in (1, 2)}
    summed = [sum(v) for v in zip(*(st.values() for st in [*stages, whole]), strict=True)]  # each layer on two ranks
    logged = whole.metrics(summed)
    assert logged == load_metrics(whole.fractions[j] for j in range(3)), logged
    assert {k for k in logged if k.startswith("moe_load_max_")} == {f"moe_load_max_{j}" for j in range(3)}
    assert logged["moe_load_max_2"] > logged["moe_load_max_0"] > 1.0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--num-experts", "6", "--moe-top-k", "8"], "model.moe_top_k (8) must be in [1, model.num_experts = 6]"),
        (["--moe-top-k", "4"], "model.moe_top_k is an MoE option but model.num_experts is 0 (a dense model)"),
        (["--num-experts", "8", "--moe-top-k", "2", "--model.activation", "gelu"], "needs model.activation swiglu"),
        (["--num-experts", "4", "--first-k-dense-replace", "5"], "model.first_k_dense_replace must be in [0, "),
        (
            [
                "--num-experts",
                "4",
                "--moe-top-k",
                "2",
                "--moe-intermediate-size",
                "33",
                "--tensor-model-parallel-size",
                "2",
            ],
            "model.moe_intermediate_size (33) must be divisible by parallel.tensor_model_parallel_size (2)",
        ),
    ],
)
def test_moe_config_errors_are_one_line(args: list[str], message: str) -> None:
    swiglu = [] if "--model.activation" in args else ["--model.activation", "swiglu"]
    found = problems(load_config([*args, *swiglu]))
    assert any(message in p and "\n" not in p for p in found), found


def test_experts_not_divisible_by_the_expert_parallel_size() -> None:
    from megatron_glm.config.moe import moe_problems

    m = moe_config(num_experts=6, moe_top_k=2)
    assert moe_problems(m, 1, 4) == ["model.num_experts (6) must be divisible by parallel.expert_parallel_size (4)"]
    assert moe_problems(m, 1, 3) == []


def test_layout_lists_dense_then_moe_layers() -> None:
    from megatron_glm.model import ModelLayout

    cfg = moe_config()
    layout = ModelLayout(cfg)
    model = GLMModel(cfg, seed=1)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == {s.name: s.shape for s in layout}
    assert "transformer.layers.0.mlp.dense_h_to_4h.weight" in layout
    spec = layout["transformer.layers.2.mlp.experts.dense_h_to_4h.weight"]
    assert spec.shape == (8, 64, 64) and spec.expert_dim == 0 and spec.split_dim == 1 and spec.blocks == 2
    assert layout["transformer.layers.2.mlp.router.expert_bias"].dtype == "fp32"
    assert not any("layers.0.mlp.router" in n for n in layout.names())
    assert math.prod(spec.shard_shape(2, 4)) == 2 * 32 * 64


def test_named_moe_sizes_have_their_published_parameter_counts() -> None:
    """Exact counts of the layouts (MTP layer included, as the releases' 358B / 110B checkpoints); without the
    embeddings and head the active counts are the published 32B / 12B."""
    from megatron_glm.config import build_config
    from megatron_glm.model.memory import estimate_memory, parameter_counts

    expected = {
        "glm-4.5": (356_785_898_816, 34_034_206_016),
        "glm-4.6": (356_785_898_816, 34_034_206_016),
        "glm-4.5-air": (109_227_310_848, 13_723_008_768),
    }
    for size, counts in expected.items():
        cfg = build_config({"model.size": size})
        assert not problems(cfg)
        assert cfg.model.num_nextn_predict_layers == 1
        assert parameter_counts(cfg.model) == counts
        total, active = parameter_counts(dataclasses.replace(cfg.model, num_nextn_predict_layers=0))
        embeddings = 2 * cfg.model.vocab_size * cfg.model.hidden_size
        published = {"glm-4.5": (355e9, 32e9), "glm-4.6": (355e9, 32e9), "glm-4.5-air": (106e9, 12e9)}[size]
        assert abs(total - published[0]) / published[0] < 0.01
        assert abs(active - embeddings - published[1]) / published[1] < 0.02
    air = build_config({"model.size": "glm-4.5-air"}).model
    built = sum(p.numel() for p in GLMModel(air, device="meta").parameters())
    assert built == parameter_counts(air)[0] == 109_227_310_848
    dense_head = dataclasses.replace(air, num_nextn_predict_layers=0)
    assert parameter_counts(dense_head)[0] == 106_852_251_264
    m = build_config({"model.size": "glm-4.5"}).model
    one = estimate_memory(m, tp=8, pp=4, dp=8, zero_stage=1, precision="bf16")
    ep8 = estimate_memory(m, tp=8, pp=4, dp=8, zero_stage=1, precision="bf16", ep=8)
    assert one.stage_parameters > 5 * ep8.stage_parameters
    assert ep8.weights == ep8.stage_parameters * 2


def test_flops_count_the_active_experts() -> None:
    """Per token: the dense layer's matrices, and on an MoE layer the router, k of the E experts and the shared
    expert (by hand), and the attention term."""
    from megatron_glm.model import ModelLayout
    from megatron_glm.model.flops import flops_per_token, matmul_parameters

    cfg = moe_config()  # H 64, 3 layers (1 dense), 8 experts top-3 of F 32, 1 shared, untied 128-row head
    h, f = 64, 32
    attention = (64 + 2 * 64) * 64 + 64 * 64
    dense = attention + 3 * cfg.ffn_size * h
    moe = attention + 8 * h + 3 * (3 * f * h) + 3 * f * h
    assert matmul_parameters(ModelLayout(cfg)) == dense + 2 * moe + 128 * h
    assert flops_per_token(cfg, 16, training=False) == 2 * (dense + 2 * moe + 128 * h) + 3 * 4 * 16 * 64


def test_pipeline_parts_carry_the_balance_loss_to_the_head() -> None:
    """The pipeline's parts, chained through the activation protocol, give the whole model's loss with the MoE
    layers' ``moe_aux`` term accumulated across the stages (its gradient reaches the routers of every stage)."""
    from megatron_glm.model import GLMPart, ModelLayout, new_rng_tracker
    from megatron_glm.model.context import aux_loss_names
    from megatron_glm.model.objective import LanguageModelLoss, LossBatch

    cfg = moe_config(moe_aux_loss_coeff=0.01)
    batch = make_batch(4)
    whole = GLMModel(cfg, seed=5).train()
    ref = whole(
        batch["input_ids"],
        batch["position_ids"],
        batch_attention_mask(batch),
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    ref.loss.backward()
    tracker, names = new_rng_tracker(5, ParallelState(), None), aux_loss_names(cfg)  # as training/pipeline.py
    assert names == ("moe_aux",)
    parts = [
        GLMPart(p, cfg, ParallelState(), seed=5, tracker=tracker, aux_names=names).train()
        for p in ModelLayout(cfg).pipe_layers
    ]
    act = (batch["input_ids"], batch["position_ids"], batch_attention_mask(batch))
    for part in parts:
        act = part(act)
    got = LanguageModelLoss()(act, LossBatch(batch["labels"], batch["loss_mask"]))
    got.loss.backward()
    assert abs(got.aux["moe_aux"].item() - ref.aux["moe_aux"].item()) < 1e-6 and ref.aux["moe_aux"] > 0
    assert abs(got.loss.item() - ref.loss.item()) < 1e-5
    router = "transformer.layers.2.mlp.router.weight"
    held = [dict(p.named_parameters()) for p in parts]
    grad = next(h[router].grad for h in held if router in h)
    assert torch.allclose(grad, dict(whole.named_parameters())[router].grad, atol=1e-6)


def _dp_bias_update(rank: int, world: int) -> list[list[float]]:
    ps = initialize_parallel_state(tp_size=1)
    model = GLMModel(moe_config(moe_bias_update_rate=0.5), ps, seed=1).train()
    router = model.transformer.layers["1"].mlp.router
    # each rank alone would move the biases differently; summed, the loads are 11 11 9 9 4 4 4 4 (mean 7)
    router.load.copy_(torch.tensor([[9, 9, 9, 9, 0, 0, 0, 0], [2, 2, 0, 0, 4, 4, 4, 4]][rank]))
    fractions = update_expert_bias(model, ps.dp_group)
    return [router.expert_bias.tolist(), fractions[0].tolist()]


def test_the_bias_update_sums_loads_over_data_parallel_ranks() -> None:
    results = run_distributed(_dp_bias_update, 2)
    assert results[0] == results[1]
    assert results[0][0] == [-0.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, 0.5]
    assert results[0][1] == pytest.approx([n / 56 for n in (11, 11, 9, 9, 4, 4, 4, 4)])


def test_local_dispatcher_groups_by_expert_and_capacity_drops_the_overflow() -> None:
    from megatron_glm.model.moe_dispatch import LocalDispatcher

    x = torch.arange(12.0).view(6, 2)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [0, 1], [3, 0]])  # expert 0 chosen by every token
    w = torch.full((6, 2), 0.5)
    grouped, counts, handle = LocalDispatcher(4).dispatch(x, ids)
    assert counts.tolist() == [6, 3, 1, 2] and torch.equal(grouped[:6], x)  # expert 0's rows first, token order
    assert torch.equal(LocalDispatcher(4).combine(grouped, handle, w), x)  # identity experts: weights sum to 1
    grouped, counts, handle = LocalDispatcher(4, capacity_factor=1.0).dispatch(x, ids)  # capacity 3 per expert
    assert counts.tolist() == [3, 3, 1, 2] and grouped.shape[0] == 9
    out = LocalDispatcher(4, capacity_factor=1.0).combine(grouped, handle, w)
    kept_zero = torch.tensor([1.0, 1, 1, 0, 0, 0]).view(6, 1)  # tokens 3-5 lost their expert-0 half
    assert torch.equal(out, x * (0.5 + 0.5 * kept_zero))
