"""Where ``dolly-finetune`` works around its dependencies: each function names the upstream behaviour (and issue, where
there is one) it works around, so it can go when upstream changes.

- :func:`keep_output_bias`: PEFT's trainable-token wrapper drops a Linear output layer's bias (huggingface/peft#3649).
- :func:`peft_trainable_tokens_on_cpu_ranks`: PEFT gathers the trainable token rows under ZeRO-3 on CUDA only.
- :func:`init_cpu_distributed`: accelerate picks no process group for DeepSpeed on CPU; DeepSpeed would JIT-compile
  a shared-memory op first.
- :func:`import_dynamo_before_zero_init`: ``deepspeed.zero.Init`` needs ``torch._dynamo`` imported first.
- :func:`weights_source`: the HF Trainer resumes with a checkpoint's on-disk key names, which miss legacy names.
- :func:`lora_sft_trainer`: TRL's fused LM-head loss bypasses PEFT's wrapper on the output layer.

Versions these were written against: peft 0.21, TRL 1.16, transformers 5.23, torch 2.13, DeepSpeed on gloo.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = [
    "distributed_cpu", "import_dynamo_before_zero_init", "init_cpu_distributed", "keep_output_bias",
    "lora_sft_trainer", "peft_trainable_tokens_on_cpu_ranks", "weights_source",
]


# --- PEFT -------------------------------------------------------------------------------------------------------


def keep_output_bias(peft_model) -> int:
    """Give back the bias that PEFT's trainable-token wrapper drops from a Linear output layer; return how many.

    Works around huggingface/peft#3649 (fix proposed in huggingface/peft#3688, not released): peft 0.21's
    ``TrainableTokensLayer`` computes a wrapped ``nn.Linear`` as ``F.linear(x, W)`` without the base layer's bias.
    GPT-J's LM head (dolly-v1) has a bias, so a LoRA run would train against logits without it while the merged
    model (which runs the base layer) has it: the trained model and the saved one would disagree. A forward hook
    adds the bias on exactly the path that drops it (adapter active and not merged); the bias stays frozen, as the
    base's other weights do.
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


def peft_trainable_tokens_on_cpu_ranks() -> None:
    """Let PEFT set up Dolly's trainable token rows under ZeRO-3 on CPU ranks.

    Works around peft 0.21's ``TrainableTokensLayer._collect_token_weights`` (peft/tuners/trainable_tokens/layer.py,
    added for ZeRO-3 by huggingface/peft#2605): it gathers the rows on rank 0 and broadcasts them, but builds the
    other ranks' receive buffer on ``cuda`` ("right now, only CUDA is implemented"), which fails on gloo CPU ranks.
    This is the same function with the buffer on the CPU; GPU runs keep PEFT's own.
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


# --- DeepSpeed on CPU (the deepspeed launcher with cpu_config.json) -------------------------------------------------


def distributed_cpu(args: argparse.Namespace) -> bool:
    """Several processes under the deepspeed launcher, on a machine without CUDA."""
    import torch

    return bool(args.deepspeed) and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_cpu_distributed(args: argparse.Namespace) -> None:
    """Under the deepspeed launcher on CPU, set up gloo ourselves so every rank gets its own shard of the data.

    Works around accelerate's ``PartialState``, which picks no backend for DeepSpeed on CPU, so
    ``TrainingArguments`` would report world size 1: no data sharding, and DeepSpeed's batch-size check fails.
    Creating accelerate's state with gloo first (and passing ``use_configured_state``, see
    ``finetune.train.training_config``) fixes both. Also skips DeepSpeed's shared-memory all-reduce op
    (``deepspeed/comm/torch.py`` ``build_shm_op``), which it would JIT-compile on first use: over a minute, once per
    machine, and gloo alone serves CPU training.
    """
    if not distributed_cpu(args):
        return
    import deepspeed.ops
    from accelerate import PartialState

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    if args.lora:
        peft_trainable_tokens_on_cpu_ranks()


def import_dynamo_before_zero_init() -> None:
    """Import ``torch._dynamo`` before any model is built under ``deepspeed.zero.Init`` (ZeRO-3).

    Works around ``deepspeed.zero.Init`` failing with a torch._dynamo "Signature mismatch" ``TypeError`` on
    torch 2.13 unless torch._dynamo was imported before entering it.
    """
    import torch._dynamo  # noqa: F401


# --- transformers and TRL -------------------------------------------------------------------------------------------


def weights_source(input_model: str, resume_from: str | None) -> str:
    """Resume from the checkpoint's own model files rather than letting the Trainer load them into the base model.

    Works around transformers 5.23's ``Trainer._load_from_checkpoint``, which calls ``load_state_dict`` with the
    checkpoint's on-disk key names: some architectures save under legacy names (GPT-NeoX writes ``embed_out.weight``
    for ``lm_head.weight``), so that tensor would silently keep its fresh initialisation ("missing keys ...
    lm_head"), and the resumed run would diverge. ``from_pretrained`` maps the names correctly. Under DeepSpeed the
    engine restores its own checkpoint on top, which is unaffected.
    """
    if resume_from and (Path(resume_from) / "config.json").is_file():
        return resume_from
    return input_model


def lora_sft_trainer():
    """TRL's SFTTrainer with the HF Trainer's loss, for LoRA runs.

    Works around TRL 1.16's loss, computed through a fused LM head that reads the output layer's ``weight`` and
    ``bias`` directly (``trl.trainer.utils.add_fused_lm_head``) instead of calling the layer. PEFT's trainable-token
    wrapper on the output layer holds the trained rows of Dolly's tokens in its own parameter and applies them only
    when called, so the fused head fails (no ``bias``) or would ignore those rows. The HF Trainer's loss calls the
    model as usual: the same masked cross-entropy over the same labels (TRL's collator builds them), normalised by
    the same token count, at the cost of materialising the logits (which ``dolly-finetune plan`` counts anyway).
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class LoraSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {key: value for key, value in inputs.items() if key != "completion_mask"}
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return LoraSFTTrainer
