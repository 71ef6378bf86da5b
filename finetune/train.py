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
import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from finetune import common
from finetune.common import (  # noqa: F401  (re-exported: the public names of dolly-finetune)
    DEFAULT_INPUT_MODEL,
    DEFAULT_SEED,
    FinetuneError,
    lora_target_modules,
    model_max_length,
)
from finetune.data import BadRecordError

logger = logging.getLogger("finetune")

FINAL_MODEL_DIR = "model"
ADAPTER_DIR = "adapter"  # inside the final model directory when --merge-lora writes the merged model beside it


# --- Command line -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``dolly-finetune`` flags (:func:`finetune.common.parse_args`, with the launch commands under --help)."""
    return common.parse_args(argv, epilog=__doc__.split("\n\n", 1)[1])


def _build_parser(presets: dict[str, dict]) -> argparse.ArgumentParser:
    return common.build_parser(presets, epilog=__doc__.split("\n\n", 1)[1])


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
    """Train, write the final model atomically (``RUN_DIR/model``, and ``RUN_DIR`` itself loads it), copy it to
    ``--export-dir``; return ``RUN_DIR/model``."""
    check_lora_flags(args)
    resume = check_run_dir(args)
    trainer = build_trainer(args, resume_from=resume)
    if trainer.is_world_process_zero() and args.overwrite_output_dir and resume is None:
        _remove_old_checkpoints(Path(args.local_output_dir))
    trainer.accelerator.wait_for_everyone()
    if resume:
        logger.info("Resuming from %s (a 'missing keys: lm_head.weight' warning is expected and harmless, see "
                    "_weights_source)", resume)
    with _mlflow_run(args, trainer) as tracking:
        trainer.train(resume_from_checkpoint=resume)
        final = save_final_model(trainer, Path(args.local_output_dir), merge_lora=args.merge_lora)
        tracking(final)
    if args.export_dir and trainer.is_world_process_zero():
        _copy_atomically(final, Path(args.export_dir))
        logger.info("Copied the final model to %s", args.export_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        from finetune.evaluate import after_training

        after_training(args, trainer, final)  # records the held-out split; runs --eval-after (other ranks exit)
    return final


def check_lora_flags(args: argparse.Namespace) -> None:
    """Refuse --load-in-4bit where it cannot run, and --report-to mlflow without MLflow, before anything is loaded
    (the model alone takes minutes)."""
    if "mlflow" in args.report_to:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise FinetuneError("--report-to mlflow needs MLflow: pip install 'dolly-langchain[mlflow]'.") from None
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

    from finetune.data import add_dolly_special_tokens, build_dataset, load_records

    check_lora_flags(args)
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
    source = args.input_model if args.lora else _weights_source(args.input_model, resume_from)
    model = _load_model(source, len(tokenizer), load_in_4bit=args.load_in_4bit, deepspeed=bool(args.deepspeed))
    trainer_class = _lora_sft_trainer() if args.lora else _sft_trainer()
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


def _lora_sft_trainer():
    """TRL's SFTTrainer with the HF Trainer's loss, for LoRA runs.

    TRL 1.16 computes the loss through a fused LM head that reads the output layer's ``weight`` and ``bias``
    directly (``trl.trainer.utils.add_fused_lm_head``) instead of calling the layer. PEFT's trainable-token wrapper
    on the output layer holds the trained rows of Dolly's tokens in its own parameter and applies them only when
    called, so the fused head fails (no ``bias``) or would ignore those rows. The HF Trainer's loss calls the model
    as usual: the same masked cross-entropy over the same labels (TRL's collator builds them), normalised by the
    same token count, at the cost of materialising the logits (which ``dolly-finetune plan`` counts anyway).
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class LoraSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {key: value for key, value in inputs.items() if key != "completion_mask"}
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return LoraSFTTrainer


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


def keep_output_bias(peft_model) -> int:
    """Give back the bias that PEFT's trainable-token wrapper drops from a Linear output layer; return how many.

    peft 0.21's ``TrainableTokensLayer`` computes a wrapped ``nn.Linear`` as ``F.linear(x, W)`` without the base
    layer's bias (huggingface/peft#3649, fix not released). GPT-J's LM head (dolly-v1) has a bias, so a LoRA run
    would train against logits without it while the merged model (which runs the base layer) has it: the trained
    model and the saved one would disagree. A forward hook adds the bias on exactly the path that drops it (adapter
    active and not merged); the bias stays frozen, as the base's other weights do.
    """
    import torch
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    def add_bias(module, inputs, output):
        if module.disable_adapters or not module.active_adapters or module.merged:
            return output  # the base layer ran, bias included
        return output + module.base_layer.bias.to(output.dtype)

    hooked = 0
    for module in peft_model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(module, TrainableTokensLayer) and isinstance(base, torch.nn.Linear) and base.bias is not None:
            module.register_forward_hook(add_bias)
            hooked += 1
    return hooked


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
    if args.lora:
        _peft_trainable_tokens_on_cpu_ranks()


def _peft_trainable_tokens_on_cpu_ranks() -> None:
    """Let PEFT set up Dolly's trainable token rows under ZeRO-3 on CPU ranks.

    peft 0.21's ``TrainableTokensLayer._collect_token_weights`` (ZeRO-3 only) gathers the rows on rank 0 and
    broadcasts them, but builds the other ranks' receive buffer on ``cuda`` ("right now, only CUDA is implemented",
    peft/tuners/trainable_tokens/layer.py), which fails on gloo CPU ranks. This is the same function with the
    buffer on the CPU; GPU runs keep PEFT's own.
    """
    import torch
    import torch.distributed as dist
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.utils.integrations import gather_params_ctx

    def collect_token_weights(self, weight, rows, embed_dim):
        with gather_params_ctx([weight], modifier_rank=None):
            if dist.get_rank() == 0:
                token_weights = weight[rows].clone()
            else:
                token_weights = torch.empty((len(rows), embed_dim), dtype=weight.dtype)
        dist.broadcast(token_weights, src=0)
        return token_weights

    TrainableTokensLayer._collect_token_weights = collect_token_weights


def _distributed_cpu(args: argparse.Namespace) -> bool:
    import torch

    return bool(args.deepspeed) and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _load_tokenizer(input_model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(input_model)
    except OSError as err:
        raise FinetuneError(f"--input-model {input_model}: cannot load its tokenizer ({err}).") from err


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


def _load_model(input_model: str, vocab_size: int, load_in_4bit: bool = False, deepspeed: bool = False):
    from transformers import AutoModelForCausalLM

    # deepspeed.zero.Init (ZeRO-3) fails with a torch._dynamo "Signature mismatch" TypeError on torch 2.13 unless
    # torch._dynamo was imported before entering it.
    import torch._dynamo  # noqa: F401

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


# --- Saving -----------------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def _mlflow_run(args: argparse.Namespace, trainer):
    """With ``--report-to mlflow``: one MLflow run around training, holding the Trainer's params and metrics
    (transformers' MLflowCallback logs into the active run), ``dolly-finetune``'s own flags, and at the end the
    final model's path (``final_model_dir``). Yields a function to call with that path.

    The run is started here rather than by the callback, which ends its run when training ends, before the final
    model exists. ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME`` are read by MLflow itself.
    """
    if "mlflow" not in [name.strip() for name in args.report_to.split(",")] or not trainer.is_world_process_zero():
        yield lambda final: None
        return
    import mlflow

    with mlflow.start_run(run_name=Path(args.local_output_dir).name):
        mlflow.log_params({f"dolly_finetune.{name}": value for name, value in sorted(vars(args).items())})

        def record(final: Path) -> None:
            mlflow.log_param("final_model_dir", str(final.resolve()))
            mlflow.set_tag("final_model_dir", str(final.resolve()))
            logger.info("MLflow run %s: final model %s", mlflow.active_run().info.run_id, final)

        yield record


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
