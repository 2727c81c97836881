"""The ``lora`` config section: low-rank adapters on the transformer linears."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_glm.config.fields import opt

LORA_TARGETS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA: low-rank adapters on the transformer linears; the base weights are frozen."""

    rank: int = opt(0, "LoRA rank r of every adapter (0: off, every weight trains).")
    alpha: float = opt(16.0, "LoRA alpha: the adapters' output is scaled by alpha / rank.")
    dropout: float = opt(0.0, "Dropout on the adapters' input, in [0, 1).")
    base: str = opt(
        "",
        "pretrain_glm.py: the checkpoint (any layout or format we read) whose frozen weights the adapters go on, "
        "loaded at every start, resumes included (finetune_glm.py: --load). Checkpoints hold the adapters and "
        "the base's identity (sha256 of its manifest); a resume against another base is refused.",
    )
    targets: list[str] = opt(
        ["attention.query_key_value", "attention.dense"],
        "The linears of every layer that take an adapter (names, or one comma-separated value): "
        + ", ".join(LORA_TARGETS)
        + ".",
    )

    def target_names(self) -> list[str]:
        """The targets, comma-separated values split (order kept, duplicates dropped)."""
        names = [n.strip() for v in self.targets for n in v.split(",") if n.strip()]
        return list(dict.fromkeys(names))
