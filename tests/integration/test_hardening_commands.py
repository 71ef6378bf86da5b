"""Issue 16 (hardening), end to end: each command family run as a user runs it (the installed console scripts, in
their own process, on the embedded SmolLM2-135M-Instruct where a model is needed) with the bad input a
hostile-but-fair user tried. Each refusal is one ``PROG: error:`` line on stderr and exit code 2, never a traceback,
and nothing is left half-written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_helpers import synthetic_records

BIN = Path(sys.executable).parent
ERROR_LINE = re.compile(r"^(dolly[\w -]*): error: ")


def _run(*argv, input: str | bytes | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [str(BIN / argv[0]), *argv[1:]]
    return subprocess.run(command, input=input, capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _refused(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code 2 and exactly one error line holding each of ``expected``; returns that line."""
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# -- dolly ask / dolly chat ---------------------------------------------------------------------------------------


def test_dolly_ask_refuses_what_cannot_run(tmp_path):
    big = "word " * 20_000  # ~100 KB: more tokens than the model's window
    _refused(_run("dolly", "ask", big, "--max-new-tokens", "8"), "do not fit the model's window")
    _refused(_run("dolly", "ask", "hi", "--max-new-tokens", "10000000000"), "do not fit the model's window")
    context = tmp_path / "context.txt"
    context.write_text("The sky is blue. " * 60_000)  # ~1 MB
    _refused(_run("dolly", "ask", "What color is the sky?", "--context-file", str(context)), "window")
    _refused(_run("dolly", "ask", b"caf\xe9 \xff"), "not valid UTF-8")
    _refused(_run("dolly", "ask", "hi", "--temperature", "nan"), "--temperature")
    if not _has_cuda():
        _refused(_run("dolly", "ask", "hi", "--engine", "transformers", "--device", "cuda"), "cuda")


def test_dolly_chat_reports_a_bad_message_and_goes_on():
    big = "word " * 20_000
    result = _run("dolly", "chat", "--max-new-tokens", "8", input=f"{big}\nSay hello.\n/exit\n".encode())
    err = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1 and "do not fit the model's window" in errors[0]
    assert result.stdout.decode().strip()  # the next message was answered


def test_a_program_that_exits_while_the_embedded_model_generates_exits_cleanly():
    """A script (or a chat quit mid-answer) that ends while a CTranslate2 batch is still generating used to abort
    at interpreter shutdown with "terminate called without an active exception" (exit code -6/134)."""
    script = (
        "import threading, time\n"
        "from dolly_langchain.llm import DollyLLM\n"
        "llm = DollyLLM(max_tokens=400)\n"
        "llm.invoke('hi')\n"
        "threading.Thread(target=lambda: llm.invoke('Write a long story about a dragon.'), daemon=True).start()\n"
        "time.sleep(1.0)\n"
        "print('leaving')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-2000:]
    assert result.stdout.decode().strip() == "leaving"


# -- dolly rag ----------------------------------------------------------------------------------------------------


def test_dolly_rag_reports_bad_inputs_and_indexes_the_rest(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a_deep.jsonl").write_bytes(b'{"text": "ok"}\n' + b"[" * 100_000 + b"\n")
    (docs / "b_latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (docs / "c_sky.txt").write_text("The sky is blue because air scatters blue light the most.\n")
    if hasattr(os, "mkfifo"):
        os.mkfifo(docs / "d_pipe.txt")  # read before any type check, this used to hang the command
    index = tmp_path / "index.sqlite"
    result = _run("dolly", "rag", "index", str(docs), "--index", str(index))
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err, err
    failed = 3 if hasattr(os, "mkfifo") else 2
    assert f"1 added, 0 skipped (unchanged), 0 replaced, {failed} failed" in out, out
    assert f"{docs / 'a_deep.jsonl'}:2:" in err and f"{docs / 'b_latin1.jsonl'}:1:" in err

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _refused(_run("dolly", "rag", "index", str(docs), "--index", str(a_file / "i.sqlite")), "not a directory")
    _refused(_run("dolly", "rag", "index", str(docs), "--chunk-overlap", "-1", "--index", str(tmp_path / "x")),
             "--chunk-overlap")
    _refused(_run("dolly", "rag", "ask", b"caf\xe9?", "--index", str(index)), "not valid UTF-8")
    assert not (a_file / "i.sqlite").exists() and not (tmp_path / "x").exists()


# -- dolly-eval ---------------------------------------------------------------------------------------------------


def test_dolly_eval_refuses_bad_data_and_outputs_before_any_work(tmp_path):
    records = [json.dumps(r).encode() for r in synthetic_records(3)]
    data = tmp_path / "dolly.jsonl"
    data.write_bytes(b"\n".join([records[0], b"[" * 100_000, records[1]]) + b"\n")
    out = tmp_path / "out"
    line = _refused(_run("dolly-eval", "--generation", "--dolly-data", str(data), "--output", str(out)),
                    "record 2 (line 2)", str(data))
    assert "--skip-bad-records" not in line and not out.exists()
    a_file = tmp_path / "report.txt"
    a_file.write_text("keep me")
    _refused(_run("dolly-eval", "--generation", "--output", str(a_file)), "--output")
    assert a_file.read_text() == "keep me"


# -- dolly-finetune -----------------------------------------------------------------------------------------------


def test_dolly_finetune_refuses_bad_records_flags_and_outputs(tmp_path):
    records = [json.dumps(r).encode() for r in synthetic_records(4)]
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"\n".join([records[0], b'{"instruction": "\xff"}', *records[1:]]) + b"\n")
    out = tmp_path / "run"
    _refused(_run("dolly-finetune", "--training-dataset", str(data), "--local-output-dir", str(out)),
             "record 2 (line 2)", "not valid UTF-8", "--skip-bad-records")
    assert not out.exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _refused(_run("dolly-finetune", "--training-dataset", str(data), "--local-output-dir", str(a_file)),
             "--local-output-dir")
    _refused(_run("dolly-finetune", "plan", "--num-gpus", "8", "--per-device-train-batch-size", "0"),
             "--per-device-train-batch-size")
    _refused(_run("dolly-finetune", "plan", "--num-gpus", "8", "--gpu-memory-gb", "nan"), "--gpu-memory-gb")
    _refused(_run("dolly", "finetune", "plan", "--num-gpus", "8", "--max-length", "-5"), "--max-length")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _commands_installed():
    for name in ("dolly", "dolly-eval", "dolly-finetune"):
        if not (BIN / name).exists():
            pytest.fail(f"{BIN / name} is missing: install the package (./dev install) to run the commands")
