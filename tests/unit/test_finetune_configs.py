"""The shipped DeepSpeed configs: each is accepted by the HF Trainer's DeepSpeed integration and DeepSpeed's parser,
and each says how to launch it and what hardware it assumes."""

from __future__ import annotations

import json
import types

import pytest

from finetune.presets import CONFIGS_DIR, HARDWARE

CONFIGS = sorted(p.name for p in CONFIGS_DIR.glob("*.json"))


def load(name: str) -> dict:
    # The HF Trainer reads the file with json.load, so it must be strict JSON (DeepSpeed alone would take hjson).
    return json.loads((CONFIGS_DIR / name).read_text(encoding="utf-8"))


def trainer_args(bf16: bool, fp16: bool):
    """Real TrainingArguments, with the precision flags set after construction (they are refused on CPU)."""
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir="unused", report_to=[], per_device_train_batch_size=6, learning_rate=5e-6, warmup_steps=50
    )
    args.bf16, args.fp16 = bf16, fp16
    return args


def test_the_four_configs_ship():
    assert CONFIGS == ["a100_config.json", "a10_config.json", "cpu_config.json", "v100_config.json"]
    assert sorted(HARDWARE) == CONFIGS  # plan knows the hardware of every shipped config


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_trainer_and_deepspeed_accept_the_config(name):
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config = load(name)
    precision = {"bf16": config.get("bf16", {}).get("enabled") is True,
                 "fp16": config.get("fp16", {}).get("enabled") is True}
    args = trainer_args(**precision)
    hf = HfTrainerDeepSpeedConfig(str(CONFIGS_DIR / name))
    hf.trainer_config_process(args)
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=5120))
    hf.trainer_config_finalize(args, model, num_training_steps=618)  # raises on a mismatch with the args
    filled = {key: value for key, value in hf.config.items() if key != "_comment"}
    assert '"auto"' not in json.dumps(filled)  # every "auto" was filled in

    parsed = DeepSpeedConfig(hf.config)  # DeepSpeed's own parser (pydantic, extra keys refused inside sections)
    assert parsed.zero_optimization_stage == 3
    assert parsed.train_micro_batch_size_per_gpu == 6 and parsed.train_batch_size == 6
    assert parsed.zero_config.gather_16bit_weights_on_model_save  # the final model is saved as one checkpoint


@pytest.mark.parametrize("name", CONFIGS)
def test_the_config_says_how_to_launch_it_and_on_what(name):
    comment = " ".join(load(name)["_comment"])
    assert "Hardware:" in comment and "Launch: deepspeed --num_gpus" in comment
    assert "finetune.train" in comment
    readme = (CONFIGS_DIR / "README.md").read_text(encoding="utf-8")
    assert f"`{name}`" in readme


def test_a_misspelled_key_inside_a_section_is_refused():
    """Why "_comment" sits at the top level: DeepSpeed ignores unknown top-level keys but refuses them in sections."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "_comment": "no"}}
    with pytest.raises(ValueError, match="_comment"):
        DeepSpeedConfig(config)


def test_gpu_configs_follow_dolly():
    a100, a10, v100 = load("a100_config.json"), load("a10_config.json"), load("v100_config.json")
    assert a100["bf16"]["enabled"] is True and "offload_optimizer" not in a100["zero_optimization"]
    for offloading in (a10, v100):
        assert offloading["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert a10["bf16"]["enabled"] is True
    assert v100["fp16"]["enabled"] is True and v100["bf16"]["enabled"] is False  # V100 has no bfloat16
    for config in (a100, a10, v100):
        assert config["optimizer"]["type"] == "AdamW" and config["scheduler"]["type"] == "WarmupLR"


def test_cpu_config_needs_no_compiled_ops_and_trains_fp32():
    config = load("cpu_config.json")
    assert "optimizer" not in config  # the HF Trainer creates torch AdamW (no DeepSpeedCPUAdam to compile)
    assert config["zero_allow_untested_optimizer"] is True  # ZeRO refuses a non-DeepSpeed optimizer otherwise
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert "offload_optimizer" not in config["zero_optimization"]
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
