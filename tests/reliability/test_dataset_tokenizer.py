"""A dataset made with another tokenizer (issue 27, defect 5): refused by the sidecar's tokenizer fingerprint even
when the other tokenizer has the same size (the id bound alone passes); a dataset without a sidecar trains with a
warning that its tokenizer cannot be verified."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_glm.config import load_config
from megatron_glm.data.corpus import write_jsonl
from megatron_glm.data.dataset_meta import meta_path, read_dataset_meta
from megatron_glm.data.loader import build_pretraining_datasets
from megatron_glm.data.preprocess import PreprocessConfig, preprocess
from megatron_glm.data.tokenizer import GLMTokenizer, tokenizer_fingerprint
from megatron_glm.data.tokenizer_training import train_sentencepiece
from megatron_glm.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory: pytest.TempPathFactory, pydoc_jsonl: Path, spm_model: Path) -> dict[str, str]:
    """``made``: the tokenizer the dataset is preprocessed with; ``other``: one of the same size trained on the
    upper-cased corpus (other pieces); ``prefix``: the dataset."""
    d = tmp_path_factory.mktemp("two_tokenizers")
    upper = d / "upper.jsonl"
    with open(pydoc_jsonl, encoding="utf-8") as stream:
        write_jsonl(upper, [{"text": json.loads(line)["text"].upper()} for line in stream])
    train_sentencepiece([str(upper)], str(d / "other"), 4000, model_type="bpe", num_threads=1)
    config = PreprocessConfig(
        inputs=[str(pydoc_jsonl)], output_prefix=str(d / "ds"), tokenizer_model=str(spm_model), workers=1
    )
    prefix = preprocess(config, log=lambda _line: None).outputs["text"]
    return {"made": str(spm_model), "other": str(d / "other.model"), "prefix": prefix}


def _cfg(prefix: str, tokenizer: str):
    return load_config(
        ["--data-path", prefix, "--tokenizer-model", tokenizer, "--seq-length", "64", "--split", "100,0,0"]
    )


def test_same_size_other_pieces_is_refused(two_tokenizers: dict[str, str]) -> None:
    made, other = GLMTokenizer(two_tokenizers["made"]), GLMTokenizer(two_tokenizers["other"])
    prefix = two_tokenizers["prefix"]
    record = read_dataset_meta(prefix)
    # staged as the issue found it: same size, other pieces, and the dataset's ids fit the other tokenizer
    assert made.vocab_size == other.vocab_size
    assert sum(made.id_to_token(i) != other.id_to_token(i) for i in range(made.base_vocab_size)) > 1000
    assert record["max_token_id"] < other.vocab_size
    assert record["tokenizer_fingerprint"] == tokenizer_fingerprint(two_tokenizers["made"])
    with pytest.raises(DataError) as caught:
        build_pretraining_datasets(_cfg(prefix, two_tokenizers["other"]), other, log=pytest.fail)
    text = str(caught.value)
    assert text.startswith(f"{prefix}: made with the tokenizer of fingerprint ")
    assert tokenizer_fingerprint(two_tokenizers["made"])[:12] in text
    assert tokenizer_fingerprint(two_tokenizers["other"])[:12] in text and "\n" not in text
    logs: list[str] = []
    train, _, _ = build_pretraining_datasets(_cfg(prefix, two_tokenizers["made"]), made, log=logs.append)
    assert train is not None and train[0]["input_ids"].shape == (64,) and logs == []


def test_dataset_without_sidecar_warns_and_keeps_the_bound(two_tokenizers: dict[str, str], tmp_path: Path) -> None:
    prefix = str(tmp_path / "megatron")
    for suffix in (".bin", ".idx"):
        os.link(two_tokenizers["prefix"] + suffix, prefix + suffix)
    assert not os.path.exists(meta_path(prefix))
    logs: list[str] = []
    other = GLMTokenizer(two_tokenizers["other"])
    train, _, _ = build_pretraining_datasets(_cfg(prefix, two_tokenizers["other"]), other, log=logs.append)
    assert train is not None
    assert logs == [
        f"warning: {prefix} has no sidecar (.meta.json): the tokenizer it was made with cannot be verified (only "
        f"that its ids fit); preprocess it with tools/preprocess_data.py to record it"
    ]


@pytest.mark.slow
def test_pretrain_refuses_in_one_line(two_tokenizers: dict[str, str], tmp_path: Path) -> None:
    args = ["--model-size", "glm-tiny", "--train-iters", "2", "--micro-batch-size", "1", "--data.num_workers", "0"]
    data = ["--data-path", two_tokenizers["prefix"], "--tokenizer-model", two_tokenizers["other"], "--seq-length", "64"]
    proc = subprocess.run(
        [sys.executable, "pretrain_glm.py", *args, *data, "--save", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {two_tokenizers['prefix']}: made with the tokenizer of fingerprint "), last
    assert "Traceback" not in proc.stderr and not list((tmp_path / "run").glob("global_step*"))
