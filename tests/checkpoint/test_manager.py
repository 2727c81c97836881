"""Checkpoint manager: atomic layout, latest, keep-last, verification and fallback, safe loading."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from megatron_glm import fileio
from megatron_glm.checkpoint import (
    CheckpointManager,
    list_checkpoints,
    safe_checkpoint_engine,
    safe_torch_load,
    verify_checkpoint,
)
from megatron_glm.errors import CheckpointError
from megatron_glm.fileio import file_sha256
from megatron_glm.testing import run_distributed


class FakeEngine:
    """Stands in for a DeepSpeed engine: one state file per tag, loaded safely."""

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert save_latest is False
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.full((4,), self.value)}}, d / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str | None, dict]:
        state = safe_torch_load(Path(load_dir) / tag / "mp_rank_00_model_states.pt")
        self.value = float(state["module"]["w"][0])
        return str(Path(load_dir) / tag), {}


def _save(mgr: CheckpointManager, step: int) -> Path:
    return mgr.save(
        FakeEngine(float(step)), step, {"step": step, "layout": {"tp": 1}}, {"torch": torch.get_rng_state()}
    )


def test_save_layout_latest_and_keep_last(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2, log=lambda _: None)
    for step in (10, 20, 30):
        path = _save(mgr, step)
    assert path == tmp_path / "global_step30"
    assert (tmp_path / "latest").read_text() == "global_step30"
    assert list_checkpoints(tmp_path) == ["global_step30", "global_step20"]  # global_step10 pruned
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"mp_rank_00_model_states.pt", "rng/rank00000.pt", "meta.json"}
    assert verify_checkpoint(path) is None
    engine = FakeEngine()
    meta, rng = mgr.load(engine, tmp_path, expect={"tp": 1})
    assert meta["step"] == 30 and engine.value == 30.0 and torch.equal(rng["torch"], torch.get_rng_state())


def test_truncated_newest_falls_back_to_previous(tmp_path: Path) -> None:
    logs: list[str] = []
    mgr = CheckpointManager(tmp_path, log=logs.append)
    _save(mgr, 1)
    newest = _save(mgr, 2)
    f = newest / "mp_rank_00_model_states.pt"
    os.truncate(f, f.stat().st_size // 2)
    assert "truncated" in verify_checkpoint(newest)
    engine = FakeEngine()
    meta, _ = mgr.load(engine, tmp_path)
    assert meta["step"] == 1 and engine.value == 1.0
    assert any("skipping checkpoint global_step2" in line and "truncated" in line for line in logs)


def test_corrupt_same_size_and_incomplete(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, log=lambda _: None)
    only = _save(mgr, 5)
    f = only / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert "sha256" in verify_checkpoint(only)
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*corrupt"):
        mgr.load(FakeEngine(), tmp_path)
    (tmp_path / "global_step6").mkdir()  # a directory without a manifest is incomplete
    assert "incomplete checkpoint" in verify_checkpoint(tmp_path / "global_step6")


def test_layout_mismatch_and_empty_dir(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, log=lambda _: None)
    assert mgr.load(FakeEngine(), tmp_path / "nothing") is None
    _save(mgr, 3)
    with pytest.raises(
        CheckpointError, match="saved with tp=1 but this run has tp=2; convert it once .* --format universal"
    ):
        mgr.load(FakeEngine(), tmp_path, expect={"tp": 2})


def test_safe_load_refuses_code(tmp_path: Path) -> None:
    bad = tmp_path / "evil.pt"
    torch.save({"x": collections.OrderedDict(a=1), "obj": FakeEngine()}, bad)
    with pytest.raises(CheckpointError, match="evil.pt: refused: it would import and run "):
        safe_torch_load(bad)
    trunc = tmp_path / "t.pt"
    torch.save({"w": torch.zeros(1000)}, trunc)
    os.truncate(trunc, 100)
    with pytest.raises(CheckpointError, match="t.pt: truncated or corrupt"):
        safe_torch_load(trunc)


class NaNEngine(FakeEngine):
    """A FakeEngine with a module and a torch optimizer whose weights or Adam moment went non-finite."""

    def __init__(self, where: str) -> None:
        super().__init__(float("nan"))
        self.module = torch.nn.Linear(2, 2)
        self.optimizer = torch.optim.Adam(self.module.parameters())
        self.module(torch.ones(1, 2)).sum().backward()
        self.optimizer.step()
        with torch.no_grad():
            if where == "weights":
                self.module.weight[0, 0] = float("nan")
            else:
                self.optimizer.state[self.module.bias]["exp_avg_sq"][1] = float("inf")


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_nonfinite_state_is_never_saved_nor_prunes(tmp_path: Path, where: str) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2, log=lambda _: None)
    for step in (10, 20):
        _save(mgr, step)
    finite = NaNEngine(where)
    with torch.no_grad():  # the same engine, made finite again, saves (the check itself passes good state)
        finite.module.weight.nan_to_num_(0.0)
        for st in finite.optimizer.state.values():
            st["exp_avg_sq"].nan_to_num_(posinf=0.0)
    finite.value = 25.0
    mgr.save(finite, 25, {"step": 25}, {})
    assert list_checkpoints(tmp_path) == ["global_step25", "global_step20"]
    part = "model weights" if where == "weights" else "optimizer state"
    with pytest.raises(CheckpointError, match=rf"^step 30: the {part} hold NaN or inf; not saving global_step30 .*"):
        mgr.save(NaNEngine(where), 30, {"step": 30}, {})
    assert list_checkpoints(tmp_path) == ["global_step25", "global_step20"]  # nothing written, nothing pruned
    assert (tmp_path / "latest").read_text() == "global_step25"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


class WriterEngine(FakeEngine):
    """Each rank writes its own state file through our DeepSpeed checkpoint engine, as DeepSpeed's engine does."""

    def __init__(self) -> None:
        super().__init__()
        self.checkpoint_engine = safe_checkpoint_engine()

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        state = {"w": torch.full((1 << 16,), float(dist.get_rank()))}
        self.checkpoint_engine.save(state, str(d / f"rank{dist.get_rank()}_states.pt"))

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str | None, dict]:
        return str(Path(load_dir) / tag), {}


def _save_and_load_on_two_ranks(rank: int, world: int, directory: str) -> dict[str, list[str]]:
    """The files each rank hashed (read back) while saving, then while loading."""
    reads: list[str] = []
    original = fileio.hash_file

    def spy(h: Any, path: Any) -> Any:
        reads.append(str(Path(path).relative_to(Path(directory))))
        return original(h, path)

    fileio.hash_file = spy
    mgr = CheckpointManager(directory, log=lambda _: None)
    mgr.save(WriterEngine(), 1, {"step": 1}, {"torch": torch.get_rng_state()})
    saving = list(reads)
    reads.clear()
    meta, _ = mgr.load(WriterEngine(), directory)
    assert meta["step"] == 1
    return {"save": saving, "load": list(reads)}


def test_files_are_hashed_by_the_rank_that_writes_them(tmp_path: Path) -> None:
    """Issue 29: rank 0 used to read every rank's files back to hash them while the others waited (and again
    at load). Now each writer hashes its bytes as it writes them; loading shares the hashing out."""
    reads = run_distributed(_save_and_load_on_two_ranks, 2, str(tmp_path))
    step = tmp_path / "global_step1"
    manifest = json.loads((step / "manifest.json").read_text())["files"]
    assert set(manifest) == {"rank0_states.pt", "rank1_states.pt", "rng/rank00000.pt", "rng/rank00001.pt", "meta.json"}
    for rel, info in manifest.items():  # the writers' digests are the files' true ones
        assert info["sha256"] == file_sha256(step / rel) and info["size"] == (step / rel).stat().st_size
    # Saving: no rank reads a state file back; rank 0 hashes only meta.json, which it wrote outside the engine.
    assert reads[0]["save"] == [".tmp.global_step1/meta.json"] and reads[1]["save"] == []
    # Loading: each file hashed once, by one of the two ranks, each taking a share.
    loaded = reads[0]["load"] + reads[1]["load"]
    assert sorted(loaded) == sorted(f"global_step1/{rel}" for rel in manifest)
    assert reads[0]["load"] and reads[1]["load"]
