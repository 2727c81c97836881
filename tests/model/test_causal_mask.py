"""A causal batch (every ``sep <= 1``), marked on the host, runs SDPA with ``is_causal``: bitwise the same model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_glm.model import GLMModel, glm_loss
from megatron_glm.model import attention as attention_module
from megatron_glm.model.glm import loss_rows
from megatron_glm.model.masks import CAUSAL, AttentionMask, batch_attention_mask, is_causal_sep
from tests.model.helpers import tiny_config

B, S = 2, 24


def _glm4(**overrides: object):
    return tiny_config(
        num_query_groups=2,
        activation="swiglu",
        normalization="RMSNorm",
        position_embedding_type="rope",
        rotary_percent=0.5,
        rotary_interleaved=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        **overrides,
    )


def _batch(loss_from: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    pos = torch.zeros(B, 2, S, dtype=torch.long)
    pos[:, 0] = torch.arange(S)
    loss_mask = torch.zeros(B, S)
    loss_mask[:, loss_from : S - 1] = 1.0
    return {
        "input_ids": torch.randint(0, 128, (B, S), generator=g),
        "position_ids": pos,
        "sep": torch.tensor([0, 1]),
        "labels": torch.randint(0, 128, (B, S), generator=g),
        "loss_mask": loss_mask,
    }


def test_causal_flag_is_found_on_the_host_only_for_causal_seps() -> None:
    assert is_causal_sep(torch.tensor([0, 1, 0])) and not is_causal_sep(torch.tensor([0, 2]))
    assert not is_causal_sep(torch.tensor([], dtype=torch.long))
    batch = _batch()
    assert batch_attention_mask(batch) is batch["sep"]
    marked = batch_attention_mask({**batch, CAUSAL: True})
    assert isinstance(marked, AttentionMask) and marked.causal and (marked.batch, marked.seq) == (B, S)
    assert torch.equal(marked.bool_mask, torch.ones(S, S, dtype=torch.bool).tril().expand(B, 1, S, S))
    docs = batch_attention_mask({**batch, CAUSAL: True, "doc_ids": torch.zeros(B, S, dtype=torch.long)})
    # document isolation: the mask function over the per-token doc_ids (not marked causal); dense on request
    assert isinstance(docs, AttentionMask) and not docs.causal and docs._bool is None
    dense = batch_attention_mask({**batch, CAUSAL: True, "doc_ids": torch.zeros(B, S, dtype=torch.long)}, dense=True)
    assert isinstance(dense, torch.Tensor) and torch.equal(dense, docs.bool_mask) and dense.shape == (B, 1, S, S)


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append("causal" if is_causal else ("mask" if attn_mask is not None else "none"))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", recording)
    return calls


def _loss_and_grads(model: GLMModel, batch: dict, causal: bool) -> tuple:
    torch.manual_seed(11)
    mask = batch_attention_mask({**batch, CAUSAL: causal})
    if causal:  # as the trainer runs it: labels, host loss rows
        out = model(
            batch["input_ids"],
            batch["position_ids"],
            mask,
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
            loss_rows=loss_rows(batch["loss_mask"]),
        )
    else:  # the reference: every layer and the head on every row, the loss from the full logits
        out = glm_loss(model(batch["input_ids"], batch["position_ids"], mask), batch["labels"], batch["loss_mask"])
    out.loss.backward()
    return out.loss.detach(), out.per_token.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_causal_kernel_equals_the_boolean_mask_bitwise(dtype: torch.dtype, dropout: float, sdpa_calls: list) -> None:
    """Loss on most rows of a causal batch: every layer runs whole with ``is_causal`` and the head on every row (the
    rows without loss weigh 0); loss, per-token losses and every gradient equal the full-logit boolean-mask model's
    bitwise."""
    cfg = _glm4(hidden_dropout=dropout, attention_dropout=dropout)
    batch = _batch()
    (loss_a, tok_a, grads_a), (loss_b, tok_b, grads_b) = (
        _loss_and_grads(GLMModel(cfg, seed=3, params_dtype=dtype).train(), batch, causal) for causal in (True, False)
    )
    assert sdpa_calls == ["causal"] * cfg.num_layers + ["mask"] * cfg.num_layers
    assert torch.equal(loss_a, loss_b) and torch.equal(tok_a, tok_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_few_loss_rows_keep_the_last_layer_on_its_rows(sdpa_calls: list) -> None:
    """Loss on under half the rows of a causal batch: the last layer still runs on those rows only (its queries
    against the rows of the boolean mask), the layers before it with ``is_causal``; the same as unmarked."""
    cfg = _glm4()
    batch = _batch(loss_from=S - 6)
    results = []
    for causal in (True, False):
        model = GLMModel(cfg, seed=3).train()
        out = model(
            batch["input_ids"],
            batch["position_ids"],
            batch_attention_mask({**batch, CAUSAL: causal}),
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad for p in model.parameters()]))
    assert sdpa_calls == ["causal"] * (cfg.num_layers - 1) + ["mask"] * (cfg.num_layers + 1)
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))
