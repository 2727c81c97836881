"""Whether a run can load a checkpoint as saved: its layout (tp, pp, dp, ep, ...) and format against the run's,
refused in one line that names the command making it loadable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_glm.errors import CheckpointError


def convert_hint(path: Path, expect: dict[str, Any]) -> str:
    """The exact command that makes checkpoint ``path`` loadable by a run of layout ``expect``."""
    out = f"{path.parent}_universal"
    if expect.get("pp", 1) == 1:
        return (
            f"convert it once (optimizer state included) with: python tools/convert_checkpoint.py --input {path} "
            f"--output {out} --format universal, then resume with --load {out}"
        )
    out = f"{path.parent}_tp{expect.get('tp', 1)}pp{expect['pp']}dp{expect.get('dp', 1)}"
    return (
        f"pipeline runs load only their own layout: python tools/convert_checkpoint.py --input {path} --output "
        f"{out} --format native --target-tp {expect.get('tp', 1)} --target-pp {expect['pp']} --target-dp "
        f"{expect.get('dp', 1)} writes the weights (the optimizer starts afresh), then resume with --load {out} "
        f"--checkpoint.load_weights_only true"
    )


def universal_loadable(engine: Any, path: Path, expect: dict[str, Any]) -> None:
    """Refuse, in one line, a run that DeepSpeed cannot load a universal checkpoint into."""
    if expect.get("pp", 1) > 1:
        raise CheckpointError(
            f"{path}: a universal checkpoint resumes runs without pipeline parallelism; " + convert_hint(path, expect)
        )
    if engine.zero_optimization_stage() not in (1, 2):
        raise CheckpointError(
            f"{path}: a universal checkpoint loads into ZeRO stage 1 or 2 (this run has stage "
            f"{engine.zero_optimization_stage()}); pass --zero-stage 1"
        )


def check_resumable(engine: Any, path: Path, meta: dict[str, Any], expect: dict[str, Any] | None) -> bool:
    """Refuse, in one line, a checkpoint this run cannot resume from (weights only, another layout, a universal
    one DeepSpeed cannot load here); whether it is a universal checkpoint."""
    layout = meta.get("layout", {})
    if meta.get("weights_only"):
        raise CheckpointError(
            f"{path}: holds model weights only (converted without optimizer state); "
            f"start from it with --checkpoint.load_weights_only true"
        )
    universal = meta.get("format") == "universal"
    if universal:
        universal_loadable(engine, path, expect or {})
    else:
        for key, want in (expect or {}).items():
            saved = layout.get(key, {"ep": 1, "dp_x_cp": layout.get("dp", want)}.get(key, want))  # unsplit
            if saved != want:
                hint = "resume with that expert-parallel size" if key == "ep" else convert_hint(path, expect)
                raise CheckpointError(f"{path}: saved with {key}={saved} but this run has {key}={want}; {hint}")
    return universal
