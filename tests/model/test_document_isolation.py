"""Document isolation in the model: with ``doc_ids`` a token's output does not depend on other documents."""

from __future__ import annotations

import numpy as np
import torch

from megatron_glm.config import ObjectiveConfig
from megatron_glm.data.blank_infilling import TOKEN, BlankInfilling, ObjectiveChoice
from megatron_glm.data.loader import collate
from megatron_glm.model import GLMModel, batch_attention_mask
from tests.data.test_blank_infilling import SP
from tests.data.test_document_isolation import packed_window
from tests.model.helpers import tiny_config


def test_other_documents_do_not_reach_a_token() -> None:
    bi = BlankInfilling(ObjectiveConfig(reset_attention_mask=True), SP, 64)
    rng = np.random.default_rng(0)
    batch = collate(
        [bi.sample(packed_window(rng, 64), np.random.default_rng(i), ObjectiveChoice(TOKEN)) for i in range(2)]
    )
    model = GLMModel(tiny_config()).eval()
    doc = batch["doc_ids"]
    changed = batch["input_ids"].clone()
    changed[doc == 0] = (changed[doc == 0] + 7) % 100  # every token of document 0 replaced
    with torch.no_grad():
        for mask_of, isolated in ((batch_attention_mask, True), (lambda b: b["sep"], False)):
            outs = [model(ids, batch["position_ids"], mask_of(batch)) for ids in (batch["input_ids"], changed)]
            others = doc > 0
            assert others.sum() > 20 and (doc == 0).sum() > 20
            same = torch.allclose(outs[0][others], outs[1][others], rtol=0, atol=1e-6)
            assert same == isolated, f"isolated={isolated}"
            assert not torch.allclose(outs[0][doc == 0], outs[1][doc == 0])
