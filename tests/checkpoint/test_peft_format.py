"""``--format peft``'s tensor mapping without training: our adapters -> peft's keys on transformers' native GLM
classes (the packed QKV as q/k/v_proj with one shared A, exact; the fused gate_up_proj kept), and the refusals."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.checkpoint.formats.hf import FAMILIES
from megatron_glm.checkpoint.formats.peft import adapter_config, peft_tensors
from megatron_glm.config import ModelConfig
from megatron_glm.config.sizes import FAMILY_OPTIONS
from megatron_glm.errors import CheckpointError
from megatron_glm.model import ModelLayout

CONFIG = ModelConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, num_query_groups=2, ffn_hidden_size=96,
    vocab_size=256, max_sequence_length=128, add_qkv_bias=True, **FAMILY_OPTIONS["glm-4-0414"],
)  # fmt: skip
TARGETS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def _adapters(rank: int = 4) -> dict[str, torch.Tensor]:
    layout, g = ModelLayout(CONFIG), torch.Generator().manual_seed(0)
    out = {}
    for i in range(CONFIG.num_layers):
        for target in TARGETS:
            out_f, in_f = layout[f"transformer.layers.{i}.{target}.weight"].shape
            out[f"transformer.layers.{i}.{target}.lora.A"] = torch.randn(rank, in_f, generator=g)
            out[f"transformer.layers.{i}.{target}.lora.B"] = torch.randn(out_f, rank, generator=g)
    return out


def test_every_native_delta_is_its_block_of_ours() -> None:
    ours = _adapters()
    tensors, targets = peft_tensors(ours, CONFIG, FAMILIES["Glm4ForCausalLM"])
    assert targets == ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(tensors) == 2 * 6 * 2
    native = {
        "self_attn.q_proj": ("attention.query_key_value", slice(0, 64)),
        "self_attn.k_proj": ("attention.query_key_value", slice(64, 96)),
        "self_attn.v_proj": ("attention.query_key_value", slice(96, 128)),
        "self_attn.o_proj": ("attention.dense", slice(None)),
        "mlp.gate_up_proj": ("mlp.dense_h_to_4h", slice(None)),  # [gate; up] = our [W1; W2], fused in both
        "mlp.down_proj": ("mlp.dense_4h_to_h", slice(None)),
    }
    for i in range(2):
        for module, (linear, rows) in native.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            full = ours[f"transformer.layers.{i}.{linear}.lora.B"] @ ours[f"transformer.layers.{i}.{linear}.lora.A"]
            assert torch.equal(b @ a, full[rows]), key  # exact: the packed blocks share A
    shared = [tensors[f"base_model.model.model.layers.0.self_attn.{p}_proj.lora_A.weight"] for p in "qkv"]
    assert shared[0].data_ptr() != shared[1].data_ptr()  # one copy each (safetensors refuses shared storage)


def test_adapter_config_is_peft_lora_config() -> None:
    peft = pytest.importorskip("peft")
    fields = adapter_config(rank=8, alpha=16.0, dropout=0.05, targets=["q_proj", "o_proj"], base="/models/glm4")
    cfg = peft.LoraConfig.from_peft_type(**fields)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, sorted(cfg.target_modules)) == (
        8,
        16.0,
        0.05,
        ["o_proj", "q_proj"],
    )
    assert cfg.task_type == "CAUSAL_LM" and cfg.base_model_name_or_path == "/models/glm4"


def test_refusals_are_one_line() -> None:
    ours = _adapters()
    with pytest.raises(CheckpointError, match=r"the chatglm2-6b layout is not one of them"):
        peft_tensors(ours, CONFIG, FAMILIES["chatglm2-6b"])
    odd = {"transformer.layers.0.mlp.experts.dense_h_to_4h.lora.A": torch.zeros(4, 64)}
    odd["transformer.layers.0.mlp.experts.dense_h_to_4h.lora.B"] = torch.zeros(192, 4)
    with pytest.raises(CheckpointError, match=r"adapter on transformer.layers.0.mlp.experts.dense_h_to_4h: no native"):
        peft_tensors(odd, CONFIG, FAMILIES["Glm4ForCausalLM"])
    bad = dict(ours)
    bad["transformer.layers.0.attention.dense.lora.B"] = torch.zeros(64, 3)
    with pytest.raises(CheckpointError, match=r"attention.dense: needs lora.A \[r, in\] and lora.B \[out, r\]"):
        peft_tensors(bad, CONFIG, FAMILIES["Glm4ForCausalLM"])
    with pytest.raises(CheckpointError, match="no LoRA adapters to write"):
        peft_tensors({}, CONFIG, FAMILIES["Glm4ForCausalLM"])
