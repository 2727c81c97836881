"""The checkpoint-format registry: detection picks the format of every kind of folder; unknown ones and unknown
format names are one-line errors listing the known formats; the converter's choices are the registry's."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint
from megatron_glm.checkpoint.formats.registry import FORMATS, REGISTRY, detect_format, format_named, open_source
from megatron_glm.errors import CheckpointError
from tests.checkpoint.helpers import reference_model, write_glm_files
from tests.checkpoint.test_release_layouts import (
    chatglm6b_config,
    chatglm6b_tensors,
    sat_config,
    sat_ranks,
    write_hf_folder,
    write_sat_folder,
)

QUIET = lambda *_: None


def _convert(src: Path, dst: Path, fmt: str) -> Path:
    convert_checkpoint(src, dst, ConvertOptions(format=fmt, num_attention_heads=4), log=QUIET)
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder of every registered format (universal: a native step directory whose meta.json says so; its
    manifest no longer matches, so only the step directory itself is that format's stand-in)."""
    root = tmp_path_factory.mktemp("formats")
    _, full = reference_model(seed=2)
    out = {"glm": root / "glm"}
    write_glm_files(out["glm"], full, tp=2)
    out["native"] = _convert(out["glm"], root / "native", "native")
    out["safetensors"] = _convert(out["glm"], root / "safetensors", "safetensors")
    out["hf"] = write_hf_folder(root / "hf", chatglm6b_config(), chatglm6b_tensors(1), "safetensors")
    out["sat"] = write_sat_folder(root / "sat", sat_ranks(3), sat_config())
    step = root / "universal" / "global_step0"
    shutil.copytree(out["native"] / "global_step0", step)
    meta = json.loads((step / "meta.json").read_text())
    (step / "meta.json").write_text(json.dumps({**meta, "format": "universal"}))
    out["universal"] = step
    out["peft"] = root / "peft"  # written from a LoRA run (tests/checkpoint/test_peft_export.py); detected only
    out["peft"].mkdir()
    (out["peft"] / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return out


def test_every_registered_format_has_a_fixture_and_a_converter_choice(folders: dict[str, Path]) -> None:
    assert set(folders) == set(FORMATS) and len(FORMATS) == len(REGISTRY)
    field = next(f for f in dataclasses.fields(ConvertOptions) if f.name == "format")
    assert tuple(field.metadata["choices"]) == FORMATS
    assert all(f"{fmt.name}: {fmt.help}" in field.metadata["help"] for fmt in REGISTRY)


@pytest.mark.parametrize("name", FORMATS)
def test_detect_picks_the_format_of_each_folder(folders: dict[str, Path], name: str) -> None:
    assert detect_format(folders[name]).name == name
    if name == "peft":  # adapters, not a model: opening one says how to use it
        with pytest.raises(CheckpointError, match=r"peft LoRA adapters, not a model: load them .* PeftModel"):
            open_source(folders[name])
    elif name != "universal":  # the stand-in holds no optimizer state to open
        src = open_source(folders[name], num_attention_heads=4)
        assert src.info.format == name and src.names()


def test_a_step_directory_is_detected_like_its_save_directory(folders: dict[str, Path]) -> None:
    assert detect_format(folders["native"] / "global_step0").name == "native"


def test_unknown_folders_and_names_are_one_line_errors_listing_the_formats(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError) as caught:
        detect_format(tmp_path / "junk")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'junk'}: not a checkpoint we can read") and "\n" not in message
    assert f"known formats: {', '.join(FORMATS)}" in message
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        detect_format(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=f"unknown format 'onnx' \\(choose from {', '.join(FORMATS)}\\)"):
        format_named("onnx")


def test_hf_layout_with_another_format_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    opts = ConvertOptions(format="safetensors", hf_layout="GlmForCausalLM")
    with pytest.raises(CheckpointError) as caught:
        convert_checkpoint(folders["native"], tmp_path / "out", opts)
    assert str(caught.value) == "--hf-layout GlmForCausalLM: only the hf format has layouts (got --format safetensors)"
    assert not (tmp_path / "out").exists()
