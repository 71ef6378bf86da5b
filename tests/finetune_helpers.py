"""Helpers shared by the finetune tests: synthetic training records (never real data) and a CLI runner."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from finetune.train import main, parse_args, train

_WORDS = (
    "the cat sat on a mat all day blue is a primary color paris is the capital of france name answer "
    "question summarize text write short poem about sea sky river tree stone water fire"
).split()


def synthetic_records(n: int, seed: int = 0, alpaca: bool = False, max_words: int = 12) -> list[dict]:
    """``n`` random Dolly-style records (or Alpaca-style with ``alpaca``); a third of them have context."""
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, max_words)))

    records = []
    for i in range(n):
        instruction, context, response = sentence().capitalize() + "?", sentence() if i % 3 == 0 else "", sentence()
        if alpaca:
            records.append({"instruction": instruction, "input": context, "output": response})
        else:
            records.append({"instruction": instruction, "context": context, "response": response, "category": "qa"})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def cli_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Flags for a fast CPU run on a tiny model: no eval, no TensorBoard, no gradient checkpointing."""
    return [
        "--input-model", str(model_dir), "--training-dataset", str(data), "--local-output-dir", str(out),
        "--test-size", "0", "--report-to", "none", "--no-gradient-checkpointing", "--lr", "1e-3",
        "--logging-steps", "1", "--seed", "0", *extra,
    ]


def run_training(argv: list[str]) -> Path:
    """Train in-process through the public API; return the final model directory."""
    return train(parse_args(argv))


def log_history(model_dir: Path) -> list[dict]:
    return json.loads((Path(model_dir) / "trainer_state.json").read_text())["log_history"]


def losses(history: list[dict]) -> dict[int, float]:
    """Training loss per logged step."""
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


__all__ = [
    "cli_args", "log_history", "losses", "main", "run_training", "synthetic_records", "write_jsonl",
]


# --- Killed runs: dolly-finetune in a subprocess that SIGKILLs itself after a checkpoint ---------------------------

KILL_SCRIPT = """
import os, signal, sys
from transformers import TrainerCallback
import finetune.train as ft

class KillAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

build = ft.build_trainer
def build_with_kill(args, **kwargs):
    trainer = build(args, **kwargs)
    trainer.add_callback(KillAfterCheckpoint())
    return trainer

ft.build_trainer = build_with_kill
ft.main(sys.argv[1:])
"""


def run_finetune_process(args: list[str], kill_at: int | None = None) -> subprocess.CompletedProcess:
    """``python -m finetune.train ARGS`` in a fresh process; with ``kill_at``, SIGKILLed after that step's checkpoint."""
    script = KILL_SCRIPT.format(kill_at=kill_at) if kill_at is not None else None
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "finetune.train", *args]
    root = Path(__file__).resolve().parents[1]
    # One thread: tiny matrices gain nothing from more, and runs compared with each other must do the same arithmetic.
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
