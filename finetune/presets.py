"""Named presets: Dolly's published training runs as ``dolly-finetune`` defaults, one per model and GPU family.

Launch commands (``plan`` first: it prints memory per GPU and on the host, and the steps per epoch)::

    dolly-finetune plan --preset dolly-v2-12b-a100 --num-gpus 8
    deepspeed --num_gpus 8 --module finetune.train --preset dolly-v2-12b-a100 --local-output-dir runs/dolly-v2-12b

    dolly-finetune plan --preset dolly-v2-7b-a10 --num-gpus 4
    deepspeed --num_gpus 4 --module finetune.train --preset dolly-v2-7b-a10 --local-output-dir runs/dolly-v2-7b

    # LoRA / QLoRA on one GPU (no DeepSpeed)
    dolly-finetune plan --preset dolly-v2-12b-qlora-a10 --num-gpus 1
    dolly-finetune --preset dolly-v2-12b-qlora-a10 --local-output-dir runs/dolly-v2-12b-qlora

A preset sets argparse defaults of ``dolly-finetune`` (keys are the parser's ``dest`` names); flags given on the
command line win. Presets override only what differs from the shared recipe, and every value says why.

Where the numbers come from: Dolly v2 (databricks/dolly ``train_dolly.py``) fine-tuned Pythia 2.8b / 6.9b / 12b on
databricks-dolly-15k for 2 epochs at lr 5e-6, warmup 50, 200 held-out records, eval every 50 and save every 200
steps, with per-device batch 6 on A100, 4 on A10 and 3 on V100 and the matching ``<gpu>_config.json``. Dolly v1
(the first ``training/trainer.py``) fine-tuned GPT-J 6B on Stanford Alpaca for 1 epoch at lr 1e-5, batch 8,
1000 held-out records and 1024-token records, on 8x A100 40GB in about 30 minutes.

NOTE: every preset sets ``packing: False``: Dolly's recipe trains one record per row (the CLI default groups
those rows by length, which keeps the records per step). With ``--packing`` a row is ``--max-length`` tokens of packed records, so the same per-device batch
carries about 8x the tokens and an epoch has about 8x fewer steps: warmup, eval and save steps and the learning
rate would all need re-tuning, and activation memory is that of full-length rows on every step.
"""

from __future__ import annotations

from pathlib import Path

from dolly_langchain.errors import DollyLookupError, MissingFileError

CONFIGS_DIR = Path(__file__).parent / "configs"

#: What each shipped DeepSpeed config assumes (read by ``dolly-finetune plan``). ``gpu_memory_gb`` is the
#: nominal memory of one GPU in GiB; ``gpus_per_node`` the usual node of that family; ``instances`` examples;
#: ``host`` / ``host_memory_gb`` the first example's RAM (what offloaded optimizer states must fit in).
HARDWARE: dict[str, dict] = {
    "a100_config.json": {
        "gpu": "A100 40GB",
        "gpu_memory_gb": 40,
        "gpus_per_node": 8,
        "instances": "p4d.24xlarge, Standard_ND96asr_v4 (8x A100 40GB)",
        "host": "p4d.24xlarge",
        "host_memory_gb": 1152,
    },
    "a10_config.json": {
        "gpu": "A10 24GB",
        "gpu_memory_gb": 24,
        "gpus_per_node": 4,
        "instances": "g5.24xlarge (4x A10), Standard_NV72ads_A10_v5 (2x A10)",
        "host": "g5.24xlarge",
        "host_memory_gb": 384,
    },
    "v100_config.json": {
        "gpu": "V100 32GB",
        "gpu_memory_gb": 32,
        "gpus_per_node": 8,
        "instances": "p3dn.24xlarge, Standard_ND40rs_v2 (8x V100 32GB)",
        "host": "p3dn.24xlarge",
        "host_memory_gb": 768,
    },
    "cpu_config.json": {
        "gpu": None,  # no GPU: plan counts each process's memory in host RAM
        "gpu_memory_gb": None,
        "gpus_per_node": 2,
        "instances": "any machine; for tests and CI",
        "host": None,
        "host_memory_gb": None,
    },
}

#: The one GPU (and its usual cloud instance) each LoRA/QLoRA preset assumes; ``dolly-finetune plan`` reads it for
#: runs without a DeepSpeed config. ``host_memory_gb`` matters at the end: the adapter is merged into a 16-bit copy
#: of the base loaded in host RAM (24 GB for pythia-12b).
SINGLE_GPU_HARDWARE: dict[str, dict] = {
    "A10 24GB": {
        "gpu": "A10 24GB",
        "gpu_memory_gb": 24,
        "gpus_per_node": 1,
        "instances": "g5.2xlarge (1x A10, 32 GiB RAM), Standard_NV36ads_A10_v5",
        "host": "g5.2xlarge",
        "host_memory_gb": 32,
    },
    "A100 40GB": {
        "gpu": "A100 40GB",
        "gpu_memory_gb": 40,
        "gpus_per_node": 1,
        "instances": "a2-highgpu-1g (1x A100 40GB, 85 GB RAM), Standard_NC24ads_A100_v4 (80GB)",
        "host": "a2-highgpu-1g",
        "host_memory_gb": 79,
    },
}

#: Records in each known training set, for steps-per-epoch arithmetic without reading the data.
DATASET_SIZES: dict[str, int] = {
    "databricks/databricks-dolly-15k": 15011,
    "tatsu-lab/alpaca": 52002,
}

# Shared by all Dolly v2 presets (databricks/dolly train_dolly.py).
_DOLLY_V2 = {
    "training_dataset": "databricks/databricks-dolly-15k",  # the 15k human-written records Dolly v2 was tuned on
    "test_size": 200,  # Dolly v2 held out 200 records: enough for a stable eval loss, keeps 98.7% for training
    "epochs": 2,  # Dolly v2 trained 2 epochs
    "lr": 5e-6,  # Dolly v2's peak lr (v1 used 1e-5 on GPT-J)
    "warmup_steps": 50,  # about 1/6 of an epoch at 8 GPUs x batch 6 (309 steps per epoch)
    "logging_steps": 10,  # Dolly's logging interval
    "eval_steps": 50,  # Dolly v2 evaluated every 50 steps: ~6 eval points per epoch
    "save_steps": 200,  # Dolly v2 saved every 200 steps
    "save_total_limit": 20,  # Dolly v2 kept up to 20 checkpoints
    "packing": False,  # Dolly's recipe: one record per row, random order (see the NOTE in the module docstring)
}

# Per GPU family: the DeepSpeed config, per-device batch and precision Dolly v2 used on it.
_A100 = {
    "deepspeed": "a100_config.json",  # ZeRO-3, bf16, all on GPU
    "per_device_train_batch_size": 6,  # Dolly v2 on A100 40GB: 6 records per GPU (fits pythia-12b with ZeRO-3)
    "per_device_eval_batch_size": 6,  # same as training: eval needs less memory than a training step
    "bf16": True,  # A100 has bfloat16; the config enables it and the HF Trainer checks that they agree
}
_A10 = {
    "deepspeed": "a10_config.json",  # ZeRO-3, bf16, Adam states offloaded to host memory
    "per_device_train_batch_size": 4,  # Dolly v2 on A10 24GB: 4 records per GPU
    "per_device_eval_batch_size": 4,  # same as training
    "bf16": True,  # A10 (Ampere) has bfloat16
}
_V100 = {
    "deepspeed": "v100_config.json",  # ZeRO-3, fp16, Adam states offloaded to host memory
    "per_device_train_batch_size": 3,  # Dolly v2 on V100 32GB: 3 records per GPU
    "per_device_eval_batch_size": 3,  # same as training
    "bf16": False,  # V100 has no bfloat16
    "fp16": True,  # v100_config.json trains in fp16 with dynamic loss scaling, as Dolly's V100 run did
}

# LoRA / QLoRA on one GPU (finetune.train --lora): same data, epochs, eval and save cadence as Dolly v2.
_LORA = {
    "lora": True,  # adapters on every attention and MLP projection, plus the rows of Dolly's new tokens
    "lr": 2e-4,  # the QLoRA paper's lr for 7B-13B models; adapters need ~40x Dolly's full fine-tuning lr
    "warmup_steps": 100,  # ~3% of an epoch at batch 4 on one GPU (3703 steps): LoRA's usual warmup ratio
    "eval_steps": 200,  # one GPU takes 8x the steps of Dolly's 8-GPU run: evaluate about as often per record
    "save_steps": 400,  # likewise; an adapter checkpoint is small (~0.2 GB with Adam states for pythia-12b)
    "save_total_limit": 5,  # checkpoints for resuming, not for picking: the last few are enough
    "bf16": True,  # A10 and A100 have bfloat16 (QLoRA's compute dtype)
}
_ONE_A10 = {
    "per_device_train_batch_size": 4,  # dolly-finetune plan: fits 24 GB with 4-bit bases up to pythia-12b
    "per_device_eval_batch_size": 4,  # same as training
}
_ONE_A100 = {
    "per_device_train_batch_size": 4,  # dolly-finetune plan: pythia-12b's 16-bit base (22 GiB) + batch 4 fit 40 GB
    "per_device_eval_batch_size": 4,  # same as training
}
_QLORA = {"load_in_4bit": True}  # QLoRA: NF4 base (bitsandbytes, CUDA only), bf16 compute

_PYTHIA_2_8B = {"input_model": "EleutherAI/pythia-2.8b"}  # base of dolly-v2-3b
_PYTHIA_6_9B = {"input_model": "EleutherAI/pythia-6.9b"}  # base of dolly-v2-7b
_PYTHIA_12B = {"input_model": "EleutherAI/pythia-12b"}  # base of dolly-v2-12b

#: Preset name -> ``dolly-finetune`` argparse defaults. dolly-v2-12b is offered on A100 only: Dolly did not
#: recommend training it on A10 or V100 (``dolly-finetune plan`` shows why).
PRESETS: dict[str, dict] = {
    "dolly-v2-12b-a100": {**_DOLLY_V2, **_PYTHIA_12B, **_A100},
    "dolly-v2-7b-a100": {**_DOLLY_V2, **_PYTHIA_6_9B, **_A100},
    "dolly-v2-3b-a100": {**_DOLLY_V2, **_PYTHIA_2_8B, **_A100},
    "dolly-v2-7b-a10": {**_DOLLY_V2, **_PYTHIA_6_9B, **_A10},
    "dolly-v2-3b-a10": {**_DOLLY_V2, **_PYTHIA_2_8B, **_A10},
    "dolly-v2-7b-v100": {**_DOLLY_V2, **_PYTHIA_6_9B, **_V100},
    "dolly-v2-3b-v100": {**_DOLLY_V2, **_PYTHIA_2_8B, **_V100},
    # LoRA (16-bit base) on one A100 40GB, QLoRA (4-bit base) on one A10 24GB: what `plan` says fits.
    "dolly-v2-12b-lora-a100": {**_DOLLY_V2, **_PYTHIA_12B, **_LORA, **_ONE_A100},
    "dolly-v2-7b-lora-a100": {**_DOLLY_V2, **_PYTHIA_6_9B, **_LORA, **_ONE_A100},
    "dolly-v2-3b-lora-a100": {**_DOLLY_V2, **_PYTHIA_2_8B, **_LORA, **_ONE_A100},
    "dolly-v2-12b-qlora-a10": {**_DOLLY_V2, **_PYTHIA_12B, **_LORA, **_QLORA, **_ONE_A10},
    "dolly-v2-7b-qlora-a10": {**_DOLLY_V2, **_PYTHIA_6_9B, **_LORA, **_QLORA, **_ONE_A10},
    "dolly-v2-3b-qlora-a10": {**_DOLLY_V2, **_PYTHIA_2_8B, **_LORA, **_QLORA, **_ONE_A10},
    # Dolly v1 (first training/trainer.py and train_dolly.py): GPT-J 6B on Stanford Alpaca.
    # Alpaca is CC BY-NC 4.0: models tuned on it are for research, not commercial use.
    "dolly-v1-6b-a100": {
        "input_model": "EleutherAI/gpt-j-6B",  # Dolly v1's base model
        "training_dataset": "tatsu-lab/alpaca",  # 52k instruction/input/output records (finetune.data maps them)
        "test_size": 1000,  # Dolly v1's trainer held out 1000 records
        "max_length": 1024,  # Dolly v1 tokenized to 1024 tokens (MAX_LENGTH), not GPT-J's 2048
        "epochs": 1,  # Dolly v1 trained 1 epoch ("30 minutes on one machine")
        "lr": 1e-5,  # Dolly v1's learning rate
        "warmup_steps": 0,  # Dolly v1 had no warmup
        "logging_steps": 10,  # Dolly v1's logging interval
        "eval_steps": 100,  # Dolly v1 evaluated every 100 steps
        "save_steps": 200,  # Dolly v1 saved every 200 steps
        "save_total_limit": 1,  # Dolly v1 kept one checkpoint (plus the best, which it reloaded at the end)
        "packing": False,  # Dolly's recipe: one record per row
        "deepspeed": "a100_config.json",  # Dolly v1's ds_z3_bf16_config.json: ZeRO-3 bf16, as the A100 config
        "per_device_train_batch_size": 8,  # Dolly v1 on 8x A100 40GB: 8 records per GPU
        "per_device_eval_batch_size": 8,  # same as training
        "bf16": True,  # A100 has bfloat16
    },
}


#: The single GPU of each preset that has no DeepSpeed config (a key of SINGLE_GPU_HARDWARE).
PRESET_GPU: dict[str, str] = {
    name: "A10 24GB" if name.endswith("-a10") else "A100 40GB" for name, preset in PRESETS.items()
    if "deepspeed" not in preset
}


def get_preset(name: str) -> dict:
    """Return a copy of preset ``name``; an unknown name raises a ``KeyError`` (a
    :class:`~dolly_langchain.errors.DollyLookupError`) listing the known ones."""
    if name not in PRESETS:
        raise DollyLookupError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])


def deepspeed_config_path(name_or_path: str | Path) -> Path:
    """A DeepSpeed config by path, or by file name in ``finetune/configs/`` (``"a100_config.json"``)."""
    for candidate in (Path(name_or_path).expanduser(), CONFIGS_DIR / str(name_or_path)):
        if candidate.is_file():
            return candidate.resolve()
    shipped = ", ".join(sorted(p.name for p in CONFIGS_DIR.glob("*.json")))
    raise MissingFileError(
        f"--deepspeed {name_or_path}: no such file. Pass a path to a DeepSpeed JSON config, or one of the "
        f"configs shipped in finetune/configs/: {shipped}."
    )
