"""dolly-finetune plan: will this model fit this hardware, and how many steps is an epoch? Answered before launching.

Launch commands::

    dolly-finetune plan --preset dolly-v2-12b-a100 --num-gpus 8            # pythia-12b on 8x A100 40GB
    dolly-finetune plan --preset dolly-v2-7b-a10 --num-gpus 4              # pythia-6.9b on 4x A10 24GB
    dolly-finetune plan --input-model EleutherAI/pythia-12b --deepspeed a10_config.json --num-gpus 4
    dolly-finetune plan --preset dolly-v2-12b-a100 --num-gpus 8 --num-nodes 2 --json
    dolly-finetune plan --input-model path/to/model_dir --deepspeed my_config.json --num-gpus 2 --gpu-memory-gb 80
    dolly-finetune plan --preset dolly-v2-12b-qlora-a10 --num-gpus 1             # QLoRA, pythia-12b, one A10
    dolly-finetune plan --preset dolly-v2-12b-qlora-a10 --num-gpus 1 --gpu-memory-gb 80   # ... on one A100 80GB
    dolly-finetune plan --input-model EleutherAI/pythia-6.9b --lora --num-gpus 1 --gpu-memory-gb 24

``plan`` takes the same flags as a training run (``--preset``, ``--input-model``, ``--deepspeed``,
``--per-device-train-batch-size``, ``--max-length``, ``--packing``, ``--epochs``, ``--test-size``,
``--training-dataset`` ...; ``--local-output-dir`` is not needed) and reads them with the training CLI's own flag
definitions (:func:`finetune.common.add_training_flags`), so the plan is for exactly the run those flags would
launch. The hardware comes from ``--num-gpus`` / ``--num-nodes`` and, for the GPU and host memory, from the shipped
config's assumed hardware (:data:`finetune.presets.HARDWARE`) or ``--gpu-memory-gb`` / ``--host-memory-gb``.

What it prints, and how each number is made (no weights are loaded, no data is tokenized):

- Parameters: the model is built from its config on PyTorch's ``meta`` device (shapes, no storage). The configs of
  the presets' base models (Pythia 2.8b/6.9b/12b, GPT-J 6B) ship in :data:`KNOWN_CONFIGS` because they cannot be
  downloaded offline; other models are read from a local directory, a ``config.json`` file or the hub.
- Model states per GPU and on the host: DeepSpeed's own ZeRO estimators
  (``estimate_zero3_model_states_mem_needs`` / ``estimate_zero2_model_states_mem_needs``) with the offload settings of
  the DeepSpeed config and ``zero_init`` on (the HF Trainer loads ZeRO-3 models sharded). They count 16-bit params
  and grads plus fp32 master weights and Adam states, and assume mixed precision.
- Activations per GPU (our estimate, not DeepSpeed's) for one micro-batch of full ``--max-length`` rows, the worst
  case (a batch holding one long record is padded to its length; a packed row is always full):
  with gradient checkpointing, each layer's input is kept (``L*b*s*h`` values) plus one layer being recomputed
  (``b*s*(9h + 2*ffn)``); without it, all ``L`` layers; plus the logits (``b*s*vocab`` in the model dtype, an fp32
  copy for the loss and its fp32 log-softmax: ``+8`` bytes each). Attention scores are not stored (SDPA / flash).
- With ``--lora`` (or ``--load-in-4bit``) the model states are counted by :func:`lora_parameters` and
  :func:`lora_states_memory` instead: the frozen base in 16-bit, or for QLoRA every linear layer but the output layer
  in NF4 (:data:`QLORA_BITS_PER_WEIGHT`) and the rest in 16-bit; the adapters (``r * (in + out)`` per targeted layer)
  and the rows of Dolly's new tokens at 16 bytes per trainable parameter (fp32 weight, gradient and two Adam
  moments); ZeRO-3 splits the frozen base and ZeRO the Adam states across GPUs. No ``--deepspeed`` means one GPU,
  whose memory comes from the preset (:data:`finetune.presets.SINGLE_GPU_HARDWARE`) or ``--gpu-memory-gb``. The
  activations add each LoRA layer's kept input; the host must hold a 16-bit copy of the base for the final merge.
- A flat :data:`CUDA_OVERHEAD_GB` for the CUDA context, NCCL buffers and allocator fragmentation.
- Fits: total <= 90% of the GPU memory; tight: <= 100%; otherwise it does not fit, and the plan names the largest
  per-device batch that would fit.
- Steps per epoch: as the HF Trainer counts them: the training records (data set size minus ``--test-size``) make
  ``ceil(n / batch)`` batches, dealt out to the GPUs (``ceil(batches / gpus)``); there is no gradient accumulation
  (``dolly-finetune`` has none). With ``--packing`` a batch is ``--max-length``-token rows of packed records, so the
  count needs the mean record length (:data:`MEAN_RECORD_TOKENS` or ``--mean-record-tokens``) and is approximate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

from dolly_langchain.clitools import positive_float, positive_int, run_command
from dolly_langchain.errors import DollyError

GIB = 2**30
CUDA_OVERHEAD_GB = 1.0  # CUDA context (~0.5 GiB), NCCL buffers and fragmentation: measured GPUs never give all
FITS_FRACTION = 0.9  # leave 10% for allocator fragmentation and spikes the estimate does not see
QLORA_BITS_PER_WEIGHT = 4.127  # NF4 + double-quantized block constants (QLoRA paper, section 3)

#: Configs of the presets' base models, so that ``plan`` works offline. Values from each model's config.json on the
#: Hugging Face hub; only what sets the parameter count and activation sizes.
KNOWN_CONFIGS: dict[str, dict] = {
    "EleutherAI/pythia-2.8b": {
        "model_type": "gpt_neox", "hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
        "intermediate_size": 10240, "vocab_size": 50304, "max_position_embeddings": 2048, "rotary_pct": 0.25,
        "use_parallel_residual": True, "tie_word_embeddings": False,
    },
    "EleutherAI/pythia-6.9b": {
        "model_type": "gpt_neox", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "intermediate_size": 16384, "vocab_size": 50432, "max_position_embeddings": 2048, "rotary_pct": 0.25,
        "use_parallel_residual": True, "tie_word_embeddings": False,
    },
    "EleutherAI/pythia-12b": {
        "model_type": "gpt_neox", "hidden_size": 5120, "num_hidden_layers": 36, "num_attention_heads": 40,
        "intermediate_size": 20480, "vocab_size": 50688, "max_position_embeddings": 2048, "rotary_pct": 0.25,
        "use_parallel_residual": True, "tie_word_embeddings": False,
    },
    "EleutherAI/gpt-j-6B": {
        "model_type": "gptj", "n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64, "n_inner": None,
        "vocab_size": 50400, "n_positions": 2048, "tie_word_embeddings": False,
    },
}

#: Mean tokens per record (Dolly's format, special tokens included), for step counts with --packing. Measured on
#: databricks-dolly-15k with SmolLM2's tokenizer (records <= 2048 tokens; median 130, p90 419); GPT-NeoX's
#: tokenizer is a similar byte-level BPE of about the same vocabulary size.
MEAN_RECORD_TOKENS: dict[str, int] = {"databricks/databricks-dolly-15k": 200}


class PlanError(DollyError, ValueError):
    """A flag or file the plan cannot use; the message names it and the fix."""


# --- Command line -----------------------------------------------------------------------------------------------

HELP = "what to launch: memory per GPU and on the host, and steps per epoch, for a training run"
PARSER_OPTIONS = {
    "description": "Estimate memory per GPU and on the host, and steps per epoch, for a dolly-finetune run. "
    "Takes any dolly-finetune training flag as well (--preset, --input-model, --deepspeed, "
    "--per-device-train-batch-size, --max-length, --packing, --epochs, --test-size, --training-dataset ...).",
}


def configure(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """The plan's own flags, and every training flag (read, but left out of ``--help``: the training command
    documents them).

    ``nested``: ``plan`` is a subcommand of a parser that holds the training flags too (``dolly finetune plan``).
    argparse copies a subcommand's namespace over its parent's, so here the training flags get no defaults: a flag
    given before ``plan`` (``dolly finetune --preset X plan``) keeps its value unless given again after it.
    """
    from finetune.common import add_training_flags
    from finetune.presets import PRESETS

    add = parser.add_argument
    add("--num-gpus", type=int, required=True, help="GPUs per node (processes per node for cpu_config.json).")
    add("--num-nodes", type=int, default=1, help="Nodes (hosts in the DeepSpeed hostfile).")
    add("--gpu-memory-gb", type=positive_float, help="Memory of one GPU in GiB. Default: the shipped config's GPU.")
    add("--host-memory-gb", type=positive_float, help="RAM of one node in GiB. Default: the shipped config's instance.")
    add("--dataset-size", type=positive_int, help="Records in the training data set. Default: known for the hub ids "
        "databricks/databricks-dolly-15k (15011) and tatsu-lab/alpaca (52002); counted for a local file.")
    add("--mean-record-tokens", type=positive_float, help="Mean tokens per record, for step counts with --packing. "
        "Default: measured for databricks-dolly-15k (200).")
    add("--json", action="store_true", help="Print the plan as JSON.")
    training = add_training_flags(parser, PRESETS, require_output_dir=False, hidden=True)
    if nested:
        for action in training:  # not set_defaults: that would put the SUPPRESS marker itself into the namespace
            action.default = argparse.SUPPRESS
    parser.set_defaults(run=run)


def register(commands) -> None:
    """Add ``plan`` to the subcommands of ``dolly finetune``, whose parser holds the training flags."""
    configure(commands.add_parser("plan", help=HELP, **PARSER_OPTIONS), nested=True)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``dolly-finetune plan`` (the alias of ``dolly finetune plan``)."""
    parser = argparse.ArgumentParser(prog="dolly-finetune plan", **PARSER_OPTIONS)
    configure(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``dolly-finetune plan ...``: print the plan (a table, or JSON with ``--json``); 2 on a usage error."""
    return run_command(build_parser(), argv)


def run(args: argparse.Namespace) -> int:
    """Check the flags, make the plan and print it (a table, or JSON with ``--json``)."""
    check_args(args)
    # DeepSpeed logs to stdout on import ("Setting accelerator to CPU"); keep stdout for the plan (--json).
    with contextlib.redirect_stdout(sys.stderr):
        plan = make_plan(args)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Plan flags and training flags (presets included), checked: what :func:`make_plan` takes."""
    return check_args(build_parser().parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Finish the training flags (:func:`finetune.common.resolve_args`) and refuse what cannot be planned."""
    from finetune.common import FinetuneError, resolve_args

    if args.num_gpus < 1 or args.num_nodes < 1:
        raise PlanError(f"--num-gpus {args.num_gpus} --num-nodes {args.num_nodes}: both must be at least 1.")
    try:
        resolve_args(args)
    except FinetuneError as err:
        raise PlanError(str(err)) from None
    if not args.deepspeed and not args.lora:
        raise PlanError("no DeepSpeed config: pass --deepspeed CFG (e.g. a100_config.json) or --preset NAME (or "
                        "--lora for adapters on one GPU).")
    if not args.deepspeed and args.num_gpus * args.num_nodes > 1:
        raise PlanError(f"--num-gpus {args.num_gpus}: several GPUs need a --deepspeed config (each would otherwise "
                        "hold the whole model); pass one, or --num-gpus 1.")
    return args


# --- The plan ---------------------------------------------------------------------------------------------------


def make_plan(args: argparse.Namespace) -> dict:
    """All the numbers, as a JSON-ready dict (sizes in GiB)."""
    from finetune.common import model_max_length

    config, config_source = load_model_config(args.input_model)
    total_params, largest_layer = count_parameters(config)
    ds_config = json.loads(Path(args.deepspeed).read_text(encoding="utf-8")) if args.deepspeed else {}
    hardware = _hardware(args)
    max_length = args.max_length or model_max_length(config)
    lora = None
    if args.lora:
        lora = lora_parameters(config, args.lora_r, args.lora_target_modules, args.load_in_4bit)
        states_gpu, states_host, zero = lora_states_memory(
            total_params, largest_layer, lora, ds_config, args.num_gpus, args.num_nodes
        )
    else:
        states_gpu, states_host, zero = model_states_memory(
            total_params, largest_layer, ds_config, args.num_gpus, args.num_nodes
        )
    # Without a DeepSpeed config (LoRA on one GPU) the run trains in bf16 unless --no-bf16.
    act_bytes = _dtype_bytes(ds_config, args.bf16) if args.deepspeed else (4 if args.bf16 is False else 2)
    per_sample = activation_memory(config, 1, max_length, act_bytes, args.gradient_checkpointing,
                                   lora_inputs_per_layer=lora["inputs_per_layer"] if lora else 0)
    batch = args.per_device_train_batch_size
    overhead = 0 if hardware["on_cpu"] else CUDA_OVERHEAD_GB * GIB
    gpu_total = states_gpu + batch * per_sample + overhead
    return {
        "model": {
            "input_model": args.input_model,
            "config_source": config_source,
            "parameters": total_params,
            "largest_layer_parameters": largest_layer,
            "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size,
        },
        **({"lora": lora} if lora else {}),
        "hardware": {
            "deepspeed_config": str(args.deepspeed) if args.deepspeed else None,
            "zero": zero,
            "num_gpus_per_node": args.num_gpus,
            "num_nodes": args.num_nodes,
            **hardware,
        },
        "memory_per_gpu_gb": {
            "model_states": states_gpu / GIB,
            "activations": batch * per_sample / GIB,
            "cuda_overhead": overhead / GIB,
            "total": gpu_total / GIB,
            "activations_assume": f"batch {batch} x {max_length} tokens, {8 * act_bytes}-bit, gradient "
            f"checkpointing {'on' if args.gradient_checkpointing else 'off'}",
            **gpu_verdict(gpu_total, states_gpu, per_sample, hardware),
        },
        "memory_per_node_host_gb": host_memory(states_host, gpu_total, args.num_gpus, hardware),
        "steps": steps_plan(args, max_length),
    }


def load_model_config(input_model: str):
    """Return ``(config, where it came from)`` for a shipped config, a local dir / config.json, or a hub id."""
    from transformers import AutoConfig

    known = {name.lower(): name for name in KNOWN_CONFIGS}
    if input_model.lower() in known:
        fields = dict(KNOWN_CONFIGS[known[input_model.lower()]])
        return AutoConfig.for_model(fields.pop("model_type"), **fields), "shipped with finetune.plan"
    path = Path(input_model).expanduser()
    if path.is_file():
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
            return AutoConfig.for_model(fields.pop("model_type"), **fields), str(path)
        except (json.JSONDecodeError, KeyError, ValueError) as err:
            raise PlanError(f"--input-model {input_model}: not a transformers config.json ({err}).") from None
    if path.is_dir() and not (path / "config.json").is_file():
        raise PlanError(f"--input-model {input_model}: the directory has no config.json.")
    if not path.exists() and (input_model.startswith((".", "/", "~")) or input_model.count("/") > 1):
        raise PlanError(f"--input-model {input_model}: no such directory or config.json file.")
    try:
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else input_model), str(path) if path.is_dir() \
            else "Hugging Face hub"
    except (OSError, ValueError) as err:
        raise PlanError(
            f"--input-model {input_model}: cannot read its config ({str(err).splitlines()[0]}). Pass a local model "
            f"directory or its config.json, or one of the shipped configs: {', '.join(KNOWN_CONFIGS)}."
        ) from None


def count_parameters(config) -> tuple[int, int]:
    """``(total parameters, parameters of the largest module)`` of the model built on the meta device.

    Tied weights are one parameter object and count once (DeepSpeed's ``model_to_params`` dedups by storage
    pointer, which meta tensors do not have, so we dedup by identity).
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return total, largest


def model_states_memory(total_params: int, largest_layer: int, ds_config: dict, gpus: int, nodes: int):
    """DeepSpeed's ZeRO estimate: ``(bytes per GPU, bytes of host RAM per node, description)``."""
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    offload_params = zero.get("offload_param", {}).get("device", "none") in ("cpu", "nvme")
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        host, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest_layer, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params, zero_init=True,
        )
    elif stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        host, gpu = estimate_zero2_model_states_mem_needs(
            total_params, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload_optimizer
        )
    else:
        raise PlanError(
            f"--deepspeed: ZeRO stage {stage}: plan estimates ZeRO stages 1-3 (set zero_optimization.stage)."
        )
    offloaded = [name for name, on in (("optimizer", offload_optimizer), ("params", offload_params)) if on]
    description = f"ZeRO-{stage}, offload: {', '.join(offloaded) or 'none'}"
    return gpu, host, description


def lora_parameters(config, r: int, target_modules: str, load_in_4bit: bool) -> dict:
    """What ``--lora`` trains and keeps frozen, counted on the model built on the meta device (see module doc).

    ``adapter_parameters``: ``r * (in + out)`` for each targeted linear layer (PEFT's A and B matrices);
    ``token_parameters``: the embedding rows of Dolly's new tokens, and their output rows unless tied;
    ``frozen_bytes``: the base in 16-bit, or with ``load_in_4bit`` every linear layer but the output layer in NF4 with
    double quantization (4.127 bits per weight, QLoRA paper section 3) and the rest (embeddings, output layer,
    norms, biases) in 16-bit; ``inputs_per_layer``: summed input width of one block's targeted layers (LoRA keeps
    each one's dropped-out input for the backward pass).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from dolly_langchain.prompts import DOLLY_SPECIAL_TOKENS
    from finetune.common import lora_target_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = lora_target_modules(config.model_type, target_modules)
    output = model.get_output_embeddings()
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    adapter = inputs = linear_weights = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        linear_weights += module.weight.numel()
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
            adapter += r * (module.in_features + module.out_features)
            inputs += module.in_features
    tied = output is None or output.weight is model.get_input_embeddings().weight
    tokens = len(DOLLY_SPECIAL_TOKENS) * config.hidden_size * (1 if tied else 2)
    frozen = linear_weights * QLORA_BITS_PER_WEIGHT / 8 + (total - linear_weights) * 2 if load_in_4bit else 2 * total
    return {
        "target_modules": targets,
        "r": r,
        "adapter_parameters": adapter,
        "token_parameters": tokens,
        "trainable_parameters": adapter + tokens,
        "base": "4-bit NF4" if load_in_4bit else "16-bit",
        "frozen_bytes": int(frozen),
        "inputs_per_layer": inputs // config.num_hidden_layers,
    }


def lora_states_memory(total_params: int, largest_layer: int, lora: dict, ds_config: dict, gpus: int, nodes: int):
    """``(bytes per GPU, bytes of host RAM per node, description)`` of a LoRA run's model states.

    Trainable parameters cost 16 bytes each (fp32 weight and gradient, Adam's two fp32 moments); with a DeepSpeed
    ZeRO config the 8 bytes of Adam states are split over all GPUs (or offloaded to the host), and ZeRO-3 also splits
    the frozen base, plus DeepSpeed's 4 bytes per parameter of the largest layer for gathering it. Without DeepSpeed
    (one GPU) everything sits on that GPU. The host must hold a 16-bit copy of the base at the end, when the adapter
    is merged into it (``--merge-lora``).
    """
    trainable, frozen, world = lora["trainable_parameters"], lora["frozen_bytes"], gpus * nodes
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0)) if ds_config else 0
    if ds_config and stage not in (1, 2, 3):
        raise PlanError(
            f"--deepspeed: ZeRO stage {stage}: plan estimates ZeRO stages 1-3 (set zero_optimization.stage)."
        )
    offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    adam = 8 * trainable
    host = 2 * total_params  # the 16-bit base the adapter is merged into
    if offload_optimizer:
        host += int(1.5 * adam)  # DeepSpeed's 1.5x buffer factor, as in its ZeRO estimators
        adam = 0
    elif stage:
        adam = adam // world
    gpu = 8 * trainable + adam
    gpu += frozen // world + 4 * largest_layer if stage == 3 else frozen
    description = f"LoRA r {lora['r']} on a frozen {lora['base']} base" + (
        f", ZeRO-{stage}" + (", optimizer offloaded" if offload_optimizer else "") if stage else ", one GPU"
    )
    return gpu, host, description


def activation_memory(config, batch: int, seq_len: int, dtype_bytes: int, gradient_checkpointing: bool,
                      lora_inputs_per_layer: int = 0) -> int:
    """Bytes of activations for one training step of ``batch`` rows of ``seq_len`` tokens (see module doc)."""
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    tokens = batch * seq_len
    one_layer = tokens * (9 * hidden + 2 * ffn + lora_inputs_per_layer) * dtype_bytes
    kept = layers * tokens * hidden * dtype_bytes + one_layer if gradient_checkpointing else layers * one_layer
    logits = tokens * vocab * (dtype_bytes + 8)
    return kept + logits


def _dtype_bytes(ds_config: dict, bf16_flag: bool | None) -> int:
    """2 when the config (or, for "auto", the --bf16 flag) trains in 16-bit, else 4."""
    for key, flag in (("bf16", bf16_flag), ("fp16", False)):
        enabled = ds_config.get(key, {}).get("enabled", False)
        if enabled is True or (enabled == "auto" and flag):
            return 2
    return 4


def _hardware(args: argparse.Namespace) -> dict:
    """The GPU and host the config assumes (finetune.presets.HARDWARE), or a one-GPU preset's
    (``SINGLE_GPU_HARDWARE``), overridden by the memory flags."""
    from finetune.presets import HARDWARE, PRESET_GPU, SINGLE_GPU_HARDWARE

    if args.deepspeed:
        assumed = HARDWARE.get(Path(args.deepspeed).name, {})
    else:
        assumed = SINGLE_GPU_HARDWARE.get(PRESET_GPU.get(args.preset or ""), {})
    on_cpu = "gpu" in assumed and assumed["gpu"] is None and args.gpu_memory_gb is None
    gpu_memory = args.gpu_memory_gb if args.gpu_memory_gb is not None else assumed.get("gpu_memory_gb")
    host_memory = args.host_memory_gb if args.host_memory_gb is not None else assumed.get("host_memory_gb")
    return {
        "on_cpu": on_cpu,
        "gpu": f"{args.gpu_memory_gb:g} GiB GPU" if args.gpu_memory_gb is not None else assumed.get("gpu"),
        "gpu_memory_gb": gpu_memory,
        "host": f"{args.host_memory_gb:g} GiB node" if args.host_memory_gb is not None else assumed.get("host"),
        "host_memory_gb": host_memory,
    }


def gpu_verdict(total: float, states: float, per_sample: float, hardware: dict) -> dict:
    """Whether ``total`` bytes fit one GPU, and the largest per-device batch that fits with 10% to spare."""
    if hardware["on_cpu"]:
        return {"fits": None, "verdict": "no GPU: each process holds this in host RAM (below)",
                "max_per_device_batch": None}
    if hardware["gpu_memory_gb"] is None:
        return {"fits": None, "verdict": "unknown: this config names no GPU; pass --gpu-memory-gb",
                "max_per_device_batch": None}
    capacity = hardware["gpu_memory_gb"] * GIB
    room = FITS_FRACTION * capacity - states - CUDA_OVERHEAD_GB * GIB
    max_batch = max(int(room // per_sample), 0)
    if total <= FITS_FRACTION * capacity:
        verdict, fits = "fits", True
    elif total <= capacity:
        verdict, fits = "tight: within 10% of GPU memory, may run out on the longest batches", True
    else:
        verdict, fits = "does not fit", False
    return {"fits": fits, "verdict": verdict, "max_per_device_batch": max_batch}


def host_memory(states_host: float, gpu_total: float, gpus: int, hardware: dict) -> dict:
    """Host RAM per node: DeepSpeed's estimate; on CPU (no GPU memory) the processes' own memory as well."""
    needed = states_host
    if hardware["on_cpu"]:  # cpu_config.json: each process holds its "GPU" share in RAM
        needed += gpus * gpu_total
    result = {"total": needed / GIB, "available": hardware["host_memory_gb"], "fits": None}
    if hardware["host_memory_gb"] is not None:
        result["fits"] = needed <= FITS_FRACTION * hardware["host_memory_gb"] * GIB
    return result


def steps_plan(args: argparse.Namespace, max_length: int) -> dict:
    """Training records, steps per epoch and in total, as the HF Trainer will count them."""
    records = dataset_size(args)
    held_out = math.ceil(args.test_size * records) if isinstance(args.test_size, float) else args.test_size
    if held_out >= records:
        raise PlanError(
            f"--test-size {args.test_size} leaves no training records of {records}; pass a smaller --test-size."
        )
    train_records = records - held_out
    world = args.num_gpus * args.num_nodes
    batch = args.per_device_train_batch_size
    result = {"dataset_records": records, "training_records": train_records, "global_batch": batch * world,
              "packing": args.packing}
    rows = train_records
    if args.packing:
        mean = args.mean_record_tokens or MEAN_RECORD_TOKENS.get(args.training_dataset)
        if mean is None:
            result.update(steps_per_epoch=None, total_steps=None,
                          note="--packing: steps depend on record lengths; pass --mean-record-tokens")
            return result
        rows = math.ceil(train_records * mean / max_length)
        result.update(packed_rows=rows, mean_record_tokens=mean, note="approximate (packed rows)")
    per_epoch = math.ceil(math.ceil(rows / batch) / world)
    result.update(steps_per_epoch=per_epoch, epochs=args.epochs, total_steps=math.ceil(per_epoch * args.epochs))
    return result


def dataset_size(args: argparse.Namespace) -> int:
    """Records in --training-dataset: --dataset-size, a known hub id, or counted in a local file."""
    from finetune.data import BadRecordError, load_records
    from finetune.presets import DATASET_SIZES

    if args.dataset_size is not None:
        size = args.dataset_size
    elif args.training_dataset in DATASET_SIZES:
        size = DATASET_SIZES[args.training_dataset]
    elif Path(args.training_dataset).expanduser().is_file():
        try:
            size = len(load_records(args.training_dataset, skip_bad_records=True)[0])
        except BadRecordError as err:
            raise PlanError(str(err)) from None
    else:
        raise PlanError(
            f"--training-dataset {args.training_dataset}: size unknown offline; pass --dataset-size N (records)."
        )
    return min(size, args.max_records) if args.max_records else size


# --- Output -----------------------------------------------------------------------------------------------------


def format_plan(plan: dict) -> str:
    """The plan as a readable table."""
    m, hw, mem, host = plan["model"], plan["hardware"], plan["memory_per_gpu_gb"], plan["memory_per_node_host_gb"]
    device = "CPU processes" if hw["on_cpu"] else hw["gpu"] or "GPUs of unknown memory"
    config = Path(hw["deepspeed_config"]).name + ", " if hw["deepspeed_config"] else ""
    lora = plan.get("lora")
    lines = [
        f"{m['input_model']} on {hw['num_nodes']} node(s) x {hw['num_gpus_per_node']} {device}, "
        f"{config}{hw['zero']}",
        f"  model        {m['parameters'] / 1e9:.2f}B parameters, largest layer "
        f"{m['largest_layer_parameters'] / 1e6:.1f}M (hidden {m['hidden_size']}, {m['num_layers']} layers, vocab "
        f"{m['vocab_size']}; config: {m['config_source']})",
    ]
    if lora:
        lines.append(f"  LoRA         {lora['trainable_parameters'] / 1e6:.1f}M trainable parameters (r {lora['r']} on "
                     f"{lora['target_modules']}, + Dolly's token rows), frozen {lora['base']} base "
                     f"{lora['frozen_bytes'] / GIB:.1f} GiB")
    lines += [
        f"  {'per process' if hw['on_cpu'] else 'per GPU':11}  {mem['model_states']:6.1f} GiB  model states "
        f"({'frozen base + adapters, their gradients and Adam states' if lora else 'DeepSpeed ZeRO estimator'})",
        f"             + {mem['activations']:6.1f} GiB  activations, worst case: {mem['activations_assume']}",
    ]
    if not hw["on_cpu"]:
        lines.append(f"             + {mem['cuda_overhead']:6.1f} GiB  CUDA context and buffers")
    capacity = f" of {hw['gpu_memory_gb']:g} GiB" if hw["gpu_memory_gb"] is not None else ""
    lines.append(f"             = {mem['total']:6.1f} GiB{capacity}: {mem['verdict'].upper()}")
    if mem["max_per_device_batch"] is not None:
        lines.append(f"               largest per-device batch that fits with 10% to spare: "
                     f"{mem['max_per_device_batch']}")
    source = "the processes above + DeepSpeed ZeRO estimator" if hw["on_cpu"] else "DeepSpeed ZeRO estimator"
    if lora:
        source = "16-bit base for merging the adapter" + (" + the processes above" if hw["on_cpu"] else "")
    available = f" of {host['available']:g} GiB ({hw['host']})" if host["available"] is not None else ""
    verdict = {None: "", True: ": FITS", False: ": DOES NOT FIT"}[host["fits"]]
    lines.append(f"  host RAM     {host['total']:6.1f} GiB per node ({source}){available}{verdict}")
    lines.append(_format_steps(plan["steps"]))
    return "\n".join(lines)


def _format_steps(steps: dict) -> str:
    head = f"  steps        {steps['training_records']} training records (of {steps['dataset_records']})"
    if steps["steps_per_epoch"] is None:
        return f"{head}; {steps['note']}"
    packed = f" packed into ~{steps['packed_rows']} rows," if steps["packing"] else ""
    return (f"{head},{packed} global batch {steps['global_batch']}: {steps['steps_per_epoch']} steps per epoch, "
            f"{steps['total_steps']} in {steps['epochs']:g} epoch(s)")


if __name__ == "__main__":
    raise SystemExit(main())
