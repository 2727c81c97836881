"""Damaged safetensors files (issue 27, defect 4): every defect is one line naming the file, from the reader and
through ``tools/convert_checkpoint.py`` and ``tools/generate.py``, never safetensors' own error or a traceback."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_glm.checkpoint import load_pretrained
from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint
from megatron_glm.checkpoint.safetensors_file import open_safetensors, read_header
from megatron_glm.errors import CheckpointError
from tests.checkpoint.helpers import reference_model, write_glm_files

ROOT = Path(__file__).resolve().parents[2]


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _edit(change: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def damage(data: bytes) -> bytes:
        header, body = _split(data)
        change(header)
        return _join(header, body)

    return damage


def _tensors(header: dict) -> list[dict]:
    """The tensor records of a header, in data order."""
    return sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])


def _bad_json(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    return data[:8] + b"{" * n + data[8 + n :]


def _set(key: str, value: object, which: int = 1) -> Callable[[dict], None]:
    return lambda header: _tensors(header)[which].__setitem__(key, value)


def _overlap(header: dict) -> None:
    first, second = _tensors(header)[:2]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]


#: (name, damage, what the one-line error says)
DEFECTS = [
    ("bad-json", _bad_json, "header is not valid JSON"),
    (
        "huge-header-length",
        lambda d: struct.pack("<Q", 2**62) + d[8:],
        "header length 4611686018427387904 does not fit",
    ),
    ("short-file", lambda d: d[:5], "shorter than the 8-byte header length"),
    ("bad-dtype", _edit(_set("dtype", "F99")), "unknown dtype 'F99'"),
    ("bad-shape", _edit(_set("shape", [7, 3])), "needs 84 bytes but its data_offsets"),
    ("negative-shape", _edit(_set("shape", [-1])), "expected a list of non-negative integers"),
    ("bad-offsets", _edit(_set("data_offsets", [8, 4])), "expected [begin, end]"),
    ("overlapping-offsets", _edit(_overlap), "overlap the previous tensor's"),
    ("truncated-body", lambda d: d[:-100], "truncated: the tensors need"),
    ("trailing-bytes", lambda d: d + b"\0" * 16, "16 bytes after the last tensor's data"),
]


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5, 2), "c": torch.zeros(25, dtype=torch.int64)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_a_sound_file_reads_back(good_file: Path) -> None:
    header = read_header(good_file)
    assert header["a"][:2] == ("F32", (3, 4)) and header.metadata == {"format": "pt"}
    with open_safetensors(good_file) as f:
        assert torch.equal(f.get_tensor("a"), torch.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize(("name", "damage", "message"), DEFECTS, ids=[d[0] for d in DEFECTS])
def test_each_defect_is_one_line_naming_the_file(good_file: Path, name: str, damage, message: str) -> None:
    good_file.write_bytes(damage(good_file.read_bytes()))
    with pytest.raises(Exception) as raw:  # the fault is real: safetensors itself cannot read the file
        load_file(str(good_file))
    assert not isinstance(raw.value, CheckpointError)
    with pytest.raises(CheckpointError) as caught:
        open_safetensors(good_file)
    text = str(caught.value)
    assert text.startswith(f"{good_file}: ") and message in text and "\n" not in text, text


def _standalone(tmp_path: Path) -> Path:
    _, full = reference_model(seed=2)
    write_glm_files(tmp_path / "glm", full, tp=1)
    out = tmp_path / "st"
    convert_checkpoint(tmp_path / "glm", out, ConvertOptions(num_attention_heads=4, format="safetensors"), log=print)
    load_pretrained(out)  # sound before it is damaged
    return out


def test_loaders_report_a_damaged_export(tmp_path: Path) -> None:
    st = _standalone(tmp_path)
    weights = st / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=rf"^{weights}: corrupt safetensors file: truncated"):
        load_pretrained(st)
    with pytest.raises(CheckpointError, match=rf"^{weights}: corrupt safetensors file: truncated"):
        convert_checkpoint(st, tmp_path / "x", ConvertOptions(num_attention_heads=4, format="native"), log=print)


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tool", "defect"),
    [
        ("convert", "truncated-body"),
        ("convert", "bad-json"),
        ("generate", "huge-header-length"),
        ("generate", "bad-dtype"),
    ],
)
def test_tools_print_one_line(tmp_path: Path, tool: str, defect: str) -> None:
    st = _standalone(tmp_path)
    _, damage, message = next(d for d in DEFECTS if d[0] == defect)
    weights = st / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    if tool == "convert":
        proc = _tool("tools/convert_checkpoint.py", "--input", str(st), "--output", str(tmp_path / "o"))
    else:
        proc = _tool("tools/generate.py", "--load", str(st), "--prompt", "a [MASK] b", "--max-new-tokens", "2")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith(f"error: {weights}: corrupt safetensors file: ") and message in lines[-1], lines
    assert "Traceback" not in proc.stderr and "SafetensorError" not in proc.stderr
    assert not (tmp_path / "o").exists()
