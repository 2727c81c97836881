"""Checkpoint conversion on synthetic checkpoints: TP round trips, formats, vocab re-padding, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint import load_pretrained
from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint, open_source
from megatron_glm.checkpoint.reshard import merge_shards, split_full
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.errors import CheckpointError
from megatron_glm.model import ModelLayout
from tests.checkpoint.helpers import logits_of, reference_model, write_glm_files
from tests.model.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
QUIET = lambda *_: None


def convert(src: Path, dst: Path, **kw: object):
    return convert_checkpoint(src, dst, ConvertOptions(num_attention_heads=4, **kw), log=QUIET)


def test_merge_split_qkv_is_per_rank_q_k_v() -> None:
    h, tp = 8, 2
    full = torch.arange(3 * h * 2, dtype=torch.float32).view(3 * h, 2)
    spec = ModelLayout(tiny_config())["transformer.layers.0.attention.query_key_value.weight"]
    shards = [split_full(spec, full, r, tp) for r in range(tp)]
    q, k, v = full.chunk(3)
    assert torch.equal(shards[0], torch.cat([q[:4], k[:4], v[:4]]))
    assert torch.equal(merge_shards(spec, shards), full)


def test_tp_round_trip_is_bitwise_and_logits_match(tmp_path: Path) -> None:
    """glm TP2 -> native TP1 -> native TP4 -> native TP2 -> glm TP2: identical shards; logits equal the model's."""
    model, full = reference_model()
    original = write_glm_files(tmp_path / "glm2", full, tp=2)
    r = convert(tmp_path / "glm2", tmp_path / "tp1", format="native", target_tp=1, verify_logits=True)
    assert r.logits_max_diff == 0.0 and r.verified == len(full)
    convert(tmp_path / "tp1", tmp_path / "tp4", format="native", target_tp=4)
    convert(tmp_path / "tp4", tmp_path / "tp2", format="native", target_tp=2)
    convert(tmp_path / "tp2", tmp_path / "glm2b", format="glm", target_tp=2)
    for r_ in range(2):
        back = safe_torch_load(tmp_path / "glm2b" / "0" / f"mp_rank_{r_:02d}_model_states.pt")["module"]
        assert back.keys() == original[r_].keys()
        assert all(torch.equal(back[k], original[r_][k]) for k in back)
    tp4 = safe_torch_load(tmp_path / "tp4" / "global_step0" / "mp_rank_03_model_states.pt")["module"]
    assert tp4["transformer.layers.0.attention.query_key_value.weight"].shape == (3 * 64 // 4, 64)
    from megatron_glm.checkpoint.verify import source_logits

    b = __import__("tests.model.helpers", fromlist=["make_batch"]).make_batch(1)
    got = source_logits(
        open_source(tmp_path / "tp4"), 128, batch={k: b[k] for k in ("input_ids", "position_ids", "sep")}
    )
    assert (got - logits_of(model)).abs().max() < 1e-5


def test_safetensors_export_loads_with_from_pretrained(tmp_path: Path) -> None:
    model, full = reference_model(seed=3)
    write_glm_files(tmp_path / "glm", full, tp=2)
    convert(tmp_path / "glm", tmp_path / "st", format="safetensors", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg = json.loads((tmp_path / "st" / "config.json").read_text())
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]) == (2, 64, 4, 128)
    loaded = load_pretrained(str(tmp_path / "st"))
    assert (logits_of(loaded) - logits_of(model)).abs().max() == 0.0
    # re-import into our format gives the same logits again
    r = convert(tmp_path / "st", tmp_path / "back", format="glm", target_tp=1, verify_logits=True)
    assert r.logits_max_diff == 0.0
    convert(tmp_path / "st", tmp_path / "st1", format="safetensors")
    assert (tmp_path / "st1" / "model.safetensors").is_file()


def test_bf16_safetensors_export(tmp_path: Path) -> None:
    _, full = reference_model()
    write_glm_files(tmp_path / "glm", full, tp=1)
    convert(tmp_path / "glm", tmp_path / "st", format="safetensors", dtype="bf16")
    m = load_pretrained(str(tmp_path / "st"))
    assert m.word_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(m.word_embeddings.weight, full["word_embeddings.weight"].bfloat16())


def test_vocab_repadding_keeps_logits_of_real_tokens(tmp_path: Path) -> None:
    _, full = reference_model()
    write_glm_files(tmp_path / "glm", full, tp=1)
    r = convert(tmp_path / "glm", tmp_path / "v256", format="native", target_tp=2, vocab_size=256, verify_logits=True)
    assert r.logits_max_diff == 0.0 and any("re-padded 128 -> 256" in n for n in r.notes)
    wte = open_source(tmp_path / "v256").tensor("word_embeddings.weight")
    assert wte.shape == (256, 64) and torch.equal(wte[:128], full["word_embeddings.weight"]) and not wte[128:].any()
    convert(tmp_path / "v256", tmp_path / "v128", format="glm", target_tp=1, vocab_size=128)
    back = safe_torch_load(tmp_path / "v128" / "0" / "mp_rank_00_model_states.pt")["module"]
    assert all(torch.equal(back[k], full[k]) for k in full)


def test_clear_errors(tmp_path: Path) -> None:
    _, full = reference_model()
    write_glm_files(tmp_path / "glm", full, tp=2)
    with pytest.raises(CheckpointError, match="not divisible by 3"):
        convert(tmp_path / "glm", tmp_path / "x", target_tp=3)
    with pytest.raises(CheckpointError, match="not divisible by the target tensor-parallel size 4"):
        convert(tmp_path / "glm", tmp_path / "x", target_tp=4, vocab_size=130)
    with pytest.raises(CheckpointError, match="only the native format has pipeline layouts"):
        convert(tmp_path / "glm", tmp_path / "x", format="glm", target_pp=2)
    with pytest.raises(CheckpointError, match="--target-pp 3 does not divide the 2 layers"):
        convert(tmp_path / "glm", tmp_path / "x", target_pp=3)
    # expert parallelism: a size below 1 (was "only native checkpoints split experts", wrongly), a dense model
    # (was accepted, writing a layout training refuses), a negative --target-dp (was accepted)
    with pytest.raises(
        CheckpointError, match=r"^--target-ep must be >= 1 and --target-dp >= 0 \(0: keep\), got 0 and 0$"
    ):
        convert(tmp_path / "glm", tmp_path / "x", target_ep=0)
    with pytest.raises(CheckpointError, match=r"got 1 and -1$"):
        convert(tmp_path / "glm", tmp_path / "x", target_dp=-1)
    with pytest.raises(CheckpointError, match=r"^--target-ep 2: the model is dense \(no experts to split\); use 1$"):
        convert(tmp_path / "glm", tmp_path / "x", target_ep=2, target_dp=2)
    with pytest.raises(
        CheckpointError, match=r"^--vocab-size must be >= 0 \(0: keep\) and --max-shard-size positive, got -1"
    ):
        convert(tmp_path / "glm", tmp_path / "x", vocab_size=-1)  # was a shape error naming the temporary output
    with pytest.raises(CheckpointError, match=r"and --max-shard-size positive, got 0 and 0$"):
        convert(tmp_path / "glm", tmp_path / "x", format="safetensors", max_shard_bytes=0)  # was accepted
    (tmp_path / "afile").write_text("")  # an output under a file: was a bare FileExistsError after the conversion
    with pytest.raises(CheckpointError, match=r"afile/x: .*afile is a file, not a directory; choose another"):
        convert(tmp_path / "glm", tmp_path / "afile" / "x")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a checkpoint we can read"):
        convert(tmp_path / "junk", tmp_path / "x")
    torch.save({"module": {"foo.weight": torch.zeros(2)}}, tmp_path / "junk" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="not a GLM checkpoint"):
        convert(tmp_path / "junk", tmp_path / "x")
    (tmp_path / "glm" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="missing tensor-parallel ranks: mp_rank_00"):
        convert(tmp_path / "glm", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


@pytest.mark.slow
def test_cli_reports_one_line_errors(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "tools/convert_checkpoint.py",
            "--input",
            str(tmp_path / "none"),
            "--output",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_converter_options_come_from_the_typed_config(tmp_path: Path) -> None:
    """Flags, their dotted paths and YAML give the same options; the help lists every field."""
    from megatron_glm.checkpoint.convert import CONVERT_FLAGS, ConvertRun
    from megatron_glm.config import help_text, load_config
    from megatron_glm.errors import ConfigError

    flags = ["--input", "a", "--output", "b", "--target-tp", "2", "--no-optimizer", "--dtype", "bf16"]
    dotted = [
        "--input",
        "a",
        "--output",
        "b",
        "--convert.target_tp",
        "2",
        "--convert.keep_optimizer",
        "false",
        "--convert.dtype",
        "bf16",
    ]
    yaml_file = tmp_path / "convert.yaml"
    yaml_file.write_text("input: a\noutput: b\nconvert:\n  target_tp: 2\n  keep_optimizer: false\n  dtype: bf16\n")
    runs = [
        load_config(argv, root=ConvertRun, aliases=CONVERT_FLAGS)
        for argv in (flags, dotted, ["--config", str(yaml_file)])
    ]
    assert runs[0] == runs[1] == runs[2]
    assert (runs[0].convert.target_tp, runs[0].convert.keep_optimizer, runs[0].convert.dtype) == (2, False, "bf16")
    text = help_text(ConvertRun, CONVERT_FLAGS)
    assert all(f"--convert.{f.name} " in text for f in __import__("dataclasses").fields(ConvertOptions))
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(["--format", "zip"], root=ConvertRun, aliases=CONVERT_FLAGS)
    # the training scripts' long spellings (--target-expert-parallel-size was an unknown option)
    long = [
        "--target-tensor-parallel-size",
        "2",
        "--target-expert-parallel-size",
        "4",
        "--target-data-parallel-size",
        "4",
    ]
    got = load_config(long, root=ConvertRun, aliases=CONVERT_FLAGS).convert
    assert (got.target_tp, got.target_ep, got.target_dp, got.target_pp) == (2, 4, 4, 1)
