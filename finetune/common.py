"""What ``dolly-finetune`` training (:mod:`finetune.train`), its data (:mod:`finetune.data`) and its planner
(:mod:`finetune.plan`) all need: the flags and their parser, the error type, the model-length rule, and the LoRA
target modules per architecture.

This module imports none of them (only :mod:`finetune.presets`, which imports nothing of the package's), so each of
them can import it without a circle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dolly_langchain.clitools import fraction, non_negative_int, positive_float, positive_int
from dolly_langchain.errors import DollyError

DEFAULT_INPUT_MODEL = "EleutherAI/pythia-6.9b"  # Dolly v2's default (dolly-v2-7b)
#: databricks-dolly-15k on the Hugging Face hub (CC BY-SA 3.0): the 15k human-written records Dolly v2 was tuned on.
DEFAULT_TRAINING_DATASET = "databricks/databricks-dolly-15k"
DEFAULT_SEED = 42
DEFAULT_LR = 1e-5  # Dolly's full fine-tuning lr
#: LoRA's default lr: the QLoRA paper's 2e-4 for 7B-13B models (Dettmers et al. 2023, table 9). Adapters start at
#: zero and have few parameters, so they need a far larger step than full fine-tuning's 1e-5.
DEFAULT_LORA_LR = 2e-4

#: ``--lora-target-modules auto``: every attention and MLP projection of each architecture (the QLoRA paper found
#: adapting all linear layers of the blocks necessary to match full fine-tuning). Names are the module names in
#: transformers 5.23's modeling_gpt_neox.py, modeling_gptj.py and modeling_llama.py. The output layer is not a
#: target: the rows of Dolly's new tokens train through ``trainable_token_indices`` (see finetune.train).
LORA_TARGET_MODULES: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],  # Pythia: dolly-v2
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],  # GPT-J: dolly-v1
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],  # Llama, SmolLM2
}


class FinetuneError(DollyError, RuntimeError):
    """A problem with the flags, files or run directory; the message names it and the fix."""


def lora_target_modules(model_type: str, flag: str = "auto") -> list[str] | str:
    """The modules ``--lora-target-modules FLAG`` adapts on a ``model_type`` model.

    ``auto``: :data:`LORA_TARGET_MODULES` for GPT-NeoX, GPT-J and Llama, PEFT's ``"all-linear"`` (every linear
    layer but the output layer) for any other architecture. Otherwise a comma-separated list of module names.
    """
    if flag != "auto":
        names = [name.strip() for name in flag.split(",") if name.strip()]
        if not names:
            raise FinetuneError(f"--lora-target-modules {flag!r}: pass `auto` or comma-separated module names.")
        return names
    return list(LORA_TARGET_MODULES.get(model_type, [])) or "all-linear"


def model_max_length(config) -> int:
    """Dolly's rule: the first of n_positions / max_position_embeddings / seq_length the config sets, else 1024."""
    for name in ("n_positions", "max_position_embeddings", "seq_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 1024


# --- Command line -----------------------------------------------------------------------------------------------

#: The description under ``dolly-finetune --help`` and ``dolly finetune --help``.
DESCRIPTION = ("Fine-tune a causal LM with Databricks' Dolly recipe (TRL SFTTrainer, optional DeepSpeed, optional "
               "LoRA/QLoRA through PEFT).")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the epilog's launch commands kept as written."""



class Default:
    """A flag's default value, marked as such so that ``--preset`` can replace it after parsing.

    Every training flag's default is wrapped in one (:func:`add_training_flags`), so after one ``parse_args`` a
    flag the user gave holds a plain value and any other flag a ``Default``: :func:`resolve_args` then applies the
    preset to the defaults only (flags given explicitly win) and unwraps the rest. ``--help`` prints ``str(default)``,
    which is the wrapped value's, so the help text is the same as with plain defaults.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return f"Default({self.value!r})"


def parse_args(argv: list[str] | None = None, epilog: str | None = None) -> argparse.Namespace:
    """Parse ``dolly-finetune`` flags; ``--preset NAME`` turns a preset's values into defaults (flags win).

    ``epilog`` is shown under ``--help`` (``finetune.train`` passes its launch commands).
    """
    from finetune.presets import PRESETS

    return resolve_args(build_parser(PRESETS, epilog).parse_args(argv))


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Finish parsed training flags in place and return them: apply ``--preset`` to the flags not given, unwrap the
    other defaults, make ``--load-in-4bit`` imply ``--lora``, pick the learning rate, and find ``--deepspeed``'s file.

    Running it again on its own result changes nothing.
    """
    from finetune.presets import PRESETS, deepspeed_config_path

    values = vars(args)
    preset = _plain(values.get("preset"))
    if preset:
        unknown = set(PRESETS[preset]) - set(values)
        if unknown:
            raise FinetuneError(f"preset {preset!r} sets unknown options {sorted(unknown)}: fix finetune/presets.py.")
        for name, value in PRESETS[preset].items():
            if isinstance(values[name], Default):
                setattr(args, name, value)
    for name, value in list(values.items()):
        if isinstance(value, Default):
            setattr(args, name, value.value)
    args.lora = args.lora or args.load_in_4bit  # QLoRA is LoRA on a 4-bit base
    if args.lr is None:
        args.lr = DEFAULT_LORA_LR if args.lora else DEFAULT_LR
    if args.deepspeed:
        try:
            args.deepspeed = str(deepspeed_config_path(args.deepspeed))
        except FileNotFoundError as err:
            raise FinetuneError(str(err)) from None
    return args


def _plain(value):
    return value.value if isinstance(value, Default) else value


def given(value) -> bool:
    """Whether a parsed (not yet resolved) flag was given on the command line rather than left at its default."""
    return not isinstance(value, Default)


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


def build_parser(presets: dict[str, dict], epilog: str | None = None) -> argparse.ArgumentParser:
    """The ``dolly-finetune`` parser: every training flag, ``--local-output-dir`` required. Its namespace holds
    :class:`Default` values until :func:`resolve_args` runs (:func:`parse_args` does both)."""
    parser = argparse.ArgumentParser(prog="dolly-finetune", description=DESCRIPTION, epilog=epilog,
                                     formatter_class=HelpFormatter)
    add_training_flags(parser, presets)
    return parser


def add_training_flags(parser: argparse.ArgumentParser, presets: dict[str, dict], *, require_output_dir: bool = True,
                       hidden: bool = False) -> list[argparse.Action]:
    """Add every training flag to ``parser``, each default wrapped in a :class:`Default`; return their actions.

    ``require_output_dir=False`` leaves ``--local-output-dir`` to the caller to check (a parser with subcommands,
    where argparse would demand it of ``plan`` too). ``hidden`` keeps the flags out of ``--help`` (``plan`` reads
    them, but documents only its own).
    """
    actions: list[argparse.Action] = []

    def adder(container):
        def add(*flags, **kwargs):
            actions.append(container.add_argument(*flags, **kwargs))
        return add

    add = adder(parser)
    add("--preset", choices=sorted(presets),
        help="Start from one of Dolly's published runs (finetune/presets.py); flags given explicitly win.")
    add("--input-model", default=DEFAULT_INPUT_MODEL, help="Hub id or local directory of the base model.")
    add("--local-output-dir", required=require_output_dir,
        help="Run directory: checkpoints, logs, and the final model (in model/, and loadable as the directory "
        "itself once the run has finished).")
    add("--export-dir", help="Also copy the final model here (Dolly's DBFS copy), e.g. a shared or mounted path.")
    add("--overwrite-output-dir", action="store_true",
        help="Replace a finished model in --local-output-dir (and --export-dir), and discard old checkpoints.")
    data = adder(parser.add_argument_group("data"))
    data("--training-dataset", default=DEFAULT_TRAINING_DATASET,
         help="Hub dataset id, or a local .jsonl/.json/.parquet/.csv with instruction/context/response "
         "(Dolly) or instruction/input/output (Alpaca, dolly-v1) records.")
    data("--max-records", type=positive_int, help="Use only the first N records of the dataset.")
    data("--skip-bad-records", action="store_true",
         help="Skip records with an empty instruction or response (and report how many) instead of "
         "stopping at the first one.")
    data("--test-size", type=_test_size, default=1000,
         help="Held-out evaluation records: a count (1000) or a ratio (0.05); 0 disables evaluation.")
    data("--max-length", type=positive_int,
         help="Longest record in tokens; longer records are dropped. Default: the model's "
         "n_positions / max_position_embeddings / seq_length, else 1024.")
    data("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
         help="Batch records of similar length (HF LengthGroupedSampler) so a batch carries little "
         "padding: same records per step as Dolly, so its warmup/eval/save step counts keep their "
         "meaning. --no-group-by-length is Dolly's exact recipe: random order, batches padded to a "
         "multiple of 8 (most of each batch is padding).")
    data("--packing", action=argparse.BooleanOptionalAction, default=False,
         help="Instead, pack records into --max-length rows (TRL best-fit packing) and train on "
         "padding-free batches: fewer, fuller steps. Only fast with a variable-length attention kernel "
         "(FlashAttention on GPU); on CPU/SDPA each step attends over the whole flattened batch.")
    train = adder(parser.add_argument_group("training"))
    train("--epochs", type=positive_float, default=3, help="Number of epochs.")
    train("--per-device-train-batch-size", type=positive_int, default=8,
          help="Records per device per step (packed rows with --packing).")
    train("--per-device-eval-batch-size", type=positive_int, default=8, help="Rows per device per eval step.")
    train("--lr", type=positive_float, default=None,
          help=f"Peak learning rate (AdamW; linear decay, or the --deepspeed config's scheduler). "
          f"Default: {DEFAULT_LR:g} (Dolly's), {DEFAULT_LORA_LR:g} with --lora.")
    train("--warmup-steps", type=non_negative_int, default=0, help="Linear warmup steps.")
    train("--seed", type=non_negative_int, default=DEFAULT_SEED, help="Seed for the data split, order and init.")
    train("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
          help="Recompute activations in the backward pass: less memory, ~20%% slower.")
    train("--bf16", action=argparse.BooleanOptionalAction, default=None,
          help="bfloat16 mixed precision. Default: on where the GPU supports it, off on CPU.")
    train("--fp16", action=argparse.BooleanOptionalAction, default=False,
          help="float16 mixed precision with loss scaling, for GPUs without bfloat16 (V100).")
    train("--deepspeed",
          help="DeepSpeed JSON config: a path, or a file name in finetune/configs/ (launch with the "
          "`deepspeed` launcher for several processes).")
    train("--local_rank", "--local-rank", type=int, default=-1,
          help="Set by the deepspeed launcher; do not pass it yourself.")
    lora = adder(parser.add_argument_group("LoRA / QLoRA (PEFT)"))
    lora("--lora", action="store_true",
         help="Train LoRA adapters (PEFT) on the frozen base model instead of all its weights; the "
         "embedding and output rows of Dolly's new tokens train as well.")
    lora("--lora-r", type=positive_int, default=16, help="LoRA rank.")
    lora("--lora-alpha", type=positive_int, default=32, help="LoRA scaling alpha (scale = alpha / r).")
    lora("--lora-dropout", type=fraction, default=0.05, help="Dropout on the LoRA path.")
    lora("--lora-target-modules", default="auto",
         help="Comma-separated module names to adapt, or `auto`: every attention and MLP projection "
         "(GPT-NeoX: query_key_value,dense,dense_h_to_4h,dense_4h_to_h; GPT-J: q/k/v/out_proj,fc_in,"
         "fc_out; Llama: q/k/v/o_proj,gate/up/down_proj; others: PEFT's all-linear).")
    lora("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
         help="Also write the base model with the adapter merged in (a plain transformers model) "
         "beside the adapter; --no-merge-lora keeps only the adapter.")
    lora("--load-in-4bit", action="store_true",
         help="QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes) with bf16 compute. Needs CUDA "
         "and `pip install dolly-langchain[qlora]`; implies --lora.")
    ckpt = adder(parser.add_argument_group("logging and checkpoints"))
    ckpt("--logging-steps", type=positive_int, default=10, help="Log the loss every N steps.")
    ckpt("--eval-steps", type=positive_int, default=50, help="Evaluate on the held-out records every N steps.")
    ckpt("--save-steps", type=positive_int, default=400, help="Write a checkpoint every N steps.")
    ckpt("--save-total-limit", type=positive_int, default=10, help="Keep at most N checkpoints.")
    ckpt("--resume-from-checkpoint", type=_resume,
         help="A checkpoint directory, or `auto` for the latest one in --local-output-dir (starts "
         "fresh when there is none).")
    ckpt("--report-to", default="tensorboard",
         help="Where to send logs: tensorboard, mlflow (MLFLOW_TRACKING_URI: a local "
         "sqlite:///mlruns.db or a Databricks workspace; `pip install dolly-langchain[mlflow]`), none, "
         "or any integration transformers knows.")
    evaluation = adder(parser.add_argument_group("evaluation of the final model (dolly-eval, into RUN_DIR/eval)"))
    evaluation("--eval-after", choices=("card", "generation", "both"),
               help="Run dolly-eval on the final model: the model card's lm-eval table, instruction "
               "following on the held-out records, or both.")
    evaluation("--eval-samples", type=positive_int,
               help="With --eval-after: a seeded N documents per task / held-out records (default: all).")
    # Wrapped after the actions are built, so that each action (BooleanOptionalAction adds "(default: ...)" to its
    # own help when built) sees its plain default, exactly as without the wrapping.
    # Set on the actions rather than with parser.set_defaults, which would also store them parser-wide, where a
    # subcommand's parser (`plan`) would copy them over the values its parent parsed.
    for action in actions:
        action.default = Default(action.default)
    if hidden:
        for action in actions:
            action.help = argparse.SUPPRESS
    return actions
