"""transformers' own ``Glm4MoeForCausalLM`` (GLM-4.5) without remote code: a tiny random one saved by transformers
(fp32; one dense layer then MoE layers with a shared expert, QK-norm, a non-zero correction bias) imports with our
logits equal to transformers', reshards to TP=2, exports back to the same tensors bitwise, and the export loads in
transformers with the original's logits. A release with GLM-4.5's MTP layer (at index ``num_hidden_layers``, with
its copies of the embedding and head) keeps it through import, resharding and export; transformers ignores it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint, open_source
from megatron_glm.checkpoint.formats.hf import FAMILIES, family_for
from megatron_glm.checkpoint.weights import load_model_weights
from megatron_glm.errors import CheckpointError
from megatron_glm.model import GLMModel

transformers = pytest.importorskip("transformers")

QUIET = lambda *_: None
LAYERS, EXPERTS, VOCAB = 4, 4, 96


def _config(**overrides: object):
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts_per_tok=2, n_shared_experts=1,
        n_routed_experts=EXPERTS, routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True,
        use_qk_norm=True, attention_bias=True, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=False, num_nextn_predict_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5},
    )  # fmt: skip
    return transformers.Glm4MoeConfig(**{**common, **overrides})


def _save_release(folder: Path, **overrides: object) -> Path:
    """A tiny Glm4MoeForCausalLM, every parameter and the correction biases random, saved by transformers."""
    torch.manual_seed(0)
    model = transformers.Glm4MoeForCausalLM(_config(**overrides)).float()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = name.endswith("norm.weight")
            p.copy_((1.0 if norm else 0.0) + (0.2 if norm else 0.1) * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # large enough to change which experts are chosen
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_release(tmp_path_factory.mktemp("glm4moe") / "release")


def convert(src: Path, dst: Path, **kw: object):
    return convert_checkpoint(src, dst, ConvertOptions(**kw), log=QUIET)


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def hf_logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(model).__name__ == "Glm4MoeForCausalLM"
    with torch.no_grad():
        return model(IDS).logits


def our_logits(ckpt: Path) -> torch.Tensor:
    src = open_source(ckpt)
    model = GLMModel(src.info.config, seed=0).eval()
    load_model_weights(model, src, 1, 0)
    b, n = IDS.shape
    pos = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)]).expand(b, 2, n)
    with torch.no_grad():
        return model(IDS, pos, torch.zeros(b, dtype=torch.long))  # sep 0: causal


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    return {k: v for f in files for k, v in load_file(folder / f).items()}


def test_release_imports_reshards_and_exports_back(release: Path, tmp_path: Path) -> None:
    src = open_source(release)
    cfg = src.info.config
    assert src.info.format == "hf" and family_for(cfg).name == "Glm4MoeForCausalLM"
    assert (cfg.num_experts, cfg.moe_top_k, cfg.moe_intermediate_size, cfg.num_shared_experts) == (EXPERTS, 2, 16, 1)
    assert (cfg.first_k_dense_replace, cfg.moe_routed_scaling_factor, cfg.qk_norm) == (1, 2.5, True)
    assert (cfg.rotary_interleaved, cfg.rotary_percent, cfg.rotary_base, cfg.query_groups) == (False, 0.5, 5e5, 2)
    # transformers saves no MTP layer: imported without it (a note says so)
    assert cfg.num_nextn_predict_layers == 0 and any("MTP" in n for n in src.info.notes), src.info.notes
    packed = src.tensor("transformer.layers.1.mlp.experts.dense_h_to_4h.weight")
    theirs = load_file(release / "model.safetensors")
    assert torch.equal(packed[2, 16:], theirs["model.layers.1.mlp.experts.2.up_proj.weight"])
    assert src.tensor("transformer.layers.1.mlp.router.expert_bias").dtype == torch.float32
    want = hf_logits(release)
    assert (our_logits(release) - want).abs().max().item() < 1e-5
    # the correction bias matters: without it other experts are chosen and the logits change
    no_bias = tmp_path / "no_bias"
    shutil.copytree(release, no_bias)
    zeroed = {k: (torch.zeros_like(v) if "e_score" in k else v) for k, v in theirs.items()}
    save_file(zeroed, str(no_bias / "model.safetensors"), metadata={"format": "pt"})
    assert (hf_logits(no_bias) - want).abs().max().item() > 1e-3

    convert(release, tmp_path / "tp2", format="native", target_tp=2)
    assert open_source(tmp_path / "tp2").info.tp == 2
    assert (our_logits(tmp_path / "tp2") - want).abs().max().item() < 1e-5
    convert(tmp_path / "tp2", tmp_path / "export", format="hf", max_shard_bytes=20_000)
    ours = _stored(tmp_path / "export")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert ours["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and config["model_type"] == "glm4_moe"
    original = json.loads((release / "config.json").read_text())
    for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
                "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob", "n_group", "topk_group",
                "use_qk_norm", "head_dim", "num_key_value_heads", "attention_bias", "rope_parameters"):  # fmt: skip
        assert config[key] == original[key], key
    assert "auto_map" not in config and config["num_nextn_predict_layers"] == 0
    assert (hf_logits(tmp_path / "export") - want).abs().max().item() < 1e-5
    # --dtype bf16: the weights in bf16, the correction bias kept fp32 with its fp32 values (not bf16-rounded)
    convert(tmp_path / "tp2", tmp_path / "bf16", format="hf", dtype="bf16")
    half = _stored(tmp_path / "bf16")
    assert half["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    for k in (k for k in theirs if "e_score" in k):
        assert half[k].dtype == torch.float32 and torch.equal(half[k], theirs[k]), k
    assert not torch.equal(theirs[k], theirs[k].bfloat16().float())  # (bf16 would have rounded them)


def _with_mtp(release: Path, folder: Path) -> dict[str, torch.Tensor]:
    """``release`` plus GLM-4.5's MTP layer at index ``LAYERS``: its own tensors random, its decoder layer an MoE
    layer (random), its ``embed_tokens`` / ``shared_head.head`` copies of the shared ones. Returns the MTP tensors."""
    shutil.copytree(release, folder)
    sd = load_file(release / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    mtp = {}
    for k, v in sd.items():
        if k.startswith(f"model.layers.{LAYERS - 1}."):
            name = k.replace(f"layers.{LAYERS - 1}.", f"layers.{LAYERS}.")
            mtp[name] = v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
    p = f"model.layers.{LAYERS}."
    for name in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"{p}{name}.weight"] = 1.0 + 0.2 * torch.randn(32, generator=gen)
    mtp[f"{p}eh_proj.weight"] = 0.1 * torch.randn(32, 64, generator=gen)
    mtp[f"{p}embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    mtp[f"{p}shared_head.head.weight"] = sd["lm_head.weight"].clone()
    save_file({**sd, **mtp}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return mtp


def test_the_mtp_layer_is_kept_through_import_reshard_and_export(release: Path, tmp_path: Path) -> None:
    mtp = _with_mtp(release, tmp_path / "with_mtp")
    src = open_source(tmp_path / "with_mtp")
    cfg = src.info.config
    assert cfg.num_nextn_predict_layers == 1 and not any("ignored" in n for n in src.info.notes), src.info.notes
    assert torch.equal(src.tensor("transformer.mtp.0.eh_proj.weight"), mtp[f"model.layers.{LAYERS}.eh_proj.weight"])
    assert torch.equal(
        src.tensor("transformer.mtp.0.final_layernorm.weight"), mtp[f"model.layers.{LAYERS}.shared_head.norm.weight"]
    )
    router = src.tensor("transformer.mtp.0.layer.mlp.router.weight")  # the MTP layer is an MoE layer
    assert torch.equal(router, mtp[f"model.layers.{LAYERS}.mlp.gate.weight"])
    convert(tmp_path / "with_mtp", tmp_path / "tp2", format="native", target_tp=2)
    convert(tmp_path / "tp2", tmp_path / "pp2", format="native", target_pp=2)
    convert(tmp_path / "pp2", tmp_path / "export", format="hf")
    ours = _stored(tmp_path / "export")
    assert sorted(ours) == sorted({**load_file(release / "model.safetensors"), **mtp})
    assert all(torch.equal(ours[k], v) for k, v in mtp.items())
    assert json.loads((tmp_path / "export" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    # transformers ignores the MTP layer: the original's logits
    assert (hf_logits(tmp_path / "export") - hf_logits(release)).abs().max().item() < 1e-5
    # a differing copy of the embedding is a note (the shared one is used), a missing one too (GLM-4.6 has none)
    bad = {**load_file(tmp_path / "with_mtp" / "model.safetensors")}
    bad[f"model.layers.{LAYERS}.embed_tokens.weight"] = bad[f"model.layers.{LAYERS}.embed_tokens.weight"] + 1
    del bad[f"model.layers.{LAYERS}.shared_head.head.weight"]
    save_file(bad, str(tmp_path / "with_mtp" / "model.safetensors"), metadata={"format": "pt"})
    notes = open_source(tmp_path / "with_mtp").info.notes
    assert any("embed_tokens" in n and "differs" in n for n in notes), notes
    assert any("shared_head.head" in n and "derived" in n for n in notes), notes


def test_dense_release_and_refusals(tmp_path: Path) -> None:
    dense = _save_release(tmp_path / "dense", first_k_dense_replace=LAYERS, use_qk_norm=False)
    cfg = open_source(dense).info.config
    assert cfg.num_experts == 0 and not cfg.qk_norm
    assert (our_logits(dense) - hf_logits(dense)).abs().max().item() < 1e-5
    convert(dense, tmp_path / "export", format="hf", hf_layout="Glm4MoeForCausalLM")
    assert sorted(_stored(tmp_path / "export")) == sorted(load_file(dense / "model.safetensors"))
    assert (hf_logits(tmp_path / "export") - hf_logits(dense)).abs().max().item() < 1e-5
    grouped = tmp_path / "grouped"
    shutil.copytree(dense, grouped)
    raw = json.loads((grouped / "config.json").read_text())
    (grouped / "config.json").write_text(json.dumps({**raw, "n_group": 2}))
    with pytest.raises(CheckpointError, match=r"n_group = 2 is not supported \(megatron_glm reads 1\)"):
        open_source(grouped)
    glm4 = open_source(dense).info.config
    with pytest.raises(CheckpointError, match="sandwich_norm"):
        family_for(dataclasses.replace(glm4, sandwich_norm=True), "Glm4MoeForCausalLM")
    assert "Glm4MoeForCausalLM" in FAMILIES


TF4_SCRIPT = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
assert transformers.__version__.startswith("4."), transformers.__version__
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
print(json.dumps({"class": type(model).__name__, "logits": logits.tolist()}))
"""


def test_the_export_with_its_mtp_layer_loads_in_transformers_4(release: Path, tmp_path: Path) -> None:
    """transformers 4.x (``MEGATRON_GLM_TRANSFORMERS4``, in a subprocess) loads the export, MTP layer and all, with
    the original's logits."""
    tf4 = os.environ.get("MEGATRON_GLM_TRANSFORMERS4")
    if not tf4:
        pytest.skip("MEGATRON_GLM_TRANSFORMERS4 is not set: no transformers 4.x folder to load the export with")
    _with_mtp(release, tmp_path / "with_mtp")
    convert(tmp_path / "with_mtp", tmp_path / "export", format="hf")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tf4, root]), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", TF4_SCRIPT, str(tmp_path / "export"), json.dumps(IDS.tolist())]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["class"] == "Glm4MoeForCausalLM"
    assert (torch.tensor(got["logits"]) - hf_logits(release)).abs().max().item() < 1e-5


DROP = object()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_experts_per_tok": DROP}, r"config\.json: lacks num_experts_per_tok \(layers 1\.\.3 are MoE layers"),
        ({"n_routed_experts": DROP}, r"config\.json: lacks n_routed_experts \("),
        ({"moe_intermediate_size": DROP}, r"config\.json: lacks moe_intermediate_size \("),
        ({"num_experts_per_tok": 8}, r"num_experts_per_tok \(8\) must be in \[1, n_routed_experts = 4\]$"),
        ({"num_experts_per_tok": 0}, r"num_experts_per_tok \(0\) must be in \[1, n_routed_experts = 4\]$"),
        ({"n_routed_experts": "four"}, r"config\.json: n_routed_experts must be an integer, got 'four'$"),
        ({"num_experts_per_tok": 1.5}, r"config\.json: num_experts_per_tok must be an integer, got 1\.5$"),
        ({"routed_scaling_factor": 0}, r"routed_scaling_factor must be a positive finite number, got 0\.0$"),
        ({"routed_scaling_factor": float("nan")}, r"routed_scaling_factor must be a positive finite number, got nan$"),
        ({"first_k_dense_replace": -1}, r"config\.json: first_k_dense_replace must be >= 0, got -1$"),
        ({"num_nextn_predict_layers": -1}, r"config\.json: num_nextn_predict_layers must be >= 0, got -1$"),
        ({"hidden_size": "big"}, r"config\.json: hidden_size must be an integer, got 'big'$"),
        ({"num_attention_heads": 0}, r"config\.json: num_attention_heads = 0: must be positive$"),
        ({"norm_topk_prob": "false"}, r"config\.json: norm_topk_prob must be true or false, got 'false'$"),
        ({"tie_word_embeddings": "no"}, r"config\.json: tie_word_embeddings must be true or false, got 'no'$"),
    ],
)
def test_a_bad_moe_config_is_one_line_naming_the_key(
    release: Path, tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    """config.json values transformers' defaults or a hand edit would make nonsense (more experts chosen than
    exist, a zero scale, a string) are refused before any tensor is read, naming the key; before, they converted
    silently or raised a bare ValueError."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(release / "model.safetensors")
    raw = json.loads((release / "config.json").read_text())
    raw = {k: v for k, v in {**raw, **edit}.items() if v is not DROP}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=message):
        open_source(folder)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.zeros(16, 32, dtype=torch.int64), r"has dtype torch\.int64, expected a floating-point weight$"),
        (torch.full((16, 32), float("nan")), r"holds non-finite values \(NaN or inf\)$"),
    ],
)
def test_an_expert_tensor_that_is_no_weight_is_refused(
    release: Path, tmp_path: Path, value: torch.Tensor, message: str
) -> None:
    """An integer or NaN expert tensor of the right shape converted silently before (cast into the packed experts)."""
    folder = tmp_path / "bad"
    shutil.copytree(release, folder)
    sd = load_file(release / "model.safetensors")
    sd["model.layers.2.mlp.experts.1.up_proj.weight"] = value
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"bad: tensor model\.layers\.2\.mlp\.experts\.1\.up_proj\.weight " + message
    ):
        convert(folder, tmp_path / "out", format="native")
    assert not (tmp_path / "out").exists()
