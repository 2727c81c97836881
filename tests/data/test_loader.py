"""The GLM dataset, the resumable distributed batch sampler, collate and building from a config."""

from __future__ import annotations

import functools
import operator
import os

import numpy as np
import pytest
import torch

from megatron_glm.config import GLMConfig
from megatron_glm.data.blank_infilling import DOCUMENT, SENTENCE, TOKEN, SpecialTokens
from megatron_glm.data.loader import (
    MicroBatchSampler,
    build_data_iterator,
    build_pretraining_data,
    build_pretraining_datasets,
    collate,
    split_num_samples,
)
from megatron_glm.errors import DataError

from .test_samples import random_documents

SP = SpecialTokens(pad=100, eos=101, cls=102, mask=103, smask=104, gmask=105, sop=106, eop=107, dblock=108)


def config(prefix: str, tmp_path, **objective) -> GLMConfig:
    cfg = GLMConfig()
    cfg.data.data_path = [prefix]
    cfg.data.seq_length = 32
    cfg.data.split = "8,1,1"
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.num_workers = 0
    cfg.training.micro_batch_size = 4
    cfg.training.train_iters = 20
    cfg.training.eval_interval = 10
    cfg.training.eval_iters = 2
    cfg.training.seed = 99
    cfg.data.objective.gap_sentence_prob = 0.25
    for key, value in objective.items():
        setattr(cfg.data.objective, key, value)
    return cfg


@pytest.fixture
def corpus(make_indexed_dataset):
    return make_indexed_dataset(random_documents(0, 200, max_sentences=10)).prefix


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_sampler_splits_global_batches_over_ranks() -> None:
    per_rank = [list(MicroBatchSampler(0, 3, r, 2, total_samples=24)) for r in range(2)]
    assert per_rank[0] == [[0, 1, 2], [6, 7, 8], [12, 13, 14], [18, 19, 20]]
    assert per_rank[1] == [[3, 4, 5], [9, 10, 11], [15, 16, 17], [21, 22, 23]]
    assert len(MicroBatchSampler(0, 3, 0, 2, total_samples=25)) == 4
    resumed = list(MicroBatchSampler(12, 3, 1, 2, total_samples=24))
    assert resumed == per_rank[1][2:]
    endless = iter(MicroBatchSampler(600, 3, 0, 2))
    assert next(endless) == [600, 601, 602] and next(endless) == [606, 607, 608]
    with pytest.raises(DataError, match="multiple"):
        MicroBatchSampler(5, 3, 0, 2)
    with pytest.raises(ValueError):
        MicroBatchSampler(0, 3, 2, 2)


def test_batches_follow_the_interface(corpus, tmp_path) -> None:
    cfg = config(corpus, tmp_path)
    train, valid, test = build_pretraining_datasets(cfg, SP)
    assert valid is not None and test is not None
    batches = take(build_data_iterator(train, consumed_samples=0, micro_batch_size=4), 30)
    seen = set()
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "loss_mask", "position_ids", "sep", "objective"}
        assert batch["input_ids"].shape == batch["labels"].shape == batch["loss_mask"].shape == (4, 32)
        assert batch["position_ids"].shape == (4, 2, 32)
        assert batch["sep"].shape == batch["objective"].shape == (4,)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        assert batch["position_ids"].dtype == batch["sep"].dtype == batch["objective"].dtype == torch.long
        assert batch["loss_mask"].dtype == torch.float32
        assert len(set(batch["objective"].tolist())) == 1, "one objective per micro-batch"
        seen.add(int(batch["objective"][0]))
        for row in range(4):
            sep = int(batch["sep"][row])
            loss = batch["loss_mask"][row]
            assert loss[:sep].sum() == 0 and loss[sep] == 1
            assert torch.all(batch["position_ids"][row, 1, :sep] == 0)
    assert seen == {TOKEN, SENTENCE, DOCUMENT}


def test_per_sample_objectives(corpus, tmp_path) -> None:
    cfg = config(corpus, tmp_path, per_sample=True)
    train = build_pretraining_datasets(cfg, SP)[0]
    batches = take(build_data_iterator(train, consumed_samples=0, micro_batch_size=4), 20)
    assert any(len(set(b["objective"].tolist())) > 1 for b in batches)


def test_same_samples_for_any_worker_count(corpus, tmp_path) -> None:
    cfg = config(corpus, tmp_path)
    train = build_pretraining_datasets(cfg, SP)[0]
    runs = [
        take(build_data_iterator(train, consumed_samples=0, micro_batch_size=4, num_workers=w), 8) for w in (0, 1, 2)
    ]
    assert same_batches(runs[0], runs[1]) and same_batches(runs[0], runs[2])


@pytest.mark.parametrize("workers", [0, 2])
def test_building_an_iterator_draws_nothing_from_the_global_rng(corpus, tmp_path, workers) -> None:
    """Dropout masks must not depend on when the iterator is built (exact resume)."""
    cfg = config(corpus, tmp_path)
    train = build_pretraining_datasets(cfg, SP)[0]
    torch.manual_seed(5)
    before = torch.get_rng_state()
    it = build_data_iterator(train, consumed_samples=8, micro_batch_size=4, num_workers=workers)
    next(it)
    assert torch.equal(torch.get_rng_state(), before)
    # The worker seeds are a function of where the iterator starts, not of the global state.
    seeds = [build_data_iterator(train, consumed_samples=c, micro_batch_size=4)._base_seed for c in (8, 8, 16)]
    assert seeds[0] == seeds[1] != seeds[2]


def test_restart_and_dp_layout_give_the_same_samples(corpus, tmp_path) -> None:
    cfg = config(corpus, tmp_path)
    train = build_pretraining_datasets(cfg, SP)[0]
    straight = take(build_data_iterator(train, consumed_samples=0, micro_batch_size=4), 16)
    # A fresh process (new dataset objects) resumed after 5 steps of 8 samples on 2 ranks.
    fresh = build_pretraining_datasets(cfg, SP, dp_size=2, is_rank0=False)[0]
    for rank in range(2):
        resumed = take(build_data_iterator(fresh, consumed_samples=40, micro_batch_size=4, dp_rank=rank, dp_size=2), 3)
        assert same_batches(resumed, straight[10 + rank :: 2][:3])
    # Sample i is a function of i alone.
    assert all(np.array_equal(train[i]["input_ids"], fresh[i]["input_ids"]) for i in (0, 5, 77, 1000))


def test_the_seed_changes_the_samples(corpus, tmp_path) -> None:
    a = build_pretraining_datasets(config(corpus, tmp_path), SP)[0]
    cfg = config(corpus, tmp_path)
    cfg.training.seed = 100
    b = build_pretraining_datasets(cfg, SP)[0]
    assert not all(np.array_equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(8))


def test_rank0_builds_caches_and_the_others_wait(corpus, tmp_path) -> None:
    cfg = config(corpus, tmp_path)
    calls = []
    build_pretraining_datasets(cfg, SP, is_rank0=False, barrier=lambda: calls.append("other"))
    assert not os.path.exists(tmp_path / "cache"), "only rank 0 writes"
    build_pretraining_datasets(cfg, SP, is_rank0=True, barrier=lambda: calls.append("rank0"))
    assert calls == ["other", "rank0"]
    files = os.listdir(tmp_path / "cache")
    assert files and all(f.endswith(".npy") for f in files)


def test_split_sample_counts() -> None:
    cfg = GLMConfig()
    cfg.training.micro_batch_size, cfg.training.train_iters = 4, 100
    cfg.training.eval_interval, cfg.training.eval_iters = 50, 5
    assert split_num_samples(cfg, 2) == (800, 3 * 5 * 8, 40)
    cfg.training.global_batch_size = 32
    assert split_num_samples(cfg, 2)[0] == 3200


def test_empty_splits_and_blends(make_indexed_dataset, tmp_path) -> None:
    a = make_indexed_dataset(random_documents(1, 50), name="a").prefix
    b = make_indexed_dataset(random_documents(2, 50), name="b").prefix
    cfg = config(a, tmp_path)
    cfg.data.split = "100,0,0"
    train, valid, test = build_pretraining_datasets(cfg, SP)
    assert valid is None and test is None
    cfg.data.data_path = ["0.3", a, "0.7", b]
    train, *_ = build_pretraining_datasets(cfg, SP)
    assert len(train.windows.datasets) == 2
    batch = collate([train[i] for i in range(8)])
    assert batch["input_ids"].shape == (8, 32)
    iterators = build_pretraining_data(cfg, SP, consumed_train_samples=8)
    assert iterators[1] is None and next(iterators[0])["input_ids"].shape == (4, 32)


def test_sentence_objective_needs_sentences(make_indexed_dataset, tmp_path) -> None:
    whole = make_indexed_dataset([[functools.reduce(operator.iadd, d, [])] for d in random_documents(3, 40)]).prefix
    cfg = config(whole, tmp_path, gap_sentence_prob=0.2)
    with pytest.raises(DataError, match="sentence"):
        build_pretraining_datasets(cfg, SP)
    cfg.data.objective.gap_sentence_prob = 0.0
    assert build_pretraining_datasets(cfg, SP)[0] is not None


def test_missing_dataset_is_a_data_error(tmp_path) -> None:
    with pytest.raises(DataError):
        build_pretraining_datasets(config(str(tmp_path / "nope"), tmp_path), SP)


def test_real_tokenizer_and_corpus(glm_tokenizer, pydoc_dataset, tmp_path) -> None:
    cfg = config(pydoc_dataset["sentence"], tmp_path)
    cfg.data.seq_length = 128
    train, _valid, _ = build_pretraining_datasets(cfg, glm_tokenizer)
    batch = next(build_data_iterator(train, consumed_samples=0, micro_batch_size=4))
    assert batch["input_ids"].shape == (4, 128)
    ids = set(batch["input_ids"].flatten().tolist())
    assert glm_tokenizer.cls_id in ids and glm_tokenizer.sop_id in ids
    assert max(ids) < glm_tokenizer.vocab_size


def test_dataset_samples_rebuild_their_windows(corpus, tmp_path) -> None:
    from .test_blank_infilling import check

    cfg = config(corpus, tmp_path, gap_sentence_prob=0.3)
    train = build_pretraining_datasets(cfg, SP)[0]
    mask_of = {TOKEN: SP.mask, SENTENCE: SP.smask, DOCUMENT: SP.gmask}
    for i in range(600):
        sample = train[i]
        window = train.windows.window(i)
        spans = check(sample, window.tokens, 32, mask_of[sample["objective"]])
        assert spans
