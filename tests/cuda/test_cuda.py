"""CUDA checks (``pytest -m cuda``; run by ``benchmarks/gpu_smoke.sh``). Collected and skipped on CPU."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.generation import KVCache
from megatron_glm.model import (
    GLMModel,
    attention_core,
    batch_attention_mask,
    full_state_dict,
    load_full_state_dict,
    sep_to_mask,
)
from megatron_glm.model.compile import compile_layers
from megatron_glm.model.masks import prepare_attention_mask
from tests.model.helpers import make_batch, random_full_state_dict, tiny_config

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cuda(batch: dict) -> dict:
    return {k: v.cuda() for k, v in batch.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_forward_backward_matches_sdpa(dtype: torch.dtype) -> None:
    batch = _cuda(make_batch(3, batch=2, seq=256))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, generator=g, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    mask = prepare_attention_mask(batch["sep"], 2, 256, "cuda")
    outs = []
    for impl in ("sdpa", "flex"):
        out = attention_core(q, k, v, mask, impl, 0.0, None)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        outs.append((out.float(), [x.float() for x in grads]))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=tol, atol=tol)
    for a, b in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 10)


def test_flex_document_isolation_matches_sdpa() -> None:
    """Document isolation (a [b, 1, s, s] mask) through flex's BlockMask equals SDPA with the boolean mask."""
    batch = _cuda(make_batch(4, batch=2, seq=256))
    doc_ids = (torch.arange(256, device="cuda") // 96).expand(2, 256).contiguous()
    bool_mask = batch_attention_mask({"sep": batch["sep"], "doc_ids": doc_ids})
    mask = prepare_attention_mask(bool_mask, 2, 256, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, generator=g, device="cuda").requires_grad_() for _ in range(3))
    outs = [attention_core(q, k, v, mask, impl, 0.0, None) for impl in ("sdpa", "flex")]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_bf16_training_steps_reduce_the_loss() -> None:
    batch = _cuda(make_batch(5, seq=128))
    model = GLMModel(
        tiny_config(head_chunk_size=32, attention_impl="flex"), device="cuda", params_dtype=torch.bfloat16
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        res = model(
            batch["input_ids"],
            batch["position_ids"],
            batch["sep"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
        res.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(res.loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses


def test_bf16_kv_cache_generation_matches_full_forward() -> None:
    batch = _cuda(make_batch(4, batch=1, seq=32))
    model = GLMModel(tiny_config(), device="cuda", params_dtype=torch.bfloat16).eval()
    ids, pos, sep = batch["input_ids"], batch["position_ids"], batch["sep"]
    n = int(sep[0])
    with torch.no_grad():
        full = model(ids, pos, sep).float()
        cache = KVCache(capacity=4)
        parts = [model(ids[:, :n], pos[:, :, :n], sep, kv_cache=cache).float()]
        for j in range(n, ids.shape[1]):
            mask = sep_to_mask(sep, ids.shape[1])[:, :, j : j + 1, : j + 1]
            parts.append(model(ids[:, j : j + 1], pos[:, :, j : j + 1], mask, kv_cache=cache).float())
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=3e-2, atol=3e-2)


def test_compiled_equals_eager_on_cuda() -> None:
    batch = _cuda(make_batch(6, seq=64))
    sd = random_full_state_dict(GLMModel(tiny_config()), seed=2)
    results = []
    for compiled in (False, True):
        model = GLMModel(tiny_config(), device="cuda").train()
        load_full_state_dict(model, sd)
        if compiled:
            compile_layers(model)
        res = model(
            batch["input_ids"],
            batch["position_ids"],
            batch["sep"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
        res.loss.backward()
        results.append({"loss": res.loss.detach(), **full_state_dict(model, grads=True)})
    for k, v in results[0].items():
        torch.testing.assert_close(results[1][k], v, rtol=1e-4, atol=1e-5, msg=k)
