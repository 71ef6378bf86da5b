"""End-to-end fine-tunes on CPU through the public API: tiny GPT-NeoX (Dolly v2) and GPT-J on Alpaca (Dolly v1).

Each run starts from a base model whose tokenizer lacks Dolly's special tokens, as a real Pythia or GPT-J does,
so the runs also prove the tokens are added and the embeddings resized.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import tiny_gptj
from dolly_langchain.prompts import DOLLY_SPECIAL_TOKENS, read_format_record
from finetune.train import FinetuneError
from finetune_helpers import cli_args, log_history, losses, run_training, synthetic_records, write_jsonl


@pytest.fixture(scope="module")
def neox_run(tmp_path_factory, base_neox_dir):
    """One finished run with evaluation, checkpoints, TensorBoard and an export copy."""
    tmp = tmp_path_factory.mktemp("neox-run")
    data = write_jsonl(tmp / "dolly.jsonl", synthetic_records(72))
    argv = cli_args(base_neox_dir, data, tmp / "run", "--test-size", "8", "--eval-steps", "4", "--save-steps", "4",
                    "--epochs", "2", "--per-device-train-batch-size", "4", "--max-length", "128",
                    "--report-to", "tensorboard", "--export-dir", str(tmp / "export"))
    return argv, run_training(argv), tmp


def test_run_writes_a_complete_model_dir(neox_run):
    _, final, tmp = neox_run
    assert final == tmp / "run" / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "trainer_state.json", "dolly_prompt_format.json"):
        assert (final / name).is_file(), name
    assert read_format_record(final)["format"] == "dolly"
    assert sorted((tmp / "run").glob("checkpoint-*")), "checkpoints every --save-steps"
    assert list((tmp / "run" / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs"


def test_loss_is_logged_and_falls(neox_run):
    history = log_history(neox_run[1])
    train_losses = list(losses(history).values())
    assert len(train_losses) >= 6
    assert train_losses[-1] < train_losses[0] - 0.5
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(evals) >= 2 and evals[-1] < evals[0]


def test_special_tokens_added_and_parameters_changed(neox_run, base_neox_dir):
    from transformers import AutoTokenizer

    final = neox_run[1]
    tokenizer = AutoTokenizer.from_pretrained(final)
    for token in DOLLY_SPECIAL_TOKENS:
        assert len(tokenizer.encode(token)) == 1, token
    before, after = load_file(base_neox_dir / "model.safetensors"), load_file(final / "model.safetensors")
    rows = "gpt_neox.embed_in.weight"
    assert after[rows].shape[0] == len(tokenizer) == before[rows].shape[0] + 3
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert not after[name].equal(before[name])


def test_export_dir_is_a_copy(neox_run):
    _, final, tmp = neox_run
    compare = filecmp.dircmp(final, tmp / "export")
    assert not compare.left_only and not compare.right_only and not compare.diff_files


def test_round_trip_into_dolly_llm(neox_run):
    from dolly_langchain.llm import DollyLLM

    llm = DollyLLM.from_model_id(str(neox_run[1]), max_new_tokens=8)
    assert isinstance(llm.invoke("Say hi"), str)


def test_finished_run_is_refused_then_overwritten(neox_run):
    argv, final, tmp = neox_run
    with pytest.raises(FinetuneError, match="--overwrite-output-dir"):
        run_training(argv)
    before = (final / "trainer_state.json").read_text()
    argv = [*argv, "--overwrite-output-dir", "--epochs", "1", "--save-steps", "1000"]
    assert run_training(argv) == final
    assert (final / "trainer_state.json").read_text() != before
    steps = json.loads((final / "trainer_state.json").read_text())["global_step"]
    # The old run's checkpoints are gone; the Trainer always checkpoints the last step.
    assert [p.name for p in (tmp / "run").glob("checkpoint-*")] == [f"checkpoint-{steps}"]
    assert not list((tmp / "run").glob(".model*")), "no temporary directory left behind"


def test_gptj_on_alpaca_records(tmp_path, plain_tokenizer):
    """Dolly v1: GPT-J on Alpaca-style instruction/input/output records, Dolly's unpacked batches."""
    base = tmp_path / "base-gptj"
    tiny_gptj(len(plain_tokenizer)).save_pretrained(base)
    plain_tokenizer.save_pretrained(base)
    data = write_jsonl(tmp_path / "alpaca.jsonl", synthetic_records(48, alpaca=True))
    final = run_training(cli_args(base, data, tmp_path / "run", "--no-packing", "--epochs", "2",
                                  "--per-device-train-batch-size", "4", "--save-steps", "100"))
    train_losses = list(losses(log_history(final)).values())
    assert len(train_losses) == 24 and train_losses[-1] < train_losses[0]
    from dolly_langchain.llm import DollyLLM

    assert isinstance(DollyLLM.from_model_id(str(final), max_new_tokens=4).invoke("Add 1 and 2."), str)


def test_console_script_prints_launch_commands():
    import shutil
    import subprocess
    import sys

    script = shutil.which("dolly-finetune", path=str(Path(sys.executable).parent))
    assert script, "dolly-finetune is installed by pip install -e ."
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "deepspeed --num_gpus 2 --module finetune.train --deepspeed cpu_config.json" in result.stdout
    assert "--resume-from-checkpoint auto" in result.stdout
