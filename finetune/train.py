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

    # LoRA adapters (PEFT) on a frozen base: one GPU, or any DeepSpeed launch above with --lora
    dolly-finetune --input-model EleutherAI/pythia-2.8b --local-output-dir runs/lora-3b --lora --bf16
    # QLoRA: 4-bit NF4 base (CUDA + pip install 'dolly-langchain[qlora]'); pythia-12b on one 24 GB A10
    dolly-finetune --preset dolly-v2-12b-qlora-a10 --local-output-dir runs/dolly-v2-12b-qlora

    # track the run in MLflow (a local store here; a Databricks workspace with MLFLOW_TRACKING_URI=databricks)
    MLFLOW_TRACKING_URI=sqlite:///mlruns.db dolly-finetune ... --report-to mlflow

    # what to launch for a given model and hardware
    dolly-finetune plan --help

The run directory (``--local-output-dir``) holds ``checkpoint-N/`` every ``--save-steps``, TensorBoard logs under
``runs/`` and, at the end, ``model/``: the model, the tokenizer with Dolly's special tokens, ``trainer_state.json``
(the log history) and ``dolly_prompt_format.json``. ``model/`` is written under a temporary name and renamed, so it
exists only when complete, and the run directory's root links to each of its files (made before the rename, so they
resolve only once it is complete): a finished run directory loads as the model itself, as Dolly's did
(``AutoModelForCausalLM.from_pretrained(RUN_DIR)``, ``pipeline(model=RUN_DIR)``, ``DollyLLM.from_model_id(RUN_DIR)``),
and an unfinished one loads as nothing. With ``--lora`` the checkpoints hold adapters, and ``model/`` holds the base
with the adapter merged in (a plain transformers model) and the adapter in ``model/adapter/``; with
``--no-merge-lora``, only the adapter (``DollyLLM.from_model_id`` merges it on load). ``heldout_split.json``
records what reproduces the held-out records (``dolly-eval RUN_DIR --generation`` scores the model on them);
``--eval-after`` evaluates the final model into ``eval/``.

NOTE: defaults that differ from TRL's ``SFTConfig`` (they are Dolly's): lr 1e-5 (TRL 2e-5), 3 epochs, per-device
batch 8, eval every 50 and save every 400 steps keeping 10 checkpoints, bf16 only where the hardware has it (TRL
always), labels masked through ``### Response:\\n`` with no EOS appended (records end with ``### End``), and
records longer than ``--max-length`` dropped (TRL truncates), and batches padded to a multiple of 8 as Dolly's
collator did. Where we go further than Dolly: by default batches are grouped by length (``--group-by-length``), which
removes most of the padding of Dolly's random batches without changing the records per step;
``--no-group-by-length`` is Dolly's exact recipe. With ``--lora`` the default lr is 2e-4 (QLoRA's for 7B-13B
models) and the loss is the HF Trainer's rather than TRL's fused one (see ``_lora_sft_trainer``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dolly_langchain.clitools import run_command
from finetune import common
from finetune.common import (  # noqa: F401  (re-exported: the public names of dolly-finetune)
    DEFAULT_INPUT_MODEL,
    DEFAULT_SEED,
    FinetuneError,
    lora_target_modules,
    model_max_length,
)
from finetune.data import (  # noqa: F401  (split_dataset re-exported: it lived here)
    BadRecordError,
    add_dolly_special_tokens,
    build_dataset,
    load_records,
    split_dataset,
)
from finetune.rundir import (  # noqa: F401  (re-exported: they lived here)
    ADAPTER_DIR,
    FINAL_MODEL_DIR,
    check_run_dir,
    copy_atomically,
    merge_adapter,
    remove_old_checkpoints,
    save_final_model,
)
from finetune.tracking import check_mlflow, mlflow_run
from finetune.workarounds import (  # noqa: F401  (keep_output_bias re-exported: it lived here)
    distributed_cpu,
    import_dynamo_before_zero_init,
    init_cpu_distributed,
    keep_output_bias,
    lora_sft_trainer,
    weights_source,
)

logger = logging.getLogger("finetune")

#: Under ``dolly-finetune --help``: this docstring's launch commands and notes.
EPILOG = __doc__.split("\n\n", 1)[1]
_lora_sft_trainer = lora_sft_trainer  # the name the --help text above gives it (kept byte-identical)


# --- Command line -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``dolly-finetune`` flags (:func:`finetune.common.parse_args`, with the launch commands under --help)."""
    return common.parse_args(argv, epilog=EPILOG)


def _build_parser(presets: dict[str, dict]) -> argparse.ArgumentParser:
    return common.build_parser(presets, epilog=EPILOG)


def main(argv: list[str] | None = None) -> int | None:
    """Entry point of ``dolly-finetune``, the alias of ``dolly finetune``; ``dolly-finetune plan ...`` runs the
    launch planner. A user error is one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:
        # The alias dispatches on its first word rather than through an argparse subparser (as `dolly finetune plan`
        # does), because a subparser would change this parser's behaviour: its --help would list a {plan}
        # positional, a stray word would become "invalid choice" instead of "unrecognized arguments", and
        # argparse would demand the required --local-output-dir of `plan` too.
        from finetune.plan import main as plan_main

        return plan_main(argv[1:])
    from finetune.presets import PRESETS

    parser = _build_parser(PRESETS)
    parser.set_defaults(run=run)
    status = run_command(parser, argv)
    if status:
        raise SystemExit(status)
    return None


def run(args: argparse.Namespace) -> int:
    """The command: finish the parsed flags (preset, defaults), train, and log where the final model is."""
    common.resolve_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(name)s] %(message)s", level=logging.INFO)
    output = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("Final model: %s", output)
    return 0


# --- Run ------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> Path:
    """Train, write the final model atomically (``RUN_DIR/model``, and ``RUN_DIR`` itself loads it), copy it to
    ``--export-dir``; return ``RUN_DIR/model``.

    The run directory's lifecycle is :mod:`finetune.rundir`; on rank 0 the end is
    :func:`dolly_langchain.evaluation.after_training` (the held-out split record, and ``--eval-after``).
    """
    check_lora_flags(args)
    resume = check_run_dir(args)
    trainer = build_trainer(args, resume_from=resume)
    if trainer.is_world_process_zero() and args.overwrite_output_dir and resume is None:
        remove_old_checkpoints(Path(args.local_output_dir))
    trainer.accelerator.wait_for_everyone()
    if resume:
        logger.info("Resuming from %s (a 'missing keys: lm_head.weight' warning is expected and harmless, see "
                    "finetune.workarounds.weights_source)", resume)
    with mlflow_run(args, trainer) as tracking:
        trainer.train(resume_from_checkpoint=resume)
        final = save_final_model(trainer, Path(args.local_output_dir), merge_lora=args.merge_lora)
        tracking(final)
    if args.export_dir and trainer.is_world_process_zero():
        copy_atomically(final, Path(args.export_dir))
        logger.info("Copied the final model to %s", args.export_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        from dolly_langchain.evaluation import after_training

        after_training(args, trainer, final)  # records the held-out split; runs --eval-after (other ranks exit)
    return final


def check_lora_flags(args: argparse.Namespace) -> None:
    """Refuse --load-in-4bit where it cannot run, and --report-to mlflow without MLflow, before anything is loaded
    (the model alone takes minutes)."""
    check_mlflow(args)
    if not args.load_in_4bit:
        return
    import torch

    if not torch.cuda.is_available():
        raise FinetuneError(
            "--load-in-4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on this machine. Drop "
            "--load-in-4bit to train LoRA on the 16-bit base, or run on a GPU."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FinetuneError(
            "--load-in-4bit (QLoRA) needs bitsandbytes: pip install 'dolly-langchain[qlora]'."
        ) from None


# --- Trainer: distributed setup, tokenizer, data, config, model -------------------------------------------------


def build_trainer(args: argparse.Namespace, resume_from: str | None = None):
    """Load the tokenizer, data and model and return a ready ``trl.SFTTrainer`` (nothing trained yet).

    ``resume_from`` (a checkpoint directory) is where the weights come from when a run is resumed.
    """
    from transformers import AutoConfig

    check_lora_flags(args)
    init_cpu_distributed(args)
    # The data is read first: a bad record is reported in seconds, not after the tokenizer and config downloads.
    records, n_bad = load_records(args.training_dataset, args.max_records, args.skip_bad_records)
    tokenizer = _load_tokenizer(args.input_model)
    add_dolly_special_tokens(tokenizer)
    model_limit = model_max_length(AutoConfig.from_pretrained(args.input_model))
    if args.max_length and args.max_length > model_limit:
        raise FinetuneError(f"--max-length {args.max_length} exceeds what {args.input_model} supports ({model_limit}).")
    max_length = args.max_length or model_limit
    dataset, n_dropped = build_dataset(records, tokenizer, max_length)
    logger.info(
        "%d records from %s (%d bad skipped, %d longer than %d tokens dropped)",
        len(dataset), args.training_dataset, n_bad, n_dropped, max_length,
    )
    train_dataset, eval_dataset = split_dataset(dataset, args.test_size, args.seed)
    config = training_config(args, max_length, has_eval=eval_dataset is not None)
    # The model is loaded after the config: under ZeRO-3 the config makes from_pretrained shard it on load.
    source = args.input_model if args.lora else weights_source(args.input_model, resume_from)
    model = _load_model(source, len(tokenizer), load_in_4bit=args.load_in_4bit, deepspeed=bool(args.deepspeed))
    trainer_class = lora_sft_trainer() if args.lora else _sft_trainer()
    trainer = trainer_class(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(args, model, tokenizer) if args.lora else None,
    )
    if args.lora:
        keep_output_bias(trainer.model)
    return trainer


def _sft_trainer():
    from trl import SFTTrainer

    return SFTTrainer


def lora_config(args: argparse.Namespace, model, tokenizer):
    """PEFT's ``LoraConfig`` for ``--lora``: adapters on the projections, and Dolly's new tokens trainable.

    Dolly's three keys are new tokens: their embedding rows and their output (LM head) rows start from the mean
    embedding and must be learned, or the model never emits ``### End``. We train exactly those rows with PEFT's
    ``trainable_token_indices`` rather than ``modules_to_save=[embeddings, lm_head]``: the latter trains (and
    checkpoints, with Adam states) both full vocab x hidden matrices, 0.5B parameters and ~8 GiB of optimizer
    state on pythia-12b, which is what rules out one 24 GB GPU; ``trainable_token_indices`` trains 3 rows each.
    Tied embeddings (Llama, SmolLM2): one list on the input embedding, and PEFT ties the LM head to it. Untied
    (GPT-NeoX ``embed_out``, GPT-J ``lm_head``): the same rows of both, named explicitly (peft>=0.21 wraps a
    Linear output layer too).
    """
    from peft import LoraConfig

    from dolly_langchain.prompts import DOLLY_SPECIAL_TOKENS

    token_ids = tokenizer.convert_tokens_to_ids(list(DOLLY_SPECIAL_TOKENS))
    names = {module: name for name, module in model.named_modules()}
    embed_in, embed_out = model.get_input_embeddings(), model.get_output_embeddings()
    if model.config.tie_word_embeddings or embed_out is None:
        trainable_tokens: list[int] | dict[str, list[int]] = token_ids
    else:
        trainable_tokens = {names[embed_in]: token_ids, names[embed_out]: list(token_ids)}
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_target_modules(model.config.model_type, args.lora_target_modules),
        trainable_token_indices=trainable_tokens,
    )


def _load_tokenizer(input_model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(input_model)
    except OSError as err:
        raise FinetuneError(f"--input-model {input_model}: cannot load its tokenizer ({err}).") from err


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
        report_to=[] if args.report_to == "none" else [name.strip() for name in args.report_to.split(",")],
        max_length=max_length,
        # Records arrive tokenized with a completion mask (finetune.data), so TRL neither tokenizes nor appends
        # EOS: Dolly's examples end with "### End", and its labels cover exactly response + "\n\n### End".
        completion_only_loss=True,
        packing=args.packing,
        packing_strategy="bfd",  # best-fit decreasing: records are never split, batches are padding-free
        pad_to_multiple_of=None if args.packing else 8,  # Dolly's collator padded to a multiple of 8
        # Random batches of dolly-15k are ~65% padding; similar-length batches keep the work, drop the padding.
        train_sampling_strategy="group_by_length" if args.group_by_length and not args.packing else "random",
        accelerator_config={"use_configured_state": True} if distributed_cpu(args) else None,
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


def _load_model(input_model: str, vocab_size: int, load_in_4bit: bool = False, deepspeed: bool = False):
    from transformers import AutoModelForCausalLM

    import_dynamo_before_zero_init()
    kwargs = {}
    if load_in_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        # QLoRA's recipe: NF4 weights, double quantization, bf16 compute. bf16 storage lets ZeRO-3 shard the 4-bit
        # weights (transformers' DeepSpeed + QLoRA guide); without DeepSpeed the model loads on this rank's GPU.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
        )
        kwargs["dtype"] = torch.bfloat16
        if not deepspeed:  # DeepSpeed places the model itself and refuses a device_map
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(input_model, **kwargs)
    except OSError as err:
        raise FinetuneError(f"--input-model {input_model}: cannot load the model ({err}).") from err
    if model.get_input_embeddings().num_embeddings != vocab_size:
        # Dolly's special tokens are new rows; transformers initialises them to the mean embedding.
        model.resize_token_embeddings(vocab_size)
    return model


if __name__ == "__main__":
    main()
