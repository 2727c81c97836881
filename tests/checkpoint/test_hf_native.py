"""transformers' own GLM classes without remote code: a tiny ``GlmForCausalLM`` / ``Glm4ForCausalLM`` saved by
transformers imports into our TP=2 layout and exports back; the export loads offline with ``AutoModelForCausalLM``
and ``AutoTokenizer`` (no ``trust_remote_code``) in transformers 5 here and in the newest 4.x in a subprocess
(``MEGATRON_GLM_TRANSFORMERS4``: a folder holding transformers 4.x, first on ``PYTHONPATH``); logits equal the
original's, greedy ``generate`` equals ``tools/generate.py --causal``. Also THUDM's remote-code GLM-4-9B layout
(``model_type: chatglm`` with ``rope_ratio``) built by hand, and the named GLM-4 sizes' exact parameter counts.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_glm.checkpoint.convert import ConvertOptions, convert_checkpoint, open_source
from megatron_glm.checkpoint.formats.hf import FAMILIES
from megatron_glm.checkpoint.weights import load_model_weights
from megatron_glm.config import ModelConfig
from megatron_glm.config.sizes import MODEL_SIZES
from megatron_glm.data.bpe_training import train_byte_bpe
from megatron_glm.data.tiktoken_file import byte_to_unicode
from megatron_glm.data.tokenizer import open_tokenizer
from megatron_glm.errors import CheckpointError
from megatron_glm.model import GLMModel, ModelLayout

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
QUIET = lambda *_: None
TF4 = "MEGATRON_GLM_TRANSFORMERS4"
PROMPT = "The quick brown fox"
NEW_TOKENS = 12
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "GLM is a general language model pretrained with an autoregressive blank infilling objective.",
    "Continue pretraining a released GLM on your own corpus, then export it to transformers.",
    "Tokens, tensors and shards: the export loads without remote code in any recent transformers.",
]


@pytest.fixture(scope="module")
def offline():
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE with GLM-4's special tokens ([MASK] [sMASK] [gMASK] <sop> <eop> <|endoftext|> ...), an even
    number of tokens (the vocab splits over TP=2 unpadded, so no padding row is banned by one side only)."""
    from tokenizers import AddedToken, Tokenizer

    folder = tmp_path_factory.mktemp("bpe")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    path = folder / "tokenizer.json"
    train_byte_bpe([str(corpus)], str(path), 300, input_format="text", min_frequency=1)
    tok = Tokenizer.from_file(str(path))
    if tok.get_vocab_size(with_added_tokens=True) % 2:
        tok.add_special_tokens([AddedToken("<|extra_0|>", special=True, normalized=False)])
        tok.save(str(path))
    return path


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights and biases too, so a misplaced one shows in the logits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if name.endswith("norm.weight") else 0.1
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + scale * torch.randn(p.shape, generator=gen))


def hf_config(kind: str, vocab: int):
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5, attention_bias=True,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=0,
    )  # fmt: skip
    cls = transformers.GlmConfig if kind == "glm" else transformers.Glm4Config
    try:
        return cls(**common, rope_parameters={"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5})
    except TypeError:  # transformers 4.x
        return cls(**common, rope_theta=5e5, partial_rotary_factor=0.5)


@pytest.fixture(scope="module")
def glm_release(tmp_path_factory: pytest.TempPathFactory, tokenizer_json: Path, offline) -> Path:
    """A tiny random GlmForCausalLM and its tokenizer, saved by transformers itself."""
    return _release(tmp_path_factory.mktemp("glm") / "release", "glm", tokenizer_json)


@pytest.fixture(scope="module")
def glm4_release(tmp_path_factory: pytest.TempPathFactory, tokenizer_json: Path, offline) -> Path:
    """A tiny random Glm4ForCausalLM (sandwich norms) and its tokenizer, saved by transformers itself."""
    return _release(tmp_path_factory.mktemp("glm4") / "release", "glm4", tokenizer_json)


@pytest.fixture(scope="module", params=["glm", "glm4"])
def release(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"{request.param}_release")


@pytest.fixture(scope="module")
def round_trip(release: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The release imported into our TP=2 layout, and that exported with --format hf (sharded): (tp2, export)."""
    tmp = tmp_path_factory.mktemp(f"{release[0]}_round_trip")
    convert(release[1], tmp / "tp2", format="native", target_tp=2)
    assert open_source(tmp / "tp2").info.tp == 2
    report = convert(tmp / "tp2", tmp / "export", format="hf", max_shard_bytes=40_000)  # the release's tokenizer
    assert report.verified > 0 and not any("tokenizer" in note for note in report.notes), report.notes
    return tmp / "tp2", tmp / "export"


ARCHITECTURES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}


def _release(folder: Path, kind: str, tokenizer_json: Path) -> Path:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token="<|endoftext|>")
    tok.pad_token = "<|endoftext|>"
    config = hf_config(kind, len(tok))
    config.pad_token_id = config.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    _randomize(model, seed=1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def convert(src: Path, dst: Path, **kw: object):
    return convert_checkpoint(src, dst, ConvertOptions(**kw), log=QUIET, open_tokenizer=open_tokenizer)


def prompt_ids(tokenizer_json: Path) -> list[int]:
    tok = open_tokenizer(tokenizer_json)
    return [tok.gmask_id, tok.sop_id, *tok.encode(PROMPT)]


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def our_logits(ckpt: Path, ids: list[int]) -> torch.Tensor:
    src = open_source(ckpt)
    model = GLMModel(src.info.config, seed=0).eval()
    load_model_weights(model, src, 1, 0)
    n = len(ids)
    pos = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)]).unsqueeze(0)
    with torch.no_grad():
        return model(torch.tensor([ids]), pos, torch.zeros(1, dtype=torch.long))[0]  # sep 0: causal


def our_generate(ckpt: Path, tokenizer: Path) -> list[int]:
    """``tools/generate.py --causal`` greedy on the checkpoint (a subprocess, as a user runs it)."""
    proc = subprocess.run(
        [sys.executable, "tools/generate.py", "--load", str(ckpt), "--tokenizer-model", str(tokenizer), "--causal",
         "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--show-tokens"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "WORLD_SIZE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("answers:"))
    return json.loads(line.split("answers:", 1)[1])[0]


def hf_generate(folder: Path, ids: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids) :].tolist()
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    return out[: next((i for i, t in enumerate(out) if t in stops), len(out))]


def test_native_release_round_trips_through_tp2(release: tuple[str, Path], round_trip, tokenizer_json: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    kind, glm_release = release
    src = open_source(glm_release)
    cfg = src.info.config
    assert src.info.format == "hf" and src.info.tokenizer_files == [str(glm_release / "tokenizer.json")]
    assert (cfg.rotary_base, cfg.rotary_percent, cfg.rotary_interleaved, cfg.query_groups) == (5e5, 0.5, True, 2)
    assert cfg.sandwich_norm == (kind == "glm4")
    tp2, export = round_trip
    files = sorted(p.name for p in export.iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 1
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[kind]] and config["model_type"] == kind
    assert "auto_map" not in config and config["rope_theta"] == 5e5 and config["num_key_value_heads"] == 2
    # the same tensors under the same names, bitwise
    theirs = load_file(glm_release / "model.safetensors")
    index = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    ours = {k: v for f in set(index.values()) for k, v in load_file(export / f).items()}
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # loads offline without remote code; logits equal the original's and our model's
    tok = AutoTokenizer.from_pretrained(export)
    assert isinstance(tok, PreTrainedTokenizerFast)
    ids = prompt_ids(tokenizer_json)
    assert tok("[gMASK]<sop>" + PROMPT, add_special_tokens=False).input_ids == ids
    want = hf_logits(glm_release, ids)
    assert (hf_logits(export, ids) - want).abs().max().item() < 1e-5
    assert (our_logits(tp2, ids) - want).abs().max().item() < 1e-5
    # greedy generate equals tools/generate.py --causal on our TP=2 checkpoint
    tokens = hf_generate(export, ids)
    assert len(tokens) >= 3
    assert our_generate(tp2, tokenizer_json) == tokens


TF4_SCRIPT = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
assert transformers.__version__.startswith("4."), transformers.__version__
folder, ids, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder)
assert isinstance(tok, PreTrainedTokenizerFast), type(tok)
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
x = torch.tensor([ids])
with torch.no_grad():
    logits = model(x).logits[0]
out = model.generate(x, max_new_tokens=new, do_sample=False)[0, len(ids):].tolist()
stops = model.generation_config.eos_token_id
stops = stops if isinstance(stops, list) else [stops]
out = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
print(json.dumps({"version": transformers.__version__, "class": type(model).__name__, "logits": logits.tolist(),
                  "tokens": out, "ids": tok("[gMASK]<sop>" + sys.argv[4], add_special_tokens=False).input_ids}))
"""


def load_in_transformers4(folder: Path, ids: list[int]) -> dict:
    tf4 = os.environ.get(TF4)
    if not tf4:
        pytest.skip(f"{TF4} is not set: no transformers 4.x folder to load the export with (.ci/run installs one)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tf4, str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", TF4_SCRIPT, str(folder), json.dumps(ids), str(NEW_TOKENS), PROMPT]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_export_loads_in_transformers_4(release: tuple[str, Path], round_trip, tokenizer_json: Path) -> None:
    """Logits equal the original's; greedy tokens equal transformers 5's (which equal tools/generate.py's)."""
    (kind, glm_release), (_, export) = release, round_trip
    ids = prompt_ids(tokenizer_json)
    got = load_in_transformers4(export, ids)
    assert got["class"] == ARCHITECTURES[kind] and got["ids"] == ids
    assert (torch.tensor(got["logits"]) - hf_logits(glm_release, ids)).abs().max().item() < 1e-5
    want = hf_generate(export, ids)
    assert len(want) >= 3 and got["tokens"] == want


def test_layouts_the_native_class_cannot_hold_are_refused(glm_release: Path, tmp_path: Path) -> None:
    convert(glm_release, tmp_path / "ours", format="native")
    with pytest.raises(CheckpointError, match=r"the chatglm-6b HuggingFace layout cannot hold this model: ") as err:
        convert(tmp_path / "ours", tmp_path / "x", format="hf", hf_layout="chatglm-6b")
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
    with pytest.raises(CheckpointError, match=r"--hf-layout 'nope': unknown \(choose from glm, chatglm-6b"):
        convert(tmp_path / "ours", tmp_path / "x", format="hf", hf_layout="nope")
    # ChatGLM2's remote-code layout still holds the same model when asked for
    convert(tmp_path / "ours", tmp_path / "c2", format="hf", hf_layout="chatglm2-6b")
    c2 = json.loads((tmp_path / "c2" / "config.json").read_text())
    assert c2["model_type"] == "chatglm" and c2["rope_ratio"] == 50 and c2["padded_vocab_size"] > 0


def test_glm4_needs_the_sandwich_norms(glm_release: Path, glm4_release: Path, tmp_path: Path) -> None:
    """GLM-4-0414's layout holds only models with sandwich_norm; GlmForCausalLM only models without; qk_norm
    (GLM-4.5) neither (only Glm4MoeForCausalLM): each is a one-line refusal naming the field."""
    convert(glm_release, tmp_path / "glm", format="native")
    with pytest.raises(CheckpointError, match=r"Glm4ForCausalLM HuggingFace layout cannot hold this model: "
                       r"sandwich_norm = False \(this layout: True\)$"):  # fmt: skip
        convert(tmp_path / "glm", tmp_path / "x", format="hf", hf_layout="Glm4ForCausalLM")
    convert(glm4_release, tmp_path / "glm4", format="native")
    with pytest.raises(CheckpointError, match=r"GlmForCausalLM HuggingFace layout cannot hold this model: "
                       r"sandwich_norm = True \(this layout: False\)$"):  # fmt: skip
        convert(tmp_path / "glm4", tmp_path / "x", format="hf", hf_layout="GlmForCausalLM")
    assert not (tmp_path / "x").exists()
    for family in FAMILIES.values():
        arch = dataclasses.replace(family.architecture.value, qk_norm=True)
        if family.name == "Glm4MoeForCausalLM":  # GLM-4.5's own layout holds it
            assert family.architecture.mismatch(arch) is None
            continue
        assert family.architecture.mismatch(arch) == "qk_norm = True (this layout: False)", family.name
    # the weights on disk tell the same: a Glm4 config over a Glm folder lacks the sandwich norms
    bad = tmp_path / "mislabelled"
    shutil.copytree(glm_release, bad)
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "model_type": "glm4", "architectures": ["Glm4ForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.0\.post_self_attn_layernorm\.weight"):
        open_source(bad)


@pytest.mark.parametrize(
    ("rope", "top", "message"),
    [
        ({"partial_rotary_factor": 0.0}, {}, r"model\.rotary_percent must be in \(0, 1\], got 0\.0$"),
        ({"partial_rotary_factor": 3.0}, {}, r"model\.rotary_percent must be in \(0, 1\], got 3\.0$"),
        ({"rope_theta": -1.0}, {}, r"model\.rotary_base must be positive, got -1\.0$"),
        ({}, {"rms_norm_eps": -1.0}, r"model\.layernorm_epsilon must be positive, got -1\.0$"),
        ({}, {"max_position_embeddings": 0}, r"model\.max_sequence_length must be positive, got 0$"),
    ],
)
def test_a_config_giving_no_buildable_model_is_refused(
    glm4_release: Path, tmp_path: Path, rope: dict, top: dict, message: str
) -> None:
    """config.json values our model cannot be built with converted silently before (to a checkpoint training
    refuses, or no rotary at all): one line naming config.json and the field."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in glm4_release.iterdir():
        (bad / f.name).symlink_to(f)
    raw = json.loads((glm4_release / "config.json").read_text())
    raw = {**raw, **top, "rope_parameters": {**raw["rope_parameters"], **rope}}
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"bad/config\.json: not a model megatron_glm can build: " + message):
        open_source(bad)


def test_native_release_through_a_pipeline_layout(glm4_release: Path, tmp_path: Path) -> None:
    """Glm4ForCausalLM -> native PP=2 (model only) -> Glm4ForCausalLM: the release's tensors, bitwise."""
    convert(glm4_release, tmp_path / "pp2", format="native", target_pp=2)
    assert open_source(tmp_path / "pp2").info.pp == 2
    convert(tmp_path / "pp2", tmp_path / "back", format="hf", tokenizer_model=str(glm4_release))
    back, theirs = load_file(tmp_path / "back" / "model.safetensors"), load_file(glm4_release / "model.safetensors")
    assert sorted(back) == sorted(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["Glm4ForCausalLM"]


def test_a_tiktoken_tokenizer_is_exported_as_tokenizer_json(glm_release: Path, tokenizer_json: Path, tmp_path) -> None:
    """GLM-4-9B's remote code ships a tiktoken BPE file: the export writes it as a tokenizer.json that
    AutoTokenizer loads as a fast tokenizer giving our ids, and its chat stops in generation_config.json."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    inverse = {char: byte for byte, char in byte_to_unicode().items()}
    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=False)
    ranks = [bytes(inverse[c] for c in piece) for piece in sorted(vocab, key=vocab.get)]
    tik = tmp_path / "glm-4-9b" / "tokenizer.model"
    tik.parent.mkdir()
    tik.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)), encoding="ascii")
    ours = open_tokenizer(tik)
    assert ours.kind == "tiktoken"
    rows = ours.vocab_size + ours.vocab_size % 2
    convert(glm_release, tmp_path / "out", format="hf", tokenizer_model=str(tik), vocab_size=rows)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in (PROMPT, *CORPUS, "  tabs\tand 中文 🦙 I'LL 12345"):
        assert tok(text, add_special_tokens=False).input_ids == ours.encode(text, allow_special=False)
    assert tok.convert_tokens_to_ids(["[gMASK]", "<sop>"]) == [ours.gmask_id, ours.sop_id]
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    stops = [ours.eos_id, ours.token_to_id("<|user|>"), ours.token_to_id("<|observation|>")]
    assert generation["eos_token_id"] == stops


# -- THUDM's remote-code GLM-4-9B layout ------------------------------------------------------------------------


def chatglm4_folder(release: Path, out: Path) -> Path:
    """THUDM's remote-code GLM-4-9B layout (``model_type: chatglm``, ``rope_ratio``) of the release's weights, built
    by hand from the published names: q/k/v packed as ``query_key_value`` [q; k; v], ``gate_up_proj`` as
    ``dense_h_to_4h``."""
    sd = load_file(release / "model.safetensors")
    raw = json.loads((release / "config.json").read_text())
    theirs = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
        "transformer.rotary_pos_emb.inv_freq": 1.0 / (5e5 ** (torch.arange(0, 8, 2).float() / 8)),
    }
    for i in range(raw["num_hidden_layers"]):
        a, b = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{a}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            theirs[f"{b}self_attention.query_key_value.{kind}"] = torch.cat(qkv)
        theirs[f"{b}self_attention.dense.weight"] = sd[f"{a}self_attn.o_proj.weight"]
        theirs[f"{b}mlp.dense_h_to_4h.weight"] = sd[f"{a}mlp.gate_up_proj.weight"]
        theirs[f"{b}mlp.dense_4h_to_h.weight"] = sd[f"{a}mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            theirs[f"{b}{norm}.weight"] = sd[f"{a}{norm}.weight"]
    config = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False, "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
        "attention_softmax_in_fp32": True, "ffn_hidden_size": raw["intermediate_size"], "hidden_size": 64,
        "kv_channels": 16, "layernorm_epsilon": 1e-5, "multi_query_attention": True, "multi_query_group_num": 2,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_layers": 2, "rope_ratio": 50, "original_rope": True,
        "padded_vocab_size": raw["vocab_size"], "post_layer_norm": True, "rmsnorm": True, "seq_length": 128,
        "tie_word_embeddings": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
    }  # fmt: skip
    out.mkdir(parents=True)
    save_file(theirs, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


def test_thudm_remote_glm4_layout_imports_with_rope_ratio(glm_release: Path, tokenizer_json: Path, tmp_path) -> None:
    folder = chatglm4_folder(glm_release, tmp_path / "glm-4-9b-remote")
    src = open_source(folder)
    assert src.info.config.rotary_base == 10000.0 * 50
    convert(folder, tmp_path / "tp2", format="native", target_tp=2)
    ids = prompt_ids(tokenizer_json)
    assert (our_logits(tmp_path / "tp2", ids) - hf_logits(glm_release, ids)).abs().max().item() < 1e-5
    # and out again natively: the release's tensors
    convert(tmp_path / "tp2", tmp_path / "native", format="hf")
    back = load_file(tmp_path / "native" / "model.safetensors")
    theirs = load_file(glm_release / "model.safetensors")
    assert sorted(back) == sorted(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)


# -- named sizes ---------------------------------------------------------------------------------------------------

#: Exact parameter counts of the named GLM-4 generation sizes (docs/family.md gives the shapes' sources).
PARAMETERS = {
    "chatglm3-6b": 6_243_584_000,
    "glm-4-9b": 9_399_951_360,
    "glm-4-9b-0414": 9_400_279_040,
    "glm-4-32b-0414": 32_566_081_536,
}


@pytest.mark.parametrize("size", sorted(PARAMETERS))
def test_named_sizes_have_the_published_parameter_counts(size: str, offline) -> None:
    cfg = ModelConfig(**MODEL_SIZES[size])
    assert sum(math.prod(spec.shape) for spec in ModelLayout(cfg)) == PARAMETERS[size]
    assert sum(p.numel() for p in GLMModel(cfg, device="meta").parameters()) == PARAMETERS[size]
    # transformers' own class of the same shape counts the same
    hf = (transformers.Glm4Config if cfg.sandwich_norm else transformers.GlmConfig)(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups, head_dim=cfg.head_dim, attention_bias=cfg.add_qkv_bias,
        pad_token_id=0,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[size]
