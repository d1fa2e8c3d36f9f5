"""Bad input to the engine's commands ends in one message and a non-zero exit code, never a traceback.

A table: command line -> exit code and a fragment of the message. Each row runs the command's main()
in-process (no subprocess, no torch import) with files made by the ``inputs`` fixture; ``@`` in an
argument is that fixture's directory. Rows that fail before any network use: the storage endpoint
points at a closed port, and none is reached.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from finetune_engine.cli import errors as cli_errors
from finetune_engine.cli import finetuning as finetuning_cli
from finetune_engine.cli import scripts as seed_scripts
from finetune_engine.cli.main import main as engine_main

GOOD_CHAT = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def _config(data: str) -> dict:
    return {
        "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": data}]}},
        "training_args": {"output_dir": "out", "learning_rate": 0.001, "max_steps": 2},
        "batchsize_conf": {"total_train_batch_size": 2},
        "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}},
        "run_conf": {"model": "m"},
    }


# A key given twice (PyYAML would keep the last one silently) and a kilobyte of nested anchors that
# expands to 10^8 values: shared with the operator's tests, which refuse exactly the same.
DUPLICATE_KEYS = "run_conf:\n  model: m\ntraining_args:\n  max_steps: 5\ntraining_args: {}\n"


def _bomb(levels: int = 9, width: int = 9) -> str:
    text = 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]\n"
    return text


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """Every malformed input of the table, in one directory."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv(cli_errors.DEBUG_ENV, "0")
    monkeypatch.delenv("FINETUNE_CONFIG", raising=False)
    d = tmp_path
    (d / "chat.jsonl").write_text(json.dumps(GOOD_CHAT) + "\n")
    (d / "ok.yaml").write_text(yaml.safe_dump(_config(str(d / "chat.jsonl")), sort_keys=False))
    (d / "dir").mkdir()
    (d / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe garbage")
    (d / "empty.yaml").write_text("")
    (d / "list.yaml").write_text("- data_conf\n- run_conf\n")
    (d / "scalar.yaml").write_text("42\n")
    (d / "unclosed.yaml").write_text("data_conf:\n  training_data: [\n")
    (d / "tab.yaml").write_text("data_conf:\n\ttraining_data: x\n")
    (d / "pyobj.yaml").write_text('run_conf: !!python/object/apply:os.system ["echo hi"]\n')
    (d / "twodocs.yaml").write_text("a: 1\n---\nb: 2\n")
    (d / "dup.yaml").write_text(DUPLICATE_KEYS)
    (d / "bomb.yaml").write_text(_bomb())
    (d / "recursive.yaml").write_text("a: &a [1, *a]\n")
    (d / "deep.yaml").write_text("a: " + "[" * 500 + "]" * 500 + "\n")
    (d / "big.yaml").write_text("# padding\n" * 120_000)
    (d / "unicode.yaml").write_text("ünïcødé: ✓\ndata_conf: {}\n")
    (d / "wrong_types.yaml").write_text(
        "data_conf: 5\ntraining_args: [1, 2]\nbatchsize_conf: {total_train_batch_size: many}\n"
        "run_conf: null\n"
    )
    (d / "tie.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    (d / "utf16.jsonl").write_bytes("\ufeff".encode("utf-16-le") + '{"text": "x"}\n'.encode("utf-16-le"))
    (d / "notjson.jsonl").write_text("{not json\n")
    (d / "empty.jsonl").write_text("")
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"not read: the config is refused first")
    return d


# (argv, exit code, fragment of the message). "@" is the inputs directory.
CORPUS: list[tuple[list[str], int, str]] = [
    # --- missing files, directories, unreadable or non-text config files
    (["validate-config", "@/missing.yaml"], 2, "file not found; check the path"),
    (["validate-config", "@/dir"], 2, "is a directory; give the path of the YAML config file"),
    (["validate-config", "@/binary.yaml"], 2, "binary.yaml:1: not UTF-8 text (byte 0x89)"),
    (["validate-config", "@/empty.yaml"], 2, "got an empty document"),
    (["validate-config", "/dev/null"], 2, "got an empty document"),
    (["validate-config", "@/big.yaml"], 2, "larger than 1048576 bytes"),
    # --- YAML that is not a config, not valid, or unsafe
    (
        ["validate-config", "@/list.yaml"],
        2,
        "expected a mapping of sections (data_conf, training_args, ...), got list",
    ),
    (["validate-config", "@/scalar.yaml"], 2, "got int"),
    (["validate-config", "@/unclosed.yaml"], 2, "unclosed.yaml:3: not valid YAML"),
    (["validate-config", "@/tab.yaml"], 2, "tab.yaml:2: not valid YAML"),
    (["validate-config", "@/pyobj.yaml"], 2, "could not determine a constructor for the tag"),
    (["validate-config", "@/twodocs.yaml"], 2, "twodocs.yaml:2: not valid YAML: but found another document"),
    (
        ["validate-config", "@/dup.yaml"],
        2,
        "dup.yaml:5: not valid YAML: duplicate key 'training_args' on lines 3 and 5",
    ),
    (["validate-config", "@/bomb.yaml"], 2, "the aliases (*name) expand to more than 200000 values"),
    (["validate-config", "@/recursive.yaml"], 2, "refers to the node that contains it"),
    (["validate-config", "@/deep.yaml"], 2, "deep.yaml:1: not valid YAML: nested deeper than 64 levels"),
    (["validate-config", "@/unicode.yaml"], 2, "ünïcødé (@/unicode.yaml:1): unknown key"),
    (
        ["validate-config", "@/wrong_types.yaml"],
        2,
        "data_conf (@/wrong_types.yaml:1): Input should be a valid",
    ),
    # --- --set overrides
    (["validate-config", "@/ok.yaml", "--set", "nonsense"], 2, "'nonsense': expected key.path=value"),
    (["validate-config", "@/ok.yaml", "--set", "=3"], 2, "expected key.path=value"),
    (["validate-config", "@/ok.yaml", "--set", "a..b=1"], 2, "'a..b': empty path component"),
    (
        ["validate-config", "@/ok.yaml", "--set", "training_args.max_steps=["],
        2,
        "training_args.max_steps: the value '[' is not valid YAML",
    ),
    (
        ["validate-config", "@/ok.yaml", "--set", "run_conf.model={a: 1, a: 2}"],
        2,
        "duplicate key 'a'",
    ),
    (
        ["validate-config", "@/ok.yaml", "--set", "run_conf.model=!!python/name:os.system"],
        2,
        "run_conf.model: the value '!!python/name:os.system' carries a YAML tag",
    ),
    (["validate-config", "@/ok.yaml", "--set", "run_conf.model=!!str x"], 2, "carries a YAML tag"),
    (
        [
            "validate-config",
            "@/ok.yaml",
            "--set",
            "data_conf.training_data.datasets[99999999999999999999].path=x",
        ],
        2,
        "index 99999999999999999999 out of range",
    ),
    (["validate-config", "@/ok.yaml", "--set", "run_conf.model.x=1"], 2, "run_conf.model is not a section"),
    (["validate-config", "@/ok.yaml", "--method", "nope"], 2, "invalid choice: 'nope'"),
    # --- values no trainer can use
    (["validate-config", "@/ok.yaml", "--set", "training_args.max_steps=0"], 2, "training_args.max_steps"),
    (
        ["validate-config", "@/ok.yaml", "--set", "training_args.learning_rate=.nan"],
        2,
        "training_args.learning_rate (@/ok.yaml:8): nan is not a usable value",
    ),
    (
        ["validate-config", "@/ok.yaml", "--set", "training_args.learning_rate=1e999"],
        2,
        "inf is not a usable",
    ),
    (
        ["validate-config", "@/ok.yaml", "--set", "training_args.max_steps=99999999999999999999999"],
        2,
        "training_args.max_steps: 99999999999999999999999 is too large a number",
    ),
    (
        ["validate-config", "@/ok.yaml", "--set", "batchsize_conf.total_train_batch_size=1e400"],
        2,
        "batchsize_conf.total_train_batch_size",
    ),
    (["validate-config", "@/ok.yaml", "--set", "training_args.output_dir=/"], 2, "is the filesystem root"),
    (
        ["validate-config", "@/ok.yaml", "--set", "peft_conf.peft_kwargs.lora_dropout=1"],
        2,
        "lora_dropout must be",
    ),
    # --- the finetuning command (the seed's interface)
    (["finetuning", "sft", "@/dir"], 2, "is a directory"),
    (["finetuning", "dpo", "@/pyobj.yaml"], 2, "could not determine a constructor"),
    (
        [
            "finetuning",
            "sft",
            "@/ok.yaml",
            "--set",
            "training_args.max_steps=-1",
            "--set",
            "training_args.num_train_epochs=0",
        ],
        2,
        "training_args.num_train_epochs: must be greater than 0 (got 0): nothing would be trained",
    ),
    (["finetuning", "sft", "@/missing.yaml", "--validate-only"], 2, "file not found"),
    (["finetuning", "sft", "@/bomb.yaml", "--validate-only"], 2, "expand to more than"),
    # --- data files
    (["validate-data", "@/missing.jsonl"], 1, "missing.jsonl:0: file not found"),
    (["validate-data", "@/dir"], 1, "not a regular file"),
    (["validate-data", "@/binary.yaml"], 1, "binary.yaml:1:"),
    (["validate-data", "@/utf16.jsonl"], 1, "UTF-16"),
    (["validate-data", "@/notjson.jsonl"], 1, "notjson.jsonl:1:"),
    (["validate-data", "@/empty.jsonl"], 1, "no examples: the file is empty"),
    (
        ["validate-data", "@/tie.jsonl", "--method", "dpo"],
        1,
        "tie.jsonl:1: chosen and rejected are identical",
    ),
    # --- bucket URIs and paths of the pod jobs
    (["pull", "s3://", "@/out"], 2, "is not a valid bucket name"),
    (["pull", "s3://bucket/../x", "@/out"], 2, "'.' and '..' are not allowed"),
    (["pull", "s3://UPPER/x", "@/out"], 2, "'UPPER' is not a valid bucket name"),
    (["pull", "http://host/x", "@/out"], 2, "only s3:// URIs are supported"),
    (
        ["deliver-data", "s3://UPPER/x", "--script", "@/missing.py"],
        2,
        "missing.py: No such file or directory",
    ),
    (["deliver-model", "@/dir", "s3://"], 2, "is not a valid bucket name"),
    (
        ["merge-job", "--base", "s3://", "--adapter", "s3://bkt/a", "--output", "s3://bkt/../o"],
        2,
        "not allowed",
    ),
    (["train-job", "--checkpoint-uri", "s3://bkt/c"], 2, "no config: pass --config FILE"),
    (["train-job", "--config", "@/missing.yaml", "--checkpoint-uri", "s3://bkt/c"], 2, "cannot read"),
    (["train-job", "--config", "@/dup.yaml", "--checkpoint-uri", "s3://bkt/c"], 2, "duplicate key"),
    (["eval-job", "--model", "s3://", "--data", "@/tie.jsonl"], 2, "is not usable here"),
    (["vllm-adapter", "@/missing"], 1, "no adapter_model.safetensors"),
    (["generate", "@/missing.yaml", "@/out.yaml"], 2, "No such file or directory"),
    # --- the seed's console scripts (behind the same boundary)
    (
        ["merge_adapter", "@/base", "@/adapter", "@/out", "--device_map", "{nope"],
        2,
        "merge_adapter: error: Expecting property name enclosed in double quotes",
    ),
    (["merge_adapter", "@/base", "@/adapter"], 2, "the following arguments are required: outpath"),
    (["create_vllm_compatible_adapter", "@/missing"], 1, "no adapter_model.safetensors"),
    (
        ["create_vllm_compatible_adapter", "@/adapter", "--training-config", "@/dup.yaml"],
        1,
        "duplicate key 'training_args' on lines 3 and 5",
    ),
    (["create_vllm_compatible_adapter", "@/adapter", "--max-lora-rank", "x"], 2, "invalid int value: 'x'"),
    (
        ["generate", "@/dup.yaml", "@/out.yaml"],
        2,
        "dup.yaml:5: not valid YAML: duplicate key 'training_args'",
    ),
    (["generate", "@/bomb.yaml", "@/out.yaml"], 2, "the aliases (*name) expand to more than 200000 values"),
    (["generate", "@/binary.yaml", "@/out.yaml"], 2, "can't decode byte 0x89"),
    (["replace_tokens", "@/dir", "@/out", "--from", "a"], 2, "the following arguments are required: --to"),
    (
        ["replace_tokens", "@/dir", "@/out", "--from", "a", "--to", "b", "--from", "c", "--to"],
        2,
        "expected one argument",
    ),
    (
        ["replace_tokens", "@/dir", "@/out", "--from", "a", "--to", "b", "--from", "c"],
        2,
        "Different number of --from and --to specified!",
    ),
    # --- other commands
    (["chat", "@/dir", "hello"], 2, "no config.json; give the directory of a saved model"),
    (["tiny", "data", "@/dir"], 2, "Is a directory; give the path of a file"),
    (["local-s3", "status", "--dir", "@/binary.yaml"], 2, "Not a directory"),
    (["no-such-command"], 2, "unknown command 'no-such-command'"),
]


def _run(argv: list[str]) -> int:
    """The console script ``argv[0]`` as engine/pyproject.toml installs it."""
    if argv[0] == "finetuning":
        return finetuning_cli.main(argv[1:])
    if argv[0] in seed_scripts.SCRIPTS:
        return getattr(seed_scripts, argv[0])(argv[1:])
    return engine_main(argv)


@pytest.mark.parametrize(
    "argv,code,fragment", CORPUS, ids=[f"{i:02d}-{' '.join(c[0])[:60]}" for i, c in enumerate(CORPUS)]
)
def test_bad_input_ends_in_one_message(inputs, capsys, argv, code, fragment):
    argv = [a.replace("@", str(inputs)) for a in argv]
    start = time.monotonic()
    try:
        rc = _run(argv)
    except SystemExit as exit_:  # argparse's usage errors
        rc = exit_.code
    elapsed = time.monotonic() - start
    out = capsys.readouterr()
    text = out.err + out.out
    assert rc == code, text
    assert fragment.replace("@", str(inputs)) in text, text
    assert "Traceback" not in text and "SystemError" not in text, text
    assert elapsed < 5, f"took {elapsed:.1f}s"


def test_corpus_covers_every_class():
    """The table keeps at least 40 cases, each command of the engine that takes a file or URI among them."""
    assert len(CORPUS) >= 40
    commands = {argv[0] for argv, _, _ in CORPUS}
    for name in ("validate-config", "finetuning", "validate-data", "pull", "deliver-data", "deliver-model"):
        assert name in commands
    for name in ("merge-job", "train-job", "eval-job", "generate", "chat", "tiny", "local-s3"):
        assert name in commands
    for name in seed_scripts.SCRIPTS:  # the seed's console scripts
        assert name in commands


def test_alias_bomb_is_refused_fast(inputs):
    """A one-kilobyte file of nested anchors (10^8 values expanded) is refused within a second."""
    from finetune_engine.config import ConfigError, load_config

    path = inputs / "bomb.yaml"
    assert path.stat().st_size < 1024
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"bomb.yaml:\d+: not valid YAML: the aliases"):
        load_config(path)
    assert time.monotonic() - start < 1


def test_debug_shows_the_traceback(inputs, monkeypatch):
    """--debug (FINETUNE_DEBUG=1) lets the original exception through, with its traceback."""
    with pytest.raises(IsADirectoryError):
        engine_main(["--debug", "tiny", "data", str(inputs / "dir")])
    monkeypatch.setenv(cli_errors.DEBUG_ENV, "1")
    with pytest.raises(IsADirectoryError):
        engine_main(["tiny", "data", str(inputs / "dir")])


def test_an_unexpected_error_prints_its_traceback_then_one_line(capsys, monkeypatch):
    """A crash or a bug (not bad input) shows its traceback, for the pod log, then one line with its
    type, message and where it was raised; exit code 1."""
    monkeypatch.setenv(cli_errors.DEBUG_ENV, "0")

    def broken(argv):
        raise RuntimeError("something broke")

    assert cli_errors.run_guarded("finetune-engine x", broken, []) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Traceback (most recent call last):")
    assert 'raise RuntimeError("something broke")' in err
    *_, before, last = err.splitlines()
    assert before == "RuntimeError: something broke"
    assert last.startswith("finetune-engine x: error: unexpected RuntimeError: something broke (at ")
    assert "test_bad_inputs.py:" in last


def test_a_known_failure_is_one_line_with_its_type(capsys, monkeypatch):
    """A failure the engine words itself (a batch that never fits, storage) stays one line, and keeps
    its type: the provider recognises BatchTooLargeError in the pod log."""
    from finetune_engine.autobatch import BatchTooLargeError

    monkeypatch.setenv(cli_errors.DEBUG_ENV, "0")

    def too_large(argv):
        raise BatchTooLargeError("auto batch size: one row does not fit in memory")

    assert cli_errors.run_guarded("finetuning", too_large, []) == 1
    err = capsys.readouterr().err
    assert err == "finetuning: error: BatchTooLargeError: auto batch size: one row does not fit in memory\n"


@pytest.mark.parametrize(
    "error", [ConnectionRefusedError(111, "Connection refused"), TimeoutError("timed out"), ConnectionError()]
)
def test_a_network_failure_is_retryable_not_bad_input(capsys, monkeypatch, error):
    """A network that is down is no fault of the input: exit 1 (the provider retries), one line, never
    exit 2 (which the provider does not retry)."""
    monkeypatch.setenv(cli_errors.DEBUG_ENV, "0")

    def offline(argv):
        raise error

    assert cli_errors.run_guarded("pull", offline, []) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pull: error: {type(error).__name__}: ") and "Traceback" not in err


def _scripts() -> dict[str, str]:
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "engine" / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["project"]["scripts"]


# console script -> (arguments, the function its run ends in, replaced here by one that crashes)
_CRASH_POINTS = {
    "finetuning": ([], "finetune_engine.cli.finetuning:_main"),
    "aimfttk": ([], "finetune_engine.cli.finetuning:_main"),
    "finetune-engine": (["validate-config", "x.yaml"], "finetune_engine.cli.validate_config:main"),
    "merge_adapter": ([], "finetune_engine.merge:main"),
    "create_vllm_compatible_adapter": ([], "finetune_engine.adapters:main"),
    "generate": ([], "finetune_engine.generate:main"),
    "replace_tokens": ([], "finetune_engine.replace_tokens:main"),
}


@pytest.mark.parametrize("script", sorted(_CRASH_POINTS))
def test_every_console_script_runs_behind_the_boundary(script, capsys, monkeypatch):
    """Each installed command, as engine/pyproject.toml names it: bad input is one line (the table
    above), a crash is its traceback and one line, exit code 1."""
    import importlib

    monkeypatch.setenv(cli_errors.DEBUG_ENV, "0")
    module_name, _, attr = _scripts()[script].partition(":")
    entry = getattr(importlib.import_module(module_name), attr)
    argv, crash_point = _CRASH_POINTS[script]
    target, _, name = crash_point.partition(":")

    def crash(argv):
        raise KeyError("boom")

    monkeypatch.setattr(importlib.import_module(target), name, crash)
    assert entry(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "KeyError: 'boom'" in err
    assert err.rstrip().splitlines()[-1].startswith(f"{script if script != 'aimfttk' else 'finetuning'}")
    assert "error: unexpected KeyError: 'boom' (at " in err.rstrip().splitlines()[-1]


def test_every_console_script_is_covered():
    """A new console script gets a crash point above, so it is checked to run behind the boundary."""
    assert set(_scripts()) == set(_CRASH_POINTS)
