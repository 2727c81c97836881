"""Resuming a different run (other data, tokenizer, seq length, batch, seed or split) is refused unless forced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.config import build_config
from megatron_glm.training.drift import identity_drift, run_identity
from tests.training.conftest import launch, train_args


def _copy_dataset(src: str, dst: Path) -> str:
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(src + suffix, str(dst) + suffix)
    return str(dst)


def _cfg(prefix: str, tokenizer: str, **extra):
    return build_config(
        {
            "model.size": "glm-tiny",
            "data.data_path": [prefix],
            "data.tokenizer_model": tokenizer,
            "data.seq_length": 64,
            **extra,
        }
    )


def test_identity_compares_content_not_paths(tiny_corpus, tmp_path):
    saved = run_identity(_cfg(tiny_corpus["data_path"], tiny_corpus["tokenizer"]), 4)
    moved = _copy_dataset(tiny_corpus["data_path"], tmp_path / "moved")
    assert identity_drift({"identity": saved}, run_identity(_cfg(moved, tiny_corpus["tokenizer"]), 4)) == []
    # Same sizes, other tokens: the .idx is the same, so the fingerprint is the sidecar's; without it the .idx
    # differs only when the documents do. Change one document's length (a real edit of the corpus).
    changed = tmp_path / "changed"
    _copy_dataset(tiny_corpus["data_path"], changed)
    idx = bytearray((changed.parent / "changed.idx").read_bytes())
    lengths = np.frombuffer(idx, dtype="<i4", count=2, offset=34).copy()
    idx[34:42] = np.array([lengths[0] + lengths[1], 0], dtype="<i4").tobytes()
    (changed.parent / "changed.idx").write_bytes(bytes(idx))
    (changed.parent / "changed.meta.json").unlink()
    drift = identity_drift(
        {"identity": saved}, run_identity(_cfg(str(changed), tiny_corpus["tokenizer"], **{"training.seed": 7}), 8)
    )
    assert len(drift) == 3 and drift[0].startswith("data (fingerprint): checkpoint pydoc_text_sentence [")
    assert drift[1:] == ["global batch: checkpoint 4, now 8", "seed: checkpoint 1234, now 7"]
    other_tok = tmp_path / "tok.model"
    other_tok.write_bytes(Path(tiny_corpus["tokenizer"]).read_bytes() + b"x")
    drift = identity_drift(
        {"identity": saved},
        run_identity(_cfg(moved, str(other_tok), **{"data.seq_length": 32, "data.split": "90,10,0"}), 4),
    )
    assert [d.split(":")[0] for d in drift] == ["tokenizer (sha256)", "seq length", "split"]
    assert drift[1:] == ["seq length: checkpoint 64, now 32", "split: checkpoint '949,50,1', now '90,10,0'"]


@pytest.mark.slow
def test_resume_on_a_changed_dataset_is_refused_unless_forced(tiny_corpus, tmp_path):
    save = tmp_path / "ck"
    common = ["--micro-batch-size", "2", "--global-batch-size", "2", "--save", str(save)]
    launch(train_args(tiny_corpus, "--train-iters", "2", *common), launcher="python")
    other = _copy_dataset(tiny_corpus["data_path"], tmp_path / "other")
    with open(other + ".bin", "r+b") as f:  # one token changed: another dataset as far as the sidecar knows
        f.seek(100)
        f.write(b"\x05\x00")
    meta = json.loads(Path(other + ".meta.json").read_text())
    meta["fingerprint"] = "0" * 64  # what preprocessing the edited corpus would have recorded
    Path(other + ".meta.json").write_text(json.dumps(meta))
    corpus = {**tiny_corpus, "data_path": other}
    resume = ["--train-iters", "4", "--load", str(save), *common]
    refused = launch(train_args(corpus, *resume), launcher="python", check=False)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    was = run_identity(_cfg(tiny_corpus["data_path"], tiny_corpus["tokenizer"]), 2)["data"][0][2][:12]
    assert refused.stderr.splitlines()[-1] == (
        f"error: {save}: this run differs from the checkpoint's: data (fingerprint): checkpoint "
        f"pydoc_text_sentence [{was}], "
        f"now other [000000000000]; resume with the same settings, or pass --override-checkpoint-config to "
        f"continue anyway"
    )
    forced = launch(train_args(corpus, *resume, "--override-checkpoint-config"), launcher="python")
    assert "--override-checkpoint-config given" in forced.stdout and "done: step 4" in forced.stdout
