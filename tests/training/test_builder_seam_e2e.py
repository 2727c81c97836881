"""Issue 23's acceptance: an option added by touching a builder and the config only (``tests/model/fake_option.py``:
``--model.extra_options extra_norm`` makes the MLP builder declare an extra TP-replicated per-layer norm and apply
it) trains under ZeRO-3, the checkpoint records it (a contradicting command line is refused by name, a format that
cannot hold it refuses it), and ZeRO-3 consolidation, TP resharding, PP conversion and the standalone export carry
its tensors, bitwise."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_glm.checkpoint.architecture import adopt_checkpoint_architecture
from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint, open_source
from megatron_glm.checkpoint.formats.native import NativeSource, layer_file
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.config import load_config
from megatron_glm.errors import CheckpointError, ConfigError
from megatron_glm.model import ModelLayout, builders
from tests.model.fake_option import EXTRA, OPTION, fake_slots
from tests.training.conftest import PY, ROOT, metrics, train_args

pytestmark = pytest.mark.slow


def _train(args: list[str], nproc: int) -> None:
    from megatron_glm.testing import find_free_port

    torchrun = str(Path(PY).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(find_free_port())]
    cmd += [str(ROOT / "tests" / "training" / "fake_option_pretrain.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_an_option_added_through_a_builder_is_carried_everywhere(
    tiny_corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "z3"
    zero3 = ["--deepspeed_config", str(ROOT / "ds_configs" / "zero3.json")]
    option = ["--model.extra_options", OPTION]
    _train(
        train_args(tiny_corpus, "--train-iters", "3", "--micro-batch-size", "2", *zero3, *option, "--save", str(run)), 2
    )
    assert sorted(metrics(run)) == [1, 2, 3]
    monkeypatch.setattr(builders, "LAYER_SLOTS", fake_slots())  # this process reads and converts with the option
    # the checkpoint records the option: a reader adopts it, a command line without it is refused by name
    restated = load_config(["--load", str(run), "--model.extra_options", "other", "--model.extra_options", "x"])
    with pytest.raises(
        ConfigError, match=r"extra_options: checkpoint \['extra_norm'\] vs command line \['other', 'x'\]"
    ):
        adopt_checkpoint_architecture(restated, log=lambda _: None)
    assert adopt_checkpoint_architecture(load_config(["--load", str(run)]), log=lambda _: None).model.extra_options == [
        OPTION
    ]
    with pytest.raises(CheckpointError, match=r"extra_options = \['extra_norm'\] \(this layout: \[\]\)"):
        convert_checkpoint(run, tmp_path / "hf", ConvertOptions(format="hf"), log=lambda *_: None)

    def convert(src: Path, dst: str, **kw: object) -> None:
        convert_checkpoint(src, tmp_path / dst, ConvertOptions(**kw), log=lambda *_: None)

    # ZeRO-3 consolidation (and TP 1 -> 2): the fp32 weights DeepSpeed's own tool gathers, the extra norms included
    convert(run, "full", target_tp=2, target_dp=1, verify_logits=True)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    reference = get_fp32_state_dict_from_zero_checkpoint(str(run))
    full = NativeSource(tmp_path / "full")
    layout = ModelLayout(full.info.config)
    extra = [n for n in layout.names() if f".{EXTRA}." in n]
    assert len(extra) == 2 * full.info.config.num_layers  # weight and bias (LayerNorm), every layer
    assert sorted(full.names()) == sorted(layout.names()) == sorted(reference)
    assert all(torch.equal(full.tensor(n), reference[n]) for n in full.names())
    assert not torch.equal(reference[extra[0]], torch.ones_like(reference[extra[0]]))  # trained
    # TP resharding and PP conversion: the replicated norm sits whole on every rank of its pipe layer's stage
    convert(tmp_path / "full", "pp2", target_tp=2, target_pp=2, target_dp=1, verify_logits=True)
    step = next((tmp_path / "pp2").glob("global_step*"))
    pipe = layout[extra[-1]].pipe_layer
    for tp_rank in range(2):
        held = safe_torch_load(layer_file(step, pipe, tp_rank))
        assert torch.equal(held[extra[-1]], reference[extra[-1]])
    # back to one stage, then the standalone export
    convert(tmp_path / "pp2", "pp1", target_tp=1, target_pp=1, target_dp=1)
    convert(tmp_path / "pp1", "st", format="safetensors")
    st = open_source(tmp_path / "st")
    assert st.names() == layout.names() and all(torch.equal(st.tensor(n), reference[n]) for n in st.names())
