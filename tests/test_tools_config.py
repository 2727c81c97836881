"""The tools' options come from the typed-config loader: Megatron's flag spellings, YAML, dotted paths, strict
unknown-key errors with a suggestion, generated --help, one-line errors for missing or conflicting options."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from megatron_glm.config import load_config
from megatron_glm.config.loader import leaf_paths
from megatron_glm.data.preprocess import PreprocessConfig
from megatron_glm.errors import ConfigError
from megatron_glm.finetune.eval_options import EvaluateRun
from megatron_glm.generation import GenerationConfig
from megatron_glm.generation.options import GenerateRun

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def preprocess_tool() -> ModuleType:
    return _tool("preprocess_data")


@pytest.fixture(scope="module")
def generate_tool() -> ModuleType:
    return _tool("generate")


@pytest.fixture(scope="module")
def evaluate_tool() -> ModuleType:
    return _tool("evaluate")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def _help(tool: ModuleType, capsys: pytest.CaptureFixture, root: type) -> str:
    assert tool.main(["--help"]) == 0
    out = capsys.readouterr().out
    for path, (f, _tp) in leaf_paths(root).items():
        assert f"--{path} (" in out, path
        assert f.metadata.get("help") and f.metadata["help"] in out, path
    return out


# -- the loader ------------------------------------------------------------------------------------------


def test_repeated_list_flag_appends_and_a_new_command_line_replaces_yaml(tmp_path: Path) -> None:
    cfg = load_config(["--data-path", "a", "b", "--lr", "0.1", "--data-path", "c"])
    assert cfg.data.data_path == ["a", "b", "c"]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  data_path: [y1, y2]\n")
    assert load_config(["--config", str(yaml_file)]).data.data_path == ["y1", "y2"]
    assert load_config(["--config", str(yaml_file), "--data-path", "z"]).data.data_path == ["z"]


# -- tools/preprocess_data.py -------------------------------------------------------------------------------


def test_preprocess_megatron_flags(preprocess_tool: ModuleType) -> None:
    cfg = preprocess_tool.parse_args(
        [
            "--input",
            "a.jsonl",
            "b/*.jsonl.gz",
            "--input",
            "c.parquet",
            "--input-format",
            "jsonl",
            "--json-keys",
            "text",
            "title",
            "--max-bad-fraction",
            "0.25",
            "--split-sentences",
            "--strict",
            "--tokenizer-model",
            "tok.model",
            "--append-eod",
            "--output-prefix",
            "out/p",
            "--workers",
            "3",
            "--log-interval",
            "7",
            "--chunk-mb",
            "0.5",
        ]
    )
    assert cfg == PreprocessConfig(
        inputs=["a.jsonl", "b/*.jsonl.gz", "c.parquet"],
        input_format="jsonl",
        json_keys=["text", "title"],
        max_bad_fraction=0.25,
        split_sentences=True,
        strict=True,
        tokenizer_model="tok.model",
        append_eod=True,
        output_prefix="out/p",
        workers=3,
        log_interval=7,
        chunk_bytes=1 << 19,
    )
    defaults = preprocess_tool.parse_args(["--input", "a", "--tokenizer-model", "t", "--output-prefix", "o"])
    assert dataclasses.replace(defaults, inputs=[], tokenizer_model="", output_prefix="") == PreprocessConfig()
    chunked = preprocess_tool.parse_args(
        ["--input", "a", "--tokenizer-model", "t", "--output-prefix", "o", "--chunk-mb=2"]
    )
    assert chunked.chunk_bytes == 2 << 20


def test_preprocess_yaml_dotted_and_errors(preprocess_tool: ModuleType, tmp_path: Path) -> None:
    yaml_file = tmp_path / "pre.yaml"
    yaml_file.write_text("inputs: [x.jsonl, y.jsonl]\ntokenizer_model: t.model\noutput_prefix: o\nworkers: 2\n")
    cfg = preprocess_tool.parse_args(["--config", str(yaml_file), "--workers", "4", "--json_keys", "body"])
    assert (cfg.inputs, cfg.workers, cfg.json_keys) == (["x.jsonl", "y.jsonl"], 4, ["body"])
    with pytest.raises(ConfigError) as exc:
        preprocess_tool.parse_args(["--input", "a", "--json-key", "text"])
    assert "unknown option --json-key (did you mean '--json-keys'?)" in _one_line(exc)
    with pytest.raises(ConfigError) as exc:
        preprocess_tool.parse_args(["--input", "a"])
    assert _one_line(exc) == "missing required options --output-prefix, --tokenizer-model (see --help)"
    with pytest.raises(ConfigError) as exc:
        preprocess_tool.parse_args(
            ["--input", "a", "--output-prefix", "o", "--tokenizer-model", "t", "--input-format", "csv"]
        )
    assert "input_format must be one of auto, jsonl, text" in _one_line(exc)
    with pytest.raises(ConfigError) as exc:
        preprocess_tool.parse_args(["--chunk-mb", "lots"])
    assert _one_line(exc) == "--chunk-mb: expected a number of MB, got 'lots'"
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [a]\nworkres: 2\n")
    with pytest.raises(ConfigError) as exc:
        preprocess_tool.parse_args(["--config", str(bad)])
    assert "unknown key 'workres' (did you mean 'workers'?)" in _one_line(exc)


def test_preprocess_help_lists_every_field(preprocess_tool: ModuleType, capsys: pytest.CaptureFixture) -> None:
    out = _help(preprocess_tool, capsys, PreprocessConfig)
    for flag in preprocess_tool.PREPROCESS_FLAGS:
        assert flag in out
    assert "--inputs (list[str], several values or a repeated flag, required)" in out


# -- tools/generate.py --------------------------------------------------------------------------------------


def test_generate_flags_give_the_engine_config(generate_tool: ModuleType) -> None:
    run = generate_tool.parse_args(
        [
            *["--load", "ck", "--tokenizer-model", "t.model", "--prompt"],
            "A [MASK] b",
            *[
                "--prompt",
                "C",
                "--max-new-tokens",
                "8",
                "--seed",
                "5",
                "--batch-size",
                "2",
                "--no-kv-cache",
                "--dtype",
                "bf16",
                "--show-tokens",
            ],
        ]
    )
    assert (run.load, run.tokenizer_model, run.prompt) == ("ck", "t.model", ["A [MASK] b", "C"])
    assert (run.batch_size, run.dtype, run.show_tokens) == (2, "bf16", True)
    assert run.generation.build(banned_ids=range(3, 5)) == GenerationConfig(
        max_new_tokens=8, seed=5, use_cache=False, banned_ids=(3, 4)
    )
    # Defaults are the engine's: greedy, nothing else changed.
    assert generate_tool.parse_args(["--load", "c", "--interactive"]).generation.build() == GenerationConfig()
    beam = generate_tool.parse_args(
        ["--load", "c", "--prompt-file", "p.txt", "--num-beams", "4", "--length-penalty", "0.5"]
    )
    assert beam.generation.build() == GenerationConfig(strategy="beam", num_beams=4, length_penalty=0.5)
    for flags, expected in (
        (["--sample"], GenerationConfig(strategy="sample")),
        (["--temperature", "0.8"], GenerationConfig(strategy="sample", temperature=0.8)),
        (["--top-k", "40"], GenerationConfig(strategy="sample", top_k=40)),
        (["--top-p", "1.0"], GenerationConfig(strategy="sample")),  # given => sampling, even at its default
        (["--sample", "--top-p", "0.9"], GenerationConfig(strategy="sample", top_p=0.9)),
    ):
        run = generate_tool.parse_args(["--load", "c", "--prompt", "x", *flags])
        assert run.generation.build() == expected, flags


def test_generate_yaml_and_dotted(generate_tool: ModuleType, tmp_path: Path) -> None:
    yaml_file = tmp_path / "gen.yaml"
    yaml_file.write_text("load: ck\nprompt: [one, two]\ngeneration:\n  top_k: 10\n  max_new_tokens: 4\n")
    run = generate_tool.parse_args(["--config", str(yaml_file), "--generation.top_k", "20"])
    assert run.prompt == ["one", "two"]
    assert run.generation.build() == GenerationConfig(strategy="sample", top_k=20, max_new_tokens=4)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt", "x"], "missing required option --load (see --help)"),
        (["--load", "c"], "give exactly one of --prompt, --prompt-file, --interactive"),
        (["--load", "c", "--prompt", "x", "--interactive"], "(got --prompt, --interactive)"),
        (["--load", "c", "--prompt", "x", "--greedy", "--sample"], "--greedy and --sample exclude each other"),
        (["--load", "c", "--prompt", "x", "--greedy", "--num-beams", "2"], "--greedy and --num-beams exclude"),
        (["--load", "c", "--prompt", "x", "--greedy", "--top-k", "5"], "--greedy does not combine with --temperature"),
        (["--load", "c", "--prompt", "x", "--num-beams", "2", "--top-p", "0.5"], "--num-beams does not combine"),
        (["--load", "c", "--prompt", "x", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--load", "c", "--prompt", "x", "--dtype", "fp8"], "dtype must be one of fp32, bf16, fp16"),
        (["--load", "c", "--promt", "x"], "unknown option --promt (did you mean '--prompt'?)"),
        (["--load", "c", "--prompt", "x", "--temperature", "hot"], "expected float, got 'hot'"),
    ],
)
def test_generate_errors_are_one_line(generate_tool: ModuleType, flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        generate_tool.parse_args(flags)
    assert message in _one_line(exc)


def test_generate_help_lists_every_field(generate_tool: ModuleType, capsys: pytest.CaptureFixture) -> None:
    out = _help(generate_tool, capsys, GenerateRun)
    for flag in generate_tool.GENERATE_FLAGS:
        assert flag in out


# -- tools/evaluate.py --------------------------------------------------------------------------------------


def test_evaluate_flags(evaluate_tool: ModuleType) -> None:
    run = evaluate_tool.parse_args(
        [
            "--load",
            "ck",
            "--eval-iters",
            "4",
            "--cloze",
            "c.jsonl",
            "--cloze-blank",
            "[gMASK]",
            "--json",
            "--data-path",
            "a",
            "b",
            "--split",
            "9,1,0",
            "--split-name",
            "test",
            "--seq-length",
            "64",
            "--micro-batch-size",
            "2",
            "--tokenizer-model",
            "t.model",
        ]
    )
    assert (run.load, run.eval_iters, run.cloze, run.cloze_blank, run.json) == ("ck", 4, "c.jsonl", "[gMASK]", True)
    assert (run.data_path, run.split, run.split_name, run.seq_length) == (["a", "b"], "9,1,0", "test", 64)
    assert (run.micro_batch_size, run.tokenizer_model, run.loss, run.task) == (2, "t.model", True, "")
    task = evaluate_tool.parse_args(
        [
            "--task",
            "seq2seq",
            "--valid-data",
            "v.jsonl",
            "--load",
            "ck",
            "--source-length",
            "40",
            "--target-length",
            "16",
            "--source-truncation",
            "left",
            "--num-beams",
            "2",
            "--no-repeat-ngram-size",
            "2",
            "--cloze-scoring",
            "mean",
            "--length-penalty",
            "0.7",
            "--output",
            "r.json",
        ]
    )
    assert task.output == "r.json"
    cfg = task.task_config()
    assert (cfg.task, cfg.valid_data, cfg.source_length, cfg.target_length) == ("seq2seq", "v.jsonl", 40, 16)
    assert (cfg.source_truncation, cfg.num_beams, cfg.no_repeat_ngram_size) == ("left", 2, 2)
    assert (cfg.cloze_scoring, cfg.length_penalty) == ("mean", 0.7)
    ppl = evaluate_tool.parse_args(["--task", "ppl", "--valid-data", "w.txt", "--load", "ck", "--window", "64"])
    assert (ppl.task, ppl.window, ppl.overlap, ppl.finetune.valid_data) == ("ppl", 64, 32, "w.txt")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--load", "c", "--no-loss"], "nothing to do: --no-loss without --cloze"),
        (["--load", "c", "--task", "ppl"], "--task needs --valid-data FILE"),
        (["--load", "c", "--task", "qa", "--valid-data", "v"], "task must be one of , seq2seq, cloze, ppl"),
        (["--load", "c", "--train-data", "t"], "unknown option --train-data (did you mean '--valid-data'?)"),
        (["--task", "cloze", "--valid-data", "v"], "missing required option --load"),
    ],
)
def test_evaluate_errors_are_one_line(evaluate_tool: ModuleType, flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        evaluate_tool.parse_args(flags)
    assert message in _one_line(exc)


def test_evaluate_help_lists_every_field(evaluate_tool: ModuleType, capsys: pytest.CaptureFixture) -> None:
    out = _help(evaluate_tool, capsys, EvaluateRun)
    for flag in evaluate_tool.EVALUATE_FLAGS:
        assert flag in out
