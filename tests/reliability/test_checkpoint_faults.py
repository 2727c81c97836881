"""Checkpoint faults: corruption, missing ``latest``, unwritable or full disks, kills mid-write and mid-prune,
malicious pickles. The previous good checkpoint always survives, and the user reads one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_glm.checkpoint import CheckpointManager, check_save_dir, list_checkpoints, verify_checkpoint
from megatron_glm.checkpoint.formats.glm_original import GLMOriginalSource
from megatron_glm.checkpoint.manager import write_manifest
from megatron_glm.checkpoint.safe_load import safe_checkpoint_engine, safe_torch_load
from megatron_glm.errors import CheckpointError
from tests.checkpoint.test_manager import FakeEngine
from tests.data.conftest import REPO_ROOT
from tests.reliability.conftest import tmpfs


def _save(mgr: CheckpointManager, step: int, engine: FakeEngine | None = None) -> Path:
    return mgr.save(
        engine or FakeEngine(float(step)), step, {"step": step, "layout": {"tp": 1}}, {"torch": torch.get_rng_state()}
    )


def _steps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "latest")


class BigEngine(FakeEngine):
    """Writes ``numel`` fp32 values per checkpoint (to fill a small disk)."""

    def __init__(self, value: float, numel: int) -> None:
        super().__init__(value)
        self.numel = numel

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.full((self.numel,), self.value)}}, d / "mp_rank_00_model_states.pt")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_falls_back_and_prune_keeps_the_good_one(tmp_path, damage):
    """Size (truncated) and sha256 (one flipped byte) are both caught; pruning never counts a corrupt checkpoint
    as kept, so after the fallback the good step-5 checkpoint survives and the corrupt step-10 one goes."""
    logs: list[str] = []
    mgr = CheckpointManager(tmp_path, keep_last=2, log=logs.append)
    _save(mgr, 5)
    ten = _save(mgr, 10)
    f = ten / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    resumed = CheckpointManager(tmp_path, keep_last=2, log=logs.append)
    engine = FakeEngine()
    meta, _ = resumed.load(engine, tmp_path)
    assert meta["step"] == 5 and engine.value == 5.0
    assert any("skipping checkpoint global_step10" in line for line in logs)
    _save(resumed, 12)
    assert _steps(tmp_path) == ["global_step12", "global_step5"]
    assert verify_checkpoint(tmp_path / "global_step5") is None
    assert "removing corrupt checkpoint global_step10" in logs


def test_missing_latest_is_reported(tmp_path):
    logs: list[str] = []
    mgr = CheckpointManager(tmp_path, log=logs.append)
    _save(mgr, 1)
    _save(mgr, 2)
    (tmp_path / "latest").unlink()
    meta, _ = mgr.load(FakeEngine(), tmp_path)
    assert meta["step"] == 2
    assert f"warning: {tmp_path / 'latest'} is missing; using the newest complete checkpoint, global_step2" in logs
    (tmp_path / "latest").write_text("global_step9")
    mgr.load(FakeEngine(), tmp_path)
    assert (
        f"warning: {tmp_path / 'latest'} names 'global_step9', which is not a complete checkpoint; using "
        "global_step2" in logs
    )


def test_read_only_save_directory(tmp_path):
    ro = tmp_path / "ro"
    with tmpfs(ro, size="1m", read_only=True):
        with pytest.raises(CheckpointError, match=rf"^--save {ro}: cannot write there \(Read-only file system\)$"):
            check_save_dir(ro)
        with pytest.raises(CheckpointError, match=r"cannot write there \(Read-only file system\)"):
            _save(CheckpointManager(ro, log=lambda _: None), 1)
        with pytest.raises(CheckpointError, match=r"sub: cannot write there \(Read-only file system\)"):
            check_save_dir(ro / "sub")


def test_full_disk_keeps_the_previous_checkpoint_and_removes_the_partial_one(tmp_path):
    disk = tmp_path / "disk"
    with tmpfs(disk, size="3m"):
        mgr = CheckpointManager(disk, log=lambda _: None)
        _save(mgr, 1, BigEngine(1.0, 300_000))  # 1.2 MB
        with pytest.raises(CheckpointError) as info:
            _save(mgr, 2, BigEngine(2.0, 500_000))  # 2 MB more does not fit
        message = str(info.value)
        names = _steps(disk)
        latest = (disk / "latest").read_text()
        intact = verify_checkpoint(disk / "global_step1")
    assert message == (
        f"cannot save checkpoint global_step2 in {disk}: the disk is full (no space left on device); "
        f"removed the partial .tmp.global_step2, the previous checkpoint global_step1 is intact"
    )
    assert names == ["global_step1"] and latest == "global_step1" and intact is None


_CHILD = """
import os, signal, sys, time, shutil
from pathlib import Path
import torch
sys.path.insert(0, {root!r})
from megatron_glm.checkpoint import CheckpointManager
from tests.checkpoint.test_manager import FakeEngine
d = Path(sys.argv[1]); mode = sys.argv[2]
class Slow(FakeEngine):
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        super().save_checkpoint(save_dir, tag, client_state, save_latest)
        if self.value == 2.0:
            (Path(save_dir) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
            time.sleep(60)  # killed here, mid-write
real_rmtree = shutil.rmtree
def dying_rmtree(path, *a, **k):
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    files[0].unlink()  # part of the checkpoint is gone ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... when the process is killed
mgr = CheckpointManager(d, keep_last=1, log=lambda _l: None)
mgr.save(FakeEngine(1.0), 1, {{"step": 1}}, {{}})
print("saved", flush=True)
if mode == "prune":
    shutil.rmtree = dying_rmtree
mgr.save(Slow(2.0), 2, {{"step": 2}}, {{}})
"""


def test_kill_during_a_checkpoint_write_never_exposes_it(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=str(REPO_ROOT)))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ck"), "write"], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (tmp_path / "ck" / ".tmp.global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = tmp_path / "ck"
    assert (ck / "latest").read_text() == "global_step1" and list_checkpoints(ck) == ["global_step1"]
    engine = FakeEngine()
    meta, _ = CheckpointManager(ck, log=lambda _: None).load(engine, ck)
    assert meta["step"] == 1 and engine.value == 1.0
    _save(CheckpointManager(ck, log=lambda _: None), 3)  # the next save clears the leftover
    assert _steps(ck) == ["global_step1", "global_step3"] or _steps(ck) == ["global_step3"]
    assert not any(p.name.startswith(".tmp") for p in ck.iterdir())


def test_kill_during_pruning_leaves_no_half_deleted_checkpoint(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=str(REPO_ROOT)).replace("time.sleep(60)", "pass"))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ck"), "prune"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ck = tmp_path / "ck"
    # global_step1 was renamed away before the deletion began: what is left under a final name is complete.
    assert list_checkpoints(ck) == ["global_step2"] and verify_checkpoint(ck / "global_step2") is None
    assert [p.name for p in ck.iterdir() if p.name.startswith(".trash.global_step1")]
    _save(CheckpointManager(ck, keep_last=1, log=lambda _: None), 3)
    assert _steps(ck) == ["global_step3"]


class Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_is_refused_by_every_loader(tmp_path):
    sentinel = tmp_path / "pwned"
    expected = r"refused: it would import and run (posix|os)\.system; a checkpoint must hold only tensors"
    # Ours.
    evil = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "x": Evil(sentinel)}, evil)
    with pytest.raises(CheckpointError, match=expected) as info:
        safe_torch_load(evil)
    assert "weights_only" not in str(info.value) and "False" not in str(info.value)
    # DeepSpeed's engine reads through our checkpoint engine.
    with pytest.raises(CheckpointError, match=expected):
        safe_checkpoint_engine().load(str(evil))
    # The original-GLM import.
    glm = tmp_path / "glm" / "1"
    glm.mkdir(parents=True)
    torch.save(
        {"module": {"word_embeddings.weight": torch.zeros(4, 2)}, "x": Evil(sentinel)},
        glm / "mp_rank_00_model_states.pt",
    )
    (tmp_path / "glm" / "latest_checkpointed_iteration.txt").write_text("1")
    with pytest.raises(CheckpointError, match=expected):
        GLMOriginalSource(tmp_path / "glm")
    # Our manager, with the manifest rewritten to match the malicious file: still refused (nothing loads).
    mgr = CheckpointManager(tmp_path / "ck", log=lambda _: None)
    step = _save(mgr, 1)
    torch.save({"module": {"w": torch.zeros(4)}, "x": Evil(sentinel)}, step / "rng" / "rank00000.pt")
    write_manifest(step, "global_step1")
    assert verify_checkpoint(step) is None
    with pytest.raises(CheckpointError, match="no checkpoint in .* could be loaded"):
        mgr.load(FakeEngine(), tmp_path / "ck")
    assert not sentinel.exists()
    json.loads((step / "manifest.json").read_text())


class UniversalLoadingEngine(FakeEngine):
    """Loads the way DeepSpeed 0.19's universal-checkpoint path does: ``zero/**/*.pt`` unpickled unrestricted."""

    def __init__(self) -> None:
        super().__init__()
        self._config = type("Config", (), {"load_universal_checkpoint": False})()

    def zero_optimization_stage(self) -> int:
        return 1

    def load_checkpoint(self, load_dir: str, tag: str, **kw: Any) -> tuple[str | None, dict]:
        if self._config.load_universal_checkpoint:
            for file in sorted((Path(load_dir) / tag / "zero").rglob("*.pt")):
                torch.load(file, weights_only=False)
        return super().load_checkpoint(load_dir, tag, **kw)


def test_malicious_pickle_in_a_universal_checkpoint_is_refused_before_deepspeed_reads_it(tmp_path):
    sentinel = tmp_path / "pwned"
    mgr = CheckpointManager(tmp_path / "ck", log=lambda _: None)
    step = mgr.save(
        FakeEngine(1.0), 1, {"step": 1, "layout": {"tp": 1}, "format": "universal"}, {"torch": torch.get_rng_state()}
    )
    (step / "zero" / "w").mkdir(parents=True)
    torch.save({"param": torch.zeros(4), "x": Evil(sentinel)}, step / "zero" / "w" / "exp_avg.pt")
    write_manifest(step, "global_step1")
    assert verify_checkpoint(step) is None
    with pytest.raises(CheckpointError, match="no checkpoint in .* could be loaded"):
        mgr.load(UniversalLoadingEngine(), tmp_path / "ck")
    assert not sentinel.exists()


def test_legacy_torch_format_is_read_not_called_corrupt(tmp_path):
    """A pre-1.6 (non-zip) torch file is data too: read (without mmap), not reported as truncated or corrupt."""
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(4.0)}, legacy, _use_new_zipfile_serialization=False)
    for mmap in (False, True):
        assert torch.equal(safe_torch_load(legacy, mmap=mmap)["w"], torch.arange(4.0))


@pytest.mark.slow
def test_read_only_save_directory_in_a_run(tiny_corpus, tmp_path):
    from tests.training.conftest import launch, train_args

    ro = tmp_path / "ro"
    with tmpfs(ro, size="1m", read_only=True):
        proc = launch(
            train_args(
                tiny_corpus,
                "--train-iters",
                "1",
                "--micro-batch-size",
                "2",
                "--global-batch-size",
                "2",
                "--save",
                str(ro / "run"),
            ),
            launcher="python",
            check=False,
        )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == f"error: --save {ro / 'run'}: cannot write there (Read-only file system)"
    assert "Traceback" not in proc.stderr
