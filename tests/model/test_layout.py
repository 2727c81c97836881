"""The model layout is the one description of the tensors: it matches a built model, and an architecture option
added to it alone is carried by resharding, pipeline conversion and the standalone export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint, open_source
from megatron_glm.checkpoint.formats.native import layer_file
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.model import GLMModel, GLMPart, ModelLayout, TensorSpec, layout
from tests.checkpoint.helpers import write_glm_files
from tests.model.helpers import tiny_config

EXTRA = "mlp.extra_bias"


@pytest.mark.parametrize("overrides", [{}, {"block_position_encoding": False, "num_layers": 3}])
def test_layout_describes_the_built_model(overrides: dict) -> None:
    cfg = tiny_config(**overrides)
    model = GLMModel(cfg, seed=3)
    lay = ModelLayout(cfg)
    own = model.state_dict(keep_vars=True)
    assert list(own) == lay.names()
    for name, t in own.items():
        spec = lay[name]
        assert tuple(t.shape) == spec.shape, name
        attr = None if getattr(t, "partition_dim", None) is None else (t.partition_dim, t.partition_stride)
        assert spec.partition == attr, name
        if spec.init == "ones":
            assert torch.all(t == 1), name
        elif spec.init == "zeros":
            assert torch.all(t == 0), name
        else:
            std = lay.init_std(name)
            assert abs(t.std().item() - std) < 0.15 * std, (name, t.std().item(), std)
        assert spec.weight_decay == (t.ndim == 2), name
    # Every tensor sits in exactly one saved pipe layer; layer i is pipe layer i + 2; the tied head holds none.
    saved = [n for p in lay.saved_pipe_layers for n in p.names]
    assert sorted(saved) == sorted(own) and len(saved) == len(set(saved))
    kinds = [p.kind for p in lay.pipe_layers]
    assert kinds == ["word_embedding", "position_embeddings", *["layer"] * cfg.num_layers, "final_norm", "head"]
    assert all(lay[n].pipe_layer == p.index for p in lay.pipe_layers for n in p.names)
    assert lay.pipe_layers[-1].names == ()
    # Each pipeline part holds the layout's tensors of its pipe layer (the head: the tied word embedding).
    for pipe in lay.pipe_layers:
        held = list(GLMPart(pipe, cfg).state_dict())
        assert held == (list(pipe.names) if pipe.kind != "head" else ["word_embeddings.weight"]), pipe


def _with_extra_bias(original):
    """``layer_tensors`` plus a per-layer bias of 4H split over tensor-parallel ranks (the fake option)."""

    def layer_tensors(config, layer=0):
        return [*original(config, layer), TensorSpec(EXTRA, (4 * config.hidden_size,), "bias", 0)]

    return layer_tensors


def test_an_option_added_to_the_layout_alone_is_carried_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only edit is the layout's per-layer list: TP resharding, PP conversion and the safetensors export
    carry the new tensor bitwise (the converter's own checksum verification included)."""
    monkeypatch.setattr(layout, "layer_tensors", _with_extra_bias(layout.layer_tensors))
    cfg = tiny_config()
    lay = ModelLayout(cfg)
    extra_names = [n for n in lay.names() if n.endswith(EXTRA)]
    assert len(extra_names) == cfg.num_layers
    g = torch.Generator().manual_seed(0)
    full = {s.name: torch.randn(s.shape, generator=g) for s in lay}
    original = write_glm_files(tmp_path / "glm2", full, tp=2)
    assert original[1][extra_names[0]].shape == (2 * cfg.hidden_size,)

    def convert(src: str, dst: str, **kw: object) -> None:
        convert_checkpoint(
            tmp_path / src, tmp_path / dst, ConvertOptions(num_attention_heads=4, **kw), log=lambda *_: None
        )

    convert("glm2", "tp4", target_tp=4)
    convert("tp4", "pp2", target_tp=2, target_pp=2)
    convert("pp2", "tp1", target_tp=1)
    convert("tp1", "st", format="safetensors")
    convert("st", "glm2b", format="glm", target_tp=2)

    tp4 = safe_torch_load(tmp_path / "tp4" / "global_step0" / "mp_rank_03_model_states.pt")["module"]
    assert torch.equal(tp4[extra_names[1]], full[extra_names[1]].chunk(4)[3])
    pipe = lay[extra_names[1]].pipe_layer
    held = safe_torch_load(layer_file(tmp_path / "pp2" / "global_step0", pipe, 1))
    assert torch.equal(held[extra_names[1]], full[extra_names[1]].chunk(2)[1])
    st = open_source(tmp_path / "st")
    assert st.names() == lay.names() and all(torch.equal(st.tensor(n), full[n]) for n in extra_names)
    for r in range(2):
        back = safe_torch_load(tmp_path / "glm2b" / "0" / f"mp_rank_{r:02d}_model_states.pt")["module"]
        assert back.keys() == original[r].keys()
        assert all(torch.equal(back[k], original[r][k]) for k in back)


def test_layout_errors_name_the_tensor() -> None:
    lay = ModelLayout(dataclasses.replace(tiny_config(), num_layers=1))
    with pytest.raises(Exception, match=r"transformer\.layers\.1\.attention\.dense\.weight: not a tensor"):
        lay["transformer.layers.1.attention.dense.weight"]
    with pytest.raises(Exception, match="1 tensors that a GLM model does not have"):
        lay.check_names([*lay.names(), "foo.weight"], "x")
