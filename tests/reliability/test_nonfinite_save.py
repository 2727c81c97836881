"""NaN weights are never saved and never make good checkpoints be pruned (issue 27's reproduction)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint import list_checkpoints, safe_torch_load, verify_checkpoint
from tests.training.conftest import launch, train_args

pytestmark = pytest.mark.slow


def test_resume_at_a_huge_lr_keeps_the_finite_checkpoints(tiny_corpus, tmp_path: Path) -> None:
    save = tmp_path / "run"
    args = train_args(tiny_corpus, "--save", str(save), "--save-interval", "5", "--checkpoint.keep_last", "2")
    launch([*args, "--train-iters", "20"], launcher="python")
    assert list_checkpoints(save) == ["global_step20", "global_step15"]
    proc = launch([*args, "--train-iters", "60", "--load", str(save), "--lr", "1e30"], launcher="python", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    # The first save point after the weights went bad (step 25) stops the run, naming the step.
    assert re.fullmatch(
        r"error: step 25: the model weights (and optimizer state )?hold NaN or inf; not saving global_step25 and "
        r"removing no checkpoint \(latest stays on global_step20\); lower the learning rate or check the data, "
        r"then resume",
        last,
    ), proc.stderr[-3000:]
    assert "saved checkpoint" not in proc.stdout
    assert list_checkpoints(save) == ["global_step20", "global_step15"]  # nothing written, nothing pruned
    assert (save / "latest").read_text() == "global_step20"
    for tag in ("global_step15", "global_step20"):
        assert verify_checkpoint(save / tag) is None
        module = safe_torch_load(save / tag / "mp_rank_00_model_states.pt")["module"]
        assert all(torch.isfinite(t).all() for t in module.values() if torch.is_tensor(t))
