"""GLM-4's architecture options: sandwich norms (GLM-4-0414), QK-norm (GLM-4.5) and both rotary layouts.

Our logits against an independent fp64 forward written here from the published equations (transformers'
``Glm4DecoderLayer``, ``Glm4MoeAttention``); our rotation against transformers' own ``apply_rotary_pos_emb``
(``glm4``: interleaved, ``glm4_moe``: half-split); TP = 2 and the pipeline's parts (TP = 1 and 2) against TP = 1;
the layout's tensors; one-line config errors; the closed-world exports that cannot hold the options refuse them.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_glm.config import ModelConfig, build_config, validate
from megatron_glm.errors import ConfigError
from megatron_glm.model import GLMModel, ModelLayout, full_state_dict, glm_loss, load_full_state_dict
from megatron_glm.model.rotary import RotaryPositions
from megatron_glm.parallel import ParallelState, gather_from_tensor_parallel_region, initialize_parallel_state
from megatron_glm.testing import run_distributed
from tests.model.helpers import SEQ, VOCAB, make_batch, pipe_parts, run_parts, tiny_config

torch.set_num_threads(1)

#: A GLM-4-shaped toy: GQA (8 heads, 2 groups of 8 dims), SwiGLU, RMSNorm, QKV bias only, rotary on half the head,
#: untied head.
GLM4 = dict(
    hidden_size=32,
    num_attention_heads=8,
    kv_channels=8,
    num_query_groups=2,
    ffn_hidden_size=40,
    max_sequence_length=64,
    position_embedding_type="rope",
    rotary_percent=0.5,
    rotary_base=500.0,
    activation="swiglu",
    normalization="RMSNorm",
    add_qkv_bias=True,
    add_bias_linear=False,
    untie_embeddings_and_output_weights=True,
    layernorm_epsilon=1e-5,
)
VARIANTS = {
    "sandwich-interleaved": dict(sandwich_norm=True, rotary_interleaved=True),
    "qk-half-split": dict(qk_norm=True, rotary_interleaved=False),
    "both-interleaved": dict(sandwich_norm=True, qk_norm=True, rotary_interleaved=True),
    "both-half-split": dict(sandwich_norm=True, qk_norm=True, rotary_interleaved=False),
    "both-layernorm-biases": dict(sandwich_norm=True, qk_norm=True, normalization="LayerNorm", add_bias_linear=True),
}


def glm4_config(name: str, **overrides: object) -> ModelConfig:
    return tiny_config(**{**GLM4, **VARIANTS[name], **overrides})


def random_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random full tensors by the layout (norm weights near 1, everything else small and non-zero)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in ModelLayout(cfg):
        base = 1.0 if spec.role == "norm" else 0.0
        out[spec.name] = base + 0.1 * torch.randn(spec.shape, generator=g, dtype=torch.float64)
    return out


# -- the reference: the published equations, fp64, no package code --------------------------------------------


def _norm(x: torch.Tensor, sd: dict, name: str, kind: str, eps: float) -> torch.Tensor:
    w = sd[name + ".weight"]
    if kind == "RMSNorm":
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w
    mu = x.mean(-1, keepdim=True)
    return (x - mu) * torch.rsqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * w + sd[name + ".bias"]


def _linear(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _rope(x: torch.Tensor, pos: torch.Tensor, n: int, base: float, interleaved: bool) -> torch.Tensor:
    """Su et al.'s rotation of the first ``n`` dims of ``x [b, s, heads, d]``: pair ``i`` (dims ``(2i, 2i+1)``
    interleaved, ``(i, i + n/2)`` half-split) turned by ``pos x base^(-2i/n)``; the other dims pass."""
    out = x.clone()
    for i in range(n // 2):
        angle = (pos.double() * base ** (-2.0 * i / n))[..., None]  # [b, s, 1]
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + n // 2)
        out[..., a] = x[..., a] * torch.cos(angle) - x[..., b] * torch.sin(angle)
        out[..., b] = x[..., b] * torch.cos(angle) + x[..., a] * torch.sin(angle)
    return out


def reference_logits(sd: dict, cfg: dict, ids: torch.Tensor, pos: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
    """Full logits ``[b, s, V]``: word embedding; per layer ``h += [N_pa](Attn(N1(h)))``, ``h += [N_pm](MLP(N2(h)))``
    (attention: GQA, optional per-head q/k norm, then rotary on row 0 of the positions; GLM's mask: column ``j``
    visible to row ``i`` when ``j < sep`` or ``j <= i``); final norm; untied head."""
    b, s = ids.shape
    nh, g, d, eps, kind = cfg["num_attention_heads"], cfg["num_query_groups"], cfg["kv_channels"], 1e-5, None
    kind, n_rot, base = cfg["normalization"], round(d * cfg["rotary_percent"]), cfg["rotary_base"]
    eps = cfg["layernorm_epsilon"]
    visible = torch.tril(torch.ones(s, s, dtype=torch.bool)).expand(b, s, s).clone()
    for r, n in enumerate(sep.tolist()):
        visible[r, :, :n] = True
    h = sd["word_embeddings.weight"][ids]
    for layer in range(cfg["num_layers"]):
        p = f"transformer.layers.{layer}."
        x = _norm(h, sd, p + "input_layernorm", kind, eps)
        qkv = _linear(x, sd, p + "attention.query_key_value")
        q = qkv[..., : nh * d].reshape(b, s, nh, d)
        k = qkv[..., nh * d : (nh + g) * d].reshape(b, s, g, d)
        v = qkv[..., (nh + g) * d :].reshape(b, s, g, d)
        if cfg["qk_norm"]:
            q, k = _norm(q, sd, p + "attention.q_norm", kind, eps), _norm(k, sd, p + "attention.k_norm", kind, eps)
        q = _rope(q, pos[:, 0], n_rot, base, cfg["rotary_interleaved"])
        k = _rope(k, pos[:, 0], n_rot, base, cfg["rotary_interleaved"])
        heads = []
        for j in range(nh):
            grp = j // (nh // g)
            scores = (q[:, :, j] @ k[:, :, grp].transpose(-1, -2) / math.sqrt(d)).masked_fill(~visible, -math.inf)
            heads.append(torch.softmax(scores, -1) @ v[:, :, grp])
        a = _linear(torch.cat(heads, -1), sd, p + "attention.dense")
        if cfg["sandwich_norm"]:
            a = _norm(a, sd, p + "post_self_attn_layernorm", kind, eps)
        h = h + a
        x = _norm(h, sd, p + "post_attention_layernorm", kind, eps)
        gate, up = _linear(x, sd, p + "mlp.dense_h_to_4h").chunk(2, -1)
        m = _linear(gate * torch.sigmoid(gate) * up, sd, p + "mlp.dense_4h_to_h")
        if cfg["sandwich_norm"]:
            m = _norm(m, sd, p + "post_mlp_layernorm", kind, eps)
        h = h + m
    return _norm(h, sd, "transformer.final_layernorm", kind, eps) @ sd["output_layer.weight"].T


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fp64_logits_equal_the_published_equations(name: str) -> None:
    cfg = glm4_config(name)
    sd = random_weights(cfg, seed=1)
    model = GLMModel(cfg, seed=5, params_dtype=torch.float64)
    load_full_state_dict(model, sd)
    batch = make_batch(4)
    ids, pos, sep = batch["input_ids"], batch["position_ids"], batch["sep"]
    ref = reference_logits(sd, vars(cfg), ids, pos, sep)
    with torch.no_grad():
        ours = model.eval()(ids, pos, sep)
        other = GLMModel(glm4_config(name, sandwich_norm=False, qk_norm=False), params_dtype=torch.float64)
        load_full_state_dict(other, {k: v for k, v in sd.items() if k in ModelLayout(other.config)})
        without = other.eval()(ids, pos, sep)
    assert ours.dtype == torch.float64 and ours.shape == (3, SEQ, VOCAB)
    # Rotary angles are computed in fp32 (as the released code): ~1e-7 relative, far below any option's effect.
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-6, rel
    effect = ((without - ref).norm() / ref.norm()).item()
    assert effect > 1e-2, effect  # the options change the logits: the comparison sees them


def test_the_rotary_layouts_are_transformers_own() -> None:
    """Interleaved = transformers' ``glm4.apply_rotary_pos_emb`` (GLM-4-0414), half-split = ``glm4_moe``'s
    (GLM-4.5), both on the first half of a 16-dim head with theta 10000, as their rotary embedding builds cos/sin."""
    glm4 = pytest.importorskip("transformers.models.glm4.modeling_glm4")
    glm4_moe = pytest.importorskip("transformers.models.glm4_moe.modeling_glm4_moe")
    b, heads, s, d, factor, theta = 2, 3, 7, 16, 0.5, 10000.0
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(b, heads, s, d, generator=g), torch.randn(b, heads, s, d, generator=g)
    position = torch.randint(0, 50, (b, s), generator=g)
    dim = int(d * factor)  # transformers' default rope init: inv_freq over the rotary dims, emb = cat(freqs, freqs)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    emb = torch.cat([position[..., None].float() * inv_freq] * 2, dim=-1)
    position_ids = torch.stack([position, torch.zeros_like(position)], dim=1)
    for module, interleaved in ((glm4, True), (glm4_moe, False)):
        cfg = tiny_config(
            hidden_size=48,
            num_attention_heads=heads,
            kv_channels=d,
            position_embedding_type="rope",
            rotary_percent=factor,
            rotary_base=theta,
            rotary_interleaved=interleaved,
        )
        theirs = module.apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
        rotary = RotaryPositions(cfg, position_ids)
        ours = rotary.apply(q), rotary.apply(k)
        for a, t in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, t, rtol=0, atol=2e-6)
            assert torch.equal(a[..., dim:], t[..., dim:]) and (a[..., :dim] - q[..., :dim]).abs().max() > 0.1
    # the two layouts really differ (the comparison above could not pass with the wrong one)
    half_split = glm4_moe.apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())[0]
    assert (half_split - glm4.apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())[0]).abs().max() > 1e-2


def test_layout_names_shapes_and_replicated_norms() -> None:
    for name in VARIANTS:
        cfg = glm4_config(name)
        model, layout = GLMModel(cfg), ModelLayout(cfg)
        sd = model.state_dict()
        assert list(sd) == layout.names(), name
        assert all(tuple(t.shape) == layout[k].shape for k, t in sd.items())
        p = "transformer.layers.1."
        suffixes = (".weight", ".bias") if cfg.normalization == "LayerNorm" else (".weight",)
        expected = {
            "post_self_attn_layernorm": (cfg.hidden_size,) if cfg.sandwich_norm else None,
            "post_mlp_layernorm": (cfg.hidden_size,) if cfg.sandwich_norm else None,
            "attention.q_norm": (cfg.head_dim,) if cfg.qk_norm else None,
            "attention.k_norm": (cfg.head_dim,) if cfg.qk_norm else None,
        }
        for norm, shape in expected.items():
            for suffix in suffixes:
                if shape is None:
                    assert p + norm + suffix not in layout
                    continue
                spec = layout[p + norm + suffix]
                assert spec.shape == shape and spec.split_dim is None and not spec.weight_decay
                assert spec.init == ("ones" if suffix == ".weight" else "zeros")
                assert torch.equal(sd[p + norm + suffix], torch.full(shape, 1.0 if suffix == ".weight" else 0.0))
                assert spec.pipe_layer == 3  # layer 1's pipe layer
        assert layout.parameter_count() == sum(t.numel() for t in model.parameters())


def _step(model: GLMModel, batch: dict, ps: ParallelState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
    glm_loss(logits, batch["labels"], batch["loss_mask"], ps).loss.backward()
    return gather_from_tensor_parallel_region(logits.detach(), ps.tp_group), full_state_dict(model, ps, grads=True)


def _parallel_checks(rank: int, world: int) -> dict[str, float]:
    """fp32, both options on, each rotary layout, sequence parallelism on and off: TP = world and the pipeline's
    parts (every pipe layer a stage; TP = 1 and TP = world) against the single-process model."""
    ps = initialize_parallel_state(tp_size=world)
    batch = make_batch(20)
    out: dict[str, float] = {}
    for name in ("both-interleaved", "both-half-split", "both-layernorm-biases"):
        cfg = glm4_config(name)
        sd = {k: v.float() for k, v in random_weights(cfg, seed=7).items()}
        ref = GLMModel(cfg, seed=5)
        load_full_state_dict(ref, sd)
        rl, rg = _step(ref, batch, ParallelState())
        for norm in ("attention.q_norm.weight", "attention.k_norm.weight", "post_mlp_layernorm.weight"):
            assert rg[f"transformer.layers.0.{norm}"].abs().max() > 1e-3, norm  # the new norms get gradients
        for seq_par in (False, True):
            par = GLMModel(glm4_config(name, sequence_parallel=seq_par), ps, seed=5)
            load_full_state_dict(par, sd, ps)
            pl, pg = _step(par, batch, ps)
            out[f"{name}/tp/sp={seq_par}/logits"] = (rl - pl).abs().max().item()
            out[f"{name}/tp/sp={seq_par}/grads"] = max((rg[k] - pg[k]).abs().max().item() for k in rg)
        for label, state in (("pp", ParallelState()), ("pp-tp", ps)):  # the pipeline's parts, chained
            parts = pipe_parts(cfg, state, seed=5)
            for part in parts:
                load_full_state_dict(part, sd, state, ignore_unexpected=True)
            logits = run_parts(parts, batch)
            glm_loss(logits, batch["labels"], batch["loss_mask"], state).loss.backward()
            full = gather_from_tensor_parallel_region(logits.detach(), state.tp_group)
            grads: dict[str, torch.Tensor] = {}
            for part in parts:
                grads.update(full_state_dict(part, state, grads=True))
            out[f"{name}/{label}/logits"] = (full - rl).abs().max().item()
            out[f"{name}/{label}/grads"] = max((grads[k] - rg[k]).abs().max().item() for k in rg)
    return out


def test_tp2_and_pipeline_parts_equal_tp1() -> None:
    results = run_distributed(_parallel_checks, 2)
    for rank, diffs in enumerate(results):
        assert len(diffs) == 3 * 4 * 2  # 3 variants x (TP, TP + SP, parts, parts under TP) x (logits, grads)
        bad = {k: v for k, v in diffs.items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"model.sandwich_norm": True, "model.residual_style": "post_ln_alpha"},
            "model.sandwich_norm needs model.residual_style pre_ln, got post_ln_alpha",
        ),
        (
            {"model.sandwich_norm": True, "model.residual_style": "deepnorm"},
            "model.sandwich_norm needs model.residual_style pre_ln, got deepnorm",
        ),
    ],
)
def test_config_errors_are_one_line(overrides: dict, message: str) -> None:
    cfg = build_config({"model.size": "glm-tiny", "model.vocab_size": 128, **overrides})
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_flags_and_sealed_architecture() -> None:
    from megatron_glm.config import load_config
    from megatron_glm.config.architecture import ARCHITECTURE_FIELDS

    cfg = load_config(["--sandwich-norm", "--qk-norm"]).model
    assert cfg.sandwich_norm and cfg.qk_norm
    dotted = load_config(["--model.sandwich_norm", "true", "--model.qk_norm", "true"]).model
    assert dotted.sandwich_norm and dotted.qk_norm
    assert {"sandwich_norm", "qk_norm"} <= set(ARCHITECTURE_FIELDS)
    arch = cfg.architecture()
    assert arch.differences(load_config([]).model.architecture()) == ["sandwich_norm", "qk_norm"]
    assert type(arch).from_dict({"num_layers": 2}).sandwich_norm is False  # older checkpoints: off


def test_closed_world_exports_refuse_the_options() -> None:
    """Every checkpoint format family that does not record a GLM-4 option refuses a model that sets it, in one
    line naming the field (the HF families through ``family_for``, GLM-130B's SAT layout)."""
    from megatron_glm.checkpoint.formats.hf import FAMILIES, family_for
    from megatron_glm.checkpoint.formats.sat import GLM130B_ARCH, check_sat_architecture
    from megatron_glm.errors import CheckpointError

    families = [f.architecture for f in FAMILIES.values()] + [GLM130B_ARCH]
    checked = 0
    for family in families:
        for option in ("sandwich_norm", "qk_norm"):
            if option in family.recorded:
                continue
            value = family.value.to_dict()
            if option == "sandwich_norm":
                value["residual_style"] = "pre_ln"
            arch = type(family.value)(**{**value, option: not value[option]})
            assert any(m.startswith(f"{option} = ") for m in family.mismatches(arch)), (family.name, option)
            checked += 1
    assert checked >= 6
    for option in ("sandwich_norm", "qk_norm"):
        cfg = ModelConfig().with_architecture(
            type(FAMILIES["glm"].architecture.value)(**{**ModelConfig().architecture().to_dict(), option: True})
        )
        with pytest.raises(CheckpointError) as err:
            family_for(cfg)
        assert f"glm: {option} = True (this layout: False)" in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(CheckpointError, match=f"sat \\(GLM-130B\\) layout cannot hold this model: .*{option}"):
            check_sat_architecture(cfg)


def test_loss_rows_and_kv_cache_paths_hold_the_new_norms() -> None:
    """The last layer on the loss rows only (training) and the KV-cache forward (generation, keys cached after
    the QK-norm and the rotation) equal the full forward."""
    from megatron_glm.generation import KVCache
    from megatron_glm.model import sep_to_mask

    cfg = glm4_config("both-half-split")
    model = GLMModel(cfg, seed=5)
    load_full_state_dict(model, {k: v.float() for k, v in random_weights(cfg, seed=2).items()})
    batch = make_batch(6)
    ids, pos, sep = batch["input_ids"], batch["position_ids"], batch["sep"]
    with torch.no_grad():
        full = model.eval()(ids, pos, sep)
        want = glm_loss(full, batch["labels"], batch["loss_mask"], ParallelState()).loss
        got = model(ids, pos, sep, labels=batch["labels"], loss_mask=batch["loss_mask"]).loss
        assert cfg.last_layer_loss_rows and abs(got.item() - want.item()) < 1e-5
        one, n = slice(0, 1), int(sep[0])
        cache = KVCache(capacity=4)
        steps = [model(ids[one, :n], pos[one, :, :n], sep[one], kv_cache=cache)]
        for j in range(n, SEQ):
            mask = sep_to_mask(sep[one], SEQ)[:, :, j : j + 1, : j + 1]
            steps.append(model(ids[one, j : j + 1], pos[one, :, j : j + 1], mask, kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full[one], rtol=0, atol=2e-5)
