"""Bad input: one ``chronicals: error:`` line on stderr, exit code 2, no traceback, fast (before any training)."""
from __future__ import annotations

import pytest

from chronicals_compile.testing.cli_runner import error_lines, run_module, write_jsonl

PAIRS = [{"prompt": f"Question {i}?", "response": f"Answer number {i}, with a few words."} for i in range(20)]


def assert_usage_error(result, *needles: str) -> None:
    code, out, err = result
    lines = error_lines(err)
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("chronicals: error: "), lines
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_no_command_prints_help_and_exits_2(cli):
    code, _, err = cli()
    assert code == 2 and "finetune" in err


def test_help_exits_0(cli):
    code, out, _ = cli("finetune", "--help")
    assert code == 0 and "--lora-r" in out and "--batch-tokens" in out


@pytest.mark.parametrize("argv, needle", [
    (["finetune", "--bogus"], "unrecognized arguments: --bogus"),
    (["finetune", "--max-len", "abc"], "--max-len"),
    (["finetune", "--max-len", "4"], "--max-len must be at least 8"),
    (["finetune", "--steps", "0"], "--steps must be positive"),
    (["finetune", "--steps", "3", "--epochs", "1"], "not allowed with argument"),
    (["finetune", "--lora-r", "-1"], "--lora-r must be positive"),
    (["finetune", "--lora-alpha", "8"], "--lora-alpha needs --lora-r"),
    (["finetune", "--memory-budget", "2"], "--memory-budget must be from 0 to 1"),
    (["finetune", "--dtype", "fp8"], "invalid choice"),
    (["finetune", "--cce-mode", "cheap"], "invalid choice"),
    (["finetune", "--enable", "rms_nrom"], "--enable: unknown pattern(s) rms_nrom; known: rms_norm"),
    (["finetune", "--disable", "rope", "bogus"], "--disable: unknown pattern(s) bogus"),
    (["finetune", "--enable", "rope", "--disable", "rope"], "--enable and --disable both name rope"),
    (["finetune", "--text-field", "body"], "need --dataset"),
    (["verify", "--ops", "nope"], "unknown op(s) nope"),
])
def test_argument_errors(cli, argv, needle):
    assert_usage_error(cli(*argv), needle)


def test_missing_model_folder(cli, tmp_path):
    assert_usage_error(cli("finetune", "--model", tmp_path / "absent"), "neither a local folder nor a preset")


def test_folder_without_config(cli, tmp_path):
    assert_usage_error(cli("finetune", "--model", tmp_path), "no config.json")


def test_missing_dataset_file(cli, tmp_path):
    assert_usage_error(cli("finetune", "--model", "tiny", "--dataset", tmp_path / "absent.jsonl"), "does not exist")


def test_unknown_field(cli, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 3)
    assert_usage_error(cli("finetune", "--model", "tiny", "--dataset", path), "no 'text' field", "question, answer")
    assert_usage_error(cli("finetune", "--model", "tiny", "--dataset", path, "--text-field", "body"),
                       "--text-field 'body' is not a field")
    assert_usage_error(cli("finetune", "--model", "tiny", "--dataset", path, "--prompt-field", "question"),
                       "--response-field 'response' is not a field")


def test_max_len_under_longest_prompt(cli, tmp_path):
    rows = PAIRS + [{"prompt": "word " * 200, "response": "short"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert_usage_error(cli("finetune", "--model", "tiny", "--dataset", path, "--max-len", "32"),
                       "--max-len 32 is not longer than the longest prompt", "example 20")


def test_empty_dataset(cli, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert_usage_error(cli("finetune", "--model", "tiny", "--dataset", path), "empty")


def test_empty_responses(cli, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}] * 4)
    assert_usage_error(cli("finetune", "--model", "tiny", "--dataset", path), "no example has a token to train on")


def test_console_path_has_no_traceback(tmp_path):
    """The real entry point (a fresh interpreter), not only main() in-process."""
    result = run_module("finetune", "--model", tmp_path / "missing")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"chronicals: error: model '{tmp_path / 'missing'}' is neither a local folder nor a preset "
        "(default, tiny, qwen2.5-0.5b, llama-3.2-1b); there is no model-hub download: give a local "
        "from_pretrained folder"]
