"""A LoRA run's adapters in HuggingFace ``peft``'s format, for transformers' own GLM classes (``--format peft``).

The folder holds ``adapter_config.json`` (peft's ``LoraConfig``: ``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules`` with the native module names, ``task_type: CAUSAL_LM``, ``peft_type: LORA`` and, when the LoRA
base is a transformers-native folder, ``base_model_name_or_path``) and ``adapter_model.safetensors`` with the key
names ``peft`` saves for ``GlmForCausalLM`` / ``Glm4ForCausalLM``
(:mod:`~megatron_glm.checkpoint.formats.hf_native`): ``base_model.model.<native module>.lora_A.weight`` ``[r, in]``
and ``.lora_B.weight`` ``[out, r]``, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.

Our linears map to the native ones as the weights do: ``attention.dense`` -> ``self_attn.o_proj``,
``mlp.dense_h_to_4h`` -> ``mlp.gate_up_proj`` (fused in both, kept fused), ``mlp.dense_4h_to_h`` ->
``mlp.down_proj``, and the packed ``attention.query_key_value`` -> ``self_attn.q_proj`` / ``k_proj`` /
``v_proj``. An MoE model's MLP adapters are refused (:func:`peft_tensors` says why: peft 0.21's transformers-v5
conversion retargets every ``gate_proj``/``up_proj``/``down_proj`` to the fused experts); its attention ones
export. An adapter on a packed weight has one ``A`` shared by the blocks, so the per-projection adapters are exact:
each gets the same ``A`` and its row block of ``B`` (``delta_q = B_q A``). peft scales by ``lora_alpha / r`` like
our runs. The tensors are the full adapters in fp32 (the fp32 master copy where the
checkpoint holds one; ``--dtype`` casts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_glm.config import ModelConfig
from megatron_glm.errors import CheckpointError

from .hf_family import HFFamily

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
#: The linears of transformers' GlmForCausalLM / Glm4ForCausalLM layers (what ``target_modules`` may name).
NATIVE_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"})


def is_peft(path: Path) -> bool:
    """A peft adapter folder (``adapter_config.json`` naming a ``peft_type``)."""
    try:
        raw = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and "peft_type" in raw


def _native_modules(family: HFFamily, config: ModelConfig, linear: str, rows: int) -> list[tuple[str, int]]:
    """``(native module name, rows of B)`` per native linear our ``linear`` is stored as (several for a packed
    weight, in row order)."""
    weight = f"{linear}.weight"
    pieces = family.split(config, weight) or ((family.hf_name(weight), rows),)
    out = []
    for name, n in pieces:
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module.rpartition(".")[2] not in NATIVE_LINEARS:
            raise CheckpointError(
                f"LoRA adapter on {linear}: no native transformers linear holds it (peft targets "
                f"{', '.join(sorted(NATIVE_LINEARS))})"
            )
        out.append((module, n))
    if sum(n for _, n in out) != rows:
        raise CheckpointError(
            f"LoRA adapter on {linear}: B has {rows} rows, the native linears {sum(n for _, n in out)}"
        )
    return out


def peft_tensors(
    adapters: dict[str, torch.Tensor], config: ModelConfig, family: HFFamily
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(tensors under peft's key names, target_modules)`` of our full ``adapters`` (``<linear>.lora.A/B``)."""
    if not family.native or family.to_theirs is not None:
        raise CheckpointError(
            f"--format peft writes adapters for transformers' own GLM classes (GlmForCausalLM / Glm4ForCausalLM); "
            f"the {family.name} layout is not one of them"
        )
    if config.num_experts and any(".mlp." in k for k in adapters):
        raise CheckpointError(
            "--format peft: LoRA adapters on an MoE model's MLPs (routed and shared experts, dense first layers) "
            "cannot be loaded by peft 0.21 on transformers 5's Glm4MoeForCausalLM: its v4->v5 conversion rewrites "
            "every gate_proj/up_proj/down_proj target into the fused expert parameters, so the shared experts' and "
            "dense layers' adapters would be dropped; export the merged model instead (--merge-lora --format hf), "
            "or train LoRA on the attention linears only"
        )
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for key in sorted(adapters):
        if not key.endswith(".lora.A"):
            continue
        linear = key.removesuffix(".lora.A")
        a, b = adapters[key], adapters.get(f"{linear}.lora.B")
        if b is None or b.shape[1] != a.shape[0]:
            raise CheckpointError(f"LoRA adapter on {linear}: needs lora.A [r, in] and lora.B [out, r] of one rank r")
        modules = _native_modules(family, config, linear, b.shape[0])
        for (module, _), block in zip(modules, b.split([n for _, n in modules], dim=0), strict=True):
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.clone()  # one copy per native linear
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = block.clone()
            targets.add(module.rpartition(".")[2])
    if not tensors:
        raise CheckpointError("no LoRA adapters to write (every adapter needs lora.A and lora.B)")
    return tensors, sorted(targets)


def adapter_config(*, rank: int, alpha: float, dropout: float, targets: list[str], base: str | None) -> dict[str, Any]:
    """peft's ``adapter_config.json`` (a ``LoraConfig``) for plain LoRA adapters on a causal language model."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def write_peft(
    out: Path, tensors: dict[str, torch.Tensor], config_fields: dict[str, Any], dtype: torch.dtype | None
) -> int:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``out`` and re-read the weights;
    returns the number of tensors verified (bitwise equal to what was meant)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    cast = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in tensors.items()}
    save_file(cast, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config_fields, indent=2), encoding="utf-8")
    back = load_file(str(out / ADAPTER_WEIGHTS))
    bad = [k for k, v in cast.items() if k not in back or back[k].dtype != v.dtype or not torch.equal(back[k], v)]
    if bad or set(back) != set(cast):
        raise CheckpointError(
            f"{out / ADAPTER_WEIGHTS}: re-read differs from what was written ({(bad or ['keys'])[0]})"
        )
    return len(cast)
