"""dolly-finetune: Databricks' Dolly recipe (instruction tuning on databricks-dolly-15k) with TRL's SFTTrainer.

Launch commands (``dolly-finetune ARGS`` and ``python -m finetune.train ARGS`` are the same program)::

    # 1 GPU (a small model; Dolly's 2.8B/6.9B/12B need the DeepSpeed configs below)
    dolly-finetune --input-model EleutherAI/pythia-410m --local-output-dir runs/dolly-410m --bf16

    # 8 GPUs on one node, DeepSpeed ZeRO-3: Dolly v2's published run (see finetune/presets.py), or any config
    deepspeed --num_gpus=8 --module finetune.train --preset dolly-v2-12b-a100 --local-output-dir runs/dolly-v2-12b
    deepspeed --num_gpus=8 --module finetune.train --deepspeed a100_config.json --bf16 \\
        --input-model EleutherAI/pythia-2.8b --local-output-dir runs/dolly-v2-3b

    # several nodes: one "HOSTNAME slots=8" line per node in ./hostfile; run this on the first node
    deepspeed --hostfile hostfile --master_addr FIRST_HOSTNAME --module finetune.train \\
        --preset dolly-v2-12b-a100 --local-output-dir /shared/runs/dolly-v2-12b

    # 2 CPU processes, ZeRO-3 over gloo (what CI runs, on a tiny model)
    deepspeed --num_gpus 2 --module finetune.train --deepspeed cpu_config.json \\
        --input-model MODEL_DIR --local-output-dir runs/cpu --training-dataset data.jsonl --test-size 0

    # continue a run that was killed (same data order, same final loss)
    dolly-finetune ...same flags... --resume-from-checkpoint auto

    # what to launch for a given model and hardware
    dolly-finetune plan --help

The run directory (``--local-output-dir``) holds ``checkpoint-N/`` every ``--save-steps``, TensorBoard logs under
``runs/`` and, at the end, ``model/``: the model, the tokenizer with Dolly's special tokens, ``trainer_state.json``
(the log history) and ``dolly_prompt_format.json``. ``model/`` is written under a temporary name and renamed, so it
exists only when complete; load it with ``DollyLLM.from_model_id("RUN_DIR/model")``. ``heldout_split.json`` records
what reproduces the held-out records (``dolly-eval RUN_DIR --generation`` scores the model on them); ``--eval-after``
evaluates the final model into ``eval/``.

NOTE: defaults that differ from TRL's ``SFTConfig`` (they are Dolly's): lr 1e-5 (TRL 2e-5), 3 epochs, per-device
batch 8, eval every 50 and save every 400 steps keeping 10 checkpoints, bf16 only where the hardware has it (TRL
always), labels masked through ``### Response:\\n`` with no EOS appended (records end with ``### End``), and
records longer than ``--max-length`` dropped (TRL truncates), and batches padded to a multiple of 8 as Dolly's
collator did. Where we go further than Dolly: by default batches are grouped by length (``--group-by-length``), which
removes most of the padding of Dolly's random batches without changing the records per step;
``--no-group-by-length`` is Dolly's exact recipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from finetune.data import DEFAULT_TRAINING_DATASET, BadRecordError

logger = logging.getLogger("finetune")

DEFAULT_INPUT_MODEL = "EleutherAI/pythia-6.9b"  # Dolly v2's default (dolly-v2-7b)
DEFAULT_SEED = 42
FINAL_MODEL_DIR = "model"


class FinetuneError(RuntimeError):
    """A problem with the flags, files or run directory; the message names it and the fix."""


# --- Command line -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``dolly-finetune`` flags; ``--preset NAME`` turns a preset's values into defaults (flags win)."""
    from finetune.presets import PRESETS, deepspeed_config_path

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS))
    known, _ = pre.parse_known_args(argv)
    parser = _build_parser(PRESETS)
    if known.preset:
        unknown = set(PRESETS[known.preset]) - {action.dest for action in parser._actions}
        if unknown:
            raise FinetuneError(
                f"preset {known.preset!r} sets unknown options {sorted(unknown)}: fix finetune/presets.py."
            )
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    if args.deepspeed:
        try:
            args.deepspeed = str(deepspeed_config_path(args.deepspeed))
        except FileNotFoundError as err:
            raise FinetuneError(str(err)) from None
    return args


def _test_size(value: str) -> int | float:
    """A count when an integer ("1000"), a ratio when a float ("0.05")."""
    try:
        size = int(value)
    except ValueError:
        try:
            size = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a count (1000) or a ratio (0.05), got {value!r}") from None
        if not 0 < size < 1:
            raise argparse.ArgumentTypeError(f"a ratio must be between 0 and 1, got {value}") from None
    if size < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return size


def _resume(value: str) -> str:
    return value if value == "auto" else str(Path(value).expanduser())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the epilog's launch commands kept as written."""


def _build_parser(presets: dict[str, dict]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dolly-finetune",
        description="Fine-tune a causal LM with Databricks' Dolly recipe (TRL SFTTrainer, optional DeepSpeed).",
        epilog=__doc__.split("\n\n", 1)[1],  # the launch commands, run directory layout and defaults
        formatter_class=_HelpFormatter,
    )
    add = parser.add_argument
    add("--preset", choices=sorted(presets),
        help="Start from one of Dolly's published runs (finetune/presets.py); flags given explicitly win.")
    add("--input-model", default=DEFAULT_INPUT_MODEL, help="Hub id or local directory of the base model.")
    add("--local-output-dir", required=True, help="Run directory: checkpoints, logs, and the final model/ in it.")
    add("--export-dir", help="Also copy the final model here (Dolly's DBFS copy), e.g. a shared or mounted path.")
    add("--overwrite-output-dir", action="store_true",
        help="Replace a finished model in --local-output-dir (and --export-dir), and discard old checkpoints.")
    data = parser.add_argument_group("data")
    data.add_argument("--training-dataset", default=DEFAULT_TRAINING_DATASET,
                      help="Hub dataset id, or a local .jsonl/.json/.parquet/.csv with instruction/context/response "
                      "(Dolly) or instruction/input/output (Alpaca, dolly-v1) records.")
    data.add_argument("--max-records", type=int, help="Use only the first N records of the dataset.")
    data.add_argument("--skip-bad-records", action="store_true",
                      help="Skip records with an empty instruction or response (and report how many) instead of "
                      "stopping at the first one.")
    data.add_argument("--test-size", type=_test_size, default=1000,
                      help="Held-out evaluation records: a count (1000) or a ratio (0.05); 0 disables evaluation.")
    data.add_argument("--max-length", type=int,
                      help="Longest record in tokens; longer records are dropped. Default: the model's "
                      "n_positions / max_position_embeddings / seq_length, else 1024.")
    data.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                      help="Batch records of similar length (HF LengthGroupedSampler) so a batch carries little "
                      "padding: same records per step as Dolly, so its warmup/eval/save step counts keep their "
                      "meaning. --no-group-by-length is Dolly's exact recipe: random order, batches padded to a "
                      "multiple of 8 (most of each batch is padding).")
    data.add_argument("--packing", action=argparse.BooleanOptionalAction, default=False,
                      help="Instead, pack records into --max-length rows (TRL best-fit packing) and train on "
                      "padding-free batches: fewer, fuller steps. Only fast with a variable-length attention kernel "
                      "(FlashAttention on GPU); on CPU/SDPA each step attends over the whole flattened batch.")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=3, help="Number of epochs.")
    train.add_argument("--per-device-train-batch-size", type=int, default=8,
                       help="Records per device per step (packed rows with --packing).")
    train.add_argument("--per-device-eval-batch-size", type=int, default=8, help="Rows per device per eval step.")
    train.add_argument("--lr", type=float, default=1e-5,
                       help="Peak learning rate (AdamW; linear decay, or the --deepspeed config's scheduler).")
    train.add_argument("--warmup-steps", type=int, default=0, help="Linear warmup steps.")
    train.add_argument("--seed", type=int, default=DEFAULT_SEED, help="Seed for the data split, order and init.")
    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                       help="Recompute activations in the backward pass: less memory, ~20%% slower.")
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bfloat16 mixed precision. Default: on where the GPU supports it, off on CPU.")
    train.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=False,
                       help="float16 mixed precision with loss scaling, for GPUs without bfloat16 (V100).")
    train.add_argument("--deepspeed",
                       help="DeepSpeed JSON config: a path, or a file name in finetune/configs/ (launch with the "
                       "`deepspeed` launcher for several processes).")
    train.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                       help="Set by the deepspeed launcher; do not pass it yourself.")
    ckpt = parser.add_argument_group("logging and checkpoints")
    ckpt.add_argument("--logging-steps", type=int, default=10, help="Log the loss every N steps.")
    ckpt.add_argument("--eval-steps", type=int, default=50, help="Evaluate on the held-out records every N steps.")
    ckpt.add_argument("--save-steps", type=int, default=400, help="Write a checkpoint every N steps.")
    ckpt.add_argument("--save-total-limit", type=int, default=10, help="Keep at most N checkpoints.")
    ckpt.add_argument("--resume-from-checkpoint", type=_resume,
                      help="A checkpoint directory, or `auto` for the latest one in --local-output-dir (starts "
                      "fresh when there is none).")
    ckpt.add_argument("--report-to", default="tensorboard",
                      help="Where to send logs: tensorboard, none, or any integration transformers knows.")
    evaluation = parser.add_argument_group("evaluation of the final model (dolly-eval, into RUN_DIR/eval)")
    evaluation.add_argument("--eval-after", choices=("card", "generation", "both"),
                            help="Run dolly-eval on the final model: the model card's lm-eval table, instruction "
                            "following on the held-out records, or both.")
    evaluation.add_argument("--eval-samples", type=int,
                            help="With --eval-after: a seeded N documents per task / held-out records (default: all).")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``dolly-finetune``; ``dolly-finetune plan ...`` runs the launch planner."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:
        from finetune.plan import main as plan_main

        return plan_main(argv[1:])
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(name)s] %(message)s", level=logging.INFO)
    try:
        output = train(parse_args(argv))
    except (FinetuneError, BadRecordError) as err:
        print(f"dolly-finetune: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("Final model: %s", output)


# --- Run ------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> Path:
    """Train, write ``<local-output-dir>/model`` atomically, copy it to ``--export-dir``; return the model dir."""
    resume = check_run_dir(args)
    trainer = build_trainer(args, resume_from=resume)
    if trainer.is_world_process_zero() and args.overwrite_output_dir and resume is None:
        _remove_old_checkpoints(Path(args.local_output_dir))
    trainer.accelerator.wait_for_everyone()
    if resume:
        logger.info("Resuming from %s (a 'missing keys: lm_head.weight' warning is expected and harmless, see "
                    "_weights_source)", resume)
    trainer.train(resume_from_checkpoint=resume)
    final = save_final_model(trainer, Path(args.local_output_dir))
    if args.export_dir and trainer.is_world_process_zero():
        _copy_atomically(final, Path(args.export_dir))
        logger.info("Copied the final model to %s", args.export_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        from finetune.evaluate import after_training

        after_training(args, trainer, final)  # records the held-out split; runs --eval-after (other ranks exit)
    return final


def check_run_dir(args: argparse.Namespace) -> str | None:
    """Refuse to clobber a finished or unfinished run by accident; return the checkpoint to resume from."""
    from transformers.trainer_utils import get_last_checkpoint

    run_dir = Path(args.local_output_dir)
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


def _remove_old_checkpoints(run_dir: Path) -> None:
    """--overwrite-output-dir starting afresh: old checkpoints would mix into --resume-from-checkpoint auto later.

    The old final model stays until the new one replaces it (save_final_model), so a failed run loses nothing.
    """
    for old in run_dir.glob("checkpoint-*"):
        if old.is_dir():
            shutil.rmtree(old)


# --- Trainer: distributed setup, tokenizer, data, config, model -------------------------------------------------


def build_trainer(args: argparse.Namespace, resume_from: str | None = None):
    """Load the tokenizer, data and model and return a ready ``trl.SFTTrainer`` (nothing trained yet).

    ``resume_from`` (a checkpoint directory) is where the weights come from when a run is resumed.
    """
    from transformers import AutoConfig
    from trl import SFTTrainer

    from finetune.data import add_dolly_special_tokens, build_dataset, load_records

    _init_cpu_distributed(args)
    tokenizer = _load_tokenizer(args.input_model)
    add_dolly_special_tokens(tokenizer)
    model_limit = model_max_length(AutoConfig.from_pretrained(args.input_model))
    if args.max_length and args.max_length > model_limit:
        raise FinetuneError(f"--max-length {args.max_length} exceeds what {args.input_model} supports ({model_limit}).")
    max_length = args.max_length or model_limit
    records, n_bad = load_records(args.training_dataset, args.max_records, args.skip_bad_records)
    dataset, n_dropped = build_dataset(records, tokenizer, max_length)
    logger.info(
        "%d records from %s (%d bad skipped, %d longer than %d tokens dropped)",
        len(dataset), args.training_dataset, n_bad, n_dropped, max_length,
    )
    train_dataset, eval_dataset = split_dataset(dataset, args.test_size, args.seed)
    config = training_config(args, max_length, has_eval=eval_dataset is not None)
    # The model is loaded after the config: under ZeRO-3 the config makes from_pretrained shard it on load.
    model = _load_model(_weights_source(args.input_model, resume_from), len(tokenizer))
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def _init_cpu_distributed(args: argparse.Namespace) -> None:
    """Under the deepspeed launcher on CPU, set up gloo ourselves so every rank gets its own shard of the data.

    accelerate picks no backend for DeepSpeed on CPU, so TrainingArguments would report world size 1: no data
    sharding, and DeepSpeed's batch-size check fails. Creating accelerate's state with gloo first (and passing
    ``use_configured_state``, see training_config) fixes both.
    """
    if not _distributed_cpu(args):
        return
    import deepspeed.ops
    from accelerate import PartialState

    # DeepSpeed's CPU communicator would JIT-compile a shared-memory all-reduce op on first use (over a minute,
    # once per machine; deepspeed/comm/torch.py build_shm_op). gloo alone serves CPU training, so skip it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def _distributed_cpu(args: argparse.Namespace) -> bool:
    import torch

    return bool(args.deepspeed) and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _load_tokenizer(input_model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(input_model)
    except OSError as err:
        raise FinetuneError(f"--input-model {input_model}: cannot load its tokenizer ({err}).") from err


def model_max_length(config) -> int:
    """Dolly's rule: the first of n_positions / max_position_embeddings / seq_length the config sets, else 1024."""
    for name in ("n_positions", "max_position_embeddings", "seq_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 1024


def split_dataset(dataset, test_size: int | float, seed: int):
    """Dolly's split: shuffle with the seed, hold out ``test_size`` records (0: no evaluation)."""
    if not test_size:
        return dataset.shuffle(seed=seed), None
    if isinstance(test_size, int) and test_size >= len(dataset):
        raise FinetuneError(
            f"--test-size {test_size} leaves no training records: only {len(dataset)} usable records. Pass a "
            "smaller --test-size (a count, or a ratio such as 0.05)."
        )
    split = dataset.train_test_split(test_size=test_size, seed=seed)
    return split["train"], split["test"]


def training_config(args: argparse.Namespace, max_length: int, has_eval: bool):
    """The SFTConfig of Dolly's recipe; comments mark where it departs from TRL's defaults and why."""
    import torch
    from trl import SFTConfig

    bf16 = args.bf16 if args.bf16 is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if args.fp16 and args.bf16:
        raise FinetuneError("--fp16 and --bf16 exclude each other: pass one (fp16 for V100, bf16 for A100/A10).")
    bf16 = bf16 and not args.fp16
    if (bf16 or args.fp16) and not torch.cuda.is_available():
        raise FinetuneError("--bf16 and --fp16 need a GPU; on CPU pass --no-bf16 (the default there) and no --fp16.")
    _check_deepspeed_config(args.deepspeed)
    return SFTConfig(
        output_dir=args.local_output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        deepspeed=args.deepspeed,
        activation_checkpointing=args.gradient_checkpointing,  # transformers 5 name of gradient_checkpointing
        bf16=bf16,  # TRL turns bf16 on everywhere; TrainingArguments refuses it on CPU
        fp16=args.fp16,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        report_to=[] if args.report_to == "none" else [args.report_to],
        max_length=max_length,
        # Records arrive tokenized with a completion mask (finetune.data), so TRL neither tokenizes nor appends
        # EOS: Dolly's examples end with "### End", and its labels cover exactly response + "\n\n### End".
        completion_only_loss=True,
        packing=args.packing,
        packing_strategy="bfd",  # best-fit decreasing: records are never split, batches are padding-free
        pad_to_multiple_of=None if args.packing else 8,  # Dolly's collator padded to a multiple of 8
        # Random batches of dolly-15k are ~65% padding; similar-length batches keep the work, drop the padding.
        train_sampling_strategy="group_by_length" if args.group_by_length and not args.packing else "random",
        accelerator_config={"use_configured_state": True} if _distributed_cpu(args) else None,
    )


def _check_deepspeed_config(path: str | None) -> None:
    """ZeRO-3 without stage3_gather_16bit_weights_on_model_save would save no usable final model."""
    if not path:
        return
    config = json.loads(Path(path).read_text(encoding="utf-8"))
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise FinetuneError(
            f"--deepspeed {path}: ZeRO stage 3 needs \"stage3_gather_16bit_weights_on_model_save\": true in "
            "zero_optimization, or the final model cannot be saved as one loadable checkpoint."
        )


def _weights_source(input_model: str, resume_from: str | None) -> str:
    """Resume from the checkpoint's own model files rather than letting the Trainer load them into the base model.

    transformers 5.23's Trainer._load_from_checkpoint calls load_state_dict with the checkpoint's on-disk key
    names, and some architectures save under legacy names (GPT-NeoX writes ``embed_out.weight`` for
    ``lm_head.weight``): that tensor would silently keep its fresh initialisation ("missing keys ... lm_head"),
    and the resumed run would diverge. from_pretrained maps the names correctly. Under DeepSpeed the engine
    restores its own checkpoint on top, which is unaffected.
    """
    if resume_from and (Path(resume_from) / "config.json").is_file():
        return resume_from
    return input_model


def _load_model(input_model: str, vocab_size: int):
    from transformers import AutoModelForCausalLM

    # deepspeed.zero.Init (ZeRO-3) fails with a torch._dynamo "Signature mismatch" TypeError on torch 2.13 unless
    # torch._dynamo was imported before entering it.
    import torch._dynamo  # noqa: F401

    try:
        model = AutoModelForCausalLM.from_pretrained(input_model)
    except OSError as err:
        raise FinetuneError(f"--input-model {input_model}: cannot load the model ({err}).") from err
    if model.get_input_embeddings().num_embeddings != vocab_size:
        # Dolly's special tokens are new rows; transformers initialises them to the mean embedding.
        model.resize_token_embeddings(vocab_size)
    return model


# --- Saving -----------------------------------------------------------------------------------------------------


def save_final_model(trainer, run_dir: Path) -> Path:
    """Write model, tokenizer, trainer_state.json and the prompt-format record to ``run_dir/model``, atomically.

    Everything goes to a temporary directory first, renamed into place when complete, so a run killed while
    saving never leaves a ``model/`` that looks finished. Every rank takes part (ZeRO-3 gathers the weights).
    """
    from dolly_langchain.prompts import write_format_record

    final, partial = run_dir / FINAL_MODEL_DIR, run_dir / f".{FINAL_MODEL_DIR}.partial"
    if trainer.is_world_process_zero():
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    trainer.model.config.use_cache = True  # off for training (TrainingArguments.use_cache); on for inference
    trainer.save_model(str(partial))
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(partial / "trainer_state.json"))
        write_format_record(partial)
        _replace_dir(partial, final)
    trainer.accelerator.wait_for_everyone()
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (--overwrite-output-dir) is moved aside first, then deleted."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _copy_atomically(src: Path, dst: Path) -> None:
    partial = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, partial)
    _replace_dir(partial, dst)


if __name__ == "__main__":
    main()
