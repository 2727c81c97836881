"""An independent fp64 forward of the GLM family, written from the published equations (no package code).

Reads the full state dict by our tensor names and the architecture from a plain dict of options (the
``ModelConfig`` field names). Equations:

- rotary (Su et al.): the pair ``(x_a, x_b)`` of dims ``a, b`` at position ``p`` becomes
  ``(x_a cos - x_b sin, x_b cos + x_a sin)`` with angle ``p base^(-2i / n)`` for the ``i``-th pair of an
  ``n``-dim rotary; pairs are ``(i, i + n/2)`` (rotate-half) or ``(2i, 2i+1)`` (interleaved). 1-D: the first
  ``rotary_percent x hd`` dims by the position; 2-D (ChatGLM-6B): dims ``[0, hd/2)`` by the position and
  ``[hd/2, hd)`` by the block position, each an ``hd/2``-dim rotary.
- grouped-query attention: query head ``i`` uses key/value group ``i // (heads / groups)``; QKV rows are
  ``[Q (heads x hd); K (groups x hd); V (groups x hd)]``.
- residuals: pre-LN ``h + f(N(h))``; post-LN alpha (ChatGLM-6B / GLM-130B's DeepNorm form)
  ``alpha N(h) + f(N(h))``, ``alpha = sqrt(2 L)``.
- MLP: tanh-GeLU; GeGLU ``x1 * gelu_erf(x2)``; SwiGLU ``silu(x1) * x2`` over the two halves of dense_h_to_4h.
- norms: LayerNorm; RMSNorm ``x / sqrt(mean(x^2) + eps) * w``.
- query-key layer scaling and fp32 softmax change nothing in exact arithmetic and are not modelled.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _norm(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str, kind: str, eps: float) -> torch.Tensor:
    w = sd[name + ".weight"]
    if kind == "RMSNorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + sd[name + ".bias"]


def _rotary(x: torch.Tensor, pos: torch.Tensor, lo: int, n: int, base: float, interleaved: bool) -> torch.Tensor:
    """Rotate dims ``[lo, lo + n)`` of ``x [b, s, heads, hd]`` by positions ``pos [b, s]``."""
    out = x.clone()
    for i in range(n // 2):
        angle = pos.double() * base ** (-2.0 * i / n)  # [b, s]
        c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
        a, b = (lo + 2 * i, lo + 2 * i + 1) if interleaved else (lo + i, lo + i + n // 2)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., b] * c + x[..., a] * s
    return out


def _positions(x: torch.Tensor, position_ids: torch.Tensor, arch: dict[str, Any], hd: int) -> torch.Tensor:
    kind, base, inter = arch["position_embedding_type"], arch["rotary_base"], arch["rotary_interleaved"]
    if kind == "rope_2d":
        x = _rotary(x, position_ids[:, 0], 0, hd // 2, base, inter)
        return _rotary(x, position_ids[:, 1], hd // 2, hd // 2, base, inter)
    return _rotary(x, position_ids[:, 0], 0, round(hd * arch["rotary_percent"]), base, inter)


def _linear(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def family_reference_logits(
    sd: dict[str, torch.Tensor],
    arch: dict[str, Any],
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Full-vocab logits ``[b, s, V]`` in fp64 (``mask``: ``[b, 1, s, s]`` 0/1, 1 = may attend)."""
    sd = {k: v.double() for k, v in sd.items()}
    mask = mask.double()
    b, s = input_ids.shape
    layers, nh = arch["num_layers"], arch["num_attention_heads"]
    hidden = sd["word_embeddings.weight"].shape[1]
    hd = arch["kv_channels"] or hidden // nh
    g = arch["num_query_groups"] or nh
    eps, norm = arch["layernorm_epsilon"], arch["normalization"]
    rotary = arch["position_embedding_type"] != "learned_absolute"
    alpha = None if arch["residual_style"] == "pre_ln" else math.sqrt(2.0 * layers)
    h = sd["word_embeddings.weight"][input_ids]
    if not rotary:
        h = h + sd["transformer.position_embeddings.weight"][position_ids[:, 0]]
        h = h + sd["transformer.block_position_embeddings.weight"][position_ids[:, 1]]
    for i in range(layers):
        p = f"transformer.layers.{i}."
        x = _norm(h, sd, p + "input_layernorm", norm, eps)
        qkv = _linear(x, sd, p + "attention.query_key_value")
        q = qkv[..., : nh * hd].reshape(b, s, nh, hd)
        k = qkv[..., nh * hd : (nh + g) * hd].reshape(b, s, g, hd)
        v = qkv[..., (nh + g) * hd :].reshape(b, s, g, hd)
        if rotary:
            q, k = _positions(q, position_ids, arch, hd), _positions(k, position_ids, arch, hd)
        heads = []
        for j in range(nh):
            grp = j // (nh // g)
            scores = q[:, :, j] @ k[:, :, grp].transpose(-1, -2) / math.sqrt(hd)  # [b, s, s]
            scores = scores * mask[:, 0] - 10000.0 * (1.0 - mask[:, 0])
            heads.append(torch.softmax(scores, dim=-1) @ v[:, :, grp])
        a = _linear(torch.cat(heads, dim=-1), sd, p + "attention.dense")
        h = h + a if alpha is None else alpha * x + a
        x = _norm(h, sd, p + "post_attention_layernorm", norm, eps)
        y = _linear(x, sd, p + "mlp.dense_h_to_4h")
        act = arch["activation"]
        if act == "gelu":
            y = 0.5 * y * (1.0 + torch.tanh(0.7978845608028654 * y * (1.0 + 0.044715 * y * y)))
        else:
            y1, y2 = y[..., : y.shape[-1] // 2], y[..., y.shape[-1] // 2 :]
            if act == "geglu":
                y = y1 * 0.5 * y2 * (1.0 + torch.erf(y2 / math.sqrt(2.0)))
            else:
                y = y1 / (1.0 + torch.exp(-y1)) * y2
        m = _linear(y, sd, p + "mlp.dense_4h_to_h")
        h = h + m if alpha is None else alpha * x + m
    h = _norm(h, sd, "transformer.final_layernorm", norm, eps)
    head = sd.get("output_layer.weight", sd["word_embeddings.weight"])
    return h @ head.T


# -- the released layouts, read by their published names and packing (no package code) --------------------------


def _per_head_qkv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head packed ``[q_0; k_0; v_0; q_1; ...]`` rows -> ``[Q; K; V]`` (weight or bias)."""
    rows = t.shape[0] // (3 * heads)
    q = torch.cat([t[(3 * h) * rows : (3 * h + 1) * rows] for h in range(heads)])
    k = torch.cat([t[(3 * h + 1) * rows : (3 * h + 2) * rows] for h in range(heads)])
    v = torch.cat([t[(3 * h + 2) * rows : (3 * h + 3) * rows] for h in range(heads)])
    return torch.cat([q, k, v])


def chatglm6b_state_dict(theirs: dict[str, torch.Tensor], arch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HF ChatGLM-6B tensors -> the reference's names: per-head QKV unpacked; ``lm_head.weight`` is the head only
    when untied (tied: HF's code uses the word embedding); ``inv_freq`` buffers dropped."""
    out = {}
    for name, t in theirs.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight":
            if arch["untie_embeddings_and_output_weights"]:
                out["output_layer.weight"] = t
            continue
        if ".attention.query_key_value." in name:
            t = _per_head_qkv(t, arch["num_attention_heads"])
        out[name.removeprefix("transformer.") if name.startswith("transformer.word_") else name] = t
    return out


def chatglm2_state_dict(theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ChatGLM2-6B tensors -> the reference's names (its QKV is already ``[Q; K of groups; V of groups]``)."""
    out = {}
    for name, t in theirs.items():
        if name == "transformer.rotary_pos_emb.inv_freq":
            continue
        if name == "transformer.embedding.word_embeddings.weight":
            name = "word_embeddings.weight"
        elif name == "transformer.output_layer.weight":
            name = "output_layer.weight"
        else:
            name = name.replace("transformer.encoder.", "transformer.").replace(".self_attention.", ".attention.")
        out[name] = t
    return out


def sat_glm130b_state_dict(ranks: list[dict[str, torch.Tensor]], arch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """SAT GLM-130B tensor-parallel rank files -> full tensors by the reference's names.

    Per rank: QKV packed per head over the rank's heads; ``dense_h_to_4h`` is the rank's ``[W1_r; W2_r]`` (GeGLU
    halves of its slice of the inner dimension); row-parallel matrices split their columns; the vocabulary is split
    over the embedding rows; norms and row-parallel biases replicated."""
    heads = arch["num_attention_heads"] // len(ranks)
    out = {}
    for name in ranks[0]:
        parts = [r[name] for r in ranks]
        ours = "word_embeddings.weight" if name == "transformer.word_embeddings.weight" else name
        if name.startswith("mixins."):
            continue
        if ".attention.query_key_value." in name:
            qkv = [_per_head_qkv(p, heads).chunk(3) for p in parts]
            out[ours] = torch.cat([torch.cat([x[i] for x in qkv]) for i in range(3)])
        elif ".mlp.dense_h_to_4h." in name:
            halves = [p.chunk(2) for p in parts]
            out[ours] = torch.cat([torch.cat([x[i] for x in halves]) for i in range(2)])
        elif name.endswith("word_embeddings.weight"):
            out[ours] = torch.cat(parts)
        elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            out[ours] = torch.cat(parts, dim=1)
        else:
            out[ours] = parts[0]
    return out
