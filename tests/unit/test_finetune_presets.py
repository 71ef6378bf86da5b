"""finetune.presets: Dolly's published runs, usable as dolly-finetune defaults with the configs they name."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

import finetune.presets as presets_module
from finetune.presets import CONFIGS_DIR, DATASET_SIZES, HARDWARE, PRESETS, deepspeed_config_path, get_preset
from finetune.train import parse_args

V2 = {
    "dolly-v2-12b-a100": ("EleutherAI/pythia-12b", "a100_config.json", 6),
    "dolly-v2-7b-a100": ("EleutherAI/pythia-6.9b", "a100_config.json", 6),
    "dolly-v2-3b-a100": ("EleutherAI/pythia-2.8b", "a100_config.json", 6),
    "dolly-v2-7b-a10": ("EleutherAI/pythia-6.9b", "a10_config.json", 4),
    "dolly-v2-3b-a10": ("EleutherAI/pythia-2.8b", "a10_config.json", 4),
    "dolly-v2-7b-v100": ("EleutherAI/pythia-6.9b", "v100_config.json", 3),
    "dolly-v2-3b-v100": ("EleutherAI/pythia-2.8b", "v100_config.json", 3),
}


LORA = {  # one GPU, no DeepSpeed: (base model, 4-bit base, GPU the plan assumes)
    "dolly-v2-12b-lora-a100": ("EleutherAI/pythia-12b", False, "A100 40GB"),
    "dolly-v2-7b-lora-a100": ("EleutherAI/pythia-6.9b", False, "A100 40GB"),
    "dolly-v2-3b-lora-a100": ("EleutherAI/pythia-2.8b", False, "A100 40GB"),
    "dolly-v2-12b-qlora-a10": ("EleutherAI/pythia-12b", True, "A10 24GB"),
    "dolly-v2-7b-qlora-a10": ("EleutherAI/pythia-6.9b", True, "A10 24GB"),
    "dolly-v2-3b-qlora-a10": ("EleutherAI/pythia-2.8b", True, "A10 24GB"),
}
DEEPSPEED_PRESETS = sorted(name for name in PRESETS if name not in LORA)


def test_the_presets():
    assert sorted(PRESETS) == sorted([*V2, *LORA, "dolly-v1-6b-a100"])


@pytest.mark.parametrize("name", sorted(LORA))
def test_lora_presets_are_dollys_data_on_one_gpu(name):
    from finetune.presets import PRESET_GPU, SINGLE_GPU_HARDWARE

    model, four_bit, gpu = LORA[name]
    preset = PRESETS[name]
    assert preset["input_model"] == model and preset["lora"] is True and preset.get("load_in_4bit", False) is four_bit
    assert "deepspeed" not in preset and PRESET_GPU[name] == gpu and gpu in SINGLE_GPU_HARDWARE
    assert (preset["epochs"], preset["test_size"], preset["lr"]) == (2, 200, 2e-4) and preset["bf16"] is True


@pytest.mark.parametrize("name", sorted(V2))
def test_dolly_v2_presets_are_dollys_published_run(name):
    model, config, batch = V2[name]
    preset = PRESETS[name]
    assert (preset["input_model"], preset["deepspeed"]) == (model, config)
    assert preset["per_device_train_batch_size"] == preset["per_device_eval_batch_size"] == batch
    assert (preset["epochs"], preset["lr"], preset["warmup_steps"]) == (2, 5e-6, 50)
    assert (preset["test_size"], preset["eval_steps"], preset["save_steps"]) == (200, 50, 200)
    assert preset["training_dataset"] == "databricks/databricks-dolly-15k" and preset["packing"] is False


def test_dolly_v1_preset_is_gpt_j_on_alpaca():
    preset = PRESETS["dolly-v1-6b-a100"]
    assert (preset["input_model"], preset["training_dataset"]) == ("EleutherAI/gpt-j-6B", "tatsu-lab/alpaca")
    assert (preset["epochs"], preset["lr"], preset["per_device_train_batch_size"]) == (1, 1e-5, 8)
    assert (preset["max_length"], preset["test_size"]) == (1024, 1000)
    assert preset["training_dataset"] in DATASET_SIZES


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses_as_dolly_finetune_defaults(name):
    args = parse_args(["--preset", name, "--local-output-dir", "out"])
    for key, value in PRESETS[name].items():
        expected = str(CONFIGS_DIR / value) if key == "deepspeed" else value
        assert getattr(args, key) == expected, key


@pytest.mark.parametrize("name", DEEPSPEED_PRESETS)
def test_preset_precision_agrees_with_its_deepspeed_config(name):
    """The HF Trainer refuses a config whose bf16/fp16 disagrees with the run's flags; a preset must not."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    preset = PRESETS[name]
    args = TrainingArguments(
        output_dir="unused", report_to=[], learning_rate=preset["lr"], warmup_steps=preset["warmup_steps"],
        per_device_train_batch_size=preset["per_device_train_batch_size"],
    )
    args.bf16, args.fp16 = preset["bf16"], preset.get("fp16", False)  # set after construction: refused on CPU
    hf = HfTrainerDeepSpeedConfig(str(deepspeed_config_path(preset["deepspeed"])))
    hf.trainer_config_process(args)
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=4096))
    hf.trainer_config_finalize(args, model, num_training_steps=100)  # raises ValueError listing mismatches


@pytest.mark.parametrize("name", DEEPSPEED_PRESETS)
def test_preset_hardware_is_known(name):
    assert PRESETS[name]["deepspeed"] in HARDWARE


def test_every_preset_value_says_why():
    """Each "key": value line of the presets carries a comment."""
    source = Path(presets_module.__file__).read_text(encoding="utf-8")
    body = source[source.index("_DOLLY_V2 = {"):source.index("def get_preset")]
    value_lines = [line for line in body.splitlines() if re.match(r'\s+"\w+": [^{]', line)]
    assert value_lines and all("#" in line for line in value_lines), [l for l in value_lines if "#" not in l]


def test_get_preset_copies_and_names_the_known_ones():
    preset = get_preset("dolly-v2-7b-a10")
    preset["lr"] = 1.0
    assert PRESETS["dolly-v2-7b-a10"]["lr"] == 5e-6
    with pytest.raises(KeyError, match="dolly-v2-12b-a100"):
        get_preset("dolly-v3")


def test_deepspeed_config_by_name_path_or_a_helpful_error(tmp_path):
    assert deepspeed_config_path("a100_config.json") == (CONFIGS_DIR / "a100_config.json").resolve()
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert deepspeed_config_path(own) == own.resolve()
    with pytest.raises(FileNotFoundError, match=r"--deepspeed nope\.json.*a10_config\.json.*cpu_config\.json"):
        deepspeed_config_path("nope.json")
