"""Single-process GLM model tests: names, init, the independent reference, masks, kernels, pipeline
halves, activation checkpointing, low precision, loss."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_glm.config import MODEL_SIZES, build_config
from megatron_glm.errors import CheckpointError
from megatron_glm.model import (
    GLMModel,
    GLMPart,
    ModelLayout,
    flops_per_token,
    full_state_dict,
    glm_loss,
    load_full_state_dict,
    prepare_attention_mask,
    sep_to_mask,
)
from tests.model.helpers import SEQ, VOCAB, make_batch, pipe_parts, random_full_state_dict, run_parts, tiny_config
from tests.model.reference import reference_logits, reference_mask

LAYER_KEYS = [
    "input_layernorm.weight",
    "input_layernorm.bias",
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "attention.dense.weight",
    "attention.dense.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight",
    "mlp.dense_4h_to_h.bias",
]


def expected_keys(layers: range, first: bool = True, last: bool = True) -> list[str]:
    keys = ["word_embeddings.weight"] if first or last else []
    if first:
        keys += ["transformer.position_embeddings.weight", "transformer.block_position_embeddings.weight"]
    keys += [f"transformer.layers.{i}.{k}" for i in layers for k in LAYER_KEYS]
    if last:
        keys += ["transformer.final_layernorm.weight", "transformer.final_layernorm.bias"]
    return keys


def run(model: GLMModel, batch: dict, mask: torch.Tensor | None = None) -> torch.Tensor:
    return model(batch["input_ids"], batch["position_ids"], batch["sep"] if mask is None else mask)


def test_state_dict_names_shapes_and_partitions() -> None:
    cfg = tiny_config()
    model = GLMModel(cfg)
    sd = model.state_dict()
    assert list(sd) == expected_keys(range(2))
    h, p = cfg.hidden_size, cfg.max_sequence_length + 1
    assert sd["word_embeddings.weight"].shape == (VOCAB, h)
    assert sd["transformer.position_embeddings.weight"].shape == (p, h)
    assert sd["transformer.layers.1.attention.query_key_value.weight"].shape == (3 * h, h)
    assert sd["transformer.layers.1.mlp.dense_4h_to_h.weight"].shape == (h, 4 * h)
    # The layout (for checkpoint tools) agrees with the parameters' own attributes.
    for name, t in model.state_dict(keep_vars=True).items():
        own = None if getattr(t, "partition_dim", None) is None else (t.partition_dim, t.partition_stride)
        assert model.layout[name].partition == own, name
    # Original checkpoints load strictly at TP = 1.
    GLMModel(cfg, seed=99).load_state_dict(sd, strict=True)


def test_init_scheme_is_seeded_by_name() -> None:
    cfg = dataclasses.replace(tiny_config(), hidden_size=128, num_attention_heads=4, num_layers=4)
    sd = GLMModel(cfg, seed=7).state_dict()
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    for name, t in sd.items():
        if name.endswith("layernorm.weight"):
            assert torch.all(t == 1), name
        elif name.endswith("bias"):
            assert torch.all(t == 0), name
        else:
            std = out_std if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) else cfg.init_std
            assert abs(t.std().item() - std) < 0.1 * std, (name, t.std().item(), std)
    # Same seed -> same weights; a layer built alone (pipeline stage) gets the same tensors.
    again = GLMModel(cfg, seed=7).state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    stage = GLMPart(ModelLayout(cfg).pipe_layers[2 + 2], cfg, seed=7).state_dict()
    assert list(stage) == expected_keys(range(2, 3), first=False, last=False)
    assert all(torch.equal(stage[k], sd[k]) for k in stage)
    other = GLMModel(cfg, seed=8).state_dict()
    assert not torch.equal(other["word_embeddings.weight"], sd["word_embeddings.weight"])
    # Different tensors get different draws.
    assert not torch.equal(
        sd["transformer.layers.0.mlp.dense_h_to_4h.weight"], sd["transformer.layers.1.mlp.dense_h_to_4h.weight"]
    )


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_match_independent_reference(impl: str) -> None:
    cfg = tiny_config(attention_impl=impl)
    model = GLMModel(cfg).eval()
    sd = random_full_state_dict(model, seed=3)
    load_full_state_dict(model, sd)
    batch = make_batch(1)
    ref = reference_logits(
        sd,
        cfg.num_layers,
        cfg.num_attention_heads,
        batch["input_ids"],
        batch["position_ids"],
        reference_mask(batch["sep"], SEQ),
    )
    with torch.no_grad():
        logits = run(model, batch)
    assert logits.shape == (3, SEQ, VOCAB)
    torch.testing.assert_close(logits.double(), ref, rtol=0, atol=2e-5)


def test_mask_builders_agree_with_reference() -> None:
    sep = torch.tensor([0, 3, 8, SEQ])
    torch.testing.assert_close(sep_to_mask(sep, SEQ).float(), reference_mask(sep, SEQ))
    explicit = torch.rand(2, 1, SEQ, SEQ) > 0.5
    assert prepare_attention_mask(explicit, 2, SEQ, "cpu").bool_mask is not None
    with pytest.raises(ValueError):
        prepare_attention_mask(explicit, 3, SEQ, "cpu")
    with pytest.raises(TypeError):
        prepare_attention_mask(torch.tensor([1.0, 2.0]), 2, SEQ, "cpu")


def test_part_a_is_blind_to_part_b_and_part_b_is_causal() -> None:
    model = GLMModel(tiny_config()).eval()
    batch = make_batch(2)
    sep = batch["sep"]
    with torch.no_grad():
        base = run(model, batch)
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        for i, n in enumerate(sep.tolist()):
            changed["input_ids"][i, n:] = (changed["input_ids"][i, n:] + 1) % VOCAB
        out = run(model, changed)
        for i, n in enumerate(sep.tolist()):
            torch.testing.assert_close(out[i, :n], base[i, :n], rtol=0, atol=1e-6)  # Part A unchanged
            assert (out[i, n:] - base[i, n:]).abs().max() > 1e-3
        # Changing Part B token j leaves every position < j unchanged and changes position j.
        n = int(sep[0])
        for j in range(n, SEQ):
            probe = dict(batch, input_ids=batch["input_ids"].clone())
            probe["input_ids"][0, j] = (probe["input_ids"][0, j] + 7) % VOCAB
            out = run(model, probe)
            torch.testing.assert_close(out[0, :j], base[0, :j], rtol=0, atol=1e-6)
            assert (out[0, j] - base[0, j]).abs().max() > 1e-3


def test_sep_and_explicit_mask_give_identical_logits_for_every_kernel() -> None:
    batch = make_batch(4)
    explicit = sep_to_mask(batch["sep"], SEQ)
    handmade = reference_mask(batch["sep"], SEQ) > 0.5
    outs = {}
    for impl in ("sdpa", "eager"):
        model = GLMModel(tiny_config(attention_impl=impl)).eval()
        with torch.no_grad():
            outs[impl] = run(model, batch)
            assert torch.equal(outs[impl], run(model, batch, explicit))
            assert torch.equal(outs[impl], run(model, batch, handmade))
    torch.testing.assert_close(outs["sdpa"], outs["eager"], rtol=0, atol=1e-5)


def test_fully_masked_rows_are_zero_for_every_kernel() -> None:
    batch = make_batch(12)
    mask = sep_to_mask(batch["sep"], SEQ).clone()
    mask[0, 0, 3] = False  # an explicit mask may hide everything from a query (e.g. padding)
    outs = []
    for impl in ("sdpa", "eager"):
        model = GLMModel(tiny_config(attention_impl=impl)).eval()
        with torch.no_grad():
            outs.append(run(model, batch, mask))
    assert all(torch.isfinite(o).all() for o in outs)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)


def _loss_and_grads(model: GLMModel, batch: dict, mask: torch.Tensor | None = None) -> tuple:
    model.zero_grad(set_to_none=True)
    logits = run(model, batch, mask)
    glm_loss(logits, batch["labels"], batch["loss_mask"]).loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_eager_and_sdpa_gradients_agree() -> None:
    batch = make_batch(5)
    sd = random_full_state_dict(GLMModel(tiny_config()), seed=5)
    results = []
    for impl in ("sdpa", "eager"):
        model = GLMModel(tiny_config(attention_impl=impl))
        load_full_state_dict(model, sd)
        results.append(_loss_and_grads(model, batch))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_matches_sdpa() -> None:
    """The flex BlockMask built from the same mask function gives SDPA's output (flex forward on CPU,
    uncompiled; the model uses flex only on CUDA)."""
    from torch.nn.attention.flex_attention import flex_attention

    batch = make_batch(6, seq=128)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 128, 16, generator=g) for _ in range(3))
    mask = prepare_attention_mask(batch["sep"], 3, 128, "cpu")
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool_mask)
    out = flex_attention(q, k, v, block_mask=mask.block_mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention runs on CUDA")
def test_flex_matches_sdpa_on_cuda() -> None:
    batch = {k: v.cuda() for k, v in make_batch(7, seq=128).items()}
    sd = random_full_state_dict(GLMModel(tiny_config()), seed=7)
    results = []
    for impl in ("sdpa", "flex"):
        model = GLMModel(tiny_config(attention_impl=impl), device="cuda")
        load_full_state_dict(model, sd)
        results.append(_loss_and_grads(model, batch))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-4)
    for name, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][name], rtol=1e-3, atol=1e-5, msg=name)


def test_pipe_parts_chained_equal_the_whole_model() -> None:
    """The pipeline's parts (what DeepSpeed's stages hold), run one after the other, are the whole model."""
    cfg = dataclasses.replace(tiny_config(), num_layers=3)
    batch = make_batch(8)
    whole = GLMModel(cfg)
    parts = pipe_parts(cfg)
    keys = [k for p in parts for k in p.state_dict()]
    assert keys == [*expected_keys(range(3)), "word_embeddings.weight"]  # the head holds the tied copy
    assert list(parts[2].state_dict()) == expected_keys(range(0, 1), first=False, last=False)
    ref_logits, ref_grads = _loss_and_grads(whole, batch)
    logits = run_parts(parts, batch)
    glm_loss(logits, batch["labels"], batch["loss_mask"]).loss.backward()
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    part_grads = {n: p.grad for m in parts[1:-1] for n, p in m.named_parameters()}
    tied = parts[0].word_embeddings.weight.grad + parts[-1].word_embeddings.weight.grad  # all-reduced in a pipeline
    assert set(part_grads) | {"word_embeddings.weight"} == set(ref_grads)
    for name, g in part_grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(tied, ref_grads["word_embeddings.weight"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl,every", [("sdpa", 1), ("eager", 2)])
def test_activation_checkpointing_reproduces_dropout(impl: str, every: int) -> None:
    cfg = dataclasses.replace(
        tiny_config(attention_impl=impl),
        hidden_dropout=0.1,
        attention_dropout=0.2,
        num_layers=4,
        checkpoint_num_layers=every,
    )
    batch = make_batch(9)
    model = GLMModel(cfg).train()
    tracker_states = model.rng_tracker.get_states()
    results = []
    for ckpt in (False, True):
        model.transformer.checkpoint_activations = ckpt
        model.rng_tracker.set_states(tracker_states)
        torch.manual_seed(11)
        results.append(_loss_and_grads(model, batch))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=0, atol=1e-7, msg=name)
    with torch.no_grad():
        assert (model.eval()(batch["input_ids"], batch["position_ids"], batch["sep"]) - l1).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_low_precision_forward_backward(dtype: torch.dtype, impl: str) -> None:
    batch = make_batch(10)
    cfg = tiny_config(attention_impl=impl)
    ref = GLMModel(cfg).eval()
    model = GLMModel(cfg, params_dtype=dtype).eval()
    assert all(p.dtype == dtype for p in model.parameters())
    logits = run(model, batch)
    assert logits.dtype == dtype
    with torch.no_grad():
        torch.testing.assert_close(logits.float(), run(ref, batch), rtol=0, atol=0.05)
    out = glm_loss(logits, batch["labels"], batch["loss_mask"])
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_is_masked_mean_with_per_sample_sums() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    out = glm_loss(logits, labels, mask)
    ce = F.cross_entropy(logits.view(-1, 11), labels.view(-1), reduction="none").view(3, 5)
    torch.testing.assert_close(out.loss, (ce * mask).sum() / mask.sum())
    torch.testing.assert_close(out.sample_sum, (ce * mask).sum(-1))
    torch.testing.assert_close(out.sample_tokens, mask.sum(-1))
    groups = out.by_group(torch.tensor([2, 0, 2]))
    assert groups[2][1] == 2.0 and groups[0][1] == 5.0
    assert math.isclose(groups[0][0], float(ce[1].detach().sum()), rel_tol=1e-6)
    empty = glm_loss(logits, labels, torch.zeros(3, 5))
    assert empty.loss.item() == 0.0
    empty.loss.backward()
    assert torch.all(logits.grad == 0)


def test_load_full_state_dict_reports_problems() -> None:
    model = GLMModel(tiny_config())
    sd = full_state_dict(model)
    with pytest.raises(CheckpointError, match="lacks"):
        load_full_state_dict(model, {k: v for k, v in sd.items() if "final" not in k})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_full_state_dict(model, {**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="shape"):
        load_full_state_dict(model, {**sd, "word_embeddings.weight": torch.zeros(VOCAB + 1, 64)})
    stage = GLMPart(ModelLayout(tiny_config()).pipe_layers[2 + 1], tiny_config())
    load_full_state_dict(stage, sd, ignore_unexpected=True)
    assert torch.equal(
        stage.state_dict()["transformer.layers.1.mlp.dense_h_to_4h.weight"],
        sd["transformer.layers.1.mlp.dense_h_to_4h.weight"],
    )


def test_constructor_rejects_bad_configs() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        GLMModel(tiny_config(vocab_size=0))
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        GLMModel(tiny_config(num_attention_heads=5))


def test_named_sizes_match_the_reference() -> None:
    published = {  # layers, hidden, heads, max positions, padded vocab
        "glm-base": (12, 768, 12, 512, 30592),
        "glm-large": (24, 1024, 16, 512, 30592),
        "glm-large-chinese": (24, 1024, 16, 1024, 50048),
        "glm-2b": (36, 2048, 32, 1024, 50304),
        "glm-10b": (48, 4096, 64, 1024, 50304),
    }
    family = {"glm-130b", "chatglm-6b", "chatglm2-6b"}  # checked in tests/model/test_family.py
    family |= {"chatglm3-6b", "glm-4-9b", "glm-4-9b-0414", "glm-4-32b-0414"}  # tests/checkpoint/test_hf_native.py
    family |= {"glm-4.5", "glm-4.5-air", "glm-4.6"}  # tests/model/test_moe.py
    assert set(MODEL_SIZES) == {"glm-tiny", *published, *family}
    for name, want in published.items():
        m = build_config({"model.size": name}).model
        assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.max_sequence_length, m.vocab_size) == want
    tiny = build_config({"model.size": "glm-tiny", "model.vocab_size": VOCAB}).model
    assert GLMModel(tiny)(
        torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 2, 4, dtype=torch.long), torch.tensor([2])
    ).shape == (1, 4, VOCAB)
    # ~ 6 N per token for glm-10b (N ~ 9.9e9 incl. embeddings) plus attention.
    ten_b = build_config({"model.size": "glm-10b"}).model
    assert 5.5e10 < flops_per_token(ten_b, 1024) < 7.0e10


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_layers_and_loss_match_eager() -> None:
    """``compile_layers`` / ``compiled_glm_loss`` (used by the benchmark) change speed, not results."""
    from megatron_glm.model import compiled_glm_loss

    batch = make_batch(13)
    ref, model = GLMModel(tiny_config()), GLMModel(tiny_config())
    model.compile_layers()
    ref_logits, ref_grads = _loss_and_grads(ref, batch)
    logits = run(model, batch)
    compiled_glm_loss(logits, batch["labels"], batch["loss_mask"]).loss.backward()
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
