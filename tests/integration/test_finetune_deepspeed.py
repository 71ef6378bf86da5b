"""A real multi-process run: the deepspeed launcher, 2 CPU ranks over gloo, ZeRO-3, a tiny random GPT-NeoX.

The launch command is the one in finetune/train.py's docstring. 128 records at per-device batch 4 on 2 ranks
must take 16 steps per epoch (each rank trains on its own half), not 32 (each rank on all the data).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dolly_langchain.prompts import DOLLY_SPECIAL_TOKENS
from finetune.presets import CONFIGS_DIR
from finetune_helpers import log_history, losses, synthetic_records, write_jsonl

RECORDS, BATCH, RANKS = 128, 4, 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(base: Path, data: Path, run: Path, *extra: str) -> None:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is part of the dev install (pip install -e '.[dev]')"
    command = [
        launcher, "--master_port", str(_free_port()), "--num_gpus", str(RANKS), "--module", "finetune.train",
        "--deepspeed", str(CONFIGS_DIR / "cpu_config.json"), "--input-model", str(base),
        "--training-dataset", str(data), "--local-output-dir", str(run), "--test-size", "0",
        "--epochs", "1", "--per-device-train-batch-size", str(BATCH), "--no-packing", "--lr", "1e-3",
        "--logging-steps", "1", "--save-steps", "8", "--no-gradient-checkpointing", "--report-to", "none", *extra,
    ]
    root = Path(__file__).resolve().parents[2]
    # One thread per rank: two ranks share the two cores of CI.
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, base_neox_dir):
    tmp = tmp_path_factory.mktemp("zero3")
    base = base_neox_dir  # no Dolly tokens yet: the embeddings are resized under ZeRO-3
    data = write_jsonl(tmp / "dolly.jsonl", synthetic_records(RECORDS, seed=11))
    _launch(base, data, tmp / "run")
    return tmp / "run", base, data


def test_each_rank_trains_on_its_own_shard(zero3_run):
    run = zero3_run[0]
    state = json.loads((run / "model" / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == RECORDS // (BATCH * RANKS) == 16
    assert state["epoch"] == 1.0


def test_loss_is_logged_and_falls(zero3_run):
    train_losses = losses(log_history(zero3_run[0] / "model"))
    assert sorted(train_losses) == list(range(1, 17))
    values = list(train_losses.values())
    assert sum(values[-4:]) / 4 < sum(values[:4]) / 4 - 0.3


def test_checkpoints_are_zero3_and_final_model_is_consolidated(zero3_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, base, _ = zero3_run
    assert (run / "checkpoint-8" / "global_step8").is_dir()  # DeepSpeed's partitioned states, for resuming
    final = run / "model"
    model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert all(len(tokenizer.encode(token)) == 1 for token in DOLLY_SPECIAL_TOKENS)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == len(AutoTokenizer.from_pretrained(base)) + 3
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    after, before = load_file(final / "model.safetensors"), load_file(base / "model.safetensors")
    assert after[name].shape == before[name].shape and not after[name].equal(before[name])
    assert (final / "dolly_prompt_format.json").is_file()


def test_zero3_model_generates_through_dolly_llm(zero3_run):
    from dolly_langchain.llm import DollyLLM

    llm = DollyLLM.from_model_id(str(zero3_run[0] / "model"), max_new_tokens=8)
    assert isinstance(llm.invoke("Say hi"), str)


def test_zero3_run_resumes_from_its_checkpoint(zero3_run, tmp_path):
    """Resume the sharded (ZeRO-3) checkpoint of step 8: steps 9-16 log the losses of the uninterrupted run."""
    run, base, data = zero3_run
    shutil.copytree(run / "checkpoint-8", tmp_path / "run" / "checkpoint-8")
    _launch(base, data, tmp_path / "run", "--resume-from-checkpoint", "auto")
    expected, got = losses(log_history(run / "model")), losses(log_history(tmp_path / "run" / "model"))
    assert got.keys() == expected.keys()
    for step in range(9, 17):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
