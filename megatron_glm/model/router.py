"""The Mixture-of-Experts router (GLM-4.5 / DeepSeek-V3 form) and its balancing statistics.

With ``x`` a token's hidden state, ``W_g = router.weight [E, H]`` and ``b = router.expert_bias [E]`` (fp32)::

    logits = x W_g^T                               (fp32)
    s      = sigmoid(logits)  |  softmax(logits)   (moe_router_score)
    chosen = topk(s + b, k)                        (the bias chooses, it does not weigh)
    w      = s[chosen]  (/ sum(s[chosen]) + 1e-20 when moe_norm_topk_prob)  x moe_routed_scaling_factor

The bias is not trained by gradient: :func:`update_expert_bias` moves it after every optimizer step against each
expert's load error (aux-loss-free balancing, ``b_e += rate x sign(mean load - load_e)``), loads counted over the
step's training tokens (:attr:`Router.load`) and summed over the data-parallel ranks, so every rank applies the
same update. :func:`sequence_balance_loss` is the optional sequence-level balance loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model.meta_device import writable


class Routing(NamedTuple):
    """A router's decision for ``n`` tokens: ``expert_ids [n, k]`` (int64), ``weights [n, k]`` (fp32, with the
    gradient to the router) and the fp32 ``scores [n, E]`` (unbiased; the balance loss reads them). A named tuple:
    ZeRO-3's backward hooks find its tensors (they re-gather the router's partitioned weight for its backward)."""

    expert_ids: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor


def route(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, score: str, normalize: bool, scale: float
) -> Routing:
    """The routing equations of the module docstring on fp32 ``logits [n, E]``."""
    scores = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, dim=-1)
    biased = scores.detach() if bias is None else scores.detach() + bias.float()
    ids = torch.topk(biased, k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(ids, weights * scale, scores)


class Router(nn.Module):
    """``weight [E, H]`` (params dtype, computed in fp32; TP-replicated) and, with ``moe_router_bias``, the fp32
    ``expert_bias [E]`` (a parameter without gradient: it moves only by :func:`update_expert_bias`). ``load``
    (int64, not saved) counts the tokens routed to each expert by training forwards since the last update."""

    def __init__(self, config: ModelConfig, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.top_k, self.score = config.moe_top_k, config.moe_router_score
        self.normalize, self.scale = config.moe_norm_topk_prob, config.moe_routed_scaling_factor
        self.rate = config.moe_bias_update_rate
        self.weight = nn.Parameter(weight)
        self.expert_bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("load", torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device), False)
        self.position: int | None = None
        """This router's place among the model's MoE layers (``moe.moe_layer_position``; set by the MoE MLP)."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> Routing:
        """Route ``x [n, H]``; ``weight``: the router weight as the caller maps it (sequence parallelism)."""
        w = self.weight if weight is None else weight
        return route(x.float() @ w.float().t(), self.expert_bias, self.top_k, self.score, self.normalize, self.scale)

    def count(self, expert_ids: torch.Tensor) -> None:
        """Add the tokens of ``expert_ids`` (every token this layer routed, on every tensor-parallel rank alike) to
        :attr:`load` (training forwards only; full recomputation counts a layer's tokens twice, which changes
        neither the signs of the update nor the logged fractions)."""
        if self.training:
            self.load += torch.bincount(expert_ids.reshape(-1), minlength=self.load.numel())


def routers(module: nn.Module) -> list[Router]:
    """The routers of ``module`` (a model or a pipeline stage), in module order."""
    return [m for m in module.modules() if isinstance(m, Router)]


@torch.no_grad()
def keep_expert_bias_fp32(module: nn.Module) -> None:
    """Every router's correction bias back in fp32 (after an engine cast the whole module to bf16/fp16)."""
    for r in routers(module):
        if r.expert_bias is not None and r.expert_bias.dtype != torch.float32:
            r.expert_bias.data = r.expert_bias.data.float()


@torch.no_grad()
def update_expert_bias(module: nn.Module, dp_group: Any = None) -> list[torch.Tensor]:
    """Aux-loss-free balancing after an optimizer step: every router's ``load`` summed over ``dp_group`` (one
    all-reduce for all of them), ``expert_bias += rate x sign(mean load - load)``, ``load`` reset. Returns each
    router's load as fractions of its tokens (fp32 ``[E]``, for the metrics), the same on every rank."""
    rs = routers(module)
    if not rs:
        return []
    loads = torch.stack([r.load for r in rs])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(loads, group=dp_group)
    fractions = []
    for r, load in zip(rs, loads.double(), strict=True):
        if r.expert_bias is not None and r.rate > 0:
            with writable(r.expert_bias):  # ZeRO-3: the whole bias, re-partitioned after (every rank moves it alike)
                r.expert_bias.add_((r.rate * torch.sign(load.mean() - load)).to(r.expert_bias.dtype))
        r.load.zero_()
        fractions.append((load / load.sum().clamp(min=1)).float())
    return fractions


def load_metrics(fractions: Iterable[torch.Tensor]) -> dict[str, float]:
    """Logged per-expert load: each MoE layer's largest and smallest expert load relative to the even share
    (``moe_load_max`` / ``moe_load_min``: the worst over layers; 1 is perfectly even) and, per layer ``j`` (in
    module order), ``moe_load_max_{j}``."""
    out: dict[str, float] = {}
    rel = [f * f.numel() for f in fractions]
    if not rel:
        return out
    out["moe_load_max"] = max(float(r.max()) for r in rel)
    out["moe_load_min"] = min(float(r.min()) for r in rel)
    for j, r in enumerate(rel):
        out[f"moe_load_max_{j}"] = float(r.max())
    return out


def sequence_balance_loss(routing: Routing, batch: int, k: int, tp_group: Any = None, shards: int = 1) -> torch.Tensor:
    """The sequence-level balance loss (DeepSeek-V3 eq. 17-20, slime's ``seq_aux_loss``), without its coefficient:
    per sequence ``sum_i f_i P_i`` with ``f_i = E / (k T) x (tokens choosing i)`` and ``P_i = mean_t s'_{i,t}``
    (``s'`` the scores normalised over the experts), averaged over the ``batch`` sequences. The rows are
    ``[batch, T / shards]`` tokens in order; under sequence parallelism (``shards`` > 1) each rank holds a shard
    of every sequence and ``expert_ids`` covers the whole sequences (gathered): ``P`` is summed over ``tp_group``."""
    scores, ids = routing.scores, routing.expert_ids
    e = scores.shape[-1]
    s = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    p = s.view(batch, -1, e).sum(dim=1)  # [b, E] over this rank's tokens
    t = p.new_tensor(s.shape[0] // batch * shards)
    if shards > 1:
        from megatron_glm.parallel import reduce_from_tensor_parallel_region

        p = reduce_from_tensor_parallel_region(p, tp_group)
    counts = torch.zeros(batch, e, device=ids.device, dtype=torch.float32)
    counts.scatter_add_(1, ids.reshape(batch, -1), torch.ones_like(ids.reshape(batch, -1), dtype=torch.float32))
    f = counts * (e / (k * t))
    return ((f * (p / t)).sum(dim=-1)).mean()
