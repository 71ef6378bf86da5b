"""Faults: a run SIGKILLed mid-way and restarted with --resume-from-checkpoint auto ends where an uninterrupted run
ends; a save interrupted half-way never leaves a model/ directory that looks complete.

The runs are real processes (``python -m finetune.train``); the killed one gets a callback that SIGKILLs its own
process right after the checkpoint of step ``KILL_AT`` is written, so the kill lands at the same point every time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_helpers import (
    cli_args, log_history, losses, run_finetune_process, run_training, synthetic_records, write_jsonl,
)

KILL_AT = 6  # mid-epoch: the resumed run must skip the batches of this epoch it already trained on


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory, tiny_neox_dir):
    tmp = tmp_path_factory.mktemp("resume")
    data = write_jsonl(tmp / "dolly.jsonl", synthetic_records(48, seed=7))

    def argv(out: Path, *extra: str) -> list[str]:
        # The default (length-grouped) path: 48 records at batch 4 give 12 steps per epoch.
        return cli_args(tiny_neox_dir, data, out, "--epochs", "2", "--per-device-train-batch-size", "4",
                        "--max-length", "96", "--save-steps", "3", *extra)

    return tmp, argv


def test_killed_run_resumes_to_the_same_loss(resume_setup):
    tmp, argv = resume_setup
    whole = run_finetune_process(argv(tmp / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = run_finetune_process(argv(tmp / "killed"), kill_at=KILL_AT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp / "killed" / f"checkpoint-{KILL_AT}" / "trainer_state.json").is_file()
    assert not (tmp / "killed" / "model").exists()

    resumed = run_finetune_process(argv(tmp / "killed", "--resume-from-checkpoint", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = losses(log_history(tmp / "whole" / "model")), losses(log_history(tmp / "killed" / "model"))
    assert max(expected) > KILL_AT + 4  # enough steps after the kill to mean something
    assert got.keys() == expected.keys()  # history up to the checkpoint restored, the rest re-logged
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
    final_whole = load_file(tmp / "whole" / "model" / "model.safetensors")
    final_resumed = load_file(tmp / "killed" / "model" / "model.safetensors")
    for name, tensor in final_whole.items():
        torch.testing.assert_close(final_resumed[name], tensor, rtol=1e-4, atol=1e-5)


def test_interrupted_final_save_leaves_no_complete_looking_model(tmp_path, tiny_neox_dir, monkeypatch):
    import dolly_langchain.prompts

    data = write_jsonl(tmp_path / "dolly.jsonl", synthetic_records(16))
    argv = cli_args(tiny_neox_dir, data, tmp_path / "run", "--epochs", "1", "--save-steps", "100")

    def killed_while_saving(output_dir):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(dolly_langchain.prompts, "write_format_record", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        run_training(argv)
    assert not (tmp_path / "run" / "model").exists()
    assert (tmp_path / "run" / ".model.partial" / "model.safetensors").is_file()  # the weights were half-way

    monkeypatch.undo()
    final = run_training([*argv, "--resume-from-checkpoint", "auto"])  # last checkpoint: nothing left to train
    assert (final / "dolly_prompt_format.json").is_file()
    assert not (tmp_path / "run" / ".model.partial").exists()
