"""Our causal training step at a GLM-4 shape against transformers' ``GlmForCausalLM``, interleaved in one run.

The architecture is GLM-4's (``GlmForCausalLM``, model_type ``glm``): grouped-query attention (``--groups``
key/value groups), SwiGLU MLP (packed ``gate_up_proj``), RMSNorm, rotary on half of each head with interleaved
pairs, a bias on Q/K/V only, an untied head. The sizes are CPU-sized (``--hidden`` 1024, 16 heads, 2 groups,
``--ffn`` 2816, ``--layers`` 4, ``--vocab`` 32768, ``--batch`` 1 x ``--seq`` 1024 by default).

One step = forward + backward + AdamW (fused on both sides) in bf16, one process, no dropout, on one fully causal
batch, called as the trainer calls it: ours gets ``attention_mask`` = sep 0 (GLM's mask with an empty Part A is the
causal mask; the trainer's host-side flag marks it causal) and the loss rows found on the host,
``position_ids [b, 2, s]`` with row 0 = ``arange`` and row 1 = 0, ``labels`` = the next token and ``loss_mask``
on every token that has one; transformers gets ``labels=input_ids`` (it shifts them itself). Both models start
from the same weights (ours copied into transformers' names and packings by :func:`copy_weights`).

Before timing, the same copy is checked at fp32 on a tiny shape: both models' losses must agree to 1e-5 (same
weights, same maths), so the timed comparison is apples to apples.

The steps are interleaved (ours, theirs, a bf16 matmul peak sample, per round) and the medians reported, with
the ratio per round (transformers' time / ours: > 1 is faster). MFU = model FLOPs (``flops_per_token``: 6 x the
matmul parameters + the dense attention term, the head on every token) per second over the median matmul peak;
both models are measured against the same work.

    python benchmarks/glm4_step.py                      # the default shape, 2 threads
    python benchmarks/glm4_step.py --head-chunk 4096    # our fused head in chunks of 4096 rows
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_glm.config import ModelConfig
from megatron_glm.model import GLMModel, flops_per_token
from megatron_glm.model.glm import loss_rows
from megatron_glm.model.masks import CAUSAL, batch_attention_mask, is_causal_sep
from megatron_glm.training.throughput import matmul_peak_flops


def glm4_config(args: argparse.Namespace, **overrides: object) -> ModelConfig:
    """Our ``ModelConfig`` of a GLM-4 (``GlmForCausalLM``) shape."""
    fields = dict(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_query_groups=args.groups,
        ffn_hidden_size=args.ffn,
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
        position_embedding_type="rope",
        rotary_percent=0.5,
        rotary_interleaved=True,
        rotary_base=10000.0,
        activation="swiglu",
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        add_qkv_bias=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    if args.head_chunk >= 0:
        fields["head_chunk_size"] = args.head_chunk
    if args.loss_rows:
        fields["last_layer_loss_rows"] = args.loss_rows == "on"
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_model(cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' ``GlmForCausalLM`` with the shapes of ``cfg`` (SDPA attention)."""
    from transformers import GlmConfig, GlmForCausalLM

    hf_cfg = GlmConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_sequence_length,
        rms_norm_eps=cfg.layernorm_epsilon,
        attention_bias=cfg.add_qkv_bias,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=None,
        partial_rotary_factor=cfg.rotary_percent,
        rope_theta=cfg.rotary_base,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return GlmForCausalLM(hf_cfg).to(dtype)


def copy_weights(ours: GLMModel, theirs: torch.nn.Module) -> None:
    """Copy our weights into transformers' names and packings (Q/K/V split, ``gate_up_proj`` as ours)."""
    cfg, sd = ours.config, ours.state_dict()
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.query_groups * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["word_embeddings.weight"], "model.norm.weight": None}
    out["model.norm.weight"] = sd["transformer.final_layernorm.weight"]
    out["lm_head.weight"] = sd["output_layer.weight"]
    for i in range(cfg.num_layers):
        src, dst = f"transformer.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            packed = sd.get(f"{src}attention.query_key_value.{kind}")
            if packed is not None:
                for name, part in zip(("q", "k", "v"), packed.split([q, kv, kv]), strict=True):
                    out[f"{dst}self_attn.{name}_proj.{kind}"] = part
        out[f"{dst}self_attn.o_proj.weight"] = sd[f"{src}attention.dense.weight"]
        out[f"{dst}mlp.gate_up_proj.weight"] = sd[f"{src}mlp.dense_h_to_4h.weight"]
        out[f"{dst}mlp.down_proj.weight"] = sd[f"{src}mlp.dense_4h_to_h.weight"]
        out[f"{dst}input_layernorm.weight"] = sd[f"{src}input_layernorm.weight"]
        out[f"{dst}post_attention_layernorm.weight"] = sd[f"{src}post_attention_layernorm.weight"]
    missing, unexpected = theirs.load_state_dict(out, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"weight copy incomplete: missing {missing}, unexpected {unexpected}")


def causal_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids; our causal inputs (sep 0, positions ``[b, 2, s]``, next-token labels) and transformers'."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    pos = torch.zeros(batch, 2, seq, dtype=torch.long)
    pos[:, 0] = torch.arange(seq)
    labels = torch.cat([ids[:, 1:], torch.zeros(batch, 1, dtype=torch.long)], dim=1)
    loss_mask = torch.ones(batch, seq)
    loss_mask[:, -1] = 0  # the last token has no next token (transformers ignores it too)
    return {
        "ids": ids,
        "pos": pos,
        "sep": torch.zeros(batch, dtype=torch.long),
        "labels": labels,
        "loss_mask": loss_mask,
        "hf_pos": pos[:, 0],
    }


def our_loss(model: GLMModel, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss as the trainer computes it: the causal flag and the loss rows found on the host first."""
    mask = batch_attention_mask({"input_ids": b["ids"], "sep": b["sep"], CAUSAL: is_causal_sep(b["sep"])})
    rows = loss_rows(b["loss_mask"])
    return model(b["ids"], b["pos"], mask, labels=b["labels"], loss_mask=b["loss_mask"], loss_rows=rows).loss


def their_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=b["ids"], position_ids=b["hf_pos"], labels=b["ids"], use_cache=False).loss


def check_same_loss(args: argparse.Namespace) -> float:
    """fp32, a tiny GLM-4 shape: our loss equals transformers' on the same weights (1e-5)."""
    tiny = argparse.Namespace(**{**vars(args), "layers": 2, "hidden": 64, "heads": 4, "groups": 2, "ffn": 176})
    tiny.vocab, tiny.seq = 256, 32
    cfg = glm4_config(tiny)
    torch.manual_seed(0)
    ours = GLMModel(cfg).train()
    theirs = hf_model(cfg, torch.float32).train()
    copy_weights(ours, theirs)
    b = causal_batch(2, tiny.seq, cfg.vocab_size, seed=1)
    a, c = float(our_loss(ours, b)), float(their_loss(theirs, b))
    if abs(a - c) > 1e-5:
        raise AssertionError(f"fp32 losses differ on the same weights: ours {a:.7f}, transformers {c:.7f}")
    return a


def timed(fn) -> tuple[float, float]:
    """``(wall seconds, this process's CPU seconds)`` of ``fn()``."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (each: our step, theirs, a peak sample)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--head-chunk", type=int, default=-1, help="model.head_chunk_size (-1: the default)")
    ap.add_argument("--loss-rows", choices=("on", "off"), help="model.last_layer_loss_rows (default: the default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    same = check_same_loss(args)
    print(f"fp32 check (tiny GLM-4 shape, same weights): ours == transformers' loss ({same:.6f}, within 1e-5)")

    dtype = torch.bfloat16
    cfg = glm4_config(args)
    torch.manual_seed(0)
    ours = GLMModel(cfg, params_dtype=dtype).train()
    theirs = hf_model(cfg, dtype).train()
    copy_weights(ours, theirs)
    batch = causal_batch(args.batch, args.seq, cfg.vocab_size)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=True)
    hf_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-5, fused=True)
    losses: dict[str, float] = {}

    def step(name: str, model: torch.nn.Module, optim: torch.optim.Optimizer, loss_fn) -> None:
        loss = loss_fn(model, batch)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.setdefault(name, float(loss.detach()))

    def ours_step() -> None:
        step("ours", ours, opt, our_loss)

    def theirs_step() -> None:
        step("transformers", theirs, hf_opt, their_loss)

    tokens = args.batch * args.seq
    flops = flops_per_token(cfg, args.seq) * tokens
    print(
        f"GLM-4 shape: {cfg.num_layers} layers x {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
        f"{cfg.query_groups} KV groups, ffn {cfg.ffn_size}, vocab {cfg.vocab_size}; {args.batch} x {args.seq} "
        f"tokens, bf16, {args.threads} threads, head chunk {cfg.head_chunk_size}, last_layer_loss_rows "
        f"{cfg.last_layer_loss_rows}; {flops / 1e9:.0f} model GFLOP/step; load {os.getloadavg()[0]:.1f}"
    )
    for _ in range(args.warmup):
        ours_step()
        theirs_step()
    peaks, t_ours, t_theirs = [], [], []
    for r in range(args.rounds):
        first, second = (ours_step, theirs_step) if r % 2 == 0 else (theirs_step, ours_step)
        a, c = timed(first), timed(second)
        t_ours.append(a if first is ours_step else c)
        t_theirs.append(c if first is ours_step else a)
        peaks.append(matmul_peak_flops(dtype, "cpu", n=2048, seconds=0.3))
    print(f"first losses (bf16, same weights): ours {losses['ours']:.4f}, transformers {losses['transformers']:.4f}")
    peak = statistics.median(peaks)
    print(
        f"bf16 matmul peak (median of {len(peaks)}): {peak / 1e9:.0f} GFLOP/s "
        f"({min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f})"
    )
    for name, times in (("ours", t_ours), ("transformers", t_theirs)):
        sec = statistics.median(t for t, _ in times)
        print(
            f"{name:>13}: {sec * 1e3:7.0f} ms/step  {tokens / sec:7.0f} tokens/s  "
            f"MFU {100 * flops / sec / peak:5.1f}%  (CPU {statistics.median(c for _, c in times) * 1e3:.0f} ms)"
        )
    for kind, k in (("wall", 0), ("CPU time", 1)):
        ratios = [c[k] / a[k] for a, c in zip(t_ours, t_theirs, strict=True)]
        median = statistics.median(c[k] for c in t_theirs) / statistics.median(a[k] for a in t_ours)
        print(f"transformers / ours ({kind}): {median:.3f}x (rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share these cores)")


if __name__ == "__main__":
    main()
