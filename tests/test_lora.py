"""LoRA on the tensor-parallel linears: TP = 2 equals TP = 1, only adapters train, merging, config errors."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from megatron_glm.config import LoraConfig, build_config, validate
from megatron_glm.errors import ConfigError
from megatron_glm.model import GLMModel, ModelLayout, full_state_dict, glm_loss, load_full_state_dict
from megatron_glm.model.lora import attach_lora, merge_lora, trainable_parameters
from megatron_glm.parallel import ParallelState, gather_from_tensor_parallel_region, initialize_parallel_state
from megatron_glm.parallel.lora import is_lora_name
from megatron_glm.testing import run_distributed
from tests.model.helpers import family_config, make_batch, tiny_config
from tests.model.test_moe import moe_config

ATOL = 1e-5
ALL_TARGETS = ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=[",".join(ALL_TARGETS)])
#: Plain GLM (fused [Q; K; V], 3 equal blocks), ChatGLM2 (grouped-query QKV blocks, SwiGLU [W1; W2]), and GLM under
#: sequence parallelism.
CONFIGS = {
    "glm": lambda: tiny_config(),
    "chatglm2": lambda: family_config("chatglm2-6b"),
    "sequence-parallel": lambda: tiny_config(sequence_parallel=True),  # reduce-scatter before B (TP > 1)
    "moe": lambda: moe_config(),  # per-expert adapters (A [E, r, in], B [E, out, r]) and the shared experts'
}


def _lora_model(cfg, ps: ParallelState, lora: LoraConfig = LORA, seed: int = 5) -> GLMModel:
    model = GLMModel(cfg, ps, seed=seed)
    attach_lora(model, lora, ModelLayout(cfg), seed=seed)
    return model


def _adapters(model: GLMModel, ps: ParallelState, grads: bool = False) -> dict[str, torch.Tensor]:
    return {k: v for k, v in full_state_dict(model, ps, grads=grads).items() if is_lora_name(k)}


def _train(model: GLMModel, ps: ParallelState, steps: int) -> tuple[list[float], dict, dict, torch.Tensor]:
    """``steps`` AdamW steps on the adapters (each on its own batch); returns the losses, the last step's full
    adapter gradients, the adapters after training and the final full logits."""
    # eps 1e-6: an expert seeing few tokens has gradients near 1e-8, where eps 1e-8 turns rounding into steps
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, eps=1e-6)
    losses, grads = [], {}
    model.train()
    for step in range(steps):
        batch = make_batch(30 + step)
        torch.manual_seed(100 + step)  # the adapter-dropout masks (default stream, the same on every rank)
        opt.zero_grad(set_to_none=True)
        logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
        loss = glm_loss(logits, batch["labels"], batch["loss_mask"], ps).loss
        loss.backward()
        losses.append(loss.item())
        grads = _adapters(model, ps, grads=True)
        opt.step()
    model.eval()
    batch = make_batch(99)
    logits = model(batch["input_ids"], batch["position_ids"], batch["sep"]).detach()
    return losses, grads, _adapters(model, ps), gather_from_tensor_parallel_region(logits, ps.tp_group)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b) and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _tp_lora_checks(rank: int, world: int) -> dict[str, float]:
    ps = initialize_parallel_state(tp_size=world)
    out: dict[str, float] = {}
    for tag, make in CONFIGS.items():
        for dropout in (0.0, 0.2):
            lora = dataclasses.replace(LORA, dropout=dropout)
            ref, par = _lora_model(make(), ParallelState(), lora), _lora_model(make(), ps, lora)
            base = {k: v for k, v in full_state_dict(par, ps).items() if not is_lora_name(k)}
            assert _max_diff(_adapters(ref, ParallelState()), _adapters(par, ps)) == 0.0  # the same A, B = 0
            rl, rg, ra, rlog = _train(ref, ParallelState(), 3)
            pl, pg, pa, plog = _train(par, ps, 3)
            key = f"{tag}/dropout{dropout}"
            out[f"{key}/losses"] = max(abs(a - b) for a, b in zip(rl, pl, strict=True))
            out[f"{key}/grads"] = _max_diff(rg, pg)
            out[f"{key}/adapters"] = _max_diff(ra, pa)
            out[f"{key}/logits"] = (rlog - plog).abs().max().item()
            # Every adapter tensor received a gradient (A's is zero at the first step, B starting at zero).
            assert all(g.abs().max() > 0 for g in pg.values()), key
            assert rl[0] != rl[-1], key  # the adapters did change the model
            after = {k: v for k, v in full_state_dict(par, ps).items() if not is_lora_name(k)}
            assert all(torch.equal(after[k], v) for k, v in base.items()), f"{key}: a base weight changed"
    return out


@pytest.mark.parametrize("tp", [2])
def test_lora_tensor_parallel_matches_single_process(tp: int) -> None:
    results = run_distributed(_tp_lora_checks, tp)
    for rank, diffs in enumerate(results):
        bad = {k: v for k, v in diffs.items() if not v <= ATOL}
        assert not bad, f"rank {rank}: {bad}"
    print(results[0])


def test_only_adapters_train_and_shapes_follow_the_split() -> None:
    cfg = family_config("chatglm2-6b")
    model = _lora_model(cfg, ParallelState())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_name(n) for n in trainable)
    assert len(trainable) == 2 * len(ALL_TARGETS) * cfg.num_layers
    layer = model.transformer.layers["0"]
    qkv = layer.attention.query_key_value.lora
    assert (
        tuple(qkv.A.shape) == (4, cfg.hidden_size) and qkv.B.shape[0] == layer.attention.query_key_value.weight.shape[0]
    )
    assert torch.count_nonzero(qkv.B) == 0  # the adapted model starts as the base
    n_train, total = trainable_parameters(model)
    assert n_train == sum(p.numel() for n, p in model.named_parameters() if is_lora_name(n)) and n_train < total


@pytest.mark.parametrize("family", ["chatglm2-6b", "moe"])
def test_merged_model_equals_adapter_model(family: str) -> None:
    cfg = moe_config() if family == "moe" else family_config(family)
    model = _lora_model(cfg, ParallelState())
    full = full_state_dict(model)
    if family == "moe":  # layer 0 dense; 1, 2: the routed experts (one adapter each) and the shared experts
        e, h, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        experts = {k: tuple(v.shape) for k, v in full.items() if ".mlp.experts." in k and is_lora_name(k)}
        assert experts == {
            **{f"transformer.layers.{i}.mlp.experts.dense_h_to_4h.lora.{x}": s for i in (1, 2)
               for x, s in (("A", (e, 4, h)), ("B", (e, 2 * f, 4)))},
            **{f"transformer.layers.{i}.mlp.experts.dense_4h_to_h.lora.{x}": s for i in (1, 2)
               for x, s in (("A", (e, 4, f)), ("B", (e, h, 4)))},
        }  # fmt: skip
        assert "transformer.layers.1.mlp.shared_experts.dense_4h_to_h.lora.B" in full
    g = torch.Generator().manual_seed(3)
    trained = {k: (0.1 * torch.randn(v.shape, generator=g) if is_lora_name(k) else v) for k, v in full.items()}
    load_full_state_dict(model, trained)
    merged = GLMModel(cfg, seed=5)
    load_full_state_dict(merged, merge_lora(trained, LORA.alpha))
    batch = make_batch(7)
    with torch.no_grad():
        a = model.eval()(batch["input_ids"], batch["position_ids"], batch["sep"])
        b = merged.eval()(batch["input_ids"], batch["position_ids"], batch["sep"])
        base = GLMModel(cfg, seed=5).eval()(batch["input_ids"], batch["position_ids"], batch["sep"])
    assert (a - base).abs().max() > 1e-2  # the adapters matter
    assert (a - b).abs().max() < ATOL


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora.rank": -1}, "lora.rank (--lora-rank) must be >= 0"),
        ({"lora.rank": 4, "lora.alpha": 0.0}, "lora.alpha (--lora-alpha) must be positive"),
        ({"lora.dropout": 1.0}, "lora.dropout (--lora-dropout) must be in [0, 1)"),
        ({"lora.targets": ["attention.dense,mlp.gate"]}, "lora.targets (--lora-targets): unknown mlp.gate"),
        ({"lora.rank": 4, "lora.targets": [""]}, "lora.targets (--lora-targets) is empty"),
        # was ignored: a run from scratch, not on the base
        ({"lora.base": "base"}, "lora.base (--lora-base base) is set but lora.rank is 0: pass --lora-rank R"),
    ],
)
def test_config_errors_are_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(build_config(overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_flags_parse() -> None:
    from megatron_glm.config import load_config

    cfg = load_config(
        ["--lora-rank", "8", "--lora-alpha", "32", "--lora-dropout", "0.05", "--lora-targets", "mlp.dense_4h_to_h"]
    )
    assert cfg.lora == LoraConfig(rank=8, alpha=32.0, dropout=0.05, targets=["mlp.dense_4h_to_h"])
    assert LoraConfig().target_names() == ["attention.query_key_value", "attention.dense"]


def test_dry_run_counts_the_trainable_adapters() -> None:
    from megatron_glm.model.memory import estimate_memory

    cfg = family_config("chatglm2-6b")
    model = _lora_model(cfg, ParallelState())
    trainable, total = trainable_parameters(model)
    plain = estimate_memory(cfg, tp=1, pp=1, dp=1, zero_stage=1, precision="fp32")
    est = estimate_memory(cfg, tp=1, pp=1, dp=1, zero_stage=1, precision="fp32", lora=LORA)
    assert est.trainable == trainable and est.stage_parameters == total
    assert est.optimizer == 8 * trainable and est.grads == 4 * trainable and est.weights == 4 * total
    assert plain.trainable == 0 and plain.optimizer == 8 * plain.stage_parameters
    # TP = 2: the per-rank count of the adapters as split (column: A whole, B halved; row: A halved, B whole).
    tp2 = estimate_memory(cfg, tp=2, pp=1, dp=1, zero_stage=1, precision="fp32", lora=LORA)
    qkv, dense = cfg.num_attention_heads * cfg.head_dim + 2 * cfg.query_groups * cfg.head_dim, cfg.hidden_size
    per_layer = (
        4 * cfg.hidden_size
        + qkv // 2 * 4  # query_key_value
        + 4 * cfg.num_attention_heads * cfg.head_dim // 2
        + dense * 4  # attention.dense
        + 4 * cfg.hidden_size
        + 2 * cfg.ffn_size // 2 * 4  # dense_h_to_4h (GLU: 2 ffn rows)
        + 4 * cfg.ffn_size // 2
        + cfg.hidden_size * 4  # dense_4h_to_h
    )
    assert tp2.trainable == cfg.num_layers * per_layer
    # MoE layers: every expert's adapters (split over EP like the experts) and the shared experts' (a model's count).
    moe = moe_config()
    for tp, ep in ((1, 1), (2, 2)):
        ps = ParallelState(tp_size=tp, ep_size=ep, ep_group=object())  # shapes only: nothing communicates
        want = trainable_parameters(_lora_model(moe, ps))[0]
        got = estimate_memory(moe, tp=tp, pp=1, dp=ep, zero_stage=1, precision="fp32", lora=LORA, ep=ep).trainable
        assert got == want, (tp, ep)


def test_pretrain_dry_run_prints_trainable_parameters() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = ["--model-size", "glm-tiny", "--model.vocab_size", "1024", "--lora-rank", "4"]
    proc = subprocess.run(
        [sys.executable, "pretrain_glm.py", "--dry-run", *args], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    line = "trainable per rank (LoRA rank 4 on attention.query_key_value, attention.dense, base frozen): 3,072 of "
    assert line in proc.stdout, proc.stdout[-2000:]


def _zero_stages(rank: int, world: int) -> dict:
    """LoRA through the real set-up and DeepSpeed at DP = 2 under ZeRO-1, 2 and 3: losses, the optimizer's
    parameters, the base after training."""
    import deepspeed

    from megatron_glm.model.layout import original_name
    from tests.training.harness import build_trainer
    from tests.training.harness import tiny_config as run_config

    out: dict = {}
    for stage in (1, 2, 3):
        cfg = run_config(
            **{
                "training.zero_stage": stage,
                "training.train_iters": 3,
                "training.micro_batch_size": 2,
                "training.global_batch_size": 4,
                "optimizer.lr": 1e-2,
                "lora.rank": 4,
                "lora.targets": [",".join(ALL_TARGETS)],
            }
        )
        trainer, _, logger = build_trainer(cfg)
        model = trainer.model
        zero = trainer.engine.optimizer  # its groups of the model's own (bf16/fp32) parameters
        groups = getattr(zero, "bit16_groups", None) or getattr(zero, "fp16_groups", None)
        names = {id(p): original_name(n) for n, p in model.named_parameters()}
        out[f"optimizer{stage}"] = sorted(names[id(p)] for g in groups for p in g)
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params) if stage == 3 else contextlib.nullcontext():
            before = {original_name(n): p.detach().clone() for n, p in model.named_parameters()}
        trainer.train()
        with deepspeed.zero.GatheredParameters(params) if stage == 3 else contextlib.nullcontext():
            after = {original_name(n): p.detach().clone() for n, p in model.named_parameters()}
        out[f"loss{stage}"] = [v["loss"] for _, v in logger.rows]
        out[f"base_same{stage}"] = all(torch.equal(before[k], after[k]) for k in before if not is_lora_name(k))
        out[f"adapters_moved{stage}"] = all(not torch.equal(before[k], after[k]) for k in before if k.endswith(".B"))
        out[f"trainable{stage}"] = sorted(original_name(n) for n, p in model.named_parameters() if p.requires_grad)
    return out


def test_lora_under_zero_1_2_3_equal_and_only_adapters_train() -> None:
    for r in run_distributed(_zero_stages, 2, timeout=900):
        assert len(r["loss1"]) == 3 and r["loss1"][0] != r["loss1"][-1]
        for stage in (2, 3):
            assert max(abs(a - b) for a, b in zip(r["loss1"], r[f"loss{stage}"], strict=True)) < 1e-5, r
        for stage in (1, 2, 3):
            assert r[f"base_same{stage}"] and r[f"adapters_moved{stage}"], stage
            assert r[f"trainable{stage}"] and all(is_lora_name(n) for n in r[f"trainable{stage}"])
        for stage in (1, 2, 3):  # what the ZeRO optimizer holds: exactly the adapters
            assert r[f"optimizer{stage}"] == sorted(r["trainable1"]), r[f"optimizer{stage}"][:4]


def test_activation_checkpointing_replays_the_adapter_dropout() -> None:
    """With adapter dropout, recomputing the layers in backward gives the same gradients (the mask replayed)."""
    cfg = tiny_config(num_layers=2)
    lora = dataclasses.replace(LORA, dropout=0.3)
    model = _lora_model(cfg, ParallelState(), lora)
    g = torch.Generator().manual_seed(4)
    load_full_state_dict(  # non-zero B, so every adapter's dropout shows in the gradients
        model,
        {
            k: (0.1 * torch.randn(v.shape, generator=g) if k.endswith(".B") else v)
            for k, v in full_state_dict(model).items()
        },
    )
    model.train()
    batch = make_batch(5)
    runs = []
    for ckpt in (False, True, False):
        model.transformer.checkpoint_activations = ckpt
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11 if len(runs) < 2 else 12)  # the last run: other masks, other gradients
        logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
        glm_loss(logits, batch["labels"], batch["loss_mask"], ParallelState()).loss.backward()
        runs.append(_adapters(model, ParallelState(), grads=True))
    assert _max_diff(runs[0], runs[1]) < ATOL
    assert _max_diff(runs[0], runs[2]) > 1e-4  # the dropout is really there


def test_resume_checks_the_base_and_the_adapters(tmp_path) -> None:
    from megatron_glm.checkpoint.lora import base_identity, check_lora_resume, lora_record
    from megatron_glm.errors import CheckpointError

    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    sha = base_identity(base)
    record = lora_record(LORA, base, sha)
    check_lora_resume({"lora": record}, record, "ckpt")  # the same base and adapters
    check_lora_resume({}, {}, "ckpt")  # no LoRA on either side
    (base / "model.safetensors").write_bytes(b"weight2")  # same size, other bytes: another base
    assert base_identity(base) != sha
    cases = [
        ({"lora": record}, lora_record(LORA, base, base_identity(base)), "trained on base"),
        ({"lora": record}, {}, "resume with --lora-rank 4, or merge them first"),
        ({}, record, "holds no LoRA adapters"),
        ({"lora": record}, lora_record(dataclasses.replace(LORA, rank=8), base, sha), "saved with lora rank 4"),
    ]
    for meta, mine, message in cases:
        with pytest.raises(CheckpointError) as err:
            check_lora_resume(meta, mine, "ckpt")
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_lora_checkpoint_is_not_opened_as_a_model(tmp_path) -> None:
    import json

    from megatron_glm.checkpoint.convert import open_source
    from megatron_glm.checkpoint.manifest import write_manifest
    from megatron_glm.config import config_to_dict
    from megatron_glm.errors import CheckpointError

    step = tmp_path / "global_step4"
    step.mkdir()
    meta = {"layout": {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 1}, "config": config_to_dict(build_config({}))}
    (step / "meta.json").write_text(json.dumps({**meta, "lora": {"rank": 4}}))
    write_manifest(step, step.name)
    with pytest.raises(CheckpointError, match=r"a LoRA run's checkpoint \(adapters only\).*--merge-lora"):
        open_source(step)
    (step / "meta.json").write_text(json.dumps(meta))
    write_manifest(step, step.name)
    with pytest.raises(CheckpointError) as err:  # the same directory without the record: the usual complaint
        open_source(step)
    assert "LoRA" not in str(err.value)


def test_lora_base_gives_the_run_its_architecture(tmp_path) -> None:
    """pretrain_glm.py --lora-base PATH takes the base's sealed architecture as --load does (none restated), and
    refuses a contradicting command line in one line."""
    import json

    from megatron_glm.checkpoint.architecture import adopt_checkpoint_architecture
    from megatron_glm.config import load_config

    base = moe_config()
    step = tmp_path / "global_step1"
    step.mkdir()
    (step / "meta.json").write_text(json.dumps({"config": {"model": dataclasses.asdict(base)}}))
    cfg = adopt_checkpoint_architecture(load_config(["--lora-rank", "4", "--lora-base", str(step)]), log=print)
    assert cfg.model.architecture() == base.architecture() and cfg.model.num_experts == 8
    plain = adopt_checkpoint_architecture(load_config(["--lora-base", str(step)]), log=print)  # rank 0: no LoRA run
    assert plain.model.num_experts == 0
    with pytest.raises(ConfigError, match=r"contradicts the checkpoint's architecture \(hidden_size: checkpoint 64"):
        adopt_checkpoint_architecture(
            load_config(["--lora-rank", "4", "--lora-base", str(step), "--hidden-size", "96"])
        )


def test_finetune_refuses_a_lora_base_other_than_load(tmp_path) -> None:
    """finetune_glm.py puts the adapters on --load; a different --lora-base was silently ignored."""
    from megatron_glm.config import load_config
    from megatron_glm.finetune.config import FinetuneConfig
    from megatron_glm.finetune.run import task_config

    cfg = load_config(["--load", str(tmp_path / "ckpt"), "--lora-rank", "4", "--lora-base", str(tmp_path / "other")])
    want = rf"^--lora-base {tmp_path}/other: fine-tuning puts the adapters on --load \({tmp_path}/ckpt\); drop"
    with pytest.raises(ConfigError, match=want):
        task_config(cfg, FinetuneConfig(task="chat"))


@pytest.mark.parametrize(("dtype", "rank"), [(torch.bfloat16, 4), (torch.float32, 3)])
def test_expert_adapters_of_any_rank_run_in_the_grouped_matmul(dtype: torch.dtype, rank: int) -> None:
    """``grouped_mm`` refuses strides that are not 16 bytes (r = 4 in bf16): the adapter pads r with zeros, and
    equals a loop over the experts, outputs and gradients."""
    from megatron_glm.model.expert_lora import ExpertLoRAAdapter
    from megatron_glm.model.moe import grouped_linear, looped_linear

    spec = ModelLayout(moe_config())["transformer.layers.1.mlp.experts.dense_h_to_4h.weight"]
    adapter = ExpertLoRAAdapter(
        spec, rank=rank, alpha=8.0, dropout=0.0, seed=1, parallel_state=ParallelState(), dtype=dtype, device="cpu"
    )
    with torch.no_grad():
        adapter.B.normal_(generator=torch.Generator().manual_seed(2))
    counts = torch.tensor([3, 0, 5, 2, 1, 0, 4, 1])
    x = torch.randn(16, spec.shape[2], dtype=dtype, generator=torch.Generator().manual_seed(3))
    outs = []
    for linear in (grouped_linear, looped_linear):
        adapter.zero_grad()
        y = adapter(x, counts, linear)
        y.float().square().sum().backward()
        outs.append((y.detach().float(), adapter.A.grad.float(), adapter.B.grad.float()))
    assert outs[0][0].abs().max() > 0
    for got, want in zip(outs[0], outs[1], strict=True):
        assert (got - want).abs().max() <= 1e-2 * max(1.0, want.abs().max().item())
