"""LoRA adapters for HuggingFace ``peft`` (``--format peft``) and ``--merge-lora`` from any ZeRO stage.

A tiny GLM-4-0414-shaped base (transformers' own ``Glm4ForCausalLM``, random weights) takes LoRA adapters on all
four linears of every layer, trained by ``pretrain_glm.py`` for two steps at TP=2 (so the packed QKV and GLU
``B`` and the row-parallel ``A`` are really sharded), under ZeRO-3 at DP=2, and in bf16 under ZeRO-1. ``peft``
loads the exported adapters onto the base exported with ``--format hf`` and its logits equal our merged model's;
merging then exporting equals exporting then merging with ``peft``; ZeRO-3 adapters are consolidated; a bf16
run's adapters are merged from the fp32 master copy.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint, open_source
from megatron_glm.checkpoint.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from megatron_glm.checkpoint.lora_merge import open_merged, read_adapters
from megatron_glm.checkpoint.lora_read import read_adapter_set
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.checkpoint.weights import load_model_weights
from megatron_glm.errors import CheckpointError
from megatron_glm.model import GLMModel
from megatron_glm.model.lora import merge_lora
from megatron_glm.parallel.lora import is_lora_name
from tests.checkpoint.test_hf_native import _randomize, hf_config
from tests.training.conftest import PY, ROOT, launch, tiny_corpus  # noqa: F401 (tiny_corpus: a fixture)

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = "attention.query_key_value,attention.dense,mlp.dense_h_to_4h,mlp.dense_4h_to_h"
LAYOUT = "Glm4ForCausalLM"
QUIET = lambda *_: None
IDS = list(range(5, 45))


def convert(src: Path, dst: Path, **kw: object):
    return convert_checkpoint(src, dst, ConvertOptions(**kw), log=QUIET)


def _train(corpus: dict, d: Path, name: str, nproc: int, *extra: str) -> Path:
    args = [
        *("--seq-length", "64", "--data-path", corpus["data_path"]),  # the architecture: --lora-base's
        *("--tokenizer-model", corpus["tokenizer"], "--lr", "2e-2", "--log-interval", "1", "--eval-interval", "0"),
        *("--bert-prob", "0", "--gap-sentence-prob", "0", "--data.objective.causal_prob", "1"),
        *("--train-iters", "2", "--micro-batch-size", "1", "--global-batch-size", "2"),
        *("--lora-base", str(d / "release"), "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", TARGETS),
        *("--save", str(d / name), *extra),
    ]
    launch(args, nproc=nproc)
    return d / name


@pytest.fixture(scope="module")
def runs(tiny_corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """The base (``release``: a transformers Glm4ForCausalLM folder, vocab 2048) and LoRA runs on it, causal
    objective, two samples a step: ``tp2`` (fp32, TP=2, ZeRO-1), ``zero3`` (fp32, DP=2, ZeRO-3: the same samples
    per step as ``tp2``), ``bf16`` (bf16, TP=2, ZeRO-1: bf16 adapters in the model files, their fp32 master copy
    in the optimizer files)."""
    d = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config("glm4", 2048))
    _randomize(model, seed=1)
    model.save_pretrained(d / "release")
    return {
        "release": d / "release",
        "tp2": _train(tiny_corpus, d, "tp2", 2, "--tensor-model-parallel-size", "2"),
        "zero3": _train(tiny_corpus, d, "zero3", 2, "--zero-stage", "3"),
        "bf16": _train(tiny_corpus, d, "bf16", 2, "--tensor-model-parallel-size", "2", "--bf16"),
    }


def our_logits(src) -> torch.Tensor:
    model = GLMModel(src.info.config, seed=0).eval()
    load_model_weights(model, src, 1, 0)
    n = len(IDS)
    pos = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)]).unsqueeze(0)
    with torch.no_grad():
        return model(torch.tensor([IDS]), pos, torch.zeros(1, dtype=torch.long))[0]  # sep 0: causal


def peft_model(base: Path, adapters: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapters).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def test_peft_loads_the_adapters_onto_the_native_export(runs: dict, tmp_path: Path) -> None:
    convert(runs["release"], tmp_path / "hf", format="hf", hf_layout=LAYOUT)
    report = convert(runs["tp2"], tmp_path / "peft", format="peft", hf_layout=LAYOUT)
    out = tmp_path / "peft"
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert report.tensors == report.verified == 2 * 2 * 6  # 2 layers x 6 native linears x (A, B)
    assert "adapters read from the fp32 master copy (ZeRO-1 optimizer files)" in report.notes
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    assert config["target_modules"] == ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(runs["release"])
    # The TP=2 shards, consolidated: B of the packed QKV / GLU split like the weight, A of the row-parallel split.
    module = safe_torch_load(runs["tp2"] / "global_step2" / "mp_rank_01_model_states.pt")["module"]
    shard = module["transformer.layers.0.mlp.dense_4h_to_h.lora.A"]
    assert shard.shape == (4, 48)  # half of the 96 input features
    ours = read_adapters(runs["tp2"] / "global_step2", open_source(runs["release"]).info.layout)
    torch.testing.assert_close(ours["transformer.layers.0.mlp.dense_4h_to_h.lora.A"][:, 48:], shard)
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    qkv_a, qkv_b = (ours[f"transformer.layers.1.attention.query_key_value.lora.{x}"] for x in "AB")
    layer = "base_model.model.model.layers.1.self_attn"
    for proj, rows in (("q", slice(0, 64)), ("k", slice(64, 96)), ("v", slice(96, 128))):
        assert torch.equal(tensors[f"{layer}.{proj}_proj.lora_A.weight"], qkv_a)  # one A, shared
        assert torch.equal(tensors[f"{layer}.{proj}_proj.lora_B.weight"], qkv_b[rows])
    # peft on the exported native model: the logits of our merged model.
    pm = peft_model(tmp_path / "hf", out)
    loaded = pm.base_model.model.model.layers[1].self_attn.k_proj.lora_B["default"].weight
    assert torch.equal(loaded, qkv_b[64:96])
    theirs, ours_merged = logits(pm), our_logits(open_merged(runs["tp2"], open_source))
    plain = logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval())
    assert (theirs - plain).abs().max() > 1e-2  # the adapters change the model
    assert (theirs - ours_merged).abs().max() < 1e-5


def test_merge_then_export_equals_export_then_merge_with_peft(runs: dict, tmp_path: Path) -> None:
    convert(runs["release"], tmp_path / "hf", format="hf", hf_layout=LAYOUT)
    convert(runs["tp2"], tmp_path / "peft", format="peft", hf_layout=LAYOUT)
    report = convert(runs["tp2"], tmp_path / "merged", format="hf", merge_lora=True, hf_layout=LAYOUT)
    assert any("read from the fp32 master copy" in n for n in report.notes), report.notes
    ours = {k: v for f in sorted((tmp_path / "merged").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    theirs = peft_model(tmp_path / "hf", tmp_path / "peft").merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    adapted = [k for k in ours if k.endswith(("proj.weight", "gate_up_proj.weight"))]
    assert len(adapted) == 2 * 6
    base = load_file(str(runs["release"] / "model.safetensors"))
    assert all(not torch.equal(ours[k], base[k]) for k in adapted)  # really merged
    # Bitwise: both compute W + (alpha / r) (B A) in fp32, and a row block of B A is B's row block times A.
    differ = {k: (ours[k] - theirs[k]).abs().max().item() for k in ours if not torch.equal(ours[k], theirs[k])}
    assert not differ, differ


def test_merge_lora_from_zero3_consolidates_the_adapters(runs: dict, tmp_path: Path) -> None:
    layout = open_source(runs["release"]).info.layout
    step = runs["zero3"] / "global_step2"
    assert json.loads((step / "meta.json").read_text())["layout"]["zero_stage"] == 3
    got = read_adapter_set(step, layout)
    assert got.origin == "the fp32 master copy (ZeRO-3 optimizer files)"
    want = read_adapters(runs["tp2"] / "global_step2", layout)  # the same samples at TP=2 under ZeRO-1
    assert set(got.tensors) == set(want) and len(want) == 2 * 4 * 2
    assert max((got.tensors[k] - want[k]).abs().max().item() for k in want) < 1e-5
    assert any(not torch.equal(want[k], torch.zeros_like(want[k])) for k in want if k.endswith(".B"))
    proc = subprocess.run(
        [PY, "tools/convert_checkpoint.py", "--input", str(runs["zero3"]), "--output", str(tmp_path / "merged"),
         "--format", "safetensors", "--merge-lora"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read from the fp32 master copy (ZeRO-3 optimizer files)" in proc.stdout, proc.stdout
    merged = open_source(tmp_path / "merged")
    expected = open_merged(runs["tp2"], open_source)
    assert max((merged.tensor(n) - expected.tensor(n)).abs().max().item() for n in merged.names()) < 1e-5


def test_merge_lora_of_a_bf16_run_uses_the_fp32_master_copy(runs: dict, tmp_path: Path) -> None:
    layout = open_source(runs["release"]).info.layout
    step = runs["bf16"] / "global_step2"
    master = read_adapter_set(step, layout)
    assert master.origin.startswith("the fp32 master copy (ZeRO-1 optimizer files)")
    # The model files hold the bf16 cast of the master copy; the master has bits bf16 drops.
    bf16 = {}
    for t in (0, 1):
        module = safe_torch_load(step / f"mp_rank_{t:02d}_model_states.pt")["module"]
        bf16[t] = {k: v for k, v in module.items() if is_lora_name(k)}
    name = "transformer.layers.0.attention.dense.lora.B"  # row-parallel: B replicated
    assert bf16[0][name].dtype == torch.bfloat16
    assert torch.equal(bf16[0][name], master.tensors[name].to(torch.bfloat16))
    assert not torch.equal(bf16[0][name].float(), master.tensors[name])
    report = convert(runs["bf16"], tmp_path / "merged", format="safetensors", merge_lora=True)
    assert any("in fp32, cast to the base's dtype; read from the fp32 master copy (ZeRO-1" in n for n in report.notes)
    merged, base = open_source(tmp_path / "merged"), open_source(runs["release"])
    weight = "transformer.layers.0.attention.dense.weight"
    parts = {weight: base.tensor(weight), **{k: v for k, v in master.tensors.items() if k.startswith(weight[:-6])}}
    assert torch.equal(merged.tensor(weight), merge_lora(parts, 8.0)[weight])
    rounded = {**parts, **{k: v.to(torch.bfloat16).float() for k, v in parts.items() if ".lora." in k}}
    assert not torch.equal(merged.tensor(weight), merge_lora(rounded, 8.0)[weight])


def test_bad_input_is_one_line(runs: dict, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    plain = tmp_path_factory.mktemp("plain") / "native"
    convert(runs["release"], plain, format="native")
    with pytest.raises(CheckpointError, match=r"not a LoRA checkpoint .*--format peft needs one"):
        convert(plain, tmp_path / "x", format="peft")
    with pytest.raises(CheckpointError, match=r"--merge-lora with --format peft: .*drop --merge-lora"):
        convert(runs["tp2"], tmp_path / "y", format="peft", merge_lora=True)
    with pytest.raises(CheckpointError, match=r"the GlmForCausalLM HuggingFace layout cannot hold this model"):
        convert(runs["tp2"], tmp_path / "z", format="peft", hf_layout="GlmForCausalLM")
    proc = subprocess.run(
        [PY, "tools/convert_checkpoint.py", "--input", str(plain), "--output", str(tmp_path / "w"), "--format", "peft"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert proc.returncode != 0 and len(lines) == 1 and "not a LoRA checkpoint" in lines[0], proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing left behind
