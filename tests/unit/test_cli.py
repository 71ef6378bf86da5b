import json
import os
import subprocess
import sys

import pytest

from conftest import MEMORIZED
from dolly_langchain.cli import main

FRANCE, COLOR, SUMMARY = MEMORIZED


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ask_prints_the_response(capsys, memorized_neox_dir):
    code, out, _ = run(capsys, "ask", FRANCE[0], "--model", str(memorized_neox_dir), "--max-new-tokens", "40")
    assert code == 0 and out == FRANCE[2] + "\n"


def test_ask_with_context_file_and_stream(capsys, memorized_neox_dir, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text(SUMMARY[1] + "\n", encoding="utf-8")
    code, out, _ = run(capsys, "ask", SUMMARY[0], "--context-file", str(context), "--model", str(memorized_neox_dir),
                       "--stream")
    assert code == 0 and out == SUMMARY[2] + "\n"
    code, out, _ = run(capsys, "ask", SUMMARY[0], "--context", SUMMARY[1], "--model", str(memorized_neox_dir))
    assert out == SUMMARY[2] + "\n"


def test_ask_json(capsys, memorized_neox_dir):
    code, out, _ = run(capsys, "ask", COLOR[0], "--model", str(memorized_neox_dir), "--json")
    record = json.loads(out)
    assert code == 0 and record["response"] == COLOR[2] and record["prompt_format"] == "dolly"
    assert record["instruction"] == COLOR[0] and record["context"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask", "   "], "instruction is empty"),
        (["ask", "hi", "--context-file", "/no/such/file.txt"], "cannot read --context-file /no/such/file.txt"),
        (["ask", "hi", "--model", "./no-such-model-dir"], "does not exist"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("dolly: error")]
    assert code == 2 and len(lines) == 1 and message in lines[0]


def test_directory_without_model_is_reported(capsys, tmp_path):
    code, _, err = run(capsys, "ask", "hi", "--model", str(tmp_path))
    assert code == 2 and "holds no model" in err


def test_unreachable_hub_is_named(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "dolly_langchain.cli", "ask", "hi", "--model", "databricks/dolly-v2-3b"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2
    assert "hub is unreachable" in result.stderr and "databricks/dolly-v2-3b" in result.stderr


def test_bad_flag_values_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "hi", "--max-new-tokens", "0"])
    assert exit_info.value.code == 2
    assert "--max-new-tokens" in capsys.readouterr().err
