"""The GLM family as options of the one GLMModel: logits against an independent fp64 reference, the layout of
every variant, tensor/pipeline parallelism, the embedding gradient shrink, DeepNorm's init, config errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_glm.checkpoint.reshard import merge_shards, split_full
from megatron_glm.config import ModelConfig, build_config, validate
from megatron_glm.errors import ConfigError
from megatron_glm.model import GLMModel, ModelLayout, full_state_dict, glm_loss, load_full_state_dict
from megatron_glm.parallel import ParallelState, gather_from_tensor_parallel_region, initialize_parallel_state
from megatron_glm.testing import run_distributed
from tests.model.family_reference import family_reference_logits
from tests.model.helpers import (
    EXTRA_VARIANTS,
    FAMILY,
    SEQ,
    VOCAB,
    family_config,
    make_batch,
    pipe_parts,
    random_full_state_dict,
    run_parts,
)
from tests.model.reference import reference_mask

torch.set_num_threads(1)
VARIANTS = [*FAMILY, *EXTRA_VARIANTS]
ATOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _loaded(cfg: ModelConfig, ps: ParallelState | None = None, seed: int = 3) -> tuple[GLMModel, dict]:
    model = GLMModel(cfg, ps, seed=5)
    sd = random_full_state_dict(GLMModel(cfg, seed=5), seed=seed)
    load_full_state_dict(model, sd, ps)
    return model, sd


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_equal_the_fp64_reference(name: str, impl: str) -> None:
    cfg = family_config(name, attention_impl=impl)
    model, sd = _loaded(cfg)
    batch = make_batch(1)
    ref = family_reference_logits(
        sd, dataclasses.asdict(cfg), batch["input_ids"], batch["position_ids"], reference_mask(batch["sep"], SEQ)
    )
    with torch.no_grad():
        logits = model.eval()(batch["input_ids"], batch["position_ids"], batch["sep"])
        chained = run_parts(pipe_parts(cfg, seed=5), batch) if impl == "sdpa" else logits
    assert logits.shape == (3, SEQ, VOCAB)
    assert _rel(logits, ref) < 1e-5, _rel(logits, ref)
    if impl == "sdpa":  # the pipeline's parts (PP = L + 4 stages) hold the same tensors: load and chain them
        parts = pipe_parts(cfg, seed=5)
        for part in parts:
            load_full_state_dict(part, sd, ignore_unexpected=True)
        with torch.no_grad():
            chained = run_parts(parts, batch)
        assert (chained - logits).abs().max().item() <= ATOL


def test_rotary_uses_the_right_position_rows() -> None:
    """1-D rope ignores block positions; rope_2d depends on both rows; rotary is relative: shifting every
    position by the same amount changes nothing."""
    batch = make_batch(2)
    ids, pos, sep = batch["input_ids"], batch["position_ids"], batch["sep"]
    zero_sep = torch.zeros_like(sep)
    for name, uses_block in (("glm-130b", False), ("chatglm-6b", True)):
        model, _ = _loaded(family_config(name))
        with torch.no_grad():
            base = model.eval()(ids, pos, sep)
            moved = pos.clone()
            moved[:, 1] = torch.randint(0, 12, moved[:, 1].shape, generator=torch.Generator().manual_seed(0))
            changed = (model(ids, moved, sep) - base).abs().max().item()
            shifted = pos.clone()
            shifted[:, 0] += 5
            shift = (model(ids, shifted, zero_sep) - model(ids, pos, zero_sep)).abs().max().item()
        assert (changed > 1e-3) == uses_block, (name, changed)
        if not uses_block:
            assert shift < 1e-4, shift


def test_layout_describes_every_variant() -> None:
    for name in VARIANTS:
        cfg = family_config(name)
        model, layout = GLMModel(cfg), ModelLayout(cfg)
        sd = model.state_dict(keep_vars=True)
        assert list(sd) == layout.names(), name
        for key, t in sd.items():
            spec = layout[key]
            assert tuple(t.shape) == spec.shape, key
            own = None if getattr(t, "partition_dim", None) is None else (t.partition_dim, t.partition_stride)
            if spec.partition is not None:  # replicated row-parallel biases / norms carry no attributes
                assert spec.partition == own, key
        assert layout.parameter_count() == sum(p.numel() for p in model.parameters())
        rotary = cfg.position_embedding_type != "learned_absolute"
        assert rotary == (layout.pipe_layers[1].names == ())
        assert layout.pipe_layers[1] in layout.saved_pipe_layers  # DeepSpeed writes a file for every module
        head = layout.pipe_layers[-1]
        assert head.names == (("output_layer.weight",) if cfg.untie_embeddings_and_output_weights else ())
        assert (head in layout.saved_pipe_layers) == cfg.untie_embeddings_and_output_weights
        no_bias = [n for n in layout.names() if n.endswith(".bias")]
        if cfg.normalization == "RMSNorm":
            assert not any("layernorm" in n for n in no_bias)
        if not cfg.add_bias_linear:
            assert all("query_key_value" in n for n in no_bias)


def test_gqa_and_glu_shards_round_trip_and_hold_matching_blocks() -> None:
    cfg = family_config("chatglm2-6b")
    layout = ModelLayout(cfg)
    qkv = layout["transformer.layers.0.attention.query_key_value.weight"]
    h4 = layout["transformer.layers.0.mlp.dense_h_to_4h.weight"]
    assert qkv.partition == (0, (64, 32, 32)) and h4.partition == (0, 2)
    rows = torch.arange(qkv.shape[0]).unsqueeze(1).expand(qkv.shape).clone()
    for tp in (2, 4):
        shards = [split_full(qkv, rows, r, tp) for r in range(tp)]
        assert torch.equal(merge_shards(qkv, shards), rows)
        for r, s in enumerate(shards):  # rank r: its query heads, then its key groups, then its value groups
            q, k, v = 64 // tp, 32 // tp, 32 // tp
            assert torch.equal(s[:q, 0], torch.arange(r * q, (r + 1) * q))
            assert torch.equal(s[q : q + k, 0], 64 + torch.arange(r * k, (r + 1) * k))
            assert torch.equal(s[q + k :, 0], 96 + torch.arange(r * v, (r + 1) * v))
        glu = torch.arange(h4.shape[0]).unsqueeze(1).expand(h4.shape).clone()
        for r in range(tp):  # matching halves: gate row i pairs with up row i + ffn
            s = split_full(h4, glu, r, tp)
            half = s.shape[0] // 2
            assert torch.equal(s[half:, 0] - s[:half, 0], torch.full((half,), 40))
    with pytest.raises(Exception, match="packed blocks"):
        split_full(qkv, rows, 0, 3)


def test_deepnorm_init_scales_the_value_output_and_mlp() -> None:
    cfg = family_config("glm-130b", num_layers=8, hidden_size=256, num_attention_heads=8, ffn_hidden_size=512)
    model, layout = GLMModel(cfg), ModelLayout(cfg)
    beta = (2.0 * 8) ** -0.5
    p = "transformer.layers.3."
    w = dict(model.named_parameters())
    q, k, v = w[p + "attention.query_key_value.weight"].detach().chunk(3)
    xavier = math.sqrt(2.0 / (256 + 256))
    for block, want in ((q, xavier), (k, xavier), (v, xavier * beta)):
        assert abs(block.std().item() / want - 1) < 0.05
    dense = w[p + "attention.dense.weight"].detach()
    assert abs(dense.std().item() / (xavier * beta) - 1) < 0.05
    h4 = w[p + "mlp.dense_h_to_4h.weight"].detach()
    assert abs(h4.std().item() / (math.sqrt(2.0 / (256 + 512)) * beta) - 1) < 0.05
    assert layout.block_init_stds(p + "attention.query_key_value.weight") == (xavier, xavier, xavier * beta)
    plain = GLMModel(family_config("chatglm-6b", num_layers=8, hidden_size=256, num_attention_heads=8))
    qkv = dict(plain.named_parameters())[p + "attention.query_key_value.weight"].detach()
    assert abs(qkv.std().item() / 0.02 - 1) < 0.05  # post_ln_alpha keeps GLM's N(0, init_std)


def test_embedding_grad_shrink_scales_the_word_embedding_gradient_only() -> None:
    batch = make_batch(3)
    grads, outs = {}, {}
    for alpha in (1.0, 0.1):
        # untied, so that the word embedding's gradient comes from the embedding only (not the tied head)
        cfg = family_config("glm-130b", embedding_grad_shrink=alpha, untie_embeddings_and_output_weights=True)
        model, _ = _loaded(cfg)
        logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
        glm_loss(logits, batch["labels"], batch["loss_mask"], ParallelState()).loss.backward()
        outs[alpha] = logits.detach()
        grads[alpha] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(outs[1.0], outs[0.1], rtol=0, atol=1e-6)  # a*x + (1-a)*x rounds, that is all
    word = "word_embeddings.weight"
    torch.testing.assert_close(grads[0.1][word], 0.1 * grads[1.0][word], rtol=1e-5, atol=1e-8)
    other = "transformer.layers.0.attention.dense.weight"
    torch.testing.assert_close(grads[0.1][other], grads[1.0][other], rtol=1e-4, atol=1e-7)


def test_low_precision_layer_scaled_attention_tracks_fp32() -> None:
    """bf16 with query-key layer scaling / fp32 softmax runs the explicit kernel and stays close to fp32."""
    cfg = family_config("chatglm-6b")
    model, sd = _loaded(cfg)
    low = GLMModel(cfg, seed=5, params_dtype=torch.bfloat16)
    load_full_state_dict(low, {k: v.bfloat16() for k, v in sd.items()})
    batch = make_batch(1)
    with torch.no_grad():
        ref = model.eval()(batch["input_ids"], batch["position_ids"], batch["sep"])
        out = low.eval()(batch["input_ids"], batch["position_ids"], batch["sep"])
    assert out.dtype == torch.bfloat16 and _rel(out.float(), ref) < 0.05


def _family_tp_checks(rank: int, world: int) -> dict[str, float]:
    ps = initialize_parallel_state(tp_size=world)
    batch = make_batch(20)
    out: dict[str, float] = {}
    for name in FAMILY:
        cfg = family_config(name)
        ref, sd = _loaded(cfg, seed=21)
        par, _ = _loaded(cfg, ps, seed=21)
        for model, state in ((ref, ParallelState()), (par, ps)):
            model.zero_grad(set_to_none=True)
            logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
            glm_loss(logits, batch["labels"], batch["loss_mask"], state).loss.backward()
            model.full_logits = gather_from_tensor_parallel_region(logits.detach(), state.tp_group)
        rg, pg = full_state_dict(ref, grads=True), full_state_dict(par, ps, grads=True)
        out[f"{name}/logits"] = (ref.full_logits - par.full_logits).abs().max().item()
        out[f"{name}/grads"] = max((rg[k] - pg[k]).abs().max().item() for k in rg)
        assert max(g.abs().max().item() for g in rg.values()) > 1e-3
        # Pipeline parts under TP (every pipe layer its own stage), chained, equal the TP = 1 model.
        parts = pipe_parts(cfg, ps, seed=5)
        for part in parts:
            load_full_state_dict(part, sd, ps, ignore_unexpected=True)
        logits = run_parts(parts, batch)
        glm_loss(logits, batch["labels"], batch["loss_mask"], ps).loss.backward()
        full = gather_from_tensor_parallel_region(logits.detach(), ps.tp_group)
        out[f"{name}/pipeline/logits"] = (full - ref.full_logits).abs().max().item()
        grads: dict[str, torch.Tensor] = {}
        for part in parts:
            for k, v in full_state_dict(part, ps, grads=True).items():
                grads[k] = grads[k] + v if k in grads else v  # the tied embedding's two copies are summed
        out[f"{name}/pipeline/grads"] = max((grads[k] - rg[k]).abs().max().item() for k in rg)
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_and_pipeline_parallel_match_single_process(tp: int) -> None:
    results = run_distributed(_family_tp_checks, tp)
    for rank, diffs in enumerate(results):
        bad = {k: v for k, v in diffs.items() if not v <= ATOL}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.num_query_groups": 3}, "num_query_groups (3) must divide model.num_attention_heads (4)"),
        (
            {"model.num_query_groups": 2, "parallel.tensor_model_parallel_size": 4},
            "num_query_groups (2) must be divisible by parallel.tensor_model_parallel_size (4)",
        ),
        (
            {"model.position_embedding_type": "rope_2d", "model.kv_channels": 6},
            "rope_2d needs a head dimension divisible by 4, got 6",
        ),
        ({"model.position_embedding_type": "rope", "model.rotary_percent": 1.5}, "rotary_percent must be in (0, 1]"),
        ({"model.position_embedding_type": "rope", "model.rotary_percent": 0.3}, "must be an even whole number"),
        ({"model.group_query_attention": True}, "needs model.num_query_groups > 0"),
        ({"model.embedding_grad_shrink": 0.0}, "embedding_grad_shrink must be in (0, 1]"),
        ({"model.ffn_hidden_size": 50, "parallel.tensor_model_parallel_size": 4}, "ffn_hidden_size (50)"),
    ],
)
def test_inconsistent_options_are_one_line_errors(overrides: dict, message: str) -> None:
    cfg = build_config({"model.size": "glm-tiny", "model.vocab_size": 128, **overrides})
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=cfg.parallel.tensor_model_parallel_size)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_options_have_help_and_megatron_flags() -> None:
    from megatron_glm.config import FLAG_ALIASES, load_config
    from megatron_glm.config.loader import leaf_paths

    fields = [f for f in dataclasses.fields(ModelConfig)]
    assert all(f.metadata.get("help") for f in fields)
    cfg = load_config(
        [
            "--position-embedding-type",
            "rope",
            "--rotary-percent",
            "0.5",
            "--rotary-interleaved",
            "--swiglu",
            "--normalization",
            "RMSNorm",
            "--group-query-attention",
            "--num-query-groups",
            "2",
            "--kv-channels",
            "16",
            "--disable-bias-linear",
            "--untie-embeddings-and-output-weights",
            "--apply-query-key-layer-scaling",
            "--ffn-hidden-size",
            "96",
        ]
    ).model
    assert (cfg.position_embedding_type, cfg.rotary_percent, cfg.rotary_interleaved, cfg.activation) == (
        "rope",
        0.5,
        True,
        "swiglu",
    )
    assert (cfg.normalization, cfg.num_query_groups, cfg.kv_channels, cfg.add_bias_linear) == ("RMSNorm", 2, 16, False)
    assert cfg.untie_embeddings_and_output_weights and cfg.apply_query_key_layer_scaling and cfg.ffn_hidden_size == 96
    assert all(path in leaf_paths() for path, _ in FLAG_ALIASES.values())
    with pytest.raises(ConfigError, match="position_embedding_type must be one of"):
        load_config(["--position-embedding-type", "alibi"])


#: Published sizes (glm-family.md): GLM-130B ~130B, ChatGLM-6B ~6.2B, ChatGLM2-6B ~6.2B.
PUBLISHED = {"glm-130b": 130e9, "chatglm-6b": 6.2e9, "chatglm2-6b": 6.2e9}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_named_sizes_build_on_meta_with_the_published_counts(name: str) -> None:
    cfg = build_config({"model.size": name}).model
    model = GLMModel(cfg, device="meta")
    count = sum(p.numel() for p in model.parameters())
    assert count == ModelLayout(cfg).parameter_count()
    assert abs(count / PUBLISHED[name] - 1) < 0.02, count  # 128.70e9, 6.255e9, 6.244e9
    h = cfg.hidden_size
    # Closed forms from the published shapes (independent of the layout code).
    if name == "glm-130b":
        layer = 4 * h * h + 4 * h + 3 * h * cfg.ffn_hidden_size + 2 * cfg.ffn_hidden_size + h + 4 * h
        assert count == 70 * layer + 150528 * h + 2 * h
    if name == "chatglm2-6b":
        qkv = (32 + 2 * 2) * 128
        layer = qkv * h + qkv + 32 * 128 * h + 3 * 13696 * h + 2 * h
        assert count == 28 * layer + 2 * 65024 * h + h


ARGS = ["--tensor-model-parallel-size", "2", "--parallel.data_parallel_size", "4", "--bf16"]


def test_dry_run_prints_count_and_memory_per_rank() -> None:
    import subprocess
    import sys

    from megatron_glm.model.memory import estimate_memory

    cfg = build_config({"model.size": "chatglm2-6b"}).model
    one = estimate_memory(cfg, tp=1, pp=1, dp=1, zero_stage=0, precision="fp32")
    assert one.stage_parameters == one.parameters and one.weights == 4 * one.parameters
    assert one.optimizer == 8 * one.parameters  # fp32: exp_avg + exp_avg_sq only
    split = estimate_memory(cfg, tp=2, pp=2, dp=4, zero_stage=1, precision="bf16")
    assert split.stage_parameters < one.parameters / 3
    assert split.optimizer == split.stage_parameters * 12 / 4 and split.grads == split.stage_parameters * 2
    z3 = estimate_memory(cfg, tp=2, pp=1, dp=4, zero_stage=3, precision="bf16")
    # ZeRO-3: the share, plus the untied head's [V/tp, H] weight gathered whole for the step (bf16; was left out)
    assert cfg.untie_embeddings_and_output_weights and cfg.vocab_size == 65024 and cfg.hidden_size == 4096
    assert z3.grads == z3.stage_parameters * 2 / 4
    assert z3.weights == z3.stage_parameters * 2 / 4 + 2 * (65024 // 2) * 4096
    tied = build_config({"model.size": "glm-large"}).model  # a tied head: the word embedding, nothing more
    assert not tied.untie_embeddings_and_output_weights
    tied3 = estimate_memory(tied, tp=2, pp=1, dp=4, zero_stage=3, precision="bf16")
    assert tied3.weights == tied3.grads == tied3.stage_parameters * 2 / 4
    # set-up: the rank's whole model in fp32 plus one drawn tensor; under ZeRO-3 the share plus that tensor
    assert one.weights < one.setup < one.weights * 1.2 and split.setup > split.stage_parameters * 4
    assert z3.weights < z3.setup < z3.weights + one.setup * 0.2
    out = subprocess.run(
        [sys.executable, "pretrain_glm.py", "--dry-run", "--model.size", "chatglm2-6b", "--seq-length", "2048", *ARGS],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "WORLD_SIZE": "8"},
    ).stdout
    assert f"parameters: {one.parameters:,}" in out
    assert "memory per rank (TP 2 x PP 1 x DP 4, ZeRO 1, bf16" in out and "optimizer states" in out
    assert "set-up peak" in out
