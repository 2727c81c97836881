"""``model.last_layer_loss_rows``: the last layer on the loss rows only gives the same loss and gradients."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.config import build_config
from megatron_glm.model import GLMModel, loss_positions
from megatron_glm.model.attention import QueryRows
from megatron_glm.parallel import initialize_parallel_state
from megatron_glm.testing import run_distributed

B, S, V = 3, 24, 256


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sep = torch.tensor([5, 11, 24])  # the last sample has no Part B: no loss rows at all
    return {
        "ids": torch.randint(0, V, (B, S), generator=g),
        "labels": torch.randint(0, V, (B, S), generator=g),
        "pos": torch.arange(S).expand(B, 2, S).clone(),
        "sep": sep,
        "loss_mask": (torch.arange(S)[None] >= sep[:, None]).float(),
    }


def _run(
    tp: int = 1, size: str = "glm-tiny", dropout: float = 0.0, **overrides: object
) -> dict[str, dict[str, torch.Tensor]]:
    ps = initialize_parallel_state(tp_size=tp)
    base = {
        "model.size": size,
        "model.vocab_size": V,
        "model.hidden_dropout": dropout,
        "model.attention_dropout": dropout,
    }
    batch = _batch()
    out = {}
    for on in (False, True):
        extra = {f"model.{k}": v for k, v in overrides.items()}
        cfg = build_config({**base, **extra, "model.last_layer_loss_rows": on})
        model = GLMModel(cfg.model, ps, seed=1)
        seen: list[tuple[int, ...]] = []
        last = list(model.transformer.layers.values())[-1]
        last.mlp.register_forward_hook(lambda m, args, out, seen=seen: seen.append(tuple(args[0].shape)))
        torch.manual_seed(7)  # hidden dropout draws from the default generator: the same stream for both runs
        res = model(batch["ids"], batch["pos"], batch["sep"], labels=batch["labels"], loss_mask=batch["loss_mask"])
        res.loss.backward()
        at = loss_positions(batch["loss_mask"])
        torch.manual_seed(8)
        with torch.no_grad():
            logits = model(batch["ids"], batch["pos"], batch["sep"], logit_positions=at)
        n = int(batch["loss_mask"].sum())
        assert seen == ([(n, cfg.model.hidden_size)] * 2 if on else [(B, S, cfg.model.hidden_size)] * 2)
        out[str(on)] = {
            "loss": res.loss.detach(),
            "per_token": res.per_token.detach(),
            "logits": logits,
            **{k: p.grad for k, p in model.named_parameters()},
        }
    return out


def _assert_equal(out: dict[str, dict[str, torch.Tensor]]) -> None:
    assert out["False"]["loss"] > 0
    for k, ref in out["False"].items():
        torch.testing.assert_close(out["True"][k], ref, rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"head_chunk_size": 7},
        {"recompute_granularity": "selective"},
        {"checkpoint_activations": True},
        {"dropout": 0.1},
        {"dropout": 0.1, "head_chunk_size": 7, "recompute_granularity": "selective"},
        {"dropout": 0.1, "checkpoint_activations": True},
    ],
    ids=[
        "plain",
        "fused-head",
        "selective",
        "full-recompute",
        "dropout",
        "dropout-fused-selective",
        "dropout-full-recompute",
    ],
)
def test_last_layer_on_loss_rows_equals_full_layer(overrides: dict) -> None:
    out = _run(**overrides)
    _assert_equal(out)
    if overrides.get("dropout"):  # the dropout really drew masks: the loss differs from the dropout-free one
        assert not torch.allclose(out["True"]["loss"], _run()["True"]["loss"])


def test_last_layer_on_loss_rows_family_gqa_rotary() -> None:
    _assert_equal(_run(size="glm-tiny", num_query_groups=2, position_embedding_type="rope", dropout=0.1))


def _check(rank: int, world: int) -> dict:
    _assert_equal(_run(tp=world, dropout=0.1))
    return {}


def test_last_layer_on_loss_rows_tp2() -> None:
    run_distributed(_check, 2)


def test_query_rows_index_per_sample() -> None:
    flat = torch.tensor([3, 4, 9, 10, 11])  # sample 0: rows 3, 4; sample 1 (s = 6): rows 3, 4, 5
    rows = QueryRows.from_flat(flat, 3, 6)
    assert rows.index.tolist() == [[3, 4, 0], [3, 4, 5], [0, 0, 0]]
    assert rows.slot.tolist() == [0, 1, 3, 4, 5]


@pytest.mark.parametrize("last_layer", [False, True])
def test_host_loss_rows_give_the_same_loss_and_gradients(last_layer: bool) -> None:
    """``forward(loss_rows=loss_rows(loss_mask))`` (found on the host by the trainer) equals the model finding them."""
    from megatron_glm.model.glm import loss_rows
    from megatron_glm.testing.syncs import HostSyncCounter

    batch = _batch()
    cfg = build_config({"model.size": "glm-tiny", "model.vocab_size": V, "model.last_layer_loss_rows": last_layer})
    results = []
    syncs = []
    for rows in (None, loss_rows(batch["loss_mask"])):
        model = GLMModel(cfg.model, seed=1)
        torch.manual_seed(7)
        with HostSyncCounter() as counter:
            res = model(
                batch["ids"],
                batch["pos"],
                batch["sep"],
                labels=batch["labels"],
                loss_mask=batch["loss_mask"],
                loss_rows=rows,
            )
        syncs.append(counter.total)
        res.loss.backward()
        results.append((res.loss.detach(), res.per_token.detach(), [p.grad for p in model.parameters()]))
    (loss_a, tok_a, grads_a), (loss_b, tok_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(tok_a, tok_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert syncs[0] > 0 and syncs[1] == 0  # given the rows, the forward never waits for the device
    rows = loss_rows(batch["loss_mask"])
    assert torch.equal(rows.flat, loss_positions(batch["loss_mask"])) and rows.index.shape == (B, S - 5)
