"""Issue 16 (hardening), the command-line items: impossible flag values (#9, #8's CLI half), dolly-eval's bad-record
message (#12), the private lm-eval cache (#14), and one line + exit 2 instead of a traceback or late failure (#10):
invalid UTF-8 in argv, --device cuda without CUDA, dolly-eval --output FILE, dolly-finetune --local-output-dir FILE.

Each test stops the command before anything heavy would load (a stand-in that fails loudly if reached), so a check
that happens too late fails here.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest

from dolly_langchain.cli import main as dolly_main
from dolly_langchain.clitools import (
    fraction,
    non_negative_float,
    non_negative_int,
    output_dir_problem,
    positive_float,
    positive_int,
    text_problem,
)
from finetune.train import main as finetune_main
from finetune_helpers import synthetic_records, write_jsonl


def _one_error_line(err: str, prog: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _exit_2(capsys, call, *argv) -> str:
    """Run a CLI entry point that must refuse ``argv``: exit status 2 (returned or raised), one error line."""
    try:
        status = call(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    return err


class _MustNotLoad(AssertionError):
    pass


def _must_not_run(*args, **kwargs):
    raise _MustNotLoad("the command went on to load or run before refusing its input")


# --- #9 and #8: argument types refuse impossible values -----------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "bad", "good"),
    [
        (positive_int, ["0", "-1", "1.5", "x"], {"1": 1, "64": 64}),
        (non_negative_int, ["-1", "x"], {"0": 0, "7": 7}),
        (positive_float, ["0", "-2", "nan", "inf", "-inf", "NaN", "x"], {"0.5": 0.5, "80": 80.0}),
        (non_negative_float, ["-0.1", "nan", "inf", "Infinity", "x"], {"0": 0.0, "0.7": 0.7}),
        (fraction, ["1", "-0.1", "nan", "1.5"], {"0": 0.0, "0.05": 0.05}),
    ],
)
def test_argument_types_refuse_what_the_flag_cannot_mean(check, bad, good):
    for text in bad:
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            check(text)
    for text, value in good.items():
        assert check(text) == value


PLAN = ["--preset", "dolly-v2-7b-a10", "--num-gpus", "4", "--json"]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--per-device-train-batch-size", "0"),  # was a ZeroDivisionError
        ("--per-device-train-batch-size", "-8"),  # was a negative batch that "fits"
        ("--max-length", "-5"),
        ("--epochs", "-1"),
        ("--epochs", "nan"),
        ("--lora-r", "-4"),
        ("--gpu-memory-gb", "nan"),  # was a traceback
        ("--gpu-memory-gb", "inf"),
        ("--host-memory-gb", "-1"),
        ("--dataset-size", "0"),
        ("--mean-record-tokens", "0"),
    ],
)
def test_plan_refuses_impossible_values_naming_the_flag(capsys, flag, value):
    for call, argv, prog in (
        (finetune_main, ["plan", *PLAN, flag, value], "dolly-finetune plan"),
        (dolly_main, ["finetune", "plan", *PLAN, flag, value], "dolly finetune plan"),
    ):
        err = _exit_2(capsys, call, *argv)
        assert flag in _one_error_line(err, prog)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--per-device-train-batch-size", "0"), ("--per-device-eval-batch-size", "-1"), ("--max-length", "0"),
     ("--epochs", "0"), ("--lr", "nan"), ("--lr", "-1e-5"), ("--warmup-steps", "-1"), ("--lora-r", "0"),
     ("--lora-alpha", "-16"), ("--lora-dropout", "1.5"), ("--save-steps", "0"), ("--logging-steps", "0"),
     ("--eval-steps", "-50"), ("--save-total-limit", "0"), ("--max-records", "0"), ("--eval-samples", "0"),
     ("--seed", "-1")],
)
def test_training_refuses_impossible_values_before_loading(capsys, monkeypatch, tmp_path, flag, value):
    import finetune.train

    monkeypatch.setattr(finetune.train, "build_trainer", _must_not_run)
    err = _exit_2(capsys, finetune_main, "--local-output-dir", str(tmp_path / "run"), flag, value)
    assert flag in _one_error_line(err, "dolly-finetune")


def test_plan_still_takes_sensible_values(capsys):
    assert finetune_main(["plan", *PLAN, "--per-device-train-batch-size", "1", "--epochs", "0.5",
                          "--gpu-memory-gb", "24.5", "--max-length", "512"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["steps"]["epochs"] == 0.5 and plan["hardware"]["gpu_memory_gb"] == 24.5


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5"])
def test_temperature_nan_or_inf_is_refused(capsys, monkeypatch, value):
    """--temperature nan/inf used to decode greedily without a word (nan > 0 is False)."""
    import dolly_langchain.cli.ask

    monkeypatch.setattr(dolly_langchain.cli.ask, "load_llm", _must_not_run)
    err = _exit_2(capsys, dolly_main, "ask", "hi", "--temperature", value)
    assert "--temperature" in _one_error_line(err, "dolly ask")


# --- #12: dolly-eval's bad-record message names no flag it lacks --------------------------------------------------


def test_dolly_eval_bad_record_does_not_suggest_skip_bad_records(capsys, tmp_path):
    from dolly_langchain.evaluation.cli import main as eval_main

    records = synthetic_records(3)
    records[1]["response"] = ""
    data = write_jsonl(tmp_path / "dolly.jsonl", records)
    err = _exit_2(capsys, eval_main, "--generation", "--dolly-data", str(data), "--device", "cpu",
                  "--output", str(tmp_path / "out"))
    line = _one_error_line(err, "dolly-eval")
    assert "record 2 (line 2)" in line and "empty 'response'" in line
    assert "--skip-bad-records" not in line


def test_finetune_bad_record_still_suggests_its_flag(tmp_path):
    from finetune.data import BadRecordError, load_records

    records = synthetic_records(2)
    records[0]["instruction"] = ""
    with pytest.raises(BadRecordError, match="--skip-bad-records"):
        load_records(write_jsonl(tmp_path / "d.jsonl", records))


# --- #14: lm-eval's pickle-based request cache stays the user's alone ---------------------------------------------


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture()
def eval_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DOLLY_LANGCHAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "eval"


def test_new_eval_cache_is_created_private(eval_cache_home):
    from dolly_langchain.evaluation.harness import private_cache_dir

    folder = private_cache_dir("abc123")
    assert folder == eval_cache_home / "abc123"
    assert _mode(eval_cache_home) == 0o700 and _mode(folder) == 0o700


def test_open_eval_cache_is_narrowed_before_lm_eval_reads_it(eval_cache_home, monkeypatch):
    """An existing cache directory others could write (where someone could plant a pickle) is made 0700, and the
    request files 0600, before lm-eval opens its SqliteDict."""
    import lm_eval

    from dolly_langchain.evaluation import harness

    folder = eval_cache_home / "fp"
    folder.mkdir(parents=True)
    requests = folder / "requests_rank0.db"
    requests.write_bytes(b"")
    for path, mode in ((eval_cache_home, 0o777), (folder, 0o777), (requests, 0o666)):
        os.chmod(path, mode)
    seen = {}

    def fake_simple_evaluate(**kwargs):
        seen.update(use_cache=kwargs["use_cache"], modes=(_mode(eval_cache_home), _mode(folder), _mode(requests)))
        raise _MustNotLoad("stop here")

    monkeypatch.setattr(harness, "build_task", lambda name, docs: SimpleNamespace(eval_docs=[{}] * 4))
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    with pytest.raises(_MustNotLoad):
        harness.evaluate_task(None, "boolq", None, fingerprint="fp", samples=None, seed=0)
    assert seen["use_cache"].startswith(str(folder))
    assert seen["modes"] == (0o700, 0o700, 0o600)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to make another user's dir")
def test_eval_cache_of_another_user_is_refused(eval_cache_home):
    from dolly_langchain.errors import DollyError
    from dolly_langchain.evaluation.harness import UnsafeCacheError, private_cache_dir

    eval_cache_home.mkdir(parents=True)
    os.chown(eval_cache_home, 12345, 12345)
    with pytest.raises(UnsafeCacheError) as err:
        private_cache_dir("fp")
    assert isinstance(err.value, DollyError) and "another user" in str(err.value)
    assert "\n" not in str(err.value)


# --- #10: one line and exit 2, before any work ----------------------------------------------------------------------


def test_text_problem_names_the_bad_byte():
    assert text_problem("fine text, ünïcode 日本") is None
    assert "0xff" in text_problem("ab\udcffc") and "UTF-8" in text_problem("ab\udcffc")
    assert "surrogate" in text_problem("\ud800")


@pytest.mark.parametrize(
    "argv",
    [["ask", "caf\udce9"], ["ask", "hi", "--context", "\udcff\udcfe"], ["chat", "--system", "x\udc80"]],
)
def test_invalid_utf8_in_argv_is_one_line(capsys, monkeypatch, argv):
    """Python hands argv bytes that are not UTF-8 over as lone surrogates; the tokenizer raised a TypeError."""
    import dolly_langchain.cli.ask
    import dolly_langchain.cli.chat

    monkeypatch.setattr(dolly_langchain.cli.ask, "load_llm", _must_not_run)
    monkeypatch.setattr(dolly_langchain.cli.chat, "load_llm", _must_not_run)
    err = _exit_2(capsys, dolly_main, *argv)
    assert "not valid UTF-8" in _one_error_line(err, f"dolly {argv[0]}")


def test_invalid_utf8_in_real_argv_is_one_line():
    result = subprocess.run([sys.executable, "-m", "dolly_langchain.cli", "ask", b"caf\xe9 \xff"],
                            capture_output=True, timeout=120)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2
    assert "not valid UTF-8 (byte 0xe9" in _one_error_line(err, "dolly ask")


def test_chat_reports_a_line_that_is_not_utf8_and_goes_on(capsys, monkeypatch):
    import io

    import dolly_langchain.cli.chat as chat

    monkeypatch.setattr(chat, "load_llm", lambda args, chat=False: SimpleNamespace(stream=_must_not_run))
    monkeypatch.setattr(sys, "stdin", io.StringIO("\udcff\udcfe\n/exit\n"))
    args = argparse.Namespace(system=None)
    assert chat.run(args) == 0
    err = capsys.readouterr().err
    assert "dolly: error: that message is not valid UTF-8 (byte 0xff" in err


def test_device_cuda_without_cuda_is_one_line_before_loading(capsys, monkeypatch):
    """PyTorch's own AssertionError ("Torch not compiled with CUDA enabled") used to escape after the load."""
    import torch

    from dolly_langchain.llm import DollyLLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(DollyLLM, "from_model_id", classmethod(lambda cls, *a, **k: _must_not_run()))
    err = _exit_2(capsys, dolly_main, "ask", "hi", "--engine", "transformers", "--device", "cuda")
    assert "--device cuda" in _one_error_line(err, "dolly")


def test_output_dir_problem():
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        file = os.path.join(root, "file")
        open(file, "w").close()
        assert output_dir_problem(os.path.join(root, "new", "deeper")) is None
        assert output_dir_problem(root) is None
        assert output_dir_problem(file) == "exists and is not a directory"
        assert "is not a directory" in output_dir_problem(os.path.join(file, "sub"))


@pytest.mark.parametrize("under_file", [False, True])
def test_dolly_eval_output_file_is_refused_before_scoring(capsys, monkeypatch, tmp_path, under_file):
    from dolly_langchain.evaluation import runner
    from dolly_langchain.evaluation.cli import main as eval_main

    file = tmp_path / "results.txt"
    file.write_text("not a directory")
    output = file / "sub" if under_file else file
    monkeypatch.setattr(runner, "run_card", _must_not_run)
    monkeypatch.setattr(runner, "run_generation", _must_not_run)
    err = _exit_2(capsys, eval_main, "--tasks", "boolq", "--device", "cpu", "--output", str(output))
    assert f"--output {output}" in _one_error_line(err, "dolly-eval")


@pytest.mark.parametrize("flag", ["--local-output-dir", "--export-dir"])
def test_finetune_output_file_is_refused_before_loading(capsys, monkeypatch, tmp_path, flag):
    import finetune.train

    file = tmp_path / "taken"
    file.write_text("a file")
    monkeypatch.setattr(finetune.train, "build_trainer", _must_not_run)
    dirs = {"--local-output-dir": str(tmp_path / "run"), "--export-dir": str(tmp_path / "export")}
    dirs[flag] = str(file)
    argv = [item for pair in dirs.items() for item in pair]
    for call, prog, prefix in ((finetune_main, "dolly-finetune", []), (dolly_main, "dolly", ["finetune"])):
        err = _exit_2(capsys, call, *prefix, *argv, "--report-to", "none")
        assert f"{flag} {file}: exists and is not a directory" in _one_error_line(err, prog)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to make another user's dir")
def test_dolly_eval_refuses_a_foreign_cache_in_one_line_before_loading(capsys, monkeypatch, tmp_path, tiny_neox_dir,
                                                                         eval_cache_home):
    from dolly_langchain.evaluation import runner
    from dolly_langchain.evaluation.cli import main as eval_main
    from eval_helpers import write_eval_dir

    data = write_eval_dir(tmp_path / "eval", tasks=("boolq",))
    eval_cache_home.mkdir(parents=True)
    os.chown(eval_cache_home, 12345, 12345)
    monkeypatch.setattr(runner, "_load_lm", _must_not_run)
    err = _exit_2(capsys, eval_main, str(tiny_neox_dir), "--tasks", "boolq", "--data-dir", str(data), "--device",
                  "cpu", "--output", str(tmp_path / "out"))
    assert "belongs to another user" in _one_error_line(err, "dolly-eval")
