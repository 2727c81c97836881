"""LoRA on a GLM-4.5-shaped MoE model's experts through the converter: the adapters of a TP=2 LoRA checkpoint (each
rank's shards as its model saves them: the experts' ``B`` split along ``2F`` with the GLU blocks, ``A`` of
``dense_4h_to_h`` along ``F``) are joined, merged per expert into the base (a ``Glm4MoeForCausalLM`` saved by
transformers) and exported as ``Glm4MoeForCausalLM``, whose logits in transformers equal our adapted model's; the peft
export of MoE MLP adapters is refused in one line; attention-only adapters of the MoE model load in peft with our
logits; a TP=2 x EP=2 checkpoint's expert adapters are joined over the expert ranks' files."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint, open_source
from megatron_glm.checkpoint.lora import base_identity, lora_record
from megatron_glm.checkpoint.lora_read import read_adapter_set
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.checkpoint.weights import load_model_weights
from megatron_glm.config import LoraConfig
from megatron_glm.errors import CheckpointError
from megatron_glm.model import GLMModel, ModelLayout, full_state_dict, load_full_state_dict
from megatron_glm.model.lora import attach_lora
from megatron_glm.parallel import ParallelState
from megatron_glm.parallel.lora import is_lora_name
from tests.checkpoint.test_hf_glm4moe import IDS, _save_release, hf_logits

transformers = pytest.importorskip("transformers")

LORA = LoraConfig(
    rank=4, alpha=8.0, targets=["attention.query_key_value,attention.dense,mlp.dense_h_to_4h,mlp.dense_4h_to_h"]
)
QUIET = lambda *_: None


def _adapted(cfg, ps: ParallelState, adapters: dict[str, torch.Tensor] | None = None) -> GLMModel:
    model = GLMModel(cfg, ps, seed=0).eval()
    attach_lora(model, LORA, ModelLayout(cfg), seed=0)
    if adapters is not None:
        load_full_state_dict(model, adapters, ps, strict=False)
    return model


def _logits(model: GLMModel) -> torch.Tensor:
    b, n = IDS.shape
    pos = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)]).expand(b, 2, n)
    with torch.no_grad():
        return model(IDS, pos, torch.zeros(b, dtype=torch.long))  # sep 0: causal


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("lora_moe")
    release = _save_release(d / "release", num_nextn_predict_layers=0)
    cfg = open_source(release).info.config
    g = torch.Generator().manual_seed(5)
    full = full_state_dict(_adapted(cfg, ParallelState()))
    adapters = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in full.items() if is_lora_name(k)}
    step = d / "lora" / "global_step2"
    step.mkdir(parents=True)
    for r in range(2):  # what each tensor-parallel rank's model holds (and DeepSpeed saves: the trainable tensors)
        model = _adapted(cfg, ParallelState(tp_size=2, tp_rank=r), adapters)
        module = {k: v for k, v in model.state_dict().items() if is_lora_name(k)}
        torch.save({"module": module}, step / f"mp_rank_{r:02d}_model_states.pt")
    meta = {
        "layout": {"tp": 2, "pp": 1, "dp": 1, "zero_stage": 0},
        "lora": lora_record(LORA, release, base_identity(release)),
        "config": {"model": dataclasses.asdict(cfg), "lora": dataclasses.asdict(LORA)},
    }
    (step / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return {"release": release, "step": step, "cfg": cfg, "adapters": adapters, "module": module}


def _stage_expert_parallel(lora_run: dict, step: Path) -> None:
    """A TP=2 x EP=2 LoRA checkpoint as training writes it: the model files (data-parallel rank 0: expert rank 0's
    experts) and each (tp, ep) rank's expert tensors, base weights and adapters, in ``experts/``."""
    cfg, adapters = lora_run["cfg"], lora_run["adapters"]
    (step / "experts").mkdir(parents=True)
    for t in range(2):
        for e in range(2):
            ps = ParallelState(tp_size=2, tp_rank=t, ep_size=2, ep_rank=e, dp_size=2, ep_group=object())
            state = _adapted(cfg, ps, adapters).state_dict()
            torch.save(
                {k: v for k, v in state.items() if ".mlp.experts." in k}, step / f"experts/pp00_tp{t:02d}_ep{e:02d}.pt"
            )
            if e == 0:
                module = {k: v for k, v in state.items() if is_lora_name(k)}
                torch.save({"module": module}, step / f"mp_rank_{t:02d}_model_states.pt")
    meta = json.loads((lora_run["step"] / "meta.json").read_text())
    meta["layout"] = {"tp": 2, "pp": 1, "dp": 2, "ep": 2, "zero_stage": 1}
    (step / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def test_merged_export_of_expert_adapters_gives_the_adapted_model(lora_run: dict, tmp_path: Path) -> None:
    cfg, adapters = lora_run["cfg"], lora_run["adapters"]
    e, f, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    name = "transformer.layers.1.mlp.experts.dense_h_to_4h.lora.B"
    assert tuple(lora_run["module"][name].shape) == (e, f, 4)  # rank 1's half of 2F (its gate and up rows)
    assert tuple(lora_run["module"][name.replace("h_to_4h.lora.B", "4h_to_h.lora.A")].shape) == (e, 4, f // 2)
    read = read_adapter_set(lora_run["step"], open_source(lora_run["release"]).info.layout).tensors
    assert set(read) == set(adapters) and all(torch.equal(read[k], adapters[k]) for k in adapters)
    assert tuple(read[name].shape) == (e, 2 * f, 4) and tuple(read[name.replace(".B", ".A")].shape) == (e, 4, h)
    out = tmp_path / "merged"
    convert_checkpoint(
        lora_run["step"], out, ConvertOptions(format="hf", merge_lora=True, hf_layout="Glm4MoeForCausalLM"),
        log=QUIET,
    )  # fmt: skip
    ours = _adapted(cfg, ParallelState())
    load_model_weights(ours, open_source(lora_run["release"]), 1, 0)
    base = _logits(ours)
    load_full_state_dict(ours, adapters, strict=False)
    want, theirs = _logits(ours), hf_logits(out)
    assert (want - base).abs().max() > 1e-2  # the adapters (experts' included) change the model
    assert (theirs - want).abs().max() < 1e-5


def test_peft_export_and_expert_parallel_pipelines_are_refused(lora_run: dict, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"MoE model's MLPs .* cannot be loaded by peft 0\.21 .*--merge-lora"):
        convert_checkpoint(
            lora_run["step"],
            tmp_path / "peft",
            ConvertOptions(format="peft", hf_layout="Glm4MoeForCausalLM"),
            log=QUIET,
        )
    assert not (tmp_path / "peft").exists()
    meta = json.loads((lora_run["step"] / "meta.json").read_text())
    ep = tmp_path / "ep" / "global_step2"
    ep.mkdir(parents=True)
    (ep / "meta.json").write_text(json.dumps({**meta, "layout": {**meta["layout"], "ep": 2, "pp": 2}}))
    with pytest.raises(CheckpointError, match=r"adapters of a run with expert and pipeline parallelism cannot be read"):
        read_adapter_set(ep, open_source(lora_run["release"]).info.layout)


def test_expert_parallel_adapters_are_joined_over_the_expert_ranks(lora_run: dict, tmp_path: Path) -> None:
    step = tmp_path / "ep" / "global_step2"
    _stage_expert_parallel(lora_run, step)
    got = read_adapter_set(step, open_source(lora_run["release"]).info.layout)
    assert got.origin.startswith("the model files and each expert rank's experts/ file")
    adapters = lora_run["adapters"]
    assert set(got.tensors) == set(adapters) and all(torch.equal(got.tensors[k], adapters[k]) for k in adapters)


def test_attention_adapters_of_an_moe_model_load_in_peft(lora_run: dict, tmp_path: Path) -> None:
    """What the refusal offers: LoRA on the attention linears only exports, and peft's logits are ours."""
    peft = pytest.importorskip("peft")
    step = tmp_path / "attention" / "global_step2"
    step.mkdir(parents=True)
    shutil.copy(lora_run["step"] / "meta.json", step / "meta.json")
    for f in lora_run["step"].glob("mp_rank_*_model_states.pt"):
        module = safe_torch_load(f)["module"]
        torch.save({"module": {k: v for k, v in module.items() if ".attention." in k}}, step / f.name)
    convert_checkpoint(
        step, tmp_path / "peft", ConvertOptions(format="peft", hf_layout="Glm4MoeForCausalLM"), log=QUIET
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(lora_run["release"], dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()(IDS).logits
    ours = _adapted(lora_run["cfg"], ParallelState())
    load_model_weights(ours, open_source(lora_run["release"]), 1, 0)
    base_logits = _logits(ours)
    load_full_state_dict(ours, {k: v for k, v in lora_run["adapters"].items() if ".attention." in k}, strict=False)
    want = _logits(ours)
    assert (want - base_logits).abs().max() > 1e-2
    assert (theirs - want).abs().max() < 1e-5


def test_an_expert_parallel_lora_run_saves_only_the_expert_adapters(lora_run: dict) -> None:
    """The experts/ files of a LoRA run hold the experts' adapters, not the frozen base experts (GLM-4.5: ~340B)."""
    from megatron_glm.checkpoint.experts import expert_parameters
    from megatron_glm.training.expert_parallel import mark_expert_parameters

    cfg = lora_run["cfg"]
    ps = ParallelState(ep_size=2, dp_size=2, ep_group=object())
    model, layout = _adapted(cfg, ps), ModelLayout(cfg)

    def is_expert(name: str) -> bool:
        weight = name.rpartition(".lora.")[0] + ".weight" if is_lora_name(name) else name
        return layout[weight].expert_dim is not None

    marked = mark_expert_parameters(model, is_expert, ps)
    saved = sorted(expert_parameters(model))
    frozen = sorted(set(marked) - set(saved))  # per expert weight: the weight, A and B marked; A and B saved
    assert len(saved) == 2 * len(frozen) == 4 * (cfg.num_layers - 1) and all(n.endswith(".weight") for n in frozen)
    assert saved == sorted(n for n in marked if is_lora_name(n))
