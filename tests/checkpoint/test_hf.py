"""HuggingFace interop: export in THUDM's GLM layout, load with ``transformers`` (our remote code), import back.

Every ``transformers`` load runs offline (``HF_HUB_OFFLINE=1``) with its remote-code module cache under the
test's temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint, open_source
from megatron_glm.checkpoint.formats import hf as hf_format
from megatron_glm.checkpoint.weights import load_model_weights
from megatron_glm.data.corpus import pydoc_documents, write_jsonl
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.data.tokenizer_training import train_sentencepiece
from megatron_glm.errors import CheckpointError
from megatron_glm.generation import GenerationConfig, InfillTokens, encode_prompt, generate
from megatron_glm.model import GLMModel
from megatron_glm.parallel import initialize_parallel_state
from megatron_glm.testing import run_distributed
from tests.checkpoint.helpers import reference_model, write_glm_files
from tests.model.helpers import make_batch, tiny_config

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512  # rows; the test tokenizer has 411 tokens, so rows 411.. are padding
QUIET = lambda *_: None


@pytest.fixture(scope="module")
def transformers_offline(tmp_path_factory: pytest.TempPathFactory):
    """``transformers`` imported offline, its remote-code modules cached under a temporary directory."""
    cache = tmp_path_factory.mktemp("hf_modules")
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_MODULES_CACHE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(cache))
    import transformers
    import transformers.dynamic_module_utils as dmu

    old_cache = dmu.HF_MODULES_CACHE
    dmu.HF_MODULES_CACHE = str(cache)  # in case transformers was imported before this module
    yield transformers
    dmu.HF_MODULES_CACHE = old_cache
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small sentencepiece model (400 pieces; 411 tokens with the command tokens)."""
    d = tmp_path_factory.mktemp("hf_tok")
    write_jsonl(d / "c.jsonl", [{"id": t, "text": x} for t, x in list(pydoc_documents())[:8]])
    train_sentencepiece([str(d / "c.jsonl")], str(d / "tok"), 400, num_threads=1)
    return str(d / "tok.model")


def convert(src: Path, dst: Path, **kw: object):
    return convert_checkpoint(
        src, dst, ConvertOptions(num_attention_heads=4, **kw), log=QUIET, open_tokenizer=GLMTokenizer
    )


def export(tmp: Path, full: dict[str, torch.Tensor], spm: str, source: str = "tp2", **kw: object) -> Path:
    """Write ``full`` as an original-format TP=2 checkpoint (``source="pp2"``: then as a native PP=2 one) and
    export it with ``--format hf``."""
    write_glm_files(tmp / "glm", full, tp=2)
    src = tmp / "glm"
    if source == "pp2":
        convert(src, tmp / "pp2", format="native", target_pp=2)
        src = tmp / "pp2"
        assert open_source(src).info.pp == 2
    convert(src, tmp / "hf", format="hf", tokenizer_model=spm, **kw)
    return tmp / "hf"


@pytest.mark.parametrize("source", ["tp2", "pp2"])
def test_export_loads_with_transformers_and_logits_match(tmp_path, spm, transformers_offline, source) -> None:
    tf = transformers_offline
    model, full = reference_model(vocab_size=VOCAB)
    out = export(tmp_path, full, spm, source)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "glm" and cfg["architectures"] == ["GLMModel"]
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSeq2SeqLM", "AutoModelForMultipleChoice"}
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]) == (2, 64, 4, VOCAB)
    assert cfg["max_sequence_length"] == model.config.max_sequence_length and cfg["block_position_encoding"]
    assert cfg["layernorm_epsilon"] == model.config.layernorm_epsilon and cfg["torch_dtype"] == "float32"
    names = set(load_file(str(out / "model.safetensors")))
    assert names == {"glm." + n for n in full}  # THUDM's names in the task-head classes; no output head (tied)
    for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "modeling_glm.py"):
        assert (out / f).is_file(), f
    b = make_batch(1, vocab=VOCAB)
    with torch.no_grad():
        ours = model(b["input_ids"], b["position_ids"], b["sep"])
        ours_loss = model(b["input_ids"], b["position_ids"], b["sep"], labels=b["labels"], loss_mask=b["loss_mask"])
    config = tf.AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    assert config.num_hidden_layers == 2 and type(config).__name__ == "GLMConfig"
    lm = tf.AutoModelForSeq2SeqLM.from_pretrained(str(out), trust_remote_code=True).eval()
    bare = tf.AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(lm).__name__ == "GLMForConditionalGeneration" and type(bare).__name__ == "GLMModel"
    float_mask = (torch.arange(16).view(1, 1, 1, 16) < b["sep"].view(-1, 1, 1, 1)) | (
        torch.arange(16).view(1, 1, 16, 1) >= torch.arange(16).view(1, 1, 1, 16)
    )
    labels = b["labels"].masked_fill(b["loss_mask"] == 0, -100)
    with torch.no_grad():
        by_sep = lm(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["sep"], labels=labels)
        by_matrix = lm(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=float_mask.float())
        by_bare = bare(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["sep"])
    for logits in (by_sep.logits, by_matrix.logits, by_bare.logits):
        assert (logits - ours).abs().max() < 1e-5
    assert abs(by_sep.loss.item() - ours_loss.loss.item()) < 1e-5


def test_multiple_choice_scores_are_our_summed_log_probs(tmp_path, spm, transformers_offline) -> None:
    """``AutoModelForMultipleChoice``: each choice's score is the sum of our model's log-probabilities of its
    tokens at the given positions (-100 pads ignored); with labels, the loss is the cross entropy over choices."""
    model, full = reference_model(vocab_size=VOCAB)
    out = export(tmp_path, full, spm)
    mc = transformers_offline.AutoModelForMultipleChoice.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(mc).__name__ == "GLMForMultipleChoice"
    b = make_batch(2, vocab=VOCAB)
    n, s = b["input_ids"].shape
    g = torch.Generator().manual_seed(3)
    choice_ids = torch.randint(0, 411, (n, 3, 4), generator=g)
    choice_indices = torch.randint(0, s, (n, 3, 4), generator=g)
    choice_ids[:, 1, 2:] = -100  # choice 1 has two tokens, choice 2 one
    choice_ids[:, 2, 1:] = -100
    choice_indices[choice_ids < 0] = -100
    labels = torch.arange(n) % 3
    with torch.no_grad():
        logp = torch.log_softmax(model(b["input_ids"], b["position_ids"], b["sep"]).float(), dim=-1)
        res = mc(
            input_ids=b["input_ids"],
            position_ids=b["position_ids"],
            attention_mask=b["sep"],
            choice_ids=choice_ids,
            choice_indices=choice_indices,
            labels=labels,
        )
    expected = torch.zeros(n, 3)
    for i in range(n):
        for c in range(3):
            for tok, at in zip(choice_ids[i, c].tolist(), choice_indices[i, c].tolist(), strict=True):
                if tok >= 0:
                    expected[i, c] += logp[i, at, tok]
    torch.testing.assert_close(res.logits, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(res.loss, torch.nn.functional.cross_entropy(expected, labels), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="choice_ids and choice_indices"):
        mc(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["sep"])


def _varied(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights whose greedy answers are not one repeated token (larger embeddings)."""
    return {k: v * 6 if "embeddings" in k else v for k, v in full.items()}


def test_generate_matches_our_generation(tmp_path, spm, transformers_offline) -> None:
    tf = transformers_offline
    _, full = reference_model(seed=5, vocab_size=VOCAB)
    full = _varied(full)
    model = GLMModel(tiny_config(vocab_size=VOCAB))
    model.load_state_dict(full)
    model.eval()
    out = export(tmp_path, full, spm, max_new_tokens=6)
    tok = GLMTokenizer(spm)
    tokens = InfillTokens.from_tokenizer(tok)
    texts = ["The module [MASK] is used for", "Return the value", "a b [sMASK] c d e f g h i"]
    banned = tuple(range(tok.vocab_size, VOCAB))
    lm = tf.AutoModelForSeq2SeqLM.from_pretrained(str(out), trust_remote_code=True).eval()
    ht = tf.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)

    def answer(row: list[int]) -> list[int]:
        return row[: row.index(tokens.eop)] if tokens.eop in row else row

    prompts = [encode_prompt(tok, t, tokens) for t in texts]
    greedy = generate(model, prompts, tokens, GenerationConfig(max_new_tokens=6, banned_ids=banned))
    inputs = ht.build_inputs_for_generation(texts)
    assert inputs["input_ids"][0, : len(prompts[0])].tolist() == prompts[0]
    width = inputs["input_ids"].shape[1]
    got = lm.generate(**inputs)  # generation_config.json: 6 answer tokens, then [eop] forced
    assert [answer(r) for r in got[:, width:].tolist()] == [r.answers[0] for r in greedy]
    assert any(len(set(r.answers[0])) > 1 for r in greedy)  # not a degenerate repetition
    beam = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=6, banned_ids=banned)
    for text, prompt in zip(texts, prompts):
        ours = generate(model, [prompt], tokens, beam)[0].answers[0]
        one = ht.build_inputs_for_generation(text)
        seq = lm.generate(**one, num_beams=3, early_stopping=True)
        assert answer(seq[0, one["input_ids"].shape[1] :].tolist()) == ours, text


def test_tokenizer_ids_equal_ours(tmp_path, spm, transformers_offline) -> None:
    _, full = reference_model(vocab_size=VOCAB)
    out = export(tmp_path, full, spm)
    ours = GLMTokenizer(spm)
    ht = transformers_offline.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    commands = "".join(t for _, t in __import__("megatron_glm.data.tokenizer", fromlist=["x"]).COMMAND_TOKENS)
    text = f"Hello [MASK] world,\n  two  spaces [sop]x[gMASK]y {commands} ünïcødé ✓ def f(): return 1"
    ids = ours.encode(text)
    assert ht.encode(text, add_special_tokens=False) == ids
    assert ht(text)["input_ids"] == [ours.cls_id, *ids]
    assert all(
        ht.convert_tokens_to_ids(t) == ours.token_to_id(t)
        for _, t in __import__("megatron_glm.data.tokenizer", fromlist=["x"]).COMMAND_TOKENS
    )
    assert ht.decode(ids) == ours.decode(ids) and len(ht) == ours.vocab_size


def test_hf_to_native_tp2_to_hf_round_trips_bitwise(tmp_path, spm) -> None:
    _, full = reference_model(vocab_size=VOCAB)
    out = export(tmp_path, full, spm)
    convert(out, tmp_path / "tp2", format="native", target_tp=2)
    assert open_source(tmp_path / "tp2").info.tp == 2
    convert(tmp_path / "tp2", tmp_path / "hf2", format="hf", tokenizer_model=spm)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    for f in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model"):
        assert (out / f).read_bytes() == (tmp_path / "hf2" / f).read_bytes(), f
    convert(out, tmp_path / "glm1", format="glm", target_tp=1)  # and the original layout
    glm = open_source(tmp_path / "glm1")
    assert all(torch.equal(glm.tensor(n), full[n]) for n in full)


def test_imports_thudm_layouts(tmp_path, spm) -> None:
    """THUDM's variants: unprefixed names in pytorch_model.bin shards with an index, config without our keys."""
    _, full = reference_model(vocab_size=VOCAB)
    out = export(tmp_path, full, spm)
    thudm = tmp_path / "thudm"
    thudm.mkdir()
    cfg = json.loads((out / "config.json").read_text())
    for key in ("layernorm_epsilon", "gelu_approximate", "glm_command_tokens"):
        cfg.pop(key)
    (thudm / "config.json").write_text(json.dumps(cfg))
    names = sorted(full)
    halves = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    for fname, part in halves.items():
        torch.save({n: full[n] for n in part}, thudm / fname)
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (thudm / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    src = open_source(thudm)
    assert src.info.format == "hf" and src.info.config.layernorm_epsilon == 1e-5
    assert all(torch.equal(src.tensor(n), full[n]) for n in full)
    convert(thudm, tmp_path / "native", format="native", target_tp=2)
    single = tmp_path / "single"  # one safetensors file, glm. prefix (ours) read the same way
    single.mkdir()
    (single / "config.json").write_text(json.dumps(cfg))
    save_file({"glm." + n: t for n, t in full.items()}, str(single / "model.safetensors"))
    assert all(torch.equal(open_source(single).tensor(n), full[n]) for n in full)


def _tp2_loss(rank: int, world: int, hf_dir: str) -> float:
    torch.set_num_threads(1)
    ps = initialize_parallel_state(tp_size=world)
    model = GLMModel(tiny_config(vocab_size=VOCAB), ps, seed=99)  # different init: the load must replace it
    load_model_weights(model, hf_dir, ps.tp_size, ps.tp_rank)  # the trainer's --checkpoint.load_weights_only path
    b = make_batch(2, vocab=VOCAB)
    with torch.no_grad():
        return float(
            model(b["input_ids"], b["position_ids"], b["sep"], labels=b["labels"], loss_mask=b["loss_mask"]).loss
        )


def test_continued_pretraining_from_hf_folder_starts_at_our_loss(tmp_path, spm) -> None:
    model, full = reference_model(vocab_size=VOCAB)
    out = export(tmp_path, full, spm)
    b = make_batch(2, vocab=VOCAB)
    with torch.no_grad():
        ref = float(
            model(b["input_ids"], b["position_ids"], b["sep"], labels=b["labels"], loss_mask=b["loss_mask"]).loss
        )
    losses = run_distributed(_tp2_loss, 2, str(out))
    assert all(abs(loss - ref) < 1e-5 for loss in losses), (losses, ref)


def test_sharded_export_and_atomic_output(tmp_path, spm, monkeypatch, transformers_offline) -> None:
    model, full = reference_model(vocab_size=VOCAB)
    out = export(tmp_path, full, spm, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all((out / s).is_file() and s.startswith("model-") for s in shards)
    assert set(index["weight_map"]) == {"glm." + n for n in full}
    lm = transformers_offline.AutoModelForSeq2SeqLM.from_pretrained(str(out), trust_remote_code=True).eval()
    b = make_batch(1, vocab=VOCAB)
    with torch.no_grad():
        diff = lm(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=b["sep"]).logits - model(
            b["input_ids"], b["position_ids"], b["sep"]
        )
    assert diff.abs().max() < 1e-5

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("megatron_glm.checkpoint.formats.registry.write_hf", broken)
    with pytest.raises(OSError, match="disk full"):
        convert(tmp_path / "glm", tmp_path / "never", format="hf", tokenizer_model=spm)
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))


def test_missing_or_mismatched_tensor_is_a_one_line_error(tmp_path, spm) -> None:
    _, full = reference_model(vocab_size=VOCAB)
    out = export(tmp_path, full, spm)
    weights = load_file(str(out / "model.safetensors"))
    name = "glm.transformer.layers.1.mlp.dense_h_to_4h.weight"
    save_file({k: v for k, v in weights.items() if k != name}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        convert(out, tmp_path / "x", format="native")
    msg = str(err.value)
    assert "\n" not in msg and f"missing tensor {name}" in msg and "[256, 64]" in msg
    save_file({**weights, name: weights[name][:100].clone()}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        open_source(out)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and "[100, 64]" in msg and "expected [256, 64]" in msg
    assert not (tmp_path / "x").exists()
    # a config value of the wrong type: was a bare ValueError from the family's reader
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_layers": "two"}))
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable \w+ config \(ValueError: invalid literal"):
        open_source(out)


def test_hf_format_does_not_import_transformers() -> None:
    code = (
        "import sys, megatron_glm.checkpoint.convert, megatron_glm.checkpoint.formats.hf, megatron_glm.hf, "
        "megatron_glm.generation.loading, megatron_glm.checkpoint.weights\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert hf_format.FAMILIES["glm"].prefix == "glm."
