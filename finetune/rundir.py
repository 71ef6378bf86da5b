"""The run directory of ``dolly-finetune`` (``--local-output-dir``): from the checks before training to the final model.

What a run directory holds, and the guarantees (the launch commands in :mod:`finetune.train` show it in use):

- ``checkpoint-N/`` every ``--save-steps``; :func:`check_run_dir` refuses to clobber a finished or unfinished run
  by accident and finds the checkpoint to resume from, :func:`remove_old_checkpoints` clears them for
  ``--overwrite-output-dir``.
- ``model/``: :func:`save_final_model` writes it under a temporary name and renames it, so it exists only when
  complete; the run directory's root links to each of its files (made before the rename, so they resolve only once
  it is complete): a finished run directory loads as the model itself, an unfinished one as nothing.
- With ``--lora``: :func:`merge_adapter` writes the base with the adapter merged in, the adapter in
  ``model/adapter/``.
- ``--export-dir``: :func:`copy_atomically` copies the final model there, replacing an older copy in one rename.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from dolly_langchain.clitools import output_dir_problem

# Imported under this module's own name: the tests replace it here to kill a run at the moment of the rename.
from dolly_langchain.files import replace_dir as _replace_dir
from finetune.common import FinetuneError

logger = logging.getLogger("finetune")

__all__ = ["ADAPTER_DIR", "FINAL_MODEL_DIR", "check_run_dir", "copy_atomically", "merge_adapter",
           "remove_old_checkpoints", "save_final_model"]

FINAL_MODEL_DIR = "model"
ADAPTER_DIR = "adapter"  # inside the final model directory when --merge-lora writes the merged model beside it


# --- Before training ----------------------------------------------------------------------------------------------


def check_run_dir(args: argparse.Namespace) -> str | None:
    """Refuse to clobber a finished or unfinished run by accident; return the checkpoint to resume from."""
    from transformers.trainer_utils import get_last_checkpoint

    run_dir = Path(args.local_output_dir)
    # Before anything is loaded: a run directory that cannot be written would otherwise fail only after the model
    # has loaded (or, for --export-dir, after training).
    for flag, path in (("--local-output-dir", run_dir), ("--export-dir", args.export_dir)):
        problem = path and output_dir_problem(path)
        if problem:
            raise FinetuneError(f"{flag} {path}: {problem}; pass a directory to write the run into.")
    final = run_dir / FINAL_MODEL_DIR
    if final.exists() and not args.overwrite_output_dir:
        raise FinetuneError(
            f"--local-output-dir {run_dir} already holds a finished model ({final}). Pass --overwrite-output-dir "
            "to train again and replace it, or choose another --local-output-dir."
        )
    if args.export_dir and Path(args.export_dir).exists() and not args.overwrite_output_dir:
        raise FinetuneError(f"--export-dir {args.export_dir} already exists. Pass --overwrite-output-dir or remove it.")
    last = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if args.resume_from_checkpoint == "auto":
        if last is None:
            logger.info("--resume-from-checkpoint auto: no checkpoint in %s, starting from the beginning", run_dir)
        return last
    if args.resume_from_checkpoint:
        if not (Path(args.resume_from_checkpoint) / "trainer_state.json").is_file():
            raise FinetuneError(
                f"--resume-from-checkpoint {args.resume_from_checkpoint}: not a checkpoint directory (no "
                "trainer_state.json). Pass a checkpoint-N directory, or `auto`."
            )
        return args.resume_from_checkpoint
    if last is not None and not args.overwrite_output_dir:
        raise FinetuneError(
            f"--local-output-dir {run_dir} holds checkpoints of an unfinished run ({Path(last).name}). Pass "
            "--resume-from-checkpoint auto to continue it, or --overwrite-output-dir to start over."
        )
    return None


def remove_old_checkpoints(run_dir: Path) -> None:
    """--overwrite-output-dir starting afresh: old checkpoints would mix into --resume-from-checkpoint auto later.

    The old final model stays until the new one replaces it (save_final_model), so a failed run loses nothing.
    """
    for old in run_dir.glob("checkpoint-*"):
        if old.is_dir():
            shutil.rmtree(old)


# --- The final model ------------------------------------------------------------------------------------------------


def save_final_model(trainer, run_dir: Path, merge_lora: bool = True) -> Path:
    """Write the final model, tokenizer, trainer_state.json and prompt-format record to ``run_dir/model``, atomically,
    and make ``run_dir`` itself load as that model; return ``run_dir/model``.

    Everything goes to a temporary directory first, renamed into place when complete, so a run killed while
    saving never leaves a ``model/`` that looks finished. Every rank takes part (ZeRO-3 gathers the weights).
    A LoRA run writes the adapter (PEFT's adapter_config.json + adapter_model.safetensors, with the tokenizer and
    format record so the directory loads on its own) and, with ``merge_lora``, the base model with the adapter merged
    in: then the merged model is the directory's root and the adapter sits in ``adapter/`` (a directory with both at
    its root would make transformers load it as an adapter); without, the adapter is the root.
    """
    from peft import PeftModel

    from dolly_langchain.prompts import write_format_record

    final, partial = run_dir / FINAL_MODEL_DIR, run_dir / f".{FINAL_MODEL_DIR}.partial"
    is_lora = isinstance(trainer.model, PeftModel)
    if trainer.is_world_process_zero():
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    trainer.model.config.use_cache = True  # off for training (TrainingArguments.use_cache); on for inference
    adapter = partial / ADAPTER_DIR if is_lora and merge_lora else partial
    trainer.save_model(str(adapter))
    if trainer.is_world_process_zero():
        if adapter != partial:
            write_format_record(adapter)
            merge_adapter(adapter, partial)
        trainer.state.save_to_json(str(partial / "trainer_state.json"))
        write_format_record(partial)
        _link_run_dir(run_dir, partial)
        _replace_dir(partial, final)
    trainer.accelerator.wait_for_everyone()
    return final


def merge_adapter(adapter_dir: Path, out: Path) -> None:
    """Load the adapter's base model (16-bit, even after QLoRA: merging into 4-bit weights would round them), merge
    the adapter in, and save a plain transformers model with the tokenizer into ``out``.

    The base is loaded afresh on the CPU rather than merged in place: under ZeRO-3 the trained weights are sharded
    across ranks, and a 4-bit base cannot hold the merged weights.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dolly_langchain.models import load_lora_adapter

    # The run is over: forget its ZeRO-3 config, or from_pretrained would shard this plain CPU load across ranks.
    unset_hf_deepspeed_config()
    model, tokenizer = load_lora_adapter(adapter_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("Merged the LoRA adapter into %s", out)


def _link_run_dir(run_dir: Path, partial: Path) -> None:
    """Make the run directory itself load as the final model, the way Dolly's run directories did.

    Chosen over writing the model into the run directory's root with config.json last: the root also holds
    checkpoints and logs, so an overwritten run would mix the files of two models there, and no rename can swap a
    whole set of files at once. Instead each entry of the final model gets a relative symlink in the root
    (``RUN_DIR/config.json -> model/config.json``), created while ``model/`` does not exist yet, so every link
    dangles and nothing loads (transformers, Dolly's loader and DollyLLM all see no file); the one rename of the
    finished directory to ``model/`` makes all of them resolve at once. A killed run therefore never looks
    finished, and ``RUN_DIR/model`` keeps working. Links of a previous model that the new one lacks are removed
    (a stale adapter_config.json would make transformers load the directory as an adapter).
    """
    names = {entry.name for entry in partial.iterdir()}
    for link in run_dir.iterdir():
        if link.is_symlink() and os.readlink(link).startswith(f"{FINAL_MODEL_DIR}/") and link.name not in names:
            link.unlink()
    for name in sorted(names):
        link, target = run_dir / name, f"{FINAL_MODEL_DIR}/{name}"
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_symlink():
            link.unlink()
        elif link.exists() and name not in ("config.json", "adapter_config.json"):
            logger.warning("Not linking %s into %s: a file of that name is already there", name, run_dir)
            continue
        elif link.exists():
            raise FinetuneError(
                f"--local-output-dir {run_dir}: {link} is in the way of the final model's {name}; move it away "
                "(the run directory's root is reserved for links to the final model)."
            )
        link.symlink_to(target)


def copy_atomically(src: Path, dst: Path) -> None:
    """Copy the directory ``src`` to ``dst`` (``--export-dir``): into a temporary directory beside ``dst``, then one
    swap for any older copy (:func:`dolly_langchain.files.replace_dir`), so ``dst`` is never half-written."""
    partial = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, partial)
    _replace_dir(partial, dst)
