"""Issue 25's last acceptance point: a tiny random ``Glm4MoeForCausalLM`` saved by transformers imports, reshards
through TP=2 x EP=2 with the converter (then EP 2 -> 1 -> 4), exports to the native transformers layout, loads in
transformers without remote code with the original's logits (fp32, < 1e-5); our model loaded at EP=2 on two gloo
processes from the TP=2 x EP=2 checkpoint gives transformers' logits too (forward only)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_glm.checkpoint.convert import open_source
from megatron_glm.checkpoint.experts import expert_file
from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.checkpoint.weights import load_glm_model
from megatron_glm.errors import CheckpointError
from megatron_glm.parallel import initialize_parallel_state
from megatron_glm.testing import run_distributed
from tests.checkpoint.test_hf_glm4moe import EXPERTS, IDS, _stored, convert, hf_logits, release  # noqa: F401

pytest.importorskip("transformers")


def _ep_logits(rank: int, world: int, ckpt: str) -> dict:
    ps = initialize_parallel_state(tp_size=1, ep_size=world)
    src = open_source(ckpt)
    model, _ = load_glm_model(src.info.config, src, ps, seed=0)
    local = {n: tuple(p.shape) for n, p in model.named_parameters() if "mlp.experts." in n}
    b, n = IDS.shape
    pos = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)]).expand(b, 2, n)
    with torch.no_grad():
        logits = model.eval()(IDS, pos, torch.zeros(b, dtype=torch.long))
    return {"logits": logits, "local": local, "ep": (ps.ep_size, ps.ep_rank)}


def test_release_reshards_through_tp2_ep2_and_exports_back(release: Path, tmp_path: Path) -> None:  # noqa: F811
    want = hf_logits(release)
    theirs = load_file(release / "model.safetensors")
    ep2 = tmp_path / "tp2_ep2"
    convert(release, ep2, format="native", target_tp=2, target_ep=2, target_dp=2)
    src = open_source(ep2)
    assert (src.info.tp, src.info.meta["layout"].get("ep")) == (2, 2)
    step = Path(src.info.path)
    name = "transformer.layers.1.mlp.experts.dense_h_to_4h.weight"
    for t in range(2):
        for e in range(2):  # each expert shard holds its half of the experts, its TP half of the packed SwiGLU
            shard = safe_torch_load(step / expert_file((0, t, e, 0)))[name]
            assert tuple(shard.shape) == (EXPERTS // 2, 2 * 16 // 2, 32)
            up = theirs[f"model.layers.1.mlp.experts.{2 * e + 1}.up_proj.weight"]
            assert torch.equal(shard[1, 8:], up.chunk(2, dim=0)[t])
    full = src.tensor(name)
    assert torch.equal(full[3, 16:], theirs["model.layers.1.mlp.experts.3.up_proj.weight"])

    # our model at EP=2 on two processes, loaded from the TP=2 x EP=2 checkpoint: transformers' logits
    results = run_distributed(_ep_logits, 2, str(ep2))
    assert [r["ep"] for r in results] == [(2, 0), (2, 1)]
    assert results[0]["local"][name] == (EXPERTS // 2, 2 * 16, 32)  # each rank builds half the experts
    for r in results:
        assert (r["logits"] - want).abs().max().item() < 1e-5

    # EP 2 -> 1 at TP=2, then export: the original's tensors bitwise and logits
    ep1 = tmp_path / "tp2_ep1"
    convert(ep2, ep1, format="native", target_tp=2, target_ep=1)
    assert "ep" not in open_source(ep1).info.meta["layout"]
    assert not (Path(open_source(ep1).info.path) / "experts").exists()
    ep4 = tmp_path / "tp1_ep4"  # and 1 -> 4 (one expert per rank), TP 2 -> 1
    convert(ep1, ep4, format="native", target_tp=1, target_ep=4, target_dp=4)
    assert len(list((Path(open_source(ep4).info.path) / "experts").glob("*.pt"))) == 4
    for source in (ep2, ep1, ep4):
        out = tmp_path / f"export_{source.name}"
        convert(source, out, format="hf")
        ours = _stored(out)
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        assert "auto_map" not in (out / "config.json").read_text()
        assert (hf_logits(out) - want).abs().max().item() < 1e-5


def test_a_pipeline_stage_without_moe_layers_is_refused(release: Path, tmp_path: Path) -> None:  # noqa: F811
    """4 layers over 4 stages leave stage 0 the one dense layer (first_k_dense_replace 1): training with expert
    parallelism refuses that layout (config.validate's rule), so the converter refuses it before writing (was
    written)."""
    match = (
        r"^--target-pp 4 --target-ep 2: pipeline stage 0 would hold dense layers only \(1 layers, "
        r"first_k_dense_replace 1\), which training with expert parallelism refuses; use fewer stages$"
    )
    with pytest.raises(CheckpointError, match=match):
        convert(release, tmp_path / "pp4_ep2", format="native", target_pp=4, target_ep=2, target_dp=2)
    assert not list(tmp_path.iterdir())


def test_an_inconsistent_shard_is_one_line(release: Path, tmp_path: Path) -> None:  # noqa: F811
    """An expert shard of the wrong shape or not a dict of tensors, a model tensor of the wrong shape (the manifest
    consistent: written so) were a bare RuntimeError / AttributeError; now one line naming the file or step, the
    tensor and the shape wanted."""
    from megatron_glm.checkpoint.manifest import write_manifest

    ep2 = tmp_path / "ep2"
    convert(release, ep2, format="native", target_ep=2, target_dp=2)
    step = ep2 / "global_step0"
    shard = step / expert_file((0, 0, 1, 0))
    saved = safe_torch_load(shard)
    name = next(n for n in saved if n.endswith("dense_h_to_4h.weight"))
    torch.save({**saved, name: torch.zeros(3, *saved[name].shape[1:])}, shard)
    write_manifest(step, step.name)
    wanted = re.escape(f"has shape [3, 32, 32], expected {[EXPERTS // 2, *saved[name].shape[1:]]} (tp=1 ep=2)")
    with pytest.raises(CheckpointError, match=rf"pp00_tp00_ep01\.pt: {re.escape(name)} {wanted}$"):
        convert(ep2, tmp_path / "out", format="hf")
    torch.save([1, 2], shard)
    write_manifest(step, step.name)
    with pytest.raises(
        CheckpointError, match=r"pp00_tp00_ep01\.pt: not an expert shard \(a dict of tensors by name\)$"
    ):
        convert(ep2, tmp_path / "out", format="hf")
    # ... and the model-states file: a tensor of another shape than meta.json's config gives (a bare RuntimeError
    # from the export's split before)
    model_file = step / "mp_rank_00_model_states.pt"
    states = safe_torch_load(model_file)
    qkv = "transformer.layers.0.attention.query_key_value.weight"
    states["module"][qkv] = torch.zeros(5, 32)
    torch.save(states, model_file)
    torch.save(saved, shard)
    write_manifest(step, step.name)
    match = rf"global_step0: {re.escape(qkv)} has shape \[5, 32\], expected \[64, 32\] \(meta\.json's config\)$"
    with pytest.raises(CheckpointError, match=match):
        convert(ep2, tmp_path / "out", format="hf")
