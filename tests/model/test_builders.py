"""Layers built from builders: the layout's per-layer tensors are the builders' declarations, the modules are
built from them, the FLOP count reads them, a builder swapped through the seam changes model and layout together;
the tensor spec's expert axis."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.architecture import checkpoint_architecture
from megatron_glm.checkpoint.convert import ConvertOptions
from megatron_glm.checkpoint.formats.hf import GLM_ARCH
from megatron_glm.checkpoint.formats.registry import format_named
from megatron_glm.config import GLMConfig
from megatron_glm.config.architecture import adopt_architecture
from megatron_glm.errors import CheckpointError, ConfigError
from megatron_glm.model import GLMModel, ModelLayout, TensorSpec, builders, flops_per_token, glm_loss
from megatron_glm.model.tensor_spec import relative
from megatron_glm.parallel import ParallelState
from tests.model.fake_option import EXTRA, OPTION, fake_slots
from tests.model.helpers import EXTRA_VARIANTS, FAMILY, family_config, make_batch, tiny_config
from tests.test_glm4_options import VARIANTS as GLM4_VARIANTS
from tests.test_glm4_options import glm4_config

torch.set_num_threads(1)


def _configs() -> dict:
    out = {name: family_config(name) for name in [*FAMILY, *EXTRA_VARIANTS]}
    out.update({f"glm4/{name}": glm4_config(name) for name in GLM4_VARIANTS})
    out["tiny"] = tiny_config()
    return out


def test_the_layout_of_a_layer_is_what_its_builders_declare() -> None:
    for name, cfg in _configs().items():
        slots = builders.layer_slots(cfg)
        declared = [
            s for slot in slots for s in relative(slot.builder.tensors(cfg), f"transformer.layers.1.{slot.name}.")
        ]
        lay = ModelLayout(cfg)
        in_layer = [s for s in lay if s.layer == 1]
        assert [s.name for s in in_layer] == [s.name for s in declared], name
        assert all(dataclasses.replace(a, layer=None, pipe_layer=0) == b for a, b in zip(in_layer, declared)), name
        # The built layer holds one module per enabled slot; the disabled slots are None.
        layer = GLMModel(cfg).transformer.layers["1"]
        for slot in builders.LAYER_SLOTS:
            assert (getattr(layer, slot.name) is None) == (slot not in slots), (name, slot.name)
        assert ("post_mlp_layernorm" in {s.name for s in slots}) == cfg.sandwich_norm


def test_modules_are_built_from_the_declarations_at_tp2() -> None:
    """The packing the attention and MLP builders declare is the stride their linears shard with."""
    ps = ParallelState(tp_size=2, tp_rank=1)  # shards only: no communication happens while building
    for name, cfg in _configs().items():
        if cfg.query_groups % 2:  # multi-query: one key/value group does not split
            continue
        model, lay = GLMModel(cfg, ps), ModelLayout(cfg)
        for key, t in model.state_dict(keep_vars=True).items():
            spec = lay[key]
            assert tuple(t.shape) == spec.shard_shape(2), (name, key)
            if spec.partition is not None:
                assert (t.partition_dim, t.partition_stride) == spec.partition, (name, key)


def test_flops_come_from_the_declared_matrices() -> None:
    """Equal to the closed form from the shapes (QKV, dense, 2 or 3 MLP matrices, head); norms add nothing."""
    for name, cfg in _configs().items():
        h, q, kv, f = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.query_groups * cfg.head_dim,
            cfg.ffn_size,
        )
        matmul = h * (q + 2 * kv) + q * h + h * f * (3 if cfg.glu else 2)
        forward = cfg.num_layers * (2 * matmul + 4 * 64 * q) + 2 * h * cfg.vocab_size
        assert flops_per_token(cfg, 64) == 3.0 * forward, name
        assert flops_per_token(cfg, 64, training=False, num_layers=1) == forward - (cfg.num_layers - 1) * (
            2 * matmul + 4 * 64 * q
        )


def test_tensor_spec_expert_axis() -> None:
    spec = TensorSpec("mlp.experts.w", (4, 16, 8), "weight", split_dim=1, expert_dim=0, experts=4)
    assert spec.shard_shape(2) == (4, 8, 8) and spec.shard_shape(2, ep_size=2) == (2, 8, 8)
    assert spec.shard_shape(1, ep_size=4) == (1, 16, 8)
    with pytest.raises(ValueError, match="expert dimension 0 must hold the 3 experts"):
        TensorSpec("x", (4, 16), "weight", expert_dim=0, experts=3)
    with pytest.raises(ValueError, match="must hold"):
        TensorSpec("x", (4, 16), "weight", split_dim=0, expert_dim=0, experts=4)
    with pytest.raises(ValueError, match="2 experts without an expert dimension"):
        TensorSpec("x", (4, 16), "weight", experts=2)
    for cfg in _configs().values():  # dense models today: no spec has an expert axis
        assert all(s.expert_dim is None and s.experts == 1 for s in ModelLayout(cfg))


def test_an_option_added_through_a_builder_and_the_config_changes_model_and_layout_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(builders, "LAYER_SLOTS", fake_slots())
    assert not any(EXTRA in n for n in ModelLayout(tiny_config()).names())  # the option is off by default
    assert builders.known_options() == {OPTION}
    for normalization in ("LayerNorm", "RMSNorm"):
        cfg = tiny_config(normalization=normalization, extra_options=[OPTION])
        model, lay = GLMModel(cfg, seed=2), ModelLayout(cfg)
        sd = model.state_dict()
        extra = [n for n in lay.names() if f".{EXTRA}." in n]
        assert len(extra) == cfg.num_layers * (2 if normalization == "LayerNorm" else 1)
        assert list(sd) == lay.names() and all(tuple(sd[k].shape) == lay[k].shape for k in sd)
        assert all(lay[n].split_dim is None and not lay[n].weight_decay for n in extra)
        assert lay.parameter_count() == sum(p.numel() for p in model.parameters())
        batch = make_batch(3)
        logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
        glm_loss(logits, batch["labels"], batch["loss_mask"], ParallelState()).loss.backward()
        weight = dict(model.named_parameters())[f"transformer.layers.0.{EXTRA}.weight"]
        assert weight.grad.abs().max() > 0  # it is used by the forward
        with torch.no_grad():
            weight.mul_(2.0)
            assert (model(batch["input_ids"], batch["position_ids"], batch["sep"]) - logits).abs().max() > 1e-3
    monkeypatch.undo()
    assert not any(EXTRA in n for n in ModelLayout(tiny_config()).names())
    assert math.isfinite(flops_per_token(tiny_config(), 8))
    with pytest.raises(
        ConfigError, match=r"model.extra_options \['extra_norm'\]: no builder reads them \(known: \[\]\)"
    ):
        GLMModel(tiny_config(extra_options=[OPTION]))  # closed world: no builder of this build reads it


def test_the_option_is_part_of_the_sealed_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint records the option; a reader takes it from the checkpoint, a command line contradicting it is
    refused with the field named, and a format that does not hold it refuses it on export."""
    monkeypatch.setattr(builders, "LAYER_SLOTS", fake_slots())
    on = tiny_config(extra_options=[OPTION])
    step = tmp_path / "global_step1"
    step.mkdir()
    (step / "meta.json").write_text(json.dumps({"config": {"model": dataclasses.asdict(on)}}))
    saved, where = checkpoint_architecture(step)
    assert saved == on.architecture() and saved.differences(tiny_config().architecture()) == ["extra_options"]
    off = dataclasses.replace(GLMConfig(), model=tiny_config(), explicit=frozenset({"model.extra_options"}))
    with pytest.raises(ConfigError, match=r"extra_options: checkpoint \['extra_norm'\] vs command line \[\]"):
        adopt_architecture(off, saved, where, log=lambda _: None)
    quiet = dataclasses.replace(off, explicit=frozenset())  # not restated: the checkpoint's option
    assert adopt_architecture(quiet, saved, where, log=lambda _: None).model.extra_options == [OPTION]
    assert GLM_ARCH.mismatch(saved) == "extra_options = ['extra_norm'] (this layout: [])"
    with pytest.raises(CheckpointError, match="extra_options"):
        format_named("hf").check(on, ConvertOptions(format="hf"))
