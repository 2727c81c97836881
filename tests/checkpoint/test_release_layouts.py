"""The released checkpoint layouts of the GLM family: GLM-130B's SwissArmyTransformer files, ChatGLM-6B's and
ChatGLM2-6B's HuggingFace folders.

Each tiny checkpoint is written here in THEIR layout, from the published names, shapes and packing (not by our
exporter); import -> our TP=2 training checkpoint -> export gives back the same names, shapes, dtypes and bytes;
the imported model's logits equal the fp64 reference of tests/model/family_reference.py run on their tensors
(which unpacks their per-head QKV itself); a missing or misshaped tensor is a one-line error naming it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint, open_source
from megatron_glm.errors import CheckpointError
from megatron_glm.model import GLMModel, load_full_state_dict
from tests.model.family_reference import (
    chatglm2_state_dict,
    chatglm6b_state_dict,
    family_reference_logits,
    sat_glm130b_state_dict,
)
from tests.model.helpers import FAMILY, SEQ, VOCAB, make_batch
from tests.model.reference import reference_mask

torch.set_num_threads(1)
QUIET = lambda *_: None
LAYERS = 2


def _rand(g: torch.Generator, *shape: int, base: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (base + 0.05 * torch.randn(shape, generator=g)).to(dtype)


# -- their layouts, from the published names ------------------------------------------------------------------


def chatglm6b_tensors(seed: int, *, tied: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF ChatGLM-6B (tiny: H 32, 4 heads, inner 64): per-head QKV, 2-D rotary ``inv_freq`` of hd / 2 dims rounded
    to fp16 (THUDM's code), ``lm_head.weight`` (the word embedding when tied, as the release)."""
    o = FAMILY["chatglm-6b"]
    h, nh, f = o["hidden_size"], o["num_attention_heads"], o["ffn_hidden_size"]
    hd = h // nh
    g = torch.Generator().manual_seed(seed)
    inv = (1.0 / (10000 ** (torch.arange(0, hd // 2, 2).float() / (hd // 2)))).half().to(dtype)
    sd = {"transformer.word_embeddings.weight": _rand(g, VOCAB, h, dtype=dtype)}
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": _rand(g, h, base=1.0, dtype=dtype),
            p + "input_layernorm.bias": _rand(g, h, dtype=dtype),
            p + "attention.rotary_emb.inv_freq": inv.clone(),
            p + "attention.query_key_value.weight": _rand(g, 3 * h, h, dtype=dtype),
            p + "attention.query_key_value.bias": _rand(g, 3 * h, dtype=dtype),
            p + "attention.dense.weight": _rand(g, h, h, dtype=dtype),
            p + "attention.dense.bias": _rand(g, h, dtype=dtype),
            p + "post_attention_layernorm.weight": _rand(g, h, base=1.0, dtype=dtype),
            p + "post_attention_layernorm.bias": _rand(g, h, dtype=dtype),
            p + "mlp.dense_h_to_4h.weight": _rand(g, f, h, dtype=dtype),
            p + "mlp.dense_h_to_4h.bias": _rand(g, f, dtype=dtype),
            p + "mlp.dense_4h_to_h.weight": _rand(g, h, f, dtype=dtype),
            p + "mlp.dense_4h_to_h.bias": _rand(g, h, dtype=dtype),
        }
    sd["transformer.final_layernorm.weight"] = _rand(g, h, base=1.0, dtype=dtype)
    sd["transformer.final_layernorm.bias"] = _rand(g, h, dtype=dtype)
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone() if tied else _rand(g, VOCAB, h, dtype=dtype)
    return sd


def chatglm6b_config(tied: bool = True) -> dict:
    o = FAMILY["chatglm-6b"]
    return {
        "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
        "model_type": "chatglm",
        "num_layers": LAYERS,
        "hidden_size": o["hidden_size"],
        "num_attention_heads": o["num_attention_heads"],
        "vocab_size": VOCAB,
        "inner_hidden_size": o["ffn_hidden_size"],
        "max_sequence_length": o["max_sequence_length"],
        "layernorm_epsilon": 1e-5,
        "position_encoding_2d": True,
        "bos_token_id": 5,
        "eos_token_id": 6,
        "pad_token_id": 0,
        "use_cache": True,
        **({} if tied else {"tie_word_embeddings": False}),
    }


def chatglm2_tensors(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF ChatGLM2-6B (tiny: H 32, 8 heads of 8, 4 groups, FFN 40): ``[Q; K of groups; V of groups]``, SwiGLU,
    RMSNorm, QKV bias only, untied output layer, ``inv_freq`` of an hd / 2 rotary computed in the weights' dtype."""
    o = FAMILY["chatglm2-6b"]
    h, nh, hd, grp, f = (o[k] for k in ("hidden_size", "num_attention_heads", "kv_channels", "num_query_groups",
                                         "ffn_hidden_size"))  # fmt: skip
    qkv = (nh + 2 * grp) * hd
    g = torch.Generator().manual_seed(seed)
    dim = hd // 2
    sd = {
        "transformer.embedding.word_embeddings.weight": _rand(g, VOCAB, h, dtype=dtype),
        "transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype) / dim)),
    }
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": _rand(g, h, base=1.0, dtype=dtype),
            p + "self_attention.query_key_value.weight": _rand(g, qkv, h, dtype=dtype),
            p + "self_attention.query_key_value.bias": _rand(g, qkv, dtype=dtype),
            p + "self_attention.dense.weight": _rand(g, h, nh * hd, dtype=dtype),
            p + "post_attention_layernorm.weight": _rand(g, h, base=1.0, dtype=dtype),
            p + "mlp.dense_h_to_4h.weight": _rand(g, 2 * f, h, dtype=dtype),
            p + "mlp.dense_4h_to_h.weight": _rand(g, h, f, dtype=dtype),
        }
    sd["transformer.encoder.final_layernorm.weight"] = _rand(g, h, base=1.0, dtype=dtype)
    sd["transformer.output_layer.weight"] = _rand(g, VOCAB, h, dtype=dtype)
    return sd


def chatglm2_config() -> dict:
    o = FAMILY["chatglm2-6b"]
    return {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "num_layers": LAYERS,
        "hidden_size": o["hidden_size"],
        "num_attention_heads": o["num_attention_heads"],
        "kv_channels": o["kv_channels"],
        "ffn_hidden_size": o["ffn_hidden_size"],
        "padded_vocab_size": VOCAB,
        "seq_length": o["max_sequence_length"],
        "multi_query_attention": True,
        "multi_query_group_num": o["num_query_groups"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_softmax_in_fp32": True,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "layernorm_epsilon": 1e-5,
        "rmsnorm": True,
        "post_layer_norm": True,
        "original_rope": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def sat_ranks(seed: int, tp: int = 2, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    """SAT GLM-130B rank files (tiny: H 32, 4 heads, inner 48): each rank's QKV packed per head over its heads,
    GeGLU ``dense_h_to_4h`` the rank's ``[W1_r; W2_r]`` (2 inner / tp rows), row-parallel matrices split by columns,
    the vocabulary by rows; norms and row-parallel biases the same on every rank; SAT's rotary buffer."""
    o = FAMILY["glm-130b"]
    h, nh, f = o["hidden_size"], o["num_attention_heads"], o["ffn_hidden_size"]
    g = torch.Generator().manual_seed(seed)
    shared = {}
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            shared[p + n + ".weight"] = _rand(g, h, base=1.0, dtype=dtype)
            shared[p + n + ".bias"] = _rand(g, h, dtype=dtype)
        shared[p + "attention.dense.bias"] = _rand(g, h, dtype=dtype)
        shared[p + "mlp.dense_4h_to_h.bias"] = _rand(g, h, dtype=dtype)
    shared["transformer.final_layernorm.weight"] = _rand(g, h, base=1.0, dtype=dtype)
    shared["transformer.final_layernorm.bias"] = _rand(g, h, dtype=dtype)
    hd = h // nh
    inv = (1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))).to(dtype)
    ranks = []
    for _ in range(tp):
        sd = {"transformer.word_embeddings.weight": _rand(g, VOCAB // tp, h, dtype=dtype)}
        for i in range(LAYERS):
            p = f"transformer.layers.{i}."
            sd |= {
                p + "input_layernorm.weight": shared[p + "input_layernorm.weight"].clone(),
                p + "input_layernorm.bias": shared[p + "input_layernorm.bias"].clone(),
                p + "attention.query_key_value.weight": _rand(g, 3 * h // tp, h, dtype=dtype),
                p + "attention.query_key_value.bias": _rand(g, 3 * h // tp, dtype=dtype),
                p + "attention.dense.weight": _rand(g, h, h // tp, dtype=dtype),
                p + "attention.dense.bias": shared[p + "attention.dense.bias"].clone(),
                p + "post_attention_layernorm.weight": shared[p + "post_attention_layernorm.weight"].clone(),
                p + "post_attention_layernorm.bias": shared[p + "post_attention_layernorm.bias"].clone(),
                p + "mlp.dense_h_to_4h.weight": _rand(g, 2 * f // tp, h, dtype=dtype),
                p + "mlp.dense_h_to_4h.bias": _rand(g, 2 * f // tp, dtype=dtype),
                p + "mlp.dense_4h_to_h.weight": _rand(g, h, f // tp, dtype=dtype),
                p + "mlp.dense_4h_to_h.bias": shared[p + "mlp.dense_4h_to_h.bias"].clone(),
            }
        sd["transformer.final_layernorm.weight"] = shared["transformer.final_layernorm.weight"].clone()
        sd["transformer.final_layernorm.bias"] = shared["transformer.final_layernorm.bias"].clone()
        sd["mixins.rotary-embedding.rotary_emb.inv_freq"] = inv.clone()
        ranks.append(sd)
    return ranks


def sat_config(tp: int = 2) -> dict:
    o = FAMILY["glm-130b"]
    return {
        "model_class": "GLM130B",
        "num_layers": LAYERS,
        "hidden_size": o["hidden_size"],
        "inner_hidden_size": o["ffn_hidden_size"],
        "num_attention_heads": o["num_attention_heads"],
        "vocab_size": VOCAB,
        "max_sequence_length": o["max_sequence_length"],
        "layernorm_order": "post",
        "model_parallel_size": tp,
    }


# -- writing and reading their folders --------------------------------------------------------------------------


def write_hf_folder(out: Path, config: dict, sd: dict[str, torch.Tensor], how: str) -> Path:
    """``how``: ``safetensors`` (one file), ``bin`` (pytorch_model.bin) or ``bin-sharded`` (two .bin shards and
    pytorch_model.bin.index.json, as the ChatGLM releases)."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if how == "safetensors":
        save_file(sd, str(out / "model.safetensors"))
    elif how == "bin":
        torch.save(sd, out / "pytorch_model.bin")
    else:
        names = list(sd)
        halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2]}
        halves["pytorch_model-00002-of-00002.bin"] = names[len(names) // 2 :]
        for fname, keys in halves.items():
            torch.save({k: sd[k] for k in keys}, out / fname)
        index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index), encoding="utf-8")
    return out


def read_hf_folder(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    out = {}
    for f in files or ["model.safetensors"]:
        out |= load_file(str(path / f))
    return out


def write_sat_folder(out: Path, ranks: list[dict[str, torch.Tensor]], config: dict | None) -> Path:
    (out / "1000").mkdir(parents=True)
    for r, sd in enumerate(ranks):
        torch.save({"module": sd, "iteration": 1000}, out / "1000" / f"mp_rank_{r:02d}_model_states.pt")
    (out / "latest").write_text("1000", encoding="utf-8")
    if config is not None:
        (out / "model_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


def read_sat_folder(path: Path) -> list[dict[str, torch.Tensor]]:
    tag = (path / "latest").read_text().strip()
    files = sorted((path / tag).glob("mp_rank_*_model_states.pt"))
    return [torch.load(f, weights_only=True)["module"] for f in files]


def convert(src: Path, dst: Path, **kw: object):
    return convert_checkpoint(src, dst, ConvertOptions(**kw), log=QUIET)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k].view(torch.uint8) if t.numel() else got[k], t.view(torch.uint8)), k


# -- the releases -------------------------------------------------------------------------------------------------

RELEASES = {
    "chatglm-6b": lambda tmp, dtype=torch.float32: (
        write_hf_folder(tmp / "theirs", chatglm6b_config(), chatglm6b_tensors(1, dtype=dtype), "bin-sharded"),
        chatglm6b_tensors(1, dtype=dtype),
    ),
    "chatglm-6b-untied": lambda tmp, dtype=torch.float32: (
        write_hf_folder(tmp / "theirs", chatglm6b_config(False), chatglm6b_tensors(2, tied=False, dtype=dtype), "bin"),
        chatglm6b_tensors(2, tied=False, dtype=dtype),
    ),
    "chatglm2-6b": lambda tmp, dtype=torch.float32: (
        write_hf_folder(tmp / "theirs", chatglm2_config(), chatglm2_tensors(3, dtype=dtype), "safetensors"),
        chatglm2_tensors(3, dtype=dtype),
    ),
    "glm-130b-sat": lambda tmp, dtype=torch.float32: (
        write_sat_folder(tmp / "theirs", sat_ranks(4, dtype=dtype), sat_config()),
        sat_ranks(4, dtype=dtype),
    ),
}


def reference_state_dict(release: str, theirs, arch: dict) -> dict[str, torch.Tensor]:
    if release.startswith("chatglm-6b"):
        return chatglm6b_state_dict(theirs, arch)
    if release == "chatglm2-6b":
        return chatglm2_state_dict(theirs)
    return sat_glm130b_state_dict(theirs, arch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("release", list(RELEASES))
def test_import_to_tp2_and_export_round_trips_bitwise(tmp_path: Path, release: str, dtype: torch.dtype) -> None:
    folder, theirs = RELEASES[release](tmp_path, dtype)
    convert(folder, tmp_path / "ours", format="native", target_tp=2)
    assert open_source(tmp_path / "ours").info.tp == 2
    short = "fp16" if dtype == torch.float16 else "fp32"
    if release == "glm-130b-sat":
        report = convert(tmp_path / "ours", tmp_path / "back", format="sat", target_tp=2, dtype=short)
        back = read_sat_folder(tmp_path / "back")
        assert len(back) == 2
        for got, want in zip(back, theirs, strict=True):
            assert_same_tensors(got, want)
        assert json.loads((tmp_path / "back" / "model_config.json").read_text())["inner_hidden_size"] == 48
    else:
        layout = "chatglm2-6b" if release == "chatglm2-6b" else ""  # by default GlmForCausalLM (test_hf_native)
        report = convert(tmp_path / "ours", tmp_path / "back", format="hf", dtype=short, hf_layout=layout)
        assert_same_tensors(read_hf_folder(tmp_path / "back"), theirs)
        config = json.loads((tmp_path / "back" / "config.json").read_text())
        want = chatglm2_config() if release == "chatglm2-6b" else chatglm6b_config(release == "chatglm-6b")
        keys = ("model_type", "num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "kv_channels")
        for key in (*keys, "ffn_hidden_size", "padded_vocab_size", "multi_query_group_num", "vocab_size"):
            assert config.get(key) == want.get(key), key
        assert any("copy THUDM's published model" in n for n in report.notes)
    assert report.verified > 0


@pytest.mark.parametrize("release", list(RELEASES))
def test_imported_logits_equal_the_reference_of_their_tensors(tmp_path: Path, release: str) -> None:
    folder, theirs = RELEASES[release](tmp_path)
    src = open_source(folder)
    cfg = src.info.config
    model = GLMModel(cfg, seed=0)
    load_full_state_dict(model, {n: src.tensor(n) for n in src.names()})
    batch = make_batch(1)
    with torch.no_grad():
        logits = model.eval()(batch["input_ids"], batch["position_ids"], batch["sep"])
    arch = dataclasses.asdict(cfg)
    ref = family_reference_logits(
        reference_state_dict(release, theirs, arch),
        arch,
        batch["input_ids"],
        batch["position_ids"],
        reference_mask(batch["sep"], SEQ),
    )
    rel = ((logits.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("release", ["chatglm2-6b", "glm-130b-sat"])
def test_round_trip_through_standalone_and_a_pipeline(tmp_path: Path, release: str) -> None:
    """Their layout -> standalone safetensors -> native PP=2 -> theirs: still the same tensors."""
    folder, theirs = RELEASES[release](tmp_path)
    convert(folder, tmp_path / "standalone", format="safetensors")
    convert(tmp_path / "standalone", tmp_path / "pp2", format="native", target_pp=2)
    assert open_source(tmp_path / "pp2").info.pp == 2
    if release == "glm-130b-sat":
        convert(tmp_path / "pp2", tmp_path / "back", format="sat", target_tp=2)
        for got, want in zip(read_sat_folder(tmp_path / "back"), theirs, strict=True):
            assert_same_tensors(got, want)
    else:
        convert(tmp_path / "pp2", tmp_path / "back", format="hf", hf_layout="chatglm2-6b")
        assert_same_tensors(read_hf_folder(tmp_path / "back"), theirs)


def test_release_configs_map_to_the_family_options(tmp_path: Path) -> None:
    for release, want in (
        ("chatglm-6b", dict(position_embedding_type="rope_2d", residual_style="post_ln_alpha", ffn_hidden_size=64)),
        ("chatglm-6b-untied", dict(untie_embeddings_and_output_weights=True)),
        ("chatglm2-6b", dict(num_query_groups=4, kv_channels=8, rotary_interleaved=True, add_bias_linear=False)),
        ("glm-130b-sat", dict(activation="geglu", residual_style="deepnorm", embedding_grad_shrink=0.1)),
    ):
        folder, _ = RELEASES[release](tmp_path / release)
        cfg = open_source(folder).info.config
        for key, value in want.items():
            assert getattr(cfg, key) == value, (release, key)


def _one_line_error(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as err:
        open_source(path)
    assert "\n" not in str(err.value)


def test_missing_or_misshaped_tensors_are_one_line_errors(tmp_path: Path) -> None:
    sd = chatglm2_tensors(3)
    del sd["transformer.encoder.layers.1.self_attention.dense.weight"]
    _one_line_error(
        write_hf_folder(tmp_path / "missing", chatglm2_config(), sd, "safetensors"),
        r"missing tensor transformer\.encoder\.layers\.1\.self_attention\.dense\.weight \(expected shape \[32, 64\]\)",
    )
    sd = chatglm6b_tensors(1)
    sd["transformer.layers.0.mlp.dense_h_to_4h.weight"] = torch.zeros(63, 32)
    _one_line_error(
        write_hf_folder(tmp_path / "shape", chatglm6b_config(), sd, "bin"),
        r"tensor transformer\.layers\.0\.mlp\.dense_h_to_4h\.weight has shape \[63, 32\], expected \[64, 32\]",
    )
    sd = chatglm6b_tensors(1)
    sd["transformer.layers.1.attention.rotary_emb.inv_freq"] = torch.ones(2)
    _one_line_error(
        write_hf_folder(tmp_path / "freq", chatglm6b_config(), sd, "bin"),
        r"tensor transformer\.layers\.1\.attention\.rotary_emb\.inv_freq does not hold the values",
    )
    ranks = sat_ranks(4)
    del ranks[1]["transformer.layers.0.mlp.dense_h_to_4h.bias"]
    _one_line_error(
        write_sat_folder(tmp_path / "sat", ranks, sat_config()),
        r"mp_rank_01_model_states\.pt: missing tensor transformer\.layers\.0\.mlp\.dense_h_to_4h\.bias "
        r"\(expected shape \[48\]\)",
    )


def test_a_tied_lm_head_that_differs_is_noted_and_sat_without_config_reads_the_shapes(tmp_path: Path) -> None:
    sd = chatglm6b_tensors(1)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    src = open_source(write_hf_folder(tmp_path / "lm", chatglm6b_config(), sd, "bin"))
    assert any(n.startswith("lm_head.weight: it differs") for n in src.info.notes)
    assert not src.info.config.untie_embeddings_and_output_weights
    ranks = sat_ranks(4)
    src = open_source(write_sat_folder(tmp_path / "sat", ranks, None), num_attention_heads=4)
    cfg = src.info.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size) == (2, 32, 48, VOCAB)


def test_export_picks_the_family_of_the_architecture(tmp_path: Path) -> None:
    folder, _ = RELEASES["glm-130b-sat"](tmp_path)
    with pytest.raises(CheckpointError, match=r"no published HuggingFace layout holds this model \(glm: ") as err:
        convert(folder, tmp_path / "hf", format="hf")
    assert "chatglm-6b: " in str(err.value) and "chatglm2-6b: " in str(err.value)
    folder, _ = RELEASES["chatglm2-6b"](tmp_path / "c2")
    with pytest.raises(CheckpointError, match=r"sat \(GLM-130B\) layout cannot hold this model: rotary_percent = 0.5"):
        convert(folder, tmp_path / "sat", format="sat")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "sat").exists()
