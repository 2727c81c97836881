"""ZeRO-3 builds the model partitioned (``deepspeed.zero.Init``): set-up memory, identical init and losses, and
weights loaded into a partitioned model; an MoE model (the router's correction bias partitioned too, moved by the
balancing rule, not the optimizer) trains as under ZeRO-1, in fp32 and in bf16 (the bias stays fp32, and its
checkpoint holds it: DeepSpeed saves a parameter outside the optimizer as each rank's partition)."""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_glm.checkpoint.convert import open_source
from megatron_glm.testing import run_distributed
from tests.training.harness import build_trainer, tiny_config

pytestmark = pytest.mark.slow

# ~204M parameters: 16 layers of 12.6M (hidden 1024) and small embeddings.
BIG = {
    "model.num_layers": 16,
    "model.hidden_size": 1024,
    "model.num_attention_heads": 16,
    "model.vocab_size": 1024,
    "training.micro_batch_size": 1,
    "training.global_batch_size": 2,
}


def _setup_peaks(rank: int, world: int) -> dict:
    """Each rank's resident-set growth while building the ~200M model under ZeRO-3, then unpartitioned."""
    from megatron_glm.model.memory import estimate_memory
    from megatron_glm.parallel import initialize_parallel_state
    from megatron_glm.testing.memory import peak_rss, reset_peak_rss
    from megatron_glm.training.distributed import init_distributed
    from megatron_glm.training.setup import build_model

    env, _ = init_distributed()  # no heartbeat
    ps = initialize_parallel_state(1, 1)
    out: dict = {}
    for stage in (3, 1):
        cfg = tiny_config(**BIG, **{"training.zero_stage": stage})
        gc.collect()
        before = reset_peak_rss()
        model = build_model(cfg, ps, env.device).module
        out[f"peak{stage}"] = peak_rss() - before
        params = list(model.parameters())
        out[f"partitioned{stage}"] = all(hasattr(p, "ds_tensor") for p in params)
        out[f"held{stage}"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        out[f"params{stage}"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        est = estimate_memory(cfg.model, tp=1, pp=1, dp=world, zero_stage=stage, precision="fp32")
        out[f"estimate{stage}"] = est.setup
        del model, params
    return out


def test_zero3_setup_peak_is_partitioned(monkeypatch: pytest.MonkeyPatch) -> None:
    """DP=2: each rank's set-up peak building ~200M parameters under ZeRO-3 is at most 0.6x the whole build's."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # freed tensors leave the resident set at once
    # spawned, not forked from the fork server: glibc reads MALLOC_* when a process starts
    results = run_distributed(_setup_peaks, 2, timeout=900, start_method="spawn")
    for rank, r in enumerate(results):
        ratio = r["peak3"] / r["peak1"]
        print(
            f"rank {rank}: set-up peak ZeRO-3 {r['peak3'] / 2**20:.0f} MiB (estimate {r['estimate3'] / 2**20:.0f}), "
            f"whole model {r['peak1'] / 2**20:.0f} MiB (estimate {r['estimate1'] / 2**20:.0f}), ratio {ratio:.3f}"
        )
        assert r["params3"] == r["params1"] > 190e6
        assert r["peak1"] > 0.95 * r["params1"] * 4  # the whole fp32 model was really built (and measured)
        assert ratio <= 0.6
        assert r["partitioned3"] and not r["partitioned1"]
        assert r["held3"] * 2 == pytest.approx(r["held1"], abs=1024)  # each rank keeps half of every tensor
        for stage in (3, 1):  # --dry-run's set-up figure is the measured one within 25%
            assert 0.75 < r[f"peak{stage}"] / r[f"estimate{stage}"] < 1.25


class _Weights:
    """An opened checkpoint (full tensors by original name) held in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: object) -> None:
        from megatron_glm.model import ModelLayout

        self.tensors = tensors
        self.info = SimpleNamespace(path="memory", layout=ModelLayout(config))

    def names(self) -> list[str]:
        return list(self.tensors)

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def release(self) -> None:
        pass


MOE = {
    "model.activation": "swiglu",
    "model.num_experts": 4,
    "model.moe_top_k": 2,
    "model.moe_intermediate_size": 32,
    "model.num_shared_experts": 1,
    "model.first_k_dense_replace": 1,
    "model.moe_bias_update_rate": 0.01,
    "model.moe_aux_loss_coeff": 0.01,
}
BIAS = "transformer.layers.1.mlp.router.expert_bias"
# The dense runs by head: tied; untied (every GLM-4 model's), its loss unfused, fused in chunks, in bf16.
UNTIED_HEAD = {"model.untie_embeddings_and_output_weights": True}
HEADS = {
    "": {},
    "_untied": UNTIED_HEAD,
    "_untied_fused": {**UNTIED_HEAD, "model.head_chunk_size": 16},
    "_bf16": {**UNTIED_HEAD, "training.precision": "bf16"},
}


def _train_moe(stage: int, precision: str = "fp32", save: str = "") -> dict:
    """3 steps of a 2-layer MoE model (a dense layer, an MoE layer): the losses and the final (gathered) weights;
    saved in ``save`` when given."""
    import deepspeed

    cfg = tiny_config(
        **MOE,
        **{
            "training.zero_stage": stage,
            "training.precision": precision,
            "training.train_iters": 3,
            "training.micro_batch_size": 2,
            "training.global_batch_size": 8,
            "checkpoint.save": save,
        },
    )
    trainer, _, logger = build_trainer(cfg)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    bias = params[BIAS]  # ZeRO-3 keeps a tensor this small whole on every rank (persistent) besides its partition
    shard = bias.ds_tensor.detach().clone() if hasattr(bias, "ds_id") else None  # (what a gather reads): both move
    with deepspeed.zero.GatheredParameters(list(params.values())) if stage == 3 else contextlib.nullcontext():
        weights = {n: p.detach().clone() for n, p in params.items()}
    return {"loss": [v["loss"] for _, v in logger.rows], "weights": weights, "bias_shard": shard}


def _train(rank: int, world: int, save: str) -> dict:
    """Losses of 4 steps under ZeRO-1 and ZeRO-3 (same init, same batches), with each head of :data:`HEADS`; then
    weights loaded into a
    partitioned model; the MoE model's steps under both, in fp32 and bf16 (the bf16 ZeRO-3 run saved in ``save``)."""
    import deepspeed

    from megatron_glm.checkpoint.weights import load_model_weights
    from megatron_glm.model import GLMModel
    from megatron_glm.model.layout import original_name
    from megatron_glm.training.setup import build_model

    out: dict = {}
    for stage in (1, 3):
        for head, extra in HEADS.items():  # the tied head, then the untied one (unfused, fused, bf16)
            cfg = tiny_config(
                **{
                    "training.zero_stage": stage,
                    "training.train_iters": 4,
                    "training.micro_batch_size": 2,
                    "training.global_batch_size": 8,
                    **extra,
                }
            )
            trainer, ps, logger = build_trainer(cfg)
            if head == "":
                load_cfg = cfg
            out[f"partitioned{head}{stage}"] = all(hasattr(p, "ds_id") for p in trainer.model.parameters())
            out[f"untied{head}{stage}"] = hasattr(trainer.model, "output_layer")
            trainer.train()
            out[f"loss{head}{stage}"] = [v["loss"] for _, v in logger.rows]
    cfg = load_cfg  # ZeRO-3, the tied head, fp32
    source = GLMModel(cfg.model, seed=7)
    full = {original_name(k): v.detach().clone() for k, v in source.named_parameters()}
    model = build_model(cfg, ps, torch.device("cpu")).module  # seed 1234, partitioned
    load_model_weights(model, _Weights(full, cfg.model), 1, 0)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        diffs = [(p.detach() - full[original_name(k)]).abs().max() for k, p in model.named_parameters()]
        out["load_diff"] = float(max(diffs))
    out["load_partitioned"] = all(p.numel() == 0 for p in model.parameters())
    out["moe1"], out["moe3"] = _train_moe(1), _train_moe(3)
    out["bf16_1"], out["bf16_3"] = _train_moe(1, "bf16"), _train_moe(3, "bf16", save)
    return out


def test_zero3_losses_equal_zero1_and_weights_load(tmp_path: Path) -> None:
    """fp32, DP=2: the partitioned build's init gives ZeRO-1's losses, the head tied or untied (the untied head's
    weight gathered for its gradient; in bf16 too); weights load into partitioned parameters.
    bf16: the MoE router's correction bias stays fp32 under ZeRO-3, takes ZeRO-1's steps and is read back whole
    from the ZeRO-3 checkpoint."""
    first, second = run_distributed(_train, 2, str(tmp_path / "bf16z3"), timeout=900)
    for r in (first, second):
        for head in HEADS:  # tied and untied heads: ZeRO-3 takes ZeRO-1's steps
            assert not r[f"partitioned{head}1"] and r[f"partitioned{head}3"]
            assert r[f"untied{head}1"] == r[f"untied{head}3"] == (head != "")
            assert len(r[f"loss{head}3"]) == 4 and len(set(r[f"loss{head}1"])) == 4
            tolerance = 1e-3 if head == "_bf16" else 1e-5
            assert max(abs(a - b) for a, b in zip(r[f"loss{head}1"], r[f"loss{head}3"], strict=True)) < tolerance, r
        assert abs(r["loss1"][0] - r["loss_untied1"][0]) > 1e-3  # the untied head is another model
        assert r["load_diff"] == 0.0 and r["load_partitioned"]
        one, three = r["moe1"], r["moe3"]  # MoE: ZeRO-3 (the correction bias partitioned) takes ZeRO-1's steps
        assert three["bias_shard"] is not None and one["bias_shard"] is None
        assert len(three["loss"]) == 3 and max(abs(a - b) for a, b in zip(one["loss"], three["loss"])) < 1e-5, r
        for name, want in one["weights"].items():
            torch.testing.assert_close(three["weights"][name], want, rtol=0, atol=1e-5, msg=name)
        assert one["weights"][BIAS].abs().max() > 0  # moved by the balancing rule (3 steps of +-0.01)
    for stage in ("moe1", "moe3"):  # the same bias on both data-parallel ranks
        results = [r[stage]["weights"][BIAS] for r in (first, second)]
        assert torch.equal(*results)
    # each rank's ZeRO-3 partition of the bias holds its half of the moved bias (not the initial zeros)
    moved = first["moe1"]["weights"][BIAS]
    assert torch.equal(torch.cat([first["moe3"]["bias_shard"], second["moe3"]["bias_shard"]]), moved)
    # bf16: the bias is fp32 (its ZeRO-3 partition too) and moves as under ZeRO-1 (same loads, same signs)
    one, three = first["bf16_1"]["weights"][BIAS], first["bf16_3"]["weights"][BIAS]
    assert first["bf16_1"]["weights"]["transformer.layers.1.mlp.router.weight"].dtype == torch.bfloat16
    assert one.dtype == three.dtype == first["bf16_3"]["bias_shard"].dtype == torch.float32
    assert torch.equal(three, one) and one.abs().max() > 0
    assert not torch.equal(one, one.bfloat16().float())  # fp32 values (0.01 steps): bf16 would round them
    assert torch.equal(torch.cat([first["bf16_3"]["bias_shard"], second["bf16_3"]["bias_shard"]]), one)
    saved = open_source(tmp_path / "bf16z3")  # the ZeRO-3 checkpoint: the whole fp32 bias, not an empty tensor
    assert saved.info.zero_stage == 3
    torch.testing.assert_close(saved.tensor(BIAS), one, rtol=0, atol=0)
