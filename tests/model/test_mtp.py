"""GLM-4.5's multi-token prediction layer (``megatron_glm.model.mtp``).

The loss with MTP against an independent fp64 forward written here from the published equations (DeepSeek-V3's MTP
module as transformers' Glm4Moe names it: ``eh_proj(concat(enorm(E[t+1]), hnorm(h_t)))``, a decoder layer,
``shared_head.norm``, the shared head, predicting ``t + 2``); TP = 2 (with and without sequence parallelism) and the
pipeline's parts chained through their activations protocol against one process (fp32, losses and gradients);
the layout; off when 0; one-line config errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_glm.config import build_config, validate
from megatron_glm.errors import ConfigError
from megatron_glm.model import (
    GLMModel,
    GLMPart,
    LanguageModelLoss,
    LossBatch,
    ModelLayout,
    full_state_dict,
    load_full_state_dict,
    new_rng_tracker,
)
from megatron_glm.model.context import aux_loss_names
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.testing import run_distributed
from tests.model.helpers import make_batch
from tests.test_glm4_options import _linear, _norm, _rope, glm4_config, random_weights

torch.set_num_threads(1)


def mtp_config(**overrides: object):
    """The GLM-4-shaped toy with QK-norm (half-split rotary), untied head, one MTP layer."""
    return glm4_config("qk-half-split", **{"num_nextn_predict_layers": 1, "mtp_loss_weight": 0.3, **overrides})


#: GLM-4.5's MoE layers (one dense layer first): the MTP layer is an MoE layer too, with the balance loss on.
MOE = dict(
    num_experts=4,
    moe_top_k=2,
    moe_intermediate_size=16,
    num_shared_experts=1,
    first_k_dense_replace=1,
    moe_routed_scaling_factor=2.5,
    moe_aux_loss_coeff=0.01,
)


# -- the reference: the published equations, fp64, no package code --------------------------------------------


def _layer(h: torch.Tensor, sd: dict, p: str, cfg: dict, pos: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One pre-norm decoder layer (GQA, per-head q/k norm, half-split partial rotary, SwiGLU)."""
    b, s, _ = h.shape
    nh, g, d, kind, eps = (
        cfg[k] for k in ("num_attention_heads", "num_query_groups", "kv_channels", "normalization", "layernorm_epsilon")
    )
    n_rot = round(d * cfg["rotary_percent"])
    x = _norm(h, sd, p + "input_layernorm", kind, eps)
    qkv = _linear(x, sd, p + "attention.query_key_value")
    q = qkv[..., : nh * d].reshape(b, s, nh, d)
    k = qkv[..., nh * d : (nh + g) * d].reshape(b, s, g, d)
    v = qkv[..., (nh + g) * d :].reshape(b, s, g, d)
    q, k = _norm(q, sd, p + "attention.q_norm", kind, eps), _norm(k, sd, p + "attention.k_norm", kind, eps)
    q = _rope(q, pos[:, 0], n_rot, cfg["rotary_base"], False)
    k = _rope(k, pos[:, 0], n_rot, cfg["rotary_base"], False)
    heads = []
    for j in range(nh):
        grp = j // (nh // g)
        scores = (q[:, :, j] @ k[:, :, grp].transpose(-1, -2) / math.sqrt(d)).masked_fill(~visible, -math.inf)
        heads.append(torch.softmax(scores, -1) @ v[:, :, grp])
    h = h + _linear(torch.cat(heads, -1), sd, p + "attention.dense")
    gate, up = _linear(_norm(h, sd, p + "post_attention_layernorm", kind, eps), sd, p + "mlp.dense_h_to_4h").chunk(
        2, -1
    )
    return h + _linear(gate * torch.sigmoid(gate) * up, sd, p + "mlp.dense_4h_to_h")


def _ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean cross entropy."""
    token = torch.logsumexp(logits, -1) - logits.gather(-1, labels[..., None])[..., 0]
    return (token * mask).sum() / mask.sum()


def reference_losses(sd: dict, cfg: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(language-model loss, MTP loss)`` of a model with one MTP layer: the stack gives ``h`` (before the final
    norm); the MTP layer reads ``E[ids[t + 1]]`` (zeros past the end) and ``h[t]`` and predicts ``labels[t + 1]``
    under ``loss_mask[t + 1]`` (nothing at the last position)."""
    ids, pos, sep, labels, mask = (batch[k] for k in ("input_ids", "position_ids", "sep", "labels", "loss_mask"))
    b, s = ids.shape
    kind, eps = cfg["normalization"], cfg["layernorm_epsilon"]
    visible = torch.tril(torch.ones(s, s, dtype=torch.bool)).expand(b, s, s).clone()
    for r, n in enumerate(sep.tolist()):
        visible[r, :, :n] = True
    emb, head = sd["word_embeddings.weight"], sd["output_layer.weight"]
    h = emb[ids]
    for layer in range(cfg["num_layers"]):
        h = _layer(h, sd, f"transformer.layers.{layer}.", cfg, pos, visible)
    main = _ce(_norm(h, sd, "transformer.final_layernorm", kind, eps) @ head.T, labels, mask.double())
    p = "transformer.mtp.0."
    nxt = torch.cat([emb[ids[:, 1:]], torch.zeros(b, 1, emb.shape[1], dtype=emb.dtype)], 1)
    x = torch.cat([_norm(nxt, sd, p + "enorm", kind, eps), _norm(h, sd, p + "hnorm", kind, eps)], -1)
    x = _layer(x @ sd[p + "eh_proj.weight"].T, sd, p + "layer.", cfg, pos, visible)
    logits = _norm(x, sd, p + "final_layernorm", kind, eps) @ head.T
    zero = torch.zeros(b, 1, dtype=labels.dtype)
    mtp = _ce(logits, torch.cat([labels[:, 1:], zero], 1), torch.cat([mask[:, 1:], zero.double()], 1).double())
    return main, mtp


def _causal_batch(seed: int) -> dict[str, torch.Tensor]:
    """A GLM-4 causal batch: sep 0, positions 0.., labels the next tokens, loss on every position but padding."""
    batch = make_batch(seed)
    b, s = batch["input_ids"].shape
    batch["sep"] = torch.zeros(b, dtype=torch.long)
    batch["position_ids"] = torch.arange(s).expand(b, 2, s).clone()
    batch["labels"] = torch.cat([batch["input_ids"][:, 1:], batch["labels"][:, :1]], 1)
    batch["loss_mask"] = torch.ones(b, s)
    batch["loss_mask"][1, -3:] = 0.0  # a padded tail
    return batch


@pytest.mark.parametrize("kind", ["causal", "glm"])
def test_fp64_loss_equals_the_published_equations(kind: str) -> None:
    cfg = mtp_config()
    sd = random_weights(cfg, seed=1)
    batch = _causal_batch(3) if kind == "causal" else make_batch(4)
    model = GLMModel(cfg, seed=5, params_dtype=torch.float64)
    load_full_state_dict(model, sd)
    main, mtp = reference_losses(sd, vars(cfg), batch)
    with torch.no_grad():
        out = model.eval()(
            batch["input_ids"],
            batch["position_ids"],
            batch["sep"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
    assert set(out.aux) == {"mtp"}
    assert abs(out.aux["mtp"].item() / (0.3 * mtp.item()) - 1) < 1e-5, (out.aux["mtp"], mtp)
    total = main + 0.3 * mtp
    assert abs(out.loss.item() / total.item() - 1) < 1e-5, (out.loss, total)
    # The parts logged apart: the language-model loss alone and the MTP loss unweighted.
    assert set(out.parts) == {"lm", "mtp"}
    assert abs(out.parts["lm"].item() / main.item() - 1) < 1e-5 and abs(out.parts["mtp"].item() / mtp.item() - 1) < 1e-5
    # The MTP term is a real part of the total: other MTP weights change it.
    sd2 = {**sd, "transformer.mtp.0.eh_proj.weight": sd["transformer.mtp.0.eh_proj.weight"] * 2}
    assert abs(reference_losses(sd2, vars(cfg), batch)[1].item() - mtp.item()) > 1e-3
    # Generation and logits do not run the MTP layer: the logits equal the model without it.
    off = GLMModel(mtp_config(num_nextn_predict_layers=0), params_dtype=torch.float64)
    load_full_state_dict(off, {k: v for k, v in sd.items() if "mtp" not in k})
    with torch.no_grad():
        assert torch.equal(
            model(batch["input_ids"], batch["position_ids"], batch["sep"]),
            off.eval()(batch["input_ids"], batch["position_ids"], batch["sep"]),
        )


def test_layout_and_off_when_zero() -> None:
    cfg, off = mtp_config(), mtp_config(num_nextn_predict_layers=0)
    layout, base = ModelLayout(cfg), ModelLayout(off)
    extra = [n for n in layout.names() if n not in base]
    assert base.names() == [n for n in layout.names() if not n.startswith("transformer.mtp.")]
    layer = [n.removeprefix("transformer.layers.1.") for n in base.names() if n.startswith("transformer.layers.1.")]
    assert extra == [
        "transformer.mtp.0.enorm.weight",
        "transformer.mtp.0.hnorm.weight",
        "transformer.mtp.0.eh_proj.weight",
        *[f"transformer.mtp.0.layer.{n}" for n in layer],
        "transformer.mtp.0.final_layernorm.weight",
    ]
    assert layout["transformer.mtp.0.eh_proj.weight"].shape == (32, 64)
    assert layout["transformer.mtp.0.eh_proj.weight"].split_dim is None
    qkv = layout["transformer.mtp.0.layer.attention.query_key_value.weight"]
    assert (
        qkv.split_dim == 0
        and qkv.block_sizes == layout["transformer.layers.0.attention.query_key_value.weight"].block_sizes
    )
    final = layout.pipe_layers[-2]
    assert final.kind == "final_norm" and set(extra) < set(final.names)
    model = GLMModel(cfg)
    assert list(model.state_dict()) == layout.names()
    assert layout.parameter_count() == sum(t.numel() for t in model.parameters())
    two = ModelLayout(mtp_config(num_nextn_predict_layers=2))
    assert "transformer.mtp.1.layer.mlp.dense_4h_to_h.weight" in two
    moe = ModelLayout(mtp_config(**MOE))  # the MTP layer has the slots of layer num_layers: MoE
    router = moe["transformer.mtp.0.layer.mlp.router.weight"]
    assert router.shape == (4, 32) and "transformer.mtp.0.layer.mlp.dense_h_to_4h.weight" not in moe
    assert moe["transformer.mtp.0.layer.mlp.experts.dense_h_to_4h.weight"].expert_dim == 0


def _loss_and_grads(model, batch: dict, ps: ParallelState) -> tuple[float, float, dict]:
    model.zero_grad(set_to_none=True)
    out = model(
        batch["input_ids"], batch["position_ids"], batch["sep"], labels=batch["labels"], loss_mask=batch["loss_mask"]
    )
    out.loss.backward()
    return out.loss.item(), out.aux["mtp"].item(), full_state_dict(model, ps, grads=True)


def _chained_parts(cfg, sd: dict, batch: dict, ps: ParallelState) -> tuple[float, float, dict]:
    """The pipeline's parts chained through their activations (as DeepSpeed hands them on), then the loss."""
    tracker = new_rng_tracker(5, ps, None)
    names = aux_loss_names(cfg)  # the MoE balance loss travels in the accumulator
    parts = [GLMPart(p, cfg, ps, seed=5, tracker=tracker, aux_names=names) for p in ModelLayout(cfg).pipe_layers]
    for part in parts:
        load_full_state_dict(part, sd, ps, ignore_unexpected=True)
    x = (batch["input_ids"], batch["position_ids"], batch["sep"])
    for part in parts:
        x = part(x)
    out = LanguageModelLoss()(x, LossBatch(batch["labels"], batch["loss_mask"]))
    out.loss.backward()
    grads: dict = {}
    for part in parts:
        grads.update(full_state_dict(part, ps, grads=True))
    return out.loss.item(), out.aux["mtp"].item(), grads


def _parallel_checks(rank: int, world: int) -> dict[str, float]:
    ps = initialize_parallel_state(tp_size=world)
    batch = _causal_batch(20)
    out: dict[str, float] = {}
    for variant, extra in (("dense", {}), ("moe", MOE)):
        cfg = mtp_config(**extra)
        sd = {k: v.float() for k, v in random_weights(cfg, seed=7).items()}
        ref = GLMModel(cfg, seed=5)
        load_full_state_dict(ref, sd)
        rl, rm, rg = _loss_and_grads(ref, batch, ParallelState())
        trained = [k for k in rg if ".mtp." in k and not k.endswith("expert_bias")]
        out[f"{variant}/mtp-grad"] = min(rg[k].abs().max().item() for k in trained)
        runs = {}
        for sp in (False, True):
            par = GLMModel(mtp_config(sequence_parallel=sp, **extra), ps, seed=5)
            load_full_state_dict(par, sd, ps)
            runs[f"tp/sp={sp}"] = _loss_and_grads(par, batch, ps)
        runs["parts"] = _chained_parts(cfg, sd, batch, ParallelState())
        runs["parts-tp"] = _chained_parts(cfg, sd, batch, ps)
        runs["parts-tp-sp"] = _chained_parts(mtp_config(sequence_parallel=True, **extra), sd, batch, ps)
        for name, (loss, mtp, grads) in runs.items():
            out[f"{variant}/{name}/loss"] = abs(loss - rl) / rl
            out[f"{variant}/{name}/mtp"] = abs(mtp - rm) / rm
            assert set(grads) == set(rg), name
            out[f"{variant}/{name}/grads"] = max(
                ((grads[k] - rg[k]).abs().max() / rg[k].abs().max().clamp(min=1e-12)).item() for k in rg
            )
    return out


def test_tp2_and_pipeline_parts_equal_one_process() -> None:
    """Dense and MoE (the MTP layer an MoE layer, its balance loss carried by the parts' accumulator)."""
    results = run_distributed(_parallel_checks, 2)
    for rank, diffs in enumerate(results):
        for variant in ("dense", "moe"):
            assert diffs.pop(f"{variant}/mtp-grad") > 1e-4  # every trained MTP tensor gets a gradient
        assert len(diffs) == 2 * 5 * 3
        bad = {k: v for k, v in diffs.items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.num_nextn_predict_layers": -1}, "model.num_nextn_predict_layers must be >= 0 (0: off), got -1"),
        ({"model.mtp_loss_weight": -0.5}, "model.mtp_loss_weight must be >= 0, got -0.5"),
        (  # was trained: the layers without a target diluted the MTP loss
            {"model.num_nextn_predict_layers": 20, "data.seq_length": 16},
            "model.num_nextn_predict_layers (20) must be below data.seq_length (16): MTP layers from seq_length - 1",
        ),
        (
            {"model.num_nextn_predict_layers": 1, "model.residual_style": "deepnorm"},
            "model.num_nextn_predict_layers needs model.residual_style pre_ln, got deepnorm",
        ),
    ],
)
def test_config_errors_are_one_line(overrides: dict, message: str) -> None:
    cfg = build_config({"model.size": "glm-tiny", "model.vocab_size": 128, **overrides})
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_flags_and_sealed_architecture() -> None:
    from megatron_glm.config import ARCHITECTURE_FIELDS, EXECUTION_FIELDS, load_config

    cfg = load_config(["--num-nextn-predict-layers", "1", "--mtp-loss-weight", "0.1"]).model
    assert cfg.num_nextn_predict_layers == 1 and cfg.mtp_loss_weight == 0.1
    assert "num_nextn_predict_layers" in ARCHITECTURE_FIELDS and "mtp_loss_weight" in EXECUTION_FIELDS
    assert cfg.architecture().differences(load_config([]).model.architecture()) == ["num_nextn_predict_layers"]
    assert type(cfg.architecture()).from_dict({"num_layers": 2}).num_nextn_predict_layers == 0  # older: off
