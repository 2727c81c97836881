"""Host synchronisations of the real training loop, counted on CPU (:class:`HostSyncCounter`): at most one per
micro-batch; the metrics are read once per log interval."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from megatron_glm.testing import run_distributed

pytestmark = pytest.mark.slow

ACCUM, STEPS = 4, 4


def _count(rank: int, world: int) -> dict:
    """Events of 4 steps of 4 micro-batches (log interval 2), ZeRO-1, DP=2, each with the sync count so far:
    ``step`` (a step starts), ``batch`` (a micro-batch is fetched), ``opt``/``opt_end`` (DeepSpeed's optimizer
    step, inside the last micro-batch's ``engine.step()``), ``log`` (the log step's reads), ``end``."""
    import megatron_glm.training.trainer as trainer_module
    from megatron_glm.testing.syncs import HostSyncCounter
    from tests.training.harness import build_trainer, synthetic_batches, tiny_config

    cfg = tiny_config(
        **{
            "training.train_iters": STEPS,
            "training.micro_batch_size": 2,
            "training.global_batch_size": 2 * ACCUM * world,
            "logging.log_interval": 2,
        }
    )
    trainer, ps, logger = build_trainer(cfg)
    counter = HostSyncCounter()
    events: list[tuple[str, int]] = []
    loader_tensors: set[int] = set()

    def loader(consumed: int) -> Iterator:
        it = synthetic_batches(cfg.training.micro_batch_size, ps.dp_rank)
        while True:
            with counter.host():  # the data loader's work is on the host
                batch = next(it)
            loader_tensors.update(id(v) for v in batch.values())
            events.append(("batch", counter.total))
            yield batch

    trainer.train_batches = loader
    host_calls = []
    if hasattr(trainer_module, "loss_rows"):  # (absent before the fix)
        rows = trainer_module.loss_rows

        def on_host(loss_mask, *a, **k):  # the trainer finds the loss rows in the loader's own host tensor
            host_calls.append(id(loss_mask) in loader_tensors)
            with counter.host():
                return rows(loss_mask, *a, **k)

        trainer_module.loss_rows = on_host
    if hasattr(trainer_module, "is_causal_sep"):
        causal = trainer_module.is_causal_sep

        def causal_on_host(sep, *a, **k):  # the trainer reads the loader's own host sep (causal attention kernels)
            host_calls.append(id(sep) in loader_tensors)
            with counter.host():
                return causal(sep, *a, **k)

        trainer_module.is_causal_sep = causal_on_host
    engine, train_step, log_step, engine_step = trainer.engine, trainer.train_step, trainer._log_step, None

    def step_engine() -> None:
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary:
            events.append(("opt", counter.total))
        engine_step()
        if boundary:
            events.append(("opt_end", counter.total))

    engine_step, engine.step = engine.step, step_engine
    trainer.train_step = lambda batches: (events.append(("step", counter.total)), train_step(batches))[1]
    trainer._log_step = lambda *a: (events.append(("log", counter.total)), log_step(*a))[1]
    with counter:
        trainer.train()
    events.append(("end", counter.total))
    return {"events": events, "where": counter.where, "host_calls": host_calls, "logged": len(logger.rows)}


def _split(events: list[tuple[str, int]]) -> list[dict]:
    """Per step: each micro-batch's syncs (fetch to next fetch, or to the optimizer step), DeepSpeed's optimizer
    step, ours around it (before the first fetch and after the optimizer step), and whether it logged."""
    steps, n = [], len(events)
    for i, (kind, _) in enumerate(events):
        if kind != "step":
            continue
        j = next(k for k in range(i + 1, n) if events[k][0] in ("step", "end"))
        span = events[i : j + 1]
        marks = [v for k, v in span if k == "batch"]
        opt = dict((k, v) for k, v in span if k in ("opt", "opt_end"))
        micro = [b - a for a, b in zip(marks, [*marks[1:], opt["opt"]], strict=True)]
        loop = (marks[0] - span[0][1]) + (span[-1][1] - opt["opt_end"])
        logged = any(k == "log" for k, _ in span)
        steps.append({"micro": micro, "optimizer": opt["opt_end"] - opt["opt"], "loop": loop, "log": logged})
    return steps


def test_at_most_one_host_sync_per_micro_batch() -> None:
    for r in run_distributed(_count, 2, timeout=900):
        steps = _split(r["events"])
        print("\n".join(str(s) for s in steps))
        assert len(steps) == STEPS and [s["log"] for s in steps] == [False, True, False, True]
        for s in steps:
            assert len(s["micro"]) == ACCUM and all(m <= 1 for m in s["micro"]), (s, r["where"])
            if not s["log"]:  # the loop's own per-step reads: the stop agreement
                assert s["loop"] <= 2, (s, r["where"])
        assert r["logged"] == 2
        # loss rows and the causal flag: really the loader's host tensors
        assert len(r["host_calls"]) == 2 * STEPS * ACCUM and all(r["host_calls"])
