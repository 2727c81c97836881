"""The architecture as one sealed value: the split of ModelConfig, readers adopting a checkpoint's architecture,
and the formats' closed-world families."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_glm.checkpoint.formats.hf import FAMILIES
from megatron_glm.checkpoint.formats.sat import GLM130B_ARCH
from megatron_glm.config import (
    ARCHITECTURE_FIELDS,
    EXECUTION_FIELDS,
    Architecture,
    ModelConfig,
    config_to_dict,
    load_config,
)
from megatron_glm.config.architecture import TRAINING_ONLY, adopt_architecture
from megatron_glm.errors import ConfigError

ROPE = ("--model.residual_style", "post_ln_alpha", "--position-embedding-type", "rope", "--rotary-base", "500000")


def saved() -> Architecture:
    """A checkpoint's architecture: post-LN alpha, 1-D rotary with base 500000."""
    return load_config(list(ROPE)).model.architecture()


def test_the_split_covers_every_field_once_and_the_value_is_sealed() -> None:
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    assert sorted(ARCHITECTURE_FIELDS + EXECUTION_FIELDS) == sorted(names)
    assert set(EXECUTION_FIELDS) == {
        "size",
        "make_vocab_size_divisible_by",
        "attention_impl",
        "checkpoint_activations",
        "checkpoint_num_layers",
        "recompute_granularity",
        "sequence_parallel",
        "head_chunk_size",
        "last_layer_loss_rows",
        "moe_capacity_factor",
        "mtp_loss_weight",
        "context_parallel_comm",
    }
    arch = saved()
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.rotary_base = 1.0  # type: ignore[misc]
    assert Architecture.from_dict({**ModelConfig().__dict__, **arch.to_dict(), "unknown": 1}) == arch
    assert arch.to_dict()["rotary_base"] == 500000.0 and "attention_impl" not in arch.to_dict()
    # Execution options are not the architecture; implied sizes and inert options compare equal.
    model = ModelConfig(attention_impl="eager", sequence_parallel=True, head_chunk_size=8)
    assert model.architecture() == ModelConfig().architecture()
    assert (
        ModelConfig(ffn_hidden_size=256, kv_channels=16).architecture().differences(ModelConfig().architecture()) == []
    )
    assert ModelConfig(rotary_base=7.0).architecture().differences(ModelConfig().architecture()) == []  # no rotary
    assert arch.differences(ModelConfig().architecture()) == [
        "position_embedding_type",
        "rotary_base",
        "residual_style",
    ]
    rebuilt = ModelConfig(attention_impl="eager").with_architecture(arch)
    assert rebuilt.architecture() == arch and rebuilt.attention_impl == "eager"


def test_a_reader_takes_what_the_command_line_does_not_restate() -> None:
    cfg = load_config(["--lr", "0.1", "--model.attention_impl", "eager", "--hidden-dropout", "0"])
    logs: list[str] = []
    out = adopt_architecture(cfg, saved(), "ckpt", logs.append)
    assert out.model.architecture() == dataclasses.replace(saved(), hidden_dropout=0.0)
    assert out.model.attention_impl == "eager" and out.optimizer.lr == 0.1  # execution options stay this run's
    assert logs == ["architecture override: hidden_dropout 0.1 -> 0.0 (checkpoint ckpt)"]
    # Restating the checkpoint's values is no contradiction.
    same = load_config([*ROPE, "--model.num_layers", "2"])
    assert adopt_architecture(same, saved(), "ckpt", logs.append).model.architecture() == saved()
    assert "explicit" not in config_to_dict(cfg)


def test_a_contradicting_command_line_is_one_line_naming_each_field() -> None:
    cfg = load_config(["--rotary-base", "10000", "--model.residual_style", "pre_ln", "--num-layers", "2"])
    with pytest.raises(ConfigError) as err:
        adopt_architecture(cfg, saved(), "ckpt/global_step2/meta.json")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("ckpt/global_step2/meta.json: the command line contradicts the checkpoint's architecture")
    assert "rotary_base: checkpoint 500000.0 vs command line 10000.0" in msg
    assert "residual_style: checkpoint 'post_ln_alpha' vs command line 'pre_ln'" in msg
    assert "num_layers" not in msg  # restated, equal
    # A named size restates its fields: glm-large contradicts a 2-layer checkpoint.
    with pytest.raises(ConfigError, match=r"num_layers: checkpoint 2 vs command line 24; hidden_size: checkpoint 64"):
        adopt_architecture(load_config(["--model-size", "glm-large"]), saved(), "ckpt")


def test_override_architecture_allows_rotary_base_and_rotary_positions_only() -> None:
    logs: list[str] = []
    flags = ["--rotary-base", "1000000", "--max-position-embeddings", "4096"]
    cfg = load_config([*flags, "--override-architecture", "rotary_base,max_sequence_length"])
    out = adopt_architecture(cfg, saved(), "ckpt", logs.append)
    assert (out.model.rotary_base, out.model.max_sequence_length) == (1000000.0, 4096)
    assert out.model.residual_style == "post_ln_alpha"
    assert logs == [
        "architecture override: max_sequence_length 512 -> 4096, rotary_base 500000.0 -> 1000000.0 (checkpoint ckpt)"
    ]
    # A rotary option without restating the position type is the checkpoint's rotary model's: refused without the
    # flag, applied with it (it was dropped silently: compared as an inert option of the default learned model).
    # (A checkpoint at the default base 10000: the default learned model's inert base compared equal to it.)
    rope = load_config(["--position-embedding-type", "rope"]).model.architecture()
    with pytest.raises(ConfigError, match=r"rotary_base: checkpoint 10000.0 vs command line 1000000.0"):
        adopt_architecture(load_config(["--rotary-base", "1000000"]), rope, "ckpt")
    base_only = load_config(["--rotary-base", "1000000", "--override-architecture", "rotary_base"])
    assert adopt_architecture(base_only, rope, "ckpt", logs.append).model.rotary_base == 1000000.0
    # Megatron's name of the length is accepted too.
    alias = load_config(
        [*flags, "--override-architecture", "rotary_base", "--override-architecture", "max_position_embeddings"]
    )
    assert adopt_architecture(alias, saved(), "ckpt", logs.append).model.max_sequence_length == 4096
    with pytest.raises(ConfigError, match=r"max_sequence_length: checkpoint 512 vs command line 4096\); .* allow"):
        adopt_architecture(load_config(flags[2:]), saved(), "ckpt")
    with pytest.raises(
        ConfigError,
        match=r"--override-architecture hidden_size: changes the weights' shapes .*; only "
        r"apply_query_key_layer_scaling, attention_softmax_in_fp32, max_sequence_length, rotary_base "
        r"\(alias max_position_embeddings\)",
    ):
        adopt_architecture(load_config(["--override-architecture", "hidden_size"]), saved(), "ckpt")
    with pytest.raises(ConfigError, match=r"--override-architecture rope_theta: unknown field rope_theta; only"):
        adopt_architecture(load_config(["--override-architecture", "rope_theta"]), saved(), "ckpt")
    # The bf16 softmax options (GLM-4's configs set them) may be turned off for the fused kernels.
    softmax = ("--attention-softmax-in-fp32", "--apply-query-key-layer-scaling")
    glm4 = load_config([*ROPE, *softmax]).model.architecture()
    off = ["--model.attention_softmax_in_fp32", "false", "--model.apply_query_key_layer_scaling", "false"]
    with pytest.raises(ConfigError, match="attention_softmax_in_fp32: checkpoint True vs command line False"):
        adopt_architecture(load_config(off), glm4, "ckpt")
    flag = ["--override-architecture", "attention_softmax_in_fp32,apply_query_key_layer_scaling"]
    out = adopt_architecture(load_config([*off, *flag]), glm4, "ckpt", logs.append).model
    assert not out.attention_softmax_in_fp32 and not out.apply_query_key_layer_scaling and out.rotary_base == 500000.0
    learned = ModelConfig().architecture()
    with pytest.raises(ConfigError, match="learned position tables"):
        adopt_architecture(load_config(["--override-architecture", "max_sequence_length"]), learned, "ckpt")


def _other_value(arch: Architecture, name: str) -> object:
    value = getattr(arch, name)
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(arch)}[name]
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, list):  # extra_options: a name a builder reads
        return [*value, "extra_norm"]
    return value + 1 if isinstance(value, int) else value * 0.5


@pytest.mark.parametrize("family", [*(f.architecture for f in FAMILIES.values()), GLM130B_ARCH], ids=lambda f: f.name)
def test_every_format_checks_every_field_it_does_not_record(family) -> None:
    """Closed world: any architecture field (a new one included) that a format does not record and whose change
    alters the math is refused on export, by name."""
    value = family.value
    assert family.mismatch(value) is None
    checked = 0
    for name in ARCHITECTURE_FIELDS:
        changed = dataclasses.replace(value, **{name: _other_value(value, name)})
        problems = family.mismatch(changed)
        held = getattr(changed, name) in family.alternatives.get(name, ())
        if name in family.recorded or name in TRAINING_ONLY or changed.canonical() == value.canonical() or held:
            assert problems is None, (name, problems)
        else:
            assert problems is not None and problems.startswith(f"{name} = "), (name, problems)
            checked += 1
    assert checked >= 6  # the transformers-native layouts record all but the fixed GLM-4 options


class _Weights:
    """A full-tensor source over a model's weights (what write_standalone reads)."""

    def __init__(self, weights: dict) -> None:
        self.weights = weights

    def names(self) -> list[str]:
        return list(self.weights)

    def tensor(self, name: str):
        return self.weights[name]

    def release(self) -> None:
        pass


GLM_HF = ("--model.vocab_size", "128", "--layernorm-epsilon", "1e-6", "--model.block_position_encoding", "false")


@pytest.mark.parametrize(
    "fmt, flags",
    [
        *(
            (f, (*ROPE, "--model.vocab_size", "128", "--rotary-percent", "0.5", "--apply-query-key-layer-scaling"))
            for f in ("glm", "native", "safetensors")
        ),
        ("hf", GLM_HF),
    ],
)
def test_every_export_records_the_whole_architecture(fmt: str, flags: tuple, tmp_path) -> None:
    """Export -> import gives back the same architecture (every field, not only names and shapes)."""
    import torch

    from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint, open_source
    from megatron_glm.checkpoint.formats.standalone import write_standalone
    from megatron_glm.model import GLMModel, full_state_dict

    model = load_config([*flags, "--init-method-std", "0.01", "--model.attention_impl", "eager"]).model
    weights = full_state_dict(GLMModel(model, seed=3))
    out = tmp_path / "standalone"
    write_standalone(_Weights(weights), out, model, transform=lambda _n, t: t, dtype=torch.float32, tokenizer_files=[])
    src = open_source(out)
    assert src.info.config.architecture() == model.architecture()
    convert_checkpoint(out, tmp_path / fmt, ConvertOptions(format=fmt), log=lambda *_: None)
    back = open_source(tmp_path / fmt).info.config.architecture()
    assert back == model.architecture(), back.differences(model.architecture())
