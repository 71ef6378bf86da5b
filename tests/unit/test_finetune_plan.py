"""dolly-finetune plan: parameter counts, DeepSpeed memory estimates and steps per epoch from model configs alone."""

from __future__ import annotations

import json

import pytest

from finetune.plan import (
    KNOWN_CONFIGS,
    activation_memory,
    count_parameters,
    load_model_config,
    main,
    model_states_memory,
)
from finetune.train import main as finetune_main

# Total parameters: Pythia's as published (Pythia paper, table 1); GPT-J's as transformers builds its config.
PUBLISHED = {
    "EleutherAI/pythia-2.8b": 2_775_208_960,
    "EleutherAI/pythia-6.9b": 6_857_302_016,
    "EleutherAI/pythia-12b": 11_846_072_320,
    "EleutherAI/gpt-j-6B": 6_050_882_784,
}


def run_plan(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model_id", sorted(KNOWN_CONFIGS))
def test_parameter_counts_of_the_shipped_configs(model_id):
    config, source = load_model_config(model_id)
    total, largest = count_parameters(config)
    assert total == PUBLISHED[model_id]
    # The largest layer is the embedding or output matrix (GPT-J's output layer also has a bias per token).
    assert largest in (config.vocab_size * config.hidden_size, config.vocab_size * (config.hidden_size + 1))
    assert source == "shipped with finetune.plan"


def test_parameter_count_of_a_local_model_matches_deepspeeds_count(tiny_neox_dir, tmp_path):
    """Built on the meta device from config.json alone, the count equals DeepSpeed's on the real model."""
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    expected = model_to_params(AutoModelForCausalLM.from_pretrained(tiny_neox_dir))
    assert count_parameters(load_model_config(str(tiny_neox_dir))[0]) == expected
    assert count_parameters(load_model_config(str(tiny_neox_dir / "config.json"))[0]) == expected


def test_tied_embeddings_count_once(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    tied, _ = count_parameters(config)
    config.tie_word_embeddings = False
    untied, _ = count_parameters(config)
    assert untied - tied == 1000 * 64


def test_model_states_are_deepspeeds_zero3_formula():
    """No offload: 18 bytes per parameter split over all GPUs, plus 4 bytes per parameter of the largest layer."""
    params, largest = PUBLISHED["EleutherAI/pythia-12b"], 50688 * 5120
    gpu, host, zero = model_states_memory(params, largest, {"zero_optimization": {"stage": 3}}, 8, 1)
    assert gpu == 4 * largest + int(18 * params / 8) and zero == "ZeRO-3, offload: none"
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    gpu_off, host_off, zero_off = model_states_memory(params, largest, offload, 4, 1)
    assert gpu_off == 4 * largest + int(2 * params / 4)  # only the 16-bit parameter shard stays on the GPU
    assert host_off == int(params * 16 * 1.5)  # fp32 weights + Adam states on the host, DeepSpeed's 1.5x buffer
    assert zero_off == "ZeRO-3, offload: optimizer"
    two_nodes, _, _ = model_states_memory(params, largest, {"zero_optimization": {"stage": 3}}, 8, 2)
    assert two_nodes == 4 * largest + int(18 * params / 16)


def test_zero_2_uses_deepspeeds_zero2_estimator():
    gpu, _, zero = model_states_memory(1_000_000, 1000, {"zero_optimization": {"stage": 2}}, 4, 1)
    assert gpu == 2 * 1_000_000 + int(18 * 1_000_000 / 4) and zero.startswith("ZeRO-2")


def test_activations_grow_with_batch_and_length_and_checkpointing_saves_memory():
    config, _ = load_model_config("EleutherAI/pythia-6.9b")
    one = activation_memory(config, 1, 1024, 2, gradient_checkpointing=True)
    assert activation_memory(config, 4, 1024, 2, True) == 4 * one
    assert activation_memory(config, 1, 2048, 2, True) == 2 * one
    assert activation_memory(config, 1, 1024, 2, gradient_checkpointing=False) > 5 * one
    # Logits alone: 1024 tokens x 50432 vocab x (2 bf16 + 8 fp32 loss copies) bytes.
    assert one > 1024 * 50432 * 10


def test_pythia_12b_fits_8_a100_40gb_as_dolly_trained_it(capsys):
    plan = run_plan(capsys, "--preset", "dolly-v2-12b-a100", "--num-gpus", "8")
    memory = plan["memory_per_gpu_gb"]
    assert plan["model"]["parameters"] == PUBLISHED["EleutherAI/pythia-12b"]
    assert plan["hardware"]["gpu_memory_gb"] == 40 and plan["hardware"]["zero"] == "ZeRO-3, offload: none"
    assert 24 < memory["model_states"] < 27  # 18 bytes x 11.85B / 8 GPUs + the embedding
    assert memory["fits"] is True and memory["total"] <= 40
    assert memory["total"] == pytest.approx(memory["model_states"] + memory["activations"] + 1.0)
    assert memory["max_per_device_batch"] >= 4
    steps = plan["steps"]
    assert (steps["dataset_records"], steps["training_records"], steps["global_batch"]) == (15011, 14811, 48)
    assert (steps["steps_per_epoch"], steps["total_steps"]) == (309, 618)  # ceil(ceil(14811 / 6) / 8), 2 epochs


def test_pythia_6_9b_fits_4_a10_with_optimizer_offload(capsys):
    plan = run_plan(capsys, "--preset", "dolly-v2-7b-a10", "--num-gpus", "4")
    memory, host = plan["memory_per_gpu_gb"], plan["memory_per_node_host_gb"]
    assert plan["hardware"]["zero"] == "ZeRO-3, offload: optimizer"
    assert memory["fits"] is True and memory["total"] < 0.9 * 24
    assert host["fits"] is True and 140 < host["total"] < 384  # ~16 bytes x 6.86B x 1.5 on a 384 GiB g5.24xlarge
    assert plan["steps"]["steps_per_epoch"] == 926  # ceil(ceil(14811 / 4) / 4)


def test_pythia_12b_without_offload_does_not_fit_a10s(capsys):
    plan = run_plan(capsys, "--input-model", "EleutherAI/pythia-12b", "--deepspeed", "a100_config.json",
                    "--num-gpus", "4", "--gpu-memory-gb", "24", "--per-device-train-batch-size", "4")
    assert plan["memory_per_gpu_gb"]["fits"] is False
    assert plan["memory_per_gpu_gb"]["max_per_device_batch"] == 0


def test_more_nodes_shard_further_and_halve_the_steps(capsys):
    one = run_plan(capsys, "--preset", "dolly-v2-12b-a100", "--num-gpus", "8")
    two = run_plan(capsys, "--preset", "dolly-v2-12b-a100", "--num-gpus", "8", "--num-nodes", "2")
    assert two["memory_per_gpu_gb"]["model_states"] < 0.55 * one["memory_per_gpu_gb"]["model_states"]
    assert two["steps"]["steps_per_epoch"] == 155


def test_dolly_v1_on_alpaca(capsys):
    plan = run_plan(capsys, "--preset", "dolly-v1-6b-a100", "--num-gpus", "8")
    assert plan["steps"]["training_records"] == 52002 - 1000
    assert plan["steps"]["steps_per_epoch"] == 797  # ceil(ceil(51002 / 8) / 8)
    assert "1024 tokens" in plan["memory_per_gpu_gb"]["activations_assume"]


def test_packing_counts_packed_rows(capsys):
    plan = run_plan(capsys, "--preset", "dolly-v2-12b-a100", "--num-gpus", "8", "--packing")
    steps = plan["steps"]
    assert steps["packed_rows"] == -(-14811 * 200 // 2048) and steps["steps_per_epoch"] == 31
    unknown = run_plan(capsys, "--preset", "dolly-v2-12b-a100", "--num-gpus", "8", "--packing",
                       "--training-dataset", "org/other", "--dataset-size", "1000")
    assert unknown["steps"]["steps_per_epoch"] is None and "--mean-record-tokens" in unknown["steps"]["note"]


def test_local_data_file_is_counted(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "response": "a"}) + "\n" for i in range(50)))
    plan = run_plan(capsys, "--preset", "dolly-v2-3b-a100", "--num-gpus", "2", "--training-dataset", str(data),
                    "--test-size", "10")
    assert (plan["steps"]["training_records"], plan["steps"]["steps_per_epoch"]) == (40, 4)  # ceil(ceil(40/6)/2)


def test_cpu_config_counts_the_processes_in_host_ram(capsys, tiny_neox_dir):
    plan = run_plan(capsys, "--input-model", str(tiny_neox_dir), "--deepspeed", "cpu_config.json", "--num-gpus",
                    "2", "--dataset-size", "100", "--test-size", "0", "--no-packing")
    memory, host = plan["memory_per_gpu_gb"], plan["memory_per_node_host_gb"]
    assert plan["hardware"]["on_cpu"] and memory["fits"] is None and memory["cuda_overhead"] == 0
    assert "32-bit" in memory["activations_assume"]  # cpu_config.json trains in fp32
    assert host["total"] >= 2 * memory["total"]


def test_table_output_names_the_verdict_and_steps(capsys):
    assert main(["--preset", "dolly-v2-12b-a100", "--num-gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "EleutherAI/pythia-12b on 1 node(s) x 8 A100 40GB" in out
    assert "of 40 GiB: FITS" in out or "of 40 GiB: TIGHT" in out
    assert "309 steps per epoch, 618 in 2 epoch(s)" in out


def test_dolly_finetune_plan_dispatches_here(capsys):
    assert finetune_main(["plan", "--preset", "dolly-v2-7b-a10", "--num-gpus", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_per_gpu_gb"]["fits"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-gpus", "1"], "pass --deepspeed CFG"),
        (["--num-gpus", "0", "--preset", "dolly-v2-7b-a10"], "--num-gpus 0"),
        (["--num-gpus", "1", "--deepspeed", "nope.json"], "--deepspeed nope.json: no such file"),
        (["--num-gpus", "1", "--deepspeed", "a10_config.json", "--input-model", "./no/such/dir"],
         "--input-model ./no/such/dir: no such directory"),
        (["--num-gpus", "1", "--deepspeed", "a10_config.json", "--training-dataset", "org/unknown"],
         "pass --dataset-size"),
        (["--num-gpus", "1", "--preset", "dolly-v2-3b-a100", "--dataset-size", "100", "--test-size", "100"],
         "--test-size 100 leaves no training records of 100; pass a smaller --test-size"),
    ],
)
def test_errors_name_the_flag_and_the_fix(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_zero_stage_0_is_refused(tmp_path, capsys):
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto"}))
    assert main(["--num-gpus", "1", "--deepspeed", str(config), "--dataset-size", "100"]) == 2
    assert "ZeRO stage 0" in capsys.readouterr().err


def test_unknown_gpu_memory_asks_for_the_flag(tmp_path, capsys, tiny_neox_dir):
    config = tmp_path / "mine.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    plan = run_plan(capsys, "--num-gpus", "1", "--deepspeed", str(config), "--dataset-size", "100",
                    "--test-size", "0", "--input-model", str(tiny_neox_dir))
    assert plan["memory_per_gpu_gb"]["fits"] is None and "--gpu-memory-gb" in plan["memory_per_gpu_gb"]["verdict"]
    with_flag = run_plan(capsys, "--num-gpus", "1", "--deepspeed", str(config), "--dataset-size", "100",
                         "--test-size", "0", "--input-model", str(tiny_neox_dir), "--gpu-memory-gb", "80")
    assert with_flag["memory_per_gpu_gb"]["fits"] is True and with_flag["hardware"]["gpu"] == "80 GiB GPU"
