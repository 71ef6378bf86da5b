"""finetune.train's command line: Dolly's defaults, flag parsing, presets, refusals that happen before training."""

from __future__ import annotations

import json
import sys
import types

import pytest

from finetune.presets import CONFIGS_DIR, PRESETS
from finetune.train import FinetuneError, _build_parser, main, parse_args, train, training_config

REQUIRED = ["--local-output-dir", "out"]


def test_defaults_are_dollys():
    args = parse_args(REQUIRED)
    assert (args.epochs, args.per_device_train_batch_size, args.per_device_eval_batch_size) == (3, 8, 8)
    assert (args.lr, args.seed, args.warmup_steps, args.test_size) == (1e-5, 42, 0, 1000)
    assert (args.logging_steps, args.eval_steps, args.save_steps, args.save_total_limit) == (10, 50, 400, 10)
    assert args.gradient_checkpointing and args.group_by_length and not args.packing and args.bf16 is None and args.max_length is None
    assert args.training_dataset == "databricks/databricks-dolly-15k" and args.report_to == "tensorboard"


def test_every_flag_is_documented(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    flags = [
        "--input-model", "--local-output-dir", "--epochs", "--per-device-train-batch-size",
        "--per-device-eval-batch-size", "--lr", "--seed", "--deepspeed", "--gradient-checkpointing",
        "--no-gradient-checkpointing", "--bf16", "--logging-steps", "--eval-steps", "--save-steps",
        "--save-total-limit", "--warmup-steps", "--test-size", "--training-dataset", "--max-length", "--max-records",
        "--resume-from-checkpoint", "--report-to", "--packing", "--no-packing", "--export-dir",
        "--group-by-length", "--no-group-by-length",
        "--overwrite-output-dir", "--skip-bad-records", "--preset", "--local_rank", "--fp16",
    ]
    missing = [flag for flag in flags if flag not in text]
    assert not missing
    for action in _build_parser(PRESETS)._actions:
        assert action.help, action.dest


@pytest.mark.parametrize(("value", "expected"), [("200", 200), ("0", 0), ("0.05", 0.05)])
def test_test_size_is_a_count_or_a_ratio(value, expected):
    size = parse_args([*REQUIRED, "--test-size", value]).test_size
    assert size == expected and type(size) is type(expected)


@pytest.mark.parametrize("value", ["1.5", "-3", "many"])
def test_bad_test_size_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        parse_args([*REQUIRED, "--test-size", value])
    assert "--test-size" in capsys.readouterr().err


def test_deepspeed_config_by_name_or_path(tmp_path):
    resolved = parse_args([*REQUIRED, "--deepspeed", "cpu_config.json"]).deepspeed
    assert resolved.endswith("finetune/configs/cpu_config.json")
    assert parse_args([*REQUIRED, "--deepspeed", resolved]).deepspeed == resolved
    with pytest.raises(FinetuneError, match="--deepspeed nope.json"):
        parse_args([*REQUIRED, "--deepspeed", "nope.json"])


def test_preset_sets_defaults_and_flags_win():
    name = "dolly-v2-12b-a100"
    args = parse_args([*REQUIRED, "--preset", name, "--lr", "3e-6"])
    assert args.lr == 3e-6  # explicit flag wins
    assert args.input_model == PRESETS[name]["input_model"] and args.epochs == PRESETS[name]["epochs"]
    assert args.deepspeed.endswith(PRESETS[name]["deepspeed"])


def test_plan_subcommand_is_dispatched(monkeypatch):
    calls = []
    fake = types.ModuleType("finetune.plan")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "finetune.plan", fake)
    assert main(["plan", "--preset", "x"]) == 0
    assert calls == [["--preset", "x"]]


def test_resume_auto_and_path():
    assert parse_args([*REQUIRED, "--resume-from-checkpoint", "auto"]).resume_from_checkpoint == "auto"
    assert parse_args([*REQUIRED, "--resume-from-checkpoint", "a/checkpoint-4"]).resume_from_checkpoint == (
        "a/checkpoint-4"
    )


# --- Refusals, before anything is loaded -------------------------------------------------------------------------


def test_finished_model_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["--local-output-dir", str(tmp_path), "--input-model", "unused"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a finished model" in err and "--overwrite-output-dir" in err


def test_unfinished_run_asks_to_resume_or_overwrite(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    with pytest.raises(FinetuneError, match="--resume-from-checkpoint auto"):
        train(parse_args(["--local-output-dir", str(tmp_path)]))


def test_resume_path_must_be_a_checkpoint(tmp_path):
    with pytest.raises(FinetuneError, match="not a checkpoint directory"):
        train(parse_args(["--local-output-dir", str(tmp_path), "--resume-from-checkpoint", str(tmp_path)]))


def test_existing_export_dir_is_refused(tmp_path):
    (tmp_path / "export").mkdir()
    argv = ["--local-output-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "export")]
    with pytest.raises(FinetuneError, match="--export-dir"):
        train(parse_args(argv))


# --- The SFTConfig of Dolly's recipe -------------------------------------------------------------------------------


def test_no_group_by_length_is_dollys_batching(tmp_path):
    config = training_config(parse_args([*REQUIRED, "--no-group-by-length"]), max_length=256, has_eval=True)
    assert not config.packing and config.pad_to_multiple_of == 8 and config.completion_only_loss
    assert config.max_length == 256 and config.eval_strategy == "steps" and not config.bf16  # CPU: no bf16
    assert config.train_sampling_strategy == "random"


def test_default_groups_by_length_with_dollys_padding(tmp_path):
    config = training_config(parse_args(REQUIRED), max_length=256, has_eval=True)
    assert not config.packing and config.pad_to_multiple_of == 8
    assert config.train_sampling_strategy == "group_by_length"


def test_packing_is_padding_free_best_fit(tmp_path):
    config = training_config(parse_args([*REQUIRED, "--packing"]), max_length=256, has_eval=False)
    assert config.packing and config.packing_strategy == "bfd" and config.eval_strategy == "no"


def test_bf16_on_cpu_is_refused():
    with pytest.raises(FinetuneError, match="--no-bf16"):
        training_config(parse_args([*REQUIRED, "--bf16"]), max_length=256, has_eval=False)


def test_zero3_config_must_gather_weights_on_save(tmp_path):
    config = json.loads((CONFIGS_DIR / "cpu_config.json").read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    path = tmp_path / "z3.json"
    path.write_text(json.dumps(config))
    with pytest.raises(FinetuneError, match="stage3_gather_16bit_weights_on_model_save"):
        training_config(parse_args([*REQUIRED, "--deepspeed", str(path)]), max_length=256, has_eval=False)
