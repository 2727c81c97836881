"""The fused, chunked head + cross entropy equals the unfused head (values and every gradient), TP1 and TP2."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.model import GLMModel, full_state_dict, glm_loss
from megatron_glm.parallel import (
    ParallelState,
    fused_head_cross_entropy,
    initialize_parallel_state,
    vocab_parallel_cross_entropy,
)
from megatron_glm.testing import run_distributed
from tests.model.helpers import make_batch, tiny_config


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fused_matches_unfused_kernel(chunk: int, smoothing: float) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, generator=g, requires_grad=True)
    w = torch.randn(40, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 40, (13,), generator=g)
    weights = (torch.rand(13, generator=g) > 0.3).float()
    ref = (vocab_parallel_cross_entropy(h @ w.t(), target, label_smoothing=smoothing) * weights).sum()
    ref_grads = torch.autograd.grad(ref * 0.7, (h, w))
    total, rows = fused_head_cross_entropy(h, w, target, weights, chunk=chunk, label_smoothing=smoothing)
    assert not rows.requires_grad and rows.shape == (13,)
    grads = torch.autograd.grad(total * 0.7, (h, w))
    torch.testing.assert_close(total, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        rows, vocab_parallel_cross_entropy(h @ w.t(), target, label_smoothing=smoothing), rtol=0, atol=1e-5
    )
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_fused_without_grad_and_bad_input() -> None:
    h, w = torch.randn(4, 8), torch.randn(16, 8)
    with torch.no_grad():
        total, rows = fused_head_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), torch.ones(4), chunk=3)
    torch.testing.assert_close(total, rows.sum())
    with pytest.raises(ValueError, match=r"chunk must be a positive number of rows, got 0"):
        fused_head_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), torch.ones(4), chunk=0)
    with pytest.raises(ValueError, match=r"h must be \[n, H\] and weight \[V/tp, H\], got \[4, 8\] and \[16, 7\]"):
        fused_head_cross_entropy(h, torch.randn(16, 7), torch.zeros(4, dtype=torch.long), torch.ones(4))


def _model_losses(tp: int, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    ps = initialize_parallel_state(tp_size=tp) if tp > 1 else ParallelState()
    batch = make_batch(3)
    out = {}
    for name, chunk in (("reference", 0), ("unfused", 0), ("fused", 7)):
        model = GLMModel(tiny_config(head_chunk_size=chunk), ps, seed=2, params_dtype=dtype).train()
        if name == "reference":  # the full-sequence head and loss
            logits = model(batch["input_ids"], batch["position_ids"], batch["sep"])
            res = glm_loss(logits, batch["labels"], batch["loss_mask"], ps)
        else:
            res = model(
                batch["input_ids"],
                batch["position_ids"],
                batch["sep"],
                labels=batch["labels"],
                loss_mask=batch["loss_mask"],
            )
        res.loss.backward()
        out[name] = {
            "loss": res.loss.detach().float(),
            "per_token": res.per_token.detach(),
            **{k: v.float() for k, v in full_state_dict(model, ps, grads=True).items()},
        }
    return out


def _compare(out: dict, atol: float) -> None:
    ref = out["reference"]
    assert ref["loss"] > 1.0
    for name in ("unfused", "fused"):
        for k, v in ref.items():
            torch.testing.assert_close(out[name][k], v, rtol=0, atol=atol, msg=f"{name} {k}")


def test_model_fused_head_matches_full_head() -> None:
    _compare(_model_losses(1, torch.float32), 1e-6)


def test_model_fused_head_bf16_close() -> None:
    out = _model_losses(1, torch.bfloat16)
    for k, v in out["unfused"].items():  # bf16 rounding differs only in how the head's gradient is accumulated
        torch.testing.assert_close(out["fused"][k], v, rtol=0.02, atol=2e-3, msg=k)


def _tp(rank: int, world: int) -> dict:
    out = _model_losses(world, torch.float32)
    _compare(out, 1e-6)
    single = _model_losses(1, torch.float32)["reference"]  # TP1 built locally on each rank
    for k, v in single.items():
        torch.testing.assert_close(out["fused"][k], v, rtol=0, atol=1e-5, msg=f"tp{world} vs tp1 {k}")
    return {}


def test_model_fused_head_tp2_matches_tp1() -> None:
    run_distributed(_tp, 2)


def test_config_rejects_negative_chunk() -> None:
    from megatron_glm.config import load_config, problems

    assert problems(load_config(["--model.head_chunk_size", "-1"])) == [
        "model.head_chunk_size must be >= 0 (0: unfused head), got -1"
    ]
    assert problems(load_config(["--model.head_chunk_size", "512"])) == []


@pytest.mark.parametrize("chunk", [16, 5])
def test_fused_fp16_gradient_is_scaled_before_its_cast(chunk: int) -> None:
    """fp16 under a loss scale of 2^16: the fused head's gradient equals the unfused head's (bitwise in one
    chunk). The head computes its gradient in forward; cast to fp16 before the scale (the old code, here
    ``grad_scale`` = the token count, i.e. a factor 1 on the sum), the small softmax entries flush to zero."""
    from megatron_glm.model.loss import glm_loss_at, glm_loss_fused

    g = torch.Generator().manual_seed(0)
    rows, vocab, hidden, scale = 16, 4096, 32, 2.0**16
    h = torch.randn(rows, hidden, generator=g).half().requires_grad_()
    w = torch.randn(vocab, hidden, generator=g).half().requires_grad_()
    labels = torch.randint(0, vocab, (1, rows), generator=g)
    loss_mask, positions = torch.ones(1, rows), torch.arange(rows)

    ref = glm_loss_at(h @ w.t(), positions, labels, loss_mask)
    ref_h, ref_w = torch.autograd.grad(ref.loss * scale, (h, w))
    grads = {}
    for name, grad_scale in (("scaled", scale), ("cast first", float(rows))):
        out = glm_loss_fused(h, w, positions, labels, loss_mask, chunk=chunk, grad_scale=grad_scale)
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)
        grads[name] = torch.autograd.grad(out.loss * scale, (h, w))
    assert ref_h.dtype == ref_w.dtype == torch.float16 and torch.isfinite(ref_w).all() and (ref_w != 0).all()
    grad_h, grad_w = grads["scaled"]
    assert torch.equal(grad_h, ref_h)
    if chunk >= rows:
        assert torch.equal(grad_w, ref_w)
    else:  # chunks' fp16 partial sums (up to ~1.6e4 here, fp16 step 8-16) cancel: equal to their rounding
        torch.testing.assert_close(grad_w, ref_w, rtol=0, atol=ref_w.abs().max().item() * 2**-11)
    assert (grad_w == 0).sum() <= 1
    # what the test stages: cast before the scale, the gradient of many unlikely tokens' rows flushes to zero
    assert (grads["cast first"][1] == 0).sum() > w.numel() // 100
    assert not torch.equal(grads["cast first"][0], ref_h)
