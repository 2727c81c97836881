"""The activation-memory estimate (``--dry-run``) against the measured peak of a training forward + backward on CPU
(profiler allocation events), for a tiny GLM-4-style model (GQA, SwiGLU, RMSNorm, partial rotary) and the 2021 GLM
layer, at two sequence lengths, for each recompute setting and attention kernel."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_glm.config import ModelConfig, build_config, load_config, problems
from megatron_glm.model import GLMModel
from megatron_glm.model.activation_memory import StepShape, estimate_activation_memory
from megatron_glm.model.memory import estimate_memory
from megatron_glm.parallel import ParallelState, initialize_parallel_state
from megatron_glm.parallel.context_parallel import ContextParallel, reduce_loss, split_batch
from megatron_glm.testing import peak_memory, run_distributed
from tests.model.helpers import make_batch

GLM4 = dict(
    position_embedding_type="rope",
    rotary_percent=0.5,
    activation="swiglu",
    normalization="RMSNorm",
    num_query_groups=2,
    add_bias_linear=False,
    block_position_encoding=False,
    num_attention_heads=8,
    ffn_hidden_size=160,
)
VOCAB, LAYERS, BATCH = 256, 4, 2


def _config(family: dict, impl: str, recompute: str, dropout: float) -> ModelConfig:
    base = build_config({"model.size": "glm-tiny"}).model
    return dataclasses.replace(
        base,
        num_layers=LAYERS,
        vocab_size=VOCAB,
        max_sequence_length=512,
        attention_impl=impl,
        recompute_granularity=recompute,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        last_layer_loss_rows=False,  # the estimate counts the last layer whole
        **family,
    )


def _measure(cfg: ModelConfig, seq: int, ps: ParallelState | None = None) -> tuple[int, int]:
    """(bytes the forward keeps for backward, peak bytes of forward + backward) above the start; with ``ps`` (context
    parallelism), this rank's positions of the batch and the loss reduced over the group."""
    torch.manual_seed(0)
    model = GLMModel(cfg, ps, seed=1).train()
    batch = make_batch(0, batch=BATCH, seq=seq, vocab=VOCAB)
    batch["loss_mask"] = torch.ones_like(batch["loss_mask"])  # every row a loss row, as the estimate counts the head
    cp = None if ps is None else ContextParallel.of(ps, cfg.context_parallel_comm)
    if cp is not None:
        batch = split_batch(batch, cp.size, cp.rank)

    def forward() -> torch.Tensor:
        out = model(
            batch["input_ids"],
            batch["position_ids"],
            batch["sep"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
        return (out if cp is None else reduce_loss(out, cp)).loss

    forward_peak, kept, loss = peak_memory(forward)
    backward_peak, _, _ = peak_memory(loss.backward)
    return kept, max(forward_peak, kept + backward_peak)


@pytest.mark.parametrize("family", [GLM4, {}], ids=["glm4", "glm"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("recompute", ["", "selective", "full"])
def test_the_estimate_is_the_measured_peak_within_35_percent(family: dict, impl: str, recompute: str) -> None:
    measured = {}
    for seq in (128, 256):
        cfg = _config(family, impl, recompute, dropout=0.1)
        kept, peak = _measure(cfg, seq)
        est = estimate_activation_memory(cfg, StepShape(seq, BATCH, precision="fp32", device_type="cpu"))
        assert est.recompute == (recompute or "none")
        assert 0.65 * peak <= est.peak <= 1.35 * peak, (seq, est.peak, peak)
        assert 0.8 * kept <= est.stored <= 1.2 * kept, (seq, est.stored, kept)  # what the forward keeps: closer
        measured[seq] = peak
    assert measured[256] > 1.5 * measured[128]  # the two lengths really differ (and the quadratic terms show)


CP_CASES = [
    ("ring", 0.0, ""),
    ("gather", 0.0, ""),
    ("ring", 0.1, ""),
    ("ring", 0.0, "full"),
    ("gather", 0.1, "selective"),
]


def _measure_cp(rank: int, world: int, configs: list[ModelConfig], seq: int) -> list[tuple[int, int]]:
    ps = initialize_parallel_state(cp_size=world)
    return [_measure(cfg, seq, ps) for cfg in configs]


def test_the_estimate_follows_the_context_parallel_comm() -> None:
    """CP=2 (one launch, the larger rank's figures): the ring keeps the local keys and values and no score matrix,
    the gather the keys and values of the whole sequence (and the mask rows), attention dropout always gathers."""
    seq = 256
    configs = [
        dataclasses.replace(_config(GLM4, "sdpa", recompute, dropout), context_parallel_comm=comm)
        for comm, dropout, recompute in CP_CASES
    ]
    per_rank = run_distributed(_measure_cp, 2, configs, seq)
    for case, cfg, *ranks in zip(CP_CASES, configs, *per_rank, strict=True):
        kept, peak = max(k for k, _ in ranks), max(p for _, p in ranks)
        est = estimate_activation_memory(cfg, StepShape(seq, BATCH, cp=2, precision="fp32", device_type="cpu"))
        assert 0.75 * peak <= est.peak <= 1.25 * peak, (case, est.peak, peak)
        assert 0.8 * kept <= est.stored <= 1.2 * kept, (case, est.stored, kept)


def test_the_formula_divides_as_stated() -> None:
    cfg = dataclasses.replace(_config(GLM4, "sdpa", "", 0.0), hidden_size=512, num_attention_heads=8)
    one = estimate_activation_memory(cfg, StepShape(4096, 1))
    # Context parallelism holds s / cp tokens. The ring (no attention dropout) keeps every layer term linear in
    # them (the local keys and values, a log-sum-exp per row, no [s/cp, s] scores nor mask): less than half CP=1.
    two = estimate_activation_memory(cfg, StepShape(4096, 1, cp=2))
    assert two.stored < one.stored / 2
    assert estimate_activation_memory(cfg, StepShape(8192, 1, cp=2)).per_layer == pytest.approx(2 * two.per_layer)
    # The gather keeps the keys and values of all s tokens (repeated to the 8 heads: 2 x cp x q, q = 1, against the
    # ring's 2 k, k = 2 groups / 8 heads) and sdpa's mask rows s/cp x s as a bias (no log-sum-exp).
    gather = estimate_activation_memory(
        dataclasses.replace(cfg, context_parallel_comm="gather"), StepShape(4096, 1, cp=2)
    )
    s_local = 2048
    kv = s_local * 512 * 2 * (2 * 2 * 1 - 2 * 0.25)
    assert gather.per_layer - two.per_layer == pytest.approx(kv + 2 * s_local * 4096 - 4 * 8 * s_local)
    # Selective recompute keeps Megatron's linear part only; full keeps one hidden state per layer (w s b h).
    selective = estimate_activation_memory(dataclasses.replace(cfg, recompute_granularity="selective"), StepShape(4096))
    full = estimate_activation_memory(dataclasses.replace(cfg, recompute_granularity="full"), StepShape(4096))
    assert full.stored < selective.stored < one.stored
    head = 4096 * VOCAB * 4 + 4096 * 512 * 2 * 3  # the loss's fp32 softmax; final RMSNorm (2) and head input (1)
    assert full.kept == pytest.approx(LAYERS * 4096 * 512 * 2 + head)
    # Eager materialises the scores b a s s (fp32 softmax + bf16 probabilities) in every layer.
    eager = estimate_activation_memory(dataclasses.replace(cfg, attention_impl="eager"), StepShape(4096))
    bias = 2 * 4096 * 4096  # sdpa's explicit mask as a bf16 bias, per layer
    assert eager.per_layer - one.per_layer == pytest.approx(8 * 4096 * 4096 * 6 - bias - 4096 * 512 * 2)
    # Pipeline: the first stage holds up to pp micro-batches of its layers (1F1B).
    piped = estimate_activation_memory(cfg, StepShape(4096, 1, pp=2, micro_batches=8))
    assert (piped.layers, piped.in_flight) == (2, 2)


def test_context_parallel_size_needs_the_sequence_divisible_by_twice_it() -> None:
    assert problems(load_config(["--context-parallel-size", "2", "--seq-length", "512"])) == []
    assert problems(load_config(["--context-parallel-size", "3", "--seq-length", "512"])) == [
        "data.seq_length (512) must be divisible by 2 x parallel.context_parallel_size (6): each context-parallel "
        "rank holds two chunks"
    ]
    assert problems(load_config(["--context-parallel-size", "0"])) == [
        "parallel.context_parallel_size must be positive, got 0"
    ]


def test_dry_run_prints_the_activation_memory_per_rank() -> None:
    import os
    import subprocess
    import sys

    flags = ["--model.size", "glm-4-9b", "--seq-length", "32768", "--bf16", "--tensor-model-parallel-size", "2"]
    flags += ["--sequence-parallel", "--context-parallel-size", "2", "--recompute-granularity", "selective"]
    flags += ["--model.attention_softmax_in_fp32", "false", "--model.apply_query_key_layer_scaling", "false"]
    flags += ["--micro-batch-size", "1", "--global-batch-size", "4", "--model.hidden_dropout", "0"]
    flags += ["--model.attention_dropout", "0"]
    env = {**os.environ, "WORLD_SIZE": "16", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "pretrain_glm.py", "--dry-run", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    cfg = load_config(flags)
    est = estimate_activation_memory(cfg.model, StepShape(32768, 1, tp=2, cp=2, micro_batches=1))
    line = (
        "activation memory per rank (seq 32768, CP 2 (ring attention): 16384 tokens per rank, micro-batch 1, TP 2, "
        f"sequence parallel, sdpa): {est.describe()}"
    )
    assert line in out.splitlines(), out[-2000:]
    assert "configuration is valid for world size 16" in out and "DP 4" in out  # 16 = TP 2 x CP 2 x DP 4
    # ZeRO-1 (the default) partitions the optimizer over DeepSpeed's data-parallel group: the dp x cp = 8 ranks
    by_dp = {dp: estimate_memory(cfg.model, tp=2, pp=1, dp=dp, zero_stage=1, precision="bf16") for dp in (4, 8)}
    assert by_dp[8].optimizer < by_dp[4].optimizer
    memory = next(row for row in out.splitlines() if row.startswith("memory per rank"))
    assert "(TP 2 x PP 1 x DP 4 x CP 2, ZeRO 1, sharded over DP x CP = 8, bf16;" in memory, memory
    assert memory.endswith(by_dp[8].describe()), memory


def test_context_parallel_refuses_what_it_cannot_serve() -> None:
    """MoE (balance terms over the local chunks) and MTP (the shift crosses chunk boundaries) are refused by name."""
    base = ["--context-parallel-size", "2", "--seq-length", "512"]
    moe = ["--num-experts", "4", "--moe-top-k", "2", "--moe-intermediate-size", "32", "--model.activation", "swiglu"]
    got = problems(load_config(base + moe))
    refused = "parallel.context_parallel_size 2 cannot be combined with"
    assert got == [f"{refused} model.num_experts > 0 (Mixture-of-Experts)"]
    got = problems(load_config([*base, "--num-nextn-predict-layers", "1", "--model.normalization", "RMSNorm"]))
    assert "parallel.context_parallel_size 2 cannot be combined with model.num_nextn_predict_layers > 0 (MTP)" in got
