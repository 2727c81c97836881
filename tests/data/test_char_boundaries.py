"""Blanks never split a character spelled in byte-fallback pieces (issue 27, defect 8), on classical Chinese (the
Analects, ``tests/data/corpora/lunyu.jsonl``) with a sentencepiece model that spells its rarer characters in
bytes; and ``tools/train_tokenizer.py`` explains sentencepiece's failures in our flag names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.config import load_config
from megatron_glm.data.blank_infilling import SpecialTokens
from megatron_glm.data.char_boundaries import CharBoundaries
from megatron_glm.data.loader import GLMDataset, build_pretraining_datasets
from megatron_glm.data.objectives import Objectives
from megatron_glm.data.preprocess import PreprocessConfig, preprocess
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.data.tokenizer_training import train_sentencepiece
from megatron_glm.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
LUNYU = ROOT / "tests" / "data" / "corpora" / "lunyu.jsonl"
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def lunyu(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A 1,200-piece BPE model at coverage 0.98 (about 5% of the tokens are byte pieces inside a character) and
    the corpus preprocessed with it, split into sentences."""
    d = tmp_path_factory.mktemp("lunyu")
    train_sentencepiece([str(LUNYU)], str(d / "tok"), 1200, character_coverage=0.98, num_threads=1)
    config = PreprocessConfig(
        inputs=[str(LUNYU)], output_prefix=str(d / "lunyu"), tokenizer_model=str(d / "tok.model"), workers=1
    )
    config.split_sentences = True
    return {"tokenizer": str(d / "tok.model"), "prefix": preprocess(config, log=lambda _l: None).outputs["text"]}


def _parts(sample: dict, tokenizer: GLMTokenizer) -> list[str]:
    """Part A's input and each Part B span's targets, decoded."""
    sep, pos, lab = int(sample["sep"]), sample["position_ids"], sample["labels"]
    end_b = sep + int(sample["loss_mask"].sum())
    heads = [i for i in range(sep, end_b) if pos[1, i] == 1]
    spans = [lab[h : (heads[k + 1] if k + 1 < len(heads) else end_b) - 1] for k, h in enumerate(heads)]
    return [tokenizer.decode(sample["input_ids"][:sep])] + [tokenizer.decode(s) for s in spans]


def _dataset(lunyu: dict[str, str], seq: int, *flags: str):
    cfg = load_config(
        [
            *("--data-path", lunyu["prefix"], "--tokenizer-model", lunyu["tokenizer"], "--seq-length", str(seq)),
            *("--split", "100,0,0", "--micro-batch-size", "1", "--data.objective.per_sample", "true", *flags),
        ]
    )
    tokenizer = GLMTokenizer(lunyu["tokenizer"])
    return build_pretraining_datasets(cfg, tokenizer, is_rank0=False)[0], tokenizer


@pytest.mark.parametrize(
    ("seq", "flags"),
    [
        (64, ["--bert-prob", "1.0"]),
        (128, ["--bert-prob", "0.4", "--gap-sentence-prob", "0.3", "--short-seq-prob", "0.2"]),
        (96, ["--bert-prob", "0.0", "--gpt-min-ratio", "0.1", "--data.pack_documents", "false"]),
    ],
)
def test_every_part_decodes_to_whole_characters(lunyu: dict[str, str], seq: int, flags: list[str]) -> None:
    ds, tokenizer = _dataset(lunyu, seq, *flags)
    chars = ds.sampler.chars
    assert chars is not None and chars.continuation.sum() > 30
    unguarded = GLMDataset(ds.windows, Objectives(ds.sampler.cfg, ds.sampler.special, seq), seed=ds.seed)
    broken = spans = 0
    for index in range(400):
        sample = ds[index]
        parts = _parts(sample, tokenizer)
        spans += len(parts) - 1
        assert not any(FFFD in p for p in parts), (index, parts)
        assert len(sample["input_ids"]) == seq and int(sample["sep"]) + int(sample["loss_mask"].sum()) <= seq
        broken += any(FFFD in p for p in _parts(unguarded[index], tokenizer))
    # the fault is real on this corpus: without the boundaries many samples cut a character
    assert spans >= 400 and broken > 20, (spans, broken)


def test_dump_samples_pretty_shows_whole_characters(lunyu: dict[str, str]) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "tools/dump_samples.py", "--pretty", "--num", "100", "--seq-length", "64"),
            *("--data-path", lunyu["prefix"], "--tokenizer-model", lunyu["tokenizer"], "--bert-prob", "1.0"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("=== sample") == 100 and "[MASK]#1" in proc.stdout and FFFD not in proc.stdout


SP = SpecialTokens(pad=100, eos=101, cls=102, mask=103, smask=104, gmask=105, sop=106, eop=107, dblock=108)


class _Bytes:
    """A 100-id vocabulary: ids 0..63 are the byte pieces 0x80..0xBF, 64..79 the lead bytes 0xE0..0xEF."""

    base_vocab_size = 100

    def id_to_token(self, i: int) -> str:
        return f"<0x{0x80 + i:02X}>" if i < 64 else f"<0x{0xE0 + i - 64:02X}>" if i < 80 else f"w{i}"


def test_snap_grows_spans_to_whole_characters_and_merges() -> None:
    chars = CharBoundaries.from_tokenizer(_Bytes())
    lead, c = 64, 0  # a three-byte character is lead, c, c
    tokens = np.array([SP.cls, c, 90, lead, c, c, 91, 92, lead, c, c, 93, lead, c], dtype=np.int64)
    barrier = np.zeros(110, dtype=bool)
    barrier[[SP.cls, SP.eos, SP.pad]] = True
    # span 1 is the orphan byte after [CLS] (dropped), span 2 starts inside a character, span 3 ends inside one
    starts, lens, n = chars.snap(tokens, np.array([1, 4, 7]), np.array([1, 1, 2]), 14, barrier)
    assert n == 12  # the last character is incomplete: Part A ends before it
    assert starts.tolist() == [3, 7] and lens.tolist() == [3, 4]
    # two spans inside one character's bytes become one span over the whole character
    starts, lens, _ = chars.snap(tokens, np.array([4, 9]), np.array([1, 1]), 12, barrier)
    assert starts.tolist() == [3, 8] and lens.tolist() == [3, 3]
    starts, lens, _ = chars.snap(tokens, np.array([3, 5]), np.array([1, 1]), 12, barrier)
    assert starts.tolist() == [3] and lens.tolist() == [3]
    assert chars.orphans(tokens, SP.cls) == (1, 1)
    assert chars.whole_end(tokens, 14) == 12 and chars.whole_end(tokens, 12) == 12


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--vocab-size", "800"], "error: sentencepiece training failed: --vocab-size 800 is below the "),
        (["--vocab-size", "1400", "--character-coverage", "0.95"], "error: --character-coverage 0.95: expected a"),
        (
            ["--vocab-size", "9000", "--model-type", "unigram"],
            "error: sentencepiece training failed: --vocab-size 9000 is more",
        ),
    ],
)
def test_train_tokenizer_explains_in_our_flag_names(tmp_path: Path, flags: list[str], message: str) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "tools/train_tokenizer.py", "--input", str(LUNYU), "--model-prefix", str(tmp_path / "t")),
            *("--threads", "1", *flags),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "_coverage" not in proc.stderr and "INTERNAL" not in proc.stderr and ".cc(" not in proc.stderr
    with pytest.raises(DataError, match="--character-coverage 0.5: expected a value in"):
        train_sentencepiece([str(LUNYU)], str(tmp_path / "u"), 1400, character_coverage=0.5)
