"""The causal objective (GLM-4's ``[gMASK]<sop>`` format): sample layout, masks, document isolation, the mixture."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_glm.batch import OBJECTIVE_NAMES
from megatron_glm.config import ObjectiveConfig, load_config, problems
from megatron_glm.data.bpe_training import train_byte_bpe
from megatron_glm.data.causal import CausalSamples
from megatron_glm.data.loader import build_pretraining_datasets, collate
from megatron_glm.data.objective_choice import BLANK_OBJECTIVES, CAUSAL, TOKEN, ObjectiveChoice
from megatron_glm.data.objectives import Objectives
from megatron_glm.data.tokenizer import open_tokenizer
from megatron_glm.errors import DataError
from megatron_glm.model import GLMLoss, GLMModel, batch_attention_mask, sep_to_mask
from megatron_glm.training.evaluation import add_loss, summarize_losses
from tests.data.test_blank_infilling import SP
from tests.model.helpers import tiny_config

from .test_loader import config
from .test_samples import random_documents
from .test_tokenizer_json import _edited

G, S, E, P = SP.gmask, SP.sop, SP.eos, SP.pad
NO_CLS = dataclasses.replace(SP, cls=-1)  # a GLM-4 tokenizer: no [CLS]


def causal(seq: int, isolate: bool = False, special=SP) -> CausalSamples:
    return CausalSamples(ObjectiveConfig(reset_attention_mask=isolate), special, seq)


def test_sample_layout_of_a_hand_built_window() -> None:
    # [CLS] 5 6 7 [eos] 8 9: a closed document, then one the window cuts.
    window = np.array([SP.cls, 5, 6, 7, E, 8, 9], dtype=np.int64)
    s = causal(12).sample(window)
    assert s["input_ids"].tolist() == [G, S, 5, 6, 7, G, S, 8, 9, P, P, P]
    assert s["labels"].tolist() == [S, 5, 6, 7, E, S, 8, 9, P, P, P, P]
    assert s["loss_mask"].tolist() == [0, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    assert s["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0], [0] * 12]
    assert s["sep"] == 0 and s["objective"] == CAUSAL and OBJECTIVE_NAMES[CAUSAL] == "causal"
    assert "doc_ids" not in s
    assert s["loss_mask"].dtype == np.float32 and s["input_ids"].dtype == s["position_ids"].dtype == np.int64
    # Document isolation: positions restart in every document, each one a block of its own.
    iso = causal(12, isolate=True).sample(window)
    assert iso["input_ids"].tolist() == s["input_ids"].tolist() and iso["labels"].tolist() == s["labels"].tolist()
    assert iso["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0], [0] * 12]
    assert iso["doc_ids"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1]
    # Cut to seq_length: the labels stay the next tokens (8 is the target of the second <sop>).
    cut = causal(7).sample(window)
    assert cut["input_ids"].tolist() == [G, S, 5, 6, 7, G, S]
    assert cut["labels"].tolist() == [S, 5, 6, 7, E, S, 8]
    assert cut["loss_mask"].tolist() == [0, 1, 1, 1, 1, 0, 1]
    # A window that starts at a document's [eos] skips the empty piece; [CLS] is never read (a tokenizer
    # without one serves the same sample).
    late = causal(6, special=NO_CLS).sample(np.array([-1, E, 5, 6, E], dtype=np.int64))
    assert late["input_ids"].tolist() == [G, S, 5, 6, P, P] and late["labels"].tolist() == [S, 5, 6, E, P, P]
    assert late["loss_mask"].tolist() == [0, 1, 1, 1, 0, 0]


def test_attention_is_causal_and_isolated_per_document() -> None:
    window = np.array([SP.cls, 5, 6, 7, E, 8, 9], dtype=np.int64)
    plain = collate([causal(12).sample(window)])
    assert torch.equal(batch_attention_mask(plain), torch.zeros(1, dtype=torch.long))
    assert torch.equal(sep_to_mask(plain["sep"], 12)[0, 0], torch.ones(12, 12, dtype=torch.bool).tril())
    iso = collate([causal(12, isolate=True).sample(window)])
    doc = iso["doc_ids"][0]
    expected = torch.ones(12, 12, dtype=torch.bool).tril() & (doc[:, None] == doc[None, :])
    assert torch.equal(batch_attention_mask(iso).bool_mask[0, 0], expected)
    assert not bool(expected[6, 3]) and bool(expected[6, 5])  # document 1 does not see document 0


def _token_losses(model: GLMModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], batch_attention_mask(batch))
    flat = F.cross_entropy(logits.double().flatten(0, 1), batch["labels"].flatten(), reduction="none")
    return flat.view(batch["labels"].shape) * batch["loss_mask"]


@pytest.mark.parametrize("position_embedding_type", ["learned_absolute", "rope"])
def test_packed_documents_have_their_own_losses(position_embedding_type: str) -> None:
    """Three documents packed into one isolated window: each document's loss equals its loss alone."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, n) for n in (9, 14, 5)]
    seq = 40
    window = np.concatenate([[SP.cls]] + [np.append(d, E) for d in docs])
    packed = collate([causal(seq, isolate=True).sample(window)])
    alone = collate([causal(seq, isolate=True).sample(np.append([SP.cls], np.append(d, E))) for d in docs])
    torch.manual_seed(0)
    model = GLMModel(tiny_config(position_embedding_type=position_embedding_type)).eval()
    lp, la = _token_losses(model, packed), _token_losses(model, alone)
    doc = packed["doc_ids"][0]
    for k, d in enumerate(docs):
        assert int(packed["loss_mask"][0][doc == k].sum()) == len(d) + 1  # every text token and the end of text
        assert la[k].sum() > 1.0
        assert abs(float(lp[0][doc == k].sum()) - float(la[k].sum())) < 1e-5
    # Without isolation the later documents see the earlier ones: their losses differ.
    shared = collate([causal(seq).sample(window)])
    ls = _token_losses(model, shared)
    assert abs(float(ls[0][doc == 2].sum()) - float(la[2].sum())) > 1e-3


def test_mixture_draws_causal_at_its_rate() -> None:
    cfg = ObjectiveConfig(bert_prob=0.4, gap_sentence_prob=0.1, causal_prob=0.3)
    objectives = Objectives(cfg, SP, 32)
    draws = np.array([objectives.choose(np.random.default_rng([5, i])).objective for i in range(20000)])
    rates = np.bincount(draws, minlength=len(OBJECTIVE_NAMES)) / len(draws)
    assert np.allclose(rates, [0.4, 0.1, 0.2, 0.3], atol=0.012), rates
    window = np.array([SP.cls, 5, 6, 7, E, 8, 9], dtype=np.int64)
    s = objectives.sample(window, np.random.default_rng(0), ObjectiveChoice(CAUSAL))
    assert s["input_ids"].tolist() == causal(32).sample(window)["input_ids"].tolist()
    assert objectives.sample(window, np.random.default_rng(0), ObjectiveChoice(TOKEN))["sep"] > 0


def test_loader_mixes_causal_batches_and_logs_them(make_indexed_dataset, tmp_path) -> None:
    prefix = make_indexed_dataset(random_documents(0, 200, max_sentences=10)).prefix
    cfg = config(prefix, tmp_path, bert_prob=0.4, gap_sentence_prob=0.1, causal_prob=0.25, reset_attention_mask=True)
    train = build_pretraining_datasets(cfg, SP)[0]
    objectives = [train[4 * group]["objective"] for group in range(2000)]  # one draw per micro-batch of 4
    assert abs(objectives.count(CAUSAL) / 2000 - 0.25) < 0.03
    group = objectives.index(CAUSAL)
    batch = collate([train[4 * group + j] for j in range(4)])
    assert batch["objective"].tolist() == [CAUSAL] * 4 and batch["sep"].tolist() == [0] * 4
    assert "doc_ids" in batch and bool((batch["input_ids"][:, 0] == G).all())
    # Per-objective logging names it: the loss of the causal rows is reported as loss_causal.
    out = GLMLoss(torch.tensor(0.0), torch.zeros(2, 1), torch.tensor([2.0, 3.0]), torch.tensor([4.0, 2.0]))
    sums: dict[int, list[float]] = {}
    add_loss(sums, out, {"objective": torch.tensor([CAUSAL, TOKEN])})
    summary = summarize_losses(sums)
    assert summary["loss_causal"] == 0.5 and summary["loss_token"] == 1.5 and "loss_document" not in summary


def test_causal_datasets_always_take_the_causal_objective(make_indexed_dataset, tmp_path) -> None:
    a = make_indexed_dataset(random_documents(1, 100, max_sentences=4), name="a").prefix
    b = make_indexed_dataset(random_documents(2, 100, max_sentences=4), name="b").prefix
    cfg = config(a, tmp_path, causal_datasets=[b])
    cfg.data.data_path = ["0.5", a, "0.5", b]
    train = build_pretraining_datasets(cfg, SP)[0]
    sources = [train.windows.locate(i)[0] for i in range(400)]
    objectives = [train[i]["objective"] for i in range(400)]
    assert all((o == CAUSAL) == (d == 1) for o, d in zip(objectives, sources))
    assert {o for o, d in zip(objectives, sources) if d == 0} <= set(BLANK_OBJECTIVES)


def test_a_tokenizer_without_cls_serves_the_causal_objective_only(make_indexed_dataset, pydoc_jsonl, tmp_path) -> None:
    """A GLM-4 style tokenizer.json (no [CLS]) trains the causal objective; selecting a blank objective with it is
    a one-line error naming [CLS]."""
    train_byte_bpe([str(pydoc_jsonl)], str(tmp_path / "bpe.json"), 400)
    path = _edited(tmp_path / "bpe.json", tmp_path / "glm4.json", "[CLS]")
    tokenizer = open_tokenizer(path)
    prefix = make_indexed_dataset(random_documents(0, 60, max_sentences=4)).prefix
    cfg = config(prefix, tmp_path, bert_prob=0.0, gap_sentence_prob=0.0, causal_prob=1.0)
    cfg.data.tokenizer_model = str(path)
    sample = build_pretraining_datasets(cfg, tokenizer)[0][3]
    assert sample["objective"] == CAUSAL
    assert sample["input_ids"][:2].tolist() == [tokenizer.gmask_id, tokenizer.sop_id]
    assert sample["input_ids"].min() >= 0 and tokenizer.eos_id in sample["labels"].tolist()
    cfg.data.objective.causal_prob = 0.9  # a blank objective can be drawn: [CLS] is named in one line
    with pytest.raises(DataError, match=r"glm4.json: the tokenizer has no \[CLS\] token") as err:
        build_pretraining_datasets(cfg, tokenizer)
    assert "\n" not in str(err.value)
    cfg.data.objective.causal_prob = 0.0
    cfg.data.objective.causal_datasets = [prefix]  # every dataset causal: no [CLS] needed
    assert build_pretraining_datasets(cfg, tokenizer)[0][0]["objective"] == CAUSAL


def test_mixture_flags_are_checked() -> None:
    cfg = load_config(["--bert-prob", "0.5", "--gap-sentence-prob", "0.25", "--data.objective.causal_prob", "0.5"])
    assert problems(cfg) == [
        "data.objective.bert_prob + gap_sentence_prob + causal_prob must be <= 1 (the rest is the document objective), "
        "got 1.25"
    ]
    cfg = load_config(["--data-path", "0.5", "a", "0.5", "b", "--data.objective.causal_datasets", "b", "c"])
    assert cfg.data.objective.causal_datasets == ["b", "c"]
    assert problems(cfg) == ["data.objective.causal_datasets names ['c'], which data.data_path does not hold"]
    assert problems(load_config(["--data-path", "a", "--data.objective.causal_prob", "1", "--bert-prob", "0"])) == []
