"""The ``lora`` config section: low-rank adapters on the transformer linears.

On a Mixture-of-Experts layer the MLP targets (``mlp.dense_h_to_4h``, ``mlp.dense_4h_to_h``) adapt its routed
experts (one adapter per expert, ``mlp.experts.<linear>``) and its shared experts (``mlp.shared_experts.<linear>``).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_glm.config.fields import opt

LORA_TARGETS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
#: Where an ``mlp.`` target's linear also sits on a Mixture-of-Experts layer.
MOE_MLP_PARTS = ("experts", "shared_experts")


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
        + ". On MoE layers the mlp targets adapt every routed expert (one adapter each) and the shared experts.",
    )

    def target_names(self) -> list[str]:
        """The targets, comma-separated values split (order kept, duplicates dropped)."""
        names = [n.strip() for v in self.targets for n in v.split(",") if n.strip()]
        return list(dict.fromkeys(names))

    def adapts(self, linear: str) -> bool:
        """Whether the linear ``linear`` of a layer (relative name, e.g. ``mlp.experts.dense_h_to_4h``) is a
        target: a target's own name, or an MoE layer's routed or shared experts' linear of an ``mlp.`` target."""
        head, _, rest = linear.partition(".")
        part, _, last = rest.partition(".")
        names = self.target_names()
        return linear in names or (head == "mlp" and part in MOE_MLP_PARTS and f"mlp.{last}" in names)
