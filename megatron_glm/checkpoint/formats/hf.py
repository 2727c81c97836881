"""HuggingFace folders in THUDM's published layout (``config.json`` with ``auto_map``, weights, tokenizer, code).

Export (``write_hf``): ``config.json`` with the family's keys and meaning, ``model.safetensors`` (or shards with
``model.safetensors.index.json``) under the published tensor names, the remote code of
``megatron_glm/hf`` (registered through ``auto_map``), ``tokenizer.model`` + ``tokenizer_config.json`` and
``generation_config.json``. Writing needs no ``transformers``; loading the folder with it needs
``trust_remote_code=True``.

Import (``HFSource``): such a folder, ours or THUDM's: tensor names with or without the family's prefix
(``glm.``), ``model.safetensors`` or ``pytorch_model.bin`` (read as data, ``weights_only``), sharded (index
JSON) or not. Every tensor the layout needs is checked by name and shape when the folder is opened.

A family (the published layout of one model architecture) is one :class:`HFFamily` in :data:`FAMILIES`:
its config mapping both ways, its tensor names and packing (a tensor of ours may be stored as several, e.g. q/k/v),
the tensors it stores that our model does not, its code files. GLM (``model_type: glm`` with ``auto_map``) ships
our remote code; ChatGLM-6B and ChatGLM2-6B (``model_type: chatglm``, told apart by their config keys, ChatGLM3 and
GLM-4-9B's remote code included; ``hf_chatglm``) are written for THUDM's published code, which the export does not
include; transformers' own ``GlmForCausalLM`` / ``Glm4ForCausalLM`` (``hf_native``) and ``Glm4MoeForCausalLM``
(GLM-4.5, ``hf_glm4moe``) need no remote code and get ``tokenizer.json`` files. Export picks the family whose
architecture the model has, transformers' classes first, or the one ``--hf-layout`` names (:func:`family_for`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_glm.checkpoint.safe_load import safe_torch_load
from megatron_glm.checkpoint.safetensors_file import open_safetensors, read_header
from megatron_glm.checkpoint.stream import SourceInfo
from megatron_glm.config import Architecture, ModelConfig
from megatron_glm.config.architecture import ArchitectureFamily
from megatron_glm.dtypes import DTYPE_NAMES
from megatron_glm.errors import CheckpointError
from megatron_glm.model.layout import ModelLayout

from .common import check_imported_model
from .hf_chatglm import CHATGLM2_FAMILY, CHATGLM_FAMILY
from .hf_family import Derived, HFFamily
from .hf_glm4moe import GLM4_MOE_FAMILY
from .hf_native import NATIVE_FAMILIES, TOKENIZER_JSON, write_native_files
from .packing import PRECISION_ONLY
from .standalone import DEFAULT_SHARD_BYTES, check_shards, read_weight_index, write_weight_shards

CONFIG = "config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_MODEL, TOKENIZER_CONFIG = "tokenizer.model", "tokenizer_config.json"
WEIGHT_FILES = (SAFE_INDEX, SAFE_WEIGHTS, BIN_INDEX, BIN_WEIGHTS)


def _glm_to_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "num_layers": cfg.num_layers,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "embedding_dropout_prob": cfg.hidden_dropout,
        "attention_dropout_prob": cfg.attention_dropout,
        "output_dropout_prob": cfg.hidden_dropout,
        "max_sequence_length": cfg.max_sequence_length,
        "checkpoint_activations": cfg.checkpoint_activations,
        "checkpoint_num_layers": cfg.checkpoint_num_layers,
        "parallel_output": True,
        "relative_encoding": False,
        "block_position_encoding": cfg.block_position_encoding,
        "output_predict": True,
        "spell_length": None,
        "spell_func": "lstm",
        "attention_scale": 1.0,
        "initializer_range": cfg.init_std,
        "pool_token": "cls",
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "gelu_approximate": "tanh",
    }


def _glm_from_config(raw: dict[str, Any], where: str) -> ModelConfig:
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size") if k not in raw]
    if missing:
        raise CheckpointError(f"{where}: GLM config lacks {', '.join(missing)}")
    unsupported = {
        "relative_encoding": (raw.get("relative_encoding", False), False),
        "attention_scale": (float(raw.get("attention_scale", 1.0)), 1.0),
        "spell_length": (raw.get("spell_length"), None),
        "gelu_approximate": (raw.get("gelu_approximate", "tanh"), "tanh"),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise CheckpointError(f"{where}: {key} = {value!r} is not supported (megatron_glm models use {wanted!r})")
    return ModelConfig(
        num_layers=int(raw["num_layers"]),
        hidden_size=int(raw["hidden_size"]),
        num_attention_heads=int(raw["num_attention_heads"]),
        vocab_size=int(raw["vocab_size"]),
        max_sequence_length=int(raw.get("max_sequence_length", 512)),
        block_position_encoding=bool(raw.get("block_position_encoding", True)),
        hidden_dropout=float(raw.get("output_dropout_prob", 0.1)),
        attention_dropout=float(raw.get("attention_dropout_prob", 0.1)),
        layernorm_epsilon=float(raw.get("layernorm_epsilon", 1e-5)),  # THUDM's code fixes 1e-5
        init_std=float(raw.get("initializer_range", 0.02)),
    )


#: What the layout holds: the 2021 GLM (our defaults), with the fields config.json records.
GLM_ARCH = ArchitectureFamily(
    "glm",
    Architecture(),
    recorded=frozenset(
        {"num_layers", "vocab_size", "hidden_size", "num_attention_heads", "max_sequence_length"}
        | {"block_position_encoding", "layernorm_epsilon"}
    ),
    alternatives=PRECISION_ONLY,
)


GLM_FAMILY = HFFamily(
    model_type="glm",
    architectures=("GLMModel",),
    auto_map={
        "AutoConfig": "configuration_glm.GLMConfig",
        "AutoModel": "modeling_glm.GLMModel",
        "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
        "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
    },
    tokenizer_class="tokenization_glm.GLMTokenizer",
    code_files=("configuration_glm.py", "modeling_glm.py", "tokenization_glm.py"),
    prefix="glm.",
    to_config=_glm_to_config,
    from_config=_glm_from_config,
    markers=("auto_map", "attention_dropout_prob", "output_dropout_prob", "embedding_dropout_prob"),
    architecture=GLM_ARCH,
)

#: Published layouts by name (``glm``, ``chatglm-6b``, ``chatglm2-6b``, ``GlmForCausalLM``, ...).
FAMILIES: dict[str, HFFamily] = {
    f.name: f for f in (GLM_FAMILY, CHATGLM_FAMILY, CHATGLM2_FAMILY, *NATIVE_FAMILIES, GLM4_MOE_FAMILY)
}


def detect_family(raw: dict[str, Any]) -> HFFamily | None:
    """The family of a ``config.json``: its ``model_type`` and one of the family's marker keys."""
    for family in FAMILIES.values():
        if raw.get("model_type") == family.model_type and any(k in raw for k in family.markers):
            return family
    return None


def family_for(config: ModelConfig, layout: str = "") -> HFFamily:
    """The published layout that holds a model of ``config``: ``layout`` (a :data:`FAMILIES` name) or else the
    first that does, transformers' native classes first (one-line error naming what each family lacks)."""
    if layout:
        if layout not in FAMILIES:
            raise CheckpointError(f"--hf-layout {layout!r}: unknown (choose from {', '.join(FAMILIES)})")
        bad = FAMILIES[layout].check(config)
        if bad is not None:
            raise CheckpointError(f"the {layout} HuggingFace layout cannot hold this model: {bad}")
        return FAMILIES[layout]
    reasons = {name: family.check(config) for name, family in FAMILIES.items()}
    for family in sorted(FAMILIES.values(), key=lambda f: not f.native):
        if reasons[family.name] is None:
            return family
    listed = "; ".join(f"{name}: {bad}" for name, bad in reasons.items())
    raise CheckpointError(f"no published HuggingFace layout holds this model ({listed})")


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def is_hf(path: Path) -> bool:
    """A HuggingFace folder of a known family (not our standalone export, which shares ``config.json``)."""
    raw = _read_config(path) if (path / CONFIG).is_file() else None
    if raw is None or detect_family(raw) is None:
        return False
    return any((path / f).is_file() for f in WEIGHT_FILES)


def _piece_shape(shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    """The shape of a published tensor holding ``rows`` rows of ours (of ``shape``; split as ``[-1, last]`` when it
    has more than two dimensions)."""
    return (rows, *shape[1:]) if len(shape) <= 2 else (rows, shape[-1])


class HFSource:
    """A HuggingFace folder read as full tensors by original GLM name."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        raw = _read_config(path)
        if raw is None:
            raise CheckpointError(f"{path / CONFIG}: cannot read the model config")
        family = detect_family(raw)
        if family is None:
            raise CheckpointError(
                f"{path / CONFIG}: model_type {raw.get('model_type')!r} with these keys is not a layout we read "
                f"({', '.join(FAMILIES)})"
            )
        self.path, self.family, self.raw_config = path, family, raw
        try:
            config = check_imported_model(family.from_config(raw, str(path / CONFIG)), str(path / CONFIG))
        except (KeyError, TypeError, ValueError) as exc:  # a family's reader without a check for this value
            raise CheckpointError(
                f"{path / CONFIG}: unreadable {family.name} config ({type(exc).__name__}: {exc})"
            ) from None
        self.weight_map = self._weight_map(path)
        notes: list[str] = []
        if family.fit is not None:
            config, notes = family.fit(config, self.weight_map)
        self.config = config
        layout = ModelLayout(config)
        self._hf_name = {}
        self._pieces: dict[str, list[str]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._open: dict[str, Any] = {}
        for spec in layout:
            pieces = family.split(config, spec.name)
            if pieces:
                self._pieces[spec.name] = [self._check_piece(n, _piece_shape(spec.shape, r)) for n, r in pieces]
                self._shapes[spec.name] = spec.shape
                continue
            cands = family.candidates(spec.name)
            hf_name = next((c for c in cands if c in self.weight_map), None)
            if hf_name is None:
                raise CheckpointError(f"{path}: missing tensor {cands[0]} (expected shape {list(spec.shape)})")
            shape = self._shape(hf_name)
            if shape != tuple(spec.shape):
                raise CheckpointError(f"{path}: tensor {hf_name} has shape {list(shape)}, expected {list(spec.shape)}")
            self._hf_name[spec.name] = hf_name
        derived = family.derived(config)
        for d in derived:
            self._check_derived(d, notes)
        self.release()
        known = set(self._hf_name.values()) | {d.name for d in derived} | {n for p in self._pieces.values() for n in p}
        extra = sorted(n for n in self.weight_map if n not in known)
        if extra:
            notes.append(f"ignored {len(extra)} tensors that are not part of the GLM model: {extra[:4]}")
        tok = [str(path / f) for f in (TOKENIZER_JSON, TOKENIZER_MODEL) if (path / f).is_file()][:1]
        self.info = SourceInfo(format="hf", path=str(path), config=config, tokenizer_files=tok, notes=notes)
        self._names = layout.names()

    def _check_piece(self, hf_name: str, shape: tuple[int, ...]) -> str:
        """A published tensor that holds part of one of ours: present with ``shape``."""
        if hf_name not in self.weight_map:
            raise CheckpointError(f"{self.path}: missing tensor {hf_name} (expected shape {list(shape)})")
        if self._shape(hf_name) != shape:
            found = list(self._shape(hf_name))
            raise CheckpointError(f"{self.path}: tensor {hf_name} has shape {found}, expected {list(shape)}")
        return hf_name

    def _check_derived(self, d: Derived, notes: list[str]) -> None:
        """A stored tensor that our model does not hold: checked against what export would write for it."""
        if d.name not in self.weight_map:
            notes.append(f"no {d.name}: it is derived (written on export)")
            return
        stored = self._raw(d.name)
        want = d.make(self._raw(self._hf_name[d.after]))
        if d.strict and (
            stored.shape != want.shape or not torch.allclose(stored.float(), want.float(), rtol=1e-3, atol=0.0)
        ):
            raise CheckpointError(
                f"{self.path}: tensor {d.name} does not hold the values this config derives (expected shape "
                f"{list(want.shape)}, e.g. {want.flatten()[:3].tolist()})"
            )
        if not d.strict and (stored.shape != want.shape or not torch.equal(stored, want)):
            notes.append(f"{d.name}: {d.note}")

    @staticmethod
    def _weight_map(path: Path) -> dict[str, str]:
        for index in (SAFE_INDEX, BIN_INDEX):
            if (path / index).is_file():
                wm = read_weight_index(path / index)
                check_shards(path, wm)
                return wm
        if (path / SAFE_WEIGHTS).is_file():
            return dict.fromkeys(read_header(path / SAFE_WEIGHTS), SAFE_WEIGHTS)
        if (path / BIN_WEIGHTS).is_file():
            return {k: BIN_WEIGHTS for k in HFSource._load_bin(path / BIN_WEIGHTS)}
        raise CheckpointError(f"{path}: no weights ({', '.join(WEIGHT_FILES)})")

    @staticmethod
    def _load_bin(file: Path) -> dict[str, torch.Tensor]:
        sd = safe_torch_load(file, mmap=True)
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise CheckpointError(f"{file}: not a state dict of tensors")
        return sd

    def _file(self, fname: str) -> Any:
        if fname not in self._open:
            if fname.endswith(".safetensors"):
                self._open[fname] = open_safetensors(self.path / fname)
            else:
                self._open[fname] = self._load_bin(self.path / fname)
        return self._open[fname]

    def _shape(self, hf_name: str) -> tuple[int, ...]:
        f = self._file(self.weight_map[hf_name])
        if isinstance(f, dict):
            return tuple(f[hf_name].shape)
        return tuple(f.get_slice(hf_name).get_shape())

    def names(self) -> list[str]:
        return list(self._names)

    def _raw(self, hf_name: str) -> torch.Tensor:
        f = self._file(self.weight_map[hf_name])
        return f[hf_name] if isinstance(f, dict) else f.get_tensor(hf_name)

    def _weight(self, hf_name: str) -> torch.Tensor:
        """A stored weight, refused in one line when it is not floating point or not finite (a NaN copied into a
        converted checkpoint or a training run's base would surface only as a NaN loss)."""
        t = self._raw(hf_name)
        if not t.is_floating_point():
            raise CheckpointError(
                f"{self.path}: tensor {hf_name} has dtype {t.dtype}, expected a floating-point weight"
            )
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{self.path}: tensor {hf_name} holds non-finite values (NaN or inf)")
        return t

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._pieces:
            return torch.cat([self._weight(n) for n in self._pieces[name]], dim=0).reshape(self._shapes[name])
        return self.family.ours(self.config, name, self._weight(self._hf_name[name]))

    module_tensor = tensor

    def optimizer_state(self, name: str) -> None:
        return None

    def release(self) -> None:
        self._open.clear()


def write_hf(
    src: Any,
    out: Path,
    config: ModelConfig,
    *,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    tokenizer: Any | None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_new_tokens: int = 32,
    family: HFFamily | None = None,
    notes: list[str] | None = None,
) -> list[str]:
    """Write the HuggingFace folder (see the module docstring); returns the weight files.

    ``tokenizer``: our ``GLMTokenizer`` (its ``model_path``, ``vocab_size`` and ``command_token_ids``; ``None``:
    no tokenizer files, no token ids in the configs).
    ``max_new_tokens``: the answer length of ``generation_config.json`` (tools/generate.py's default), written as
    ``max_new_tokens + 1`` with ``forced_eos_token_id = [eop]``: the answer, then a forced ``[eop]``."""
    from megatron_glm.hf import code_file

    family = family or family_for(config)
    layout = ModelLayout(config)
    after: dict[str, list[Derived]] = {}
    for d in family.derived(config):
        after.setdefault(d.after, []).append(d)

    def expand(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        pieces = family.split(config, name)
        if pieces:
            flat = t.reshape(-1, t.shape[-1]) if t.dim() > 2 else t
            return [(n, p.clone()) for (n, _), p in zip(pieces, flat.split([r for _, r in pieces], dim=0))]
        own = (family.hf_name(name), family.theirs(config, name, t))
        return [own] + [(d.name, d.make(t).clone()) for d in after.get(name, [])]

    files = write_weight_shards(
        src, out, layout, transform=transform, dtype=dtype, max_shard_bytes=max_shard_bytes, expand=expand
    )
    fields: dict[str, Any] = {
        "architectures": list(family.architectures),
        "model_type": family.model_type,
        **({"auto_map": dict(family.auto_map)} if family.auto_map else {}),
        **family.to_config(config),
        "torch_dtype": DTYPE_NAMES[dtype],
    }
    if family.native:  # transformers' own classes and fast tokenizer
        (notes if notes is not None else []).extend(write_native_files(out, fields, config, tokenizer))
        return files
    if not family.code_files:  # written for the family's published code and tokenizer (not shipped here)
        (out / CONFIG).write_text(json.dumps(fields, indent=1), encoding="utf-8")
        return files
    generation = _remote_code_tokenizer(out, fields, config, family, tokenizer, max_new_tokens)
    (out / CONFIG).write_text(json.dumps(fields, indent=1), encoding="utf-8")
    (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=1), encoding="utf-8")
    for name in family.code_files:
        shutil.copyfile(code_file(name), out / name)
    return files


def _remote_code_tokenizer(
    out: Path, fields: dict[str, Any], config: ModelConfig, family: HFFamily, tokenizer: Any | None, max_new_tokens: int
) -> dict[str, Any]:
    """The remote-code layouts' sentencepiece tokenizer files and command-token ids (added to ``fields``); returns
    the ``generation_config.json`` fields."""
    generation: dict[str, Any] = {"do_sample": False, "num_beams": 1, "use_cache": True}
    if tokenizer is not None:
        if getattr(tokenizer, "kind", "sentencepiece") != "sentencepiece":
            raise CheckpointError(
                f"{tokenizer.model_path}: this export ships GLM's remote-code sentencepiece tokenizer; "
                f"a {tokenizer.kind} tokenizer is not supported here"
            )
        ids, tokens = tokenizer.command_token_ids, tokenizer.vocab_size
        fields.update(pad_token_id=ids["[pad]"], eos_token_id=ids["[eop]"], glm_command_tokens=ids)
        generation.update(
            pad_token_id=ids["[pad]"],
            eos_token_id=ids["[eop]"],
            forced_eos_token_id=ids["[eop]"],
            max_new_tokens=max_new_tokens + 1,
            suppress_tokens=list(range(tokens, config.vocab_size)),  # padded embedding rows are not tokens
            renormalize_logits=True,
            length_penalty=1.0,
        )
        shutil.copyfile(tokenizer.model_path, out / TOKENIZER_MODEL)
        tok_cfg = {
            "tokenizer_class": family.tokenizer_class.rsplit(".", 1)[-1],
            "auto_map": {"AutoTokenizer": [family.tokenizer_class, None]},
            "model_max_length": config.max_sequence_length,
            "pad_token": "[pad]",
            "eos_token": "[eos]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "sep_token": "[SEP]",
            "unk_token": "[UNK]",
        }
        (out / TOKENIZER_CONFIG).write_text(json.dumps(tok_cfg, indent=1), encoding="utf-8")
    return generation
