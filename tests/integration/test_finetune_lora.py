"""dolly-finetune --lora end to end on CPU: a tiny GPT-NeoX whose tokenizer lacks Dolly's tokens (as Pythia's does).

What is checked: the loss falls; training changes only the adapters and the rows of Dolly's new tokens; the final
directory holds the adapter and the merged model, and the run directory itself loads everywhere a model directory
does (plain transformers, pipeline, Dolly's loader, DollyLLM) once finished and nowhere while unfinished; a
SIGKILLed run resumes to the same losses; the same under the 2-rank ZeRO-3 CPU launcher; an MLflow run in a real
local sqlite store records the params, metrics and the final model's path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dolly_langchain.prompts import DOLLY_SPECIAL_TOKENS
from finetune.train import build_trainer, parse_args, save_final_model
from finetune_helpers import (
    cli_args, log_history, losses, run_finetune_process, run_training, synthetic_records, write_jsonl,
)

LORA = ["--lora", "--lora-r", "8", "--lr", "5e-3"]


def load_model_tokenizer_for_generate(path):
    """Dolly's own loader (databricks/dolly training/generate.py), as users of Dolly call it on a run directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path)
    return model, tokenizer


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_neox_dir):
    """A LoRA run through build_trainer + save_final_model (what train() runs), with every parameter snapshotted
    before and after training."""
    tmp = tmp_path_factory.mktemp("lora")
    data = write_jsonl(tmp / "dolly.jsonl", synthetic_records(48, seed=3))
    args = parse_args(cli_args(base_neox_dir, data, tmp / "run", *LORA, "--epochs", "2",
                               "--per-device-train-batch-size", "4", "--save-steps", "100"))
    trainer = build_trainer(args)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    final = save_final_model(trainer, tmp / "run")
    return tmp / "run", final, before, after, trainer.processing_class


def test_loss_falls(lora_run):
    values = list(losses(log_history(lora_run[1])).values())
    assert len(values) == 24
    assert sum(values[-4:]) / 4 < sum(values[:4]) / 4 - 0.3


def test_only_adapters_and_new_token_rows_change(lora_run):
    _, _, before, after, _ = lora_run
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "training changed nothing"
    assert all("lora_" in name or "trainable_tokens_delta" in name for name in changed), sorted(changed)
    assert any(name.endswith("lora_B.default.weight") for name in changed)  # B starts at zero, so it learned
    deltas = [name for name in changed if "trainable_tokens_delta" in name]
    assert len(deltas) == 2  # input and output rows (GPT-NeoX does not tie them)


def test_final_dir_holds_merged_model_and_adapter(lora_run, base_neox_dir):
    from transformers import AutoTokenizer

    run, final, *_ = lora_run
    assert final == run / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json",
                 "dolly_prompt_format.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer.json", "adapter/dolly_prompt_format.json"):
        assert (final / name).is_file(), name
    assert not (final / "adapter_config.json").exists()  # transformers would load the directory as an adapter
    tokenizer = AutoTokenizer.from_pretrained(run)
    new_ids = tokenizer.convert_tokens_to_ids(list(DOLLY_SPECIAL_TOKENS))
    base, merged = load_file(base_neox_dir / "model.safetensors"), load_file(final / "model.safetensors")
    n_base = base["gpt_neox.embed_in.weight"].shape[0]
    assert merged["gpt_neox.embed_in.weight"].shape[0] == len(tokenizer) == n_base + 3
    assert min(new_ids) >= n_base
    # Base weights that LoRA does not target are unchanged, and so are the rows of the old tokens.
    for name in ("gpt_neox.layers.0.input_layernorm.weight", "gpt_neox.final_layer_norm.bias"):
        assert torch.equal(merged[name], base[name]), name
    for name in ("gpt_neox.embed_in.weight", "embed_out.weight"):
        assert torch.equal(merged[name][:n_base], base[name]), name
    # Targeted projections carry the merged adapter.
    qkv = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert not torch.equal(merged[qkv], base[qkv])


def test_merged_model_equals_the_adapter_on_its_base(lora_run):
    from dolly_langchain.models import load_lora_adapter, load_model_and_tokenizer

    run, final, *_ = lora_run
    merged, tokenizer = load_model_and_tokenizer(str(run))
    from_adapter, _ = load_lora_adapter(final / "adapter")
    ids = torch.tensor([tokenizer.encode("### Instruction:\nName a color.\n\n### Response:\n")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, from_adapter(ids).logits, rtol=1e-4, atol=1e-4)


def test_run_dir_loads_like_dollys(lora_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from dolly_langchain.llm import DollyLLM

    run = lora_run[0]
    model, info = AutoModelForCausalLM.from_pretrained(run, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert AutoTokenizer.from_pretrained(run).convert_tokens_to_ids("### End") is not None
    model, tokenizer = load_model_tokenizer_for_generate(run)
    assert tokenizer.padding_side == "left"
    generator = pipeline("text-generation", model=str(run))
    assert isinstance(generator("Say hi", max_new_tokens=3)[0]["generated_text"], str)
    for path in (run, run / "model", run / "model" / "adapter"):  # run dir, final model, adapter (merged on load)
        assert isinstance(DollyLLM.from_model_id(str(path), max_new_tokens=4).invoke("Say hi"), str), path


def test_no_merge_keeps_only_the_adapter(tmp_path, tiny_neox_dir):
    from dolly_langchain.llm import DollyLLM

    data = write_jsonl(tmp_path / "dolly.jsonl", synthetic_records(16))
    final = run_training(cli_args(tiny_neox_dir, data, tmp_path / "run", *LORA, "--epochs", "1",
                                  "--save-steps", "100", "--no-merge-lora"))
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    assert (tmp_path / "run" / "adapter_config.json").is_file()  # the run directory is the adapter too
    assert isinstance(DollyLLM.from_model_id(str(tmp_path / "run"), max_new_tokens=4).invoke("Say hi"), str)


# --- Killed runs ------------------------------------------------------------------------------------------------

KILL_AT = 6
def _loads_anywhere(path: Path) -> list[str]:
    """Which loaders accept ``path`` (a killed run must be accepted by none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from dolly_langchain.llm import DollyLLM

    loaders = {
        "AutoModelForCausalLM": lambda: AutoModelForCausalLM.from_pretrained(path),
        "AutoTokenizer": lambda: AutoTokenizer.from_pretrained(path),
        "pipeline": lambda: pipeline("text-generation", model=str(path)),
        "load_model_tokenizer_for_generate": lambda: load_model_tokenizer_for_generate(path),
        "DollyLLM": lambda: DollyLLM.from_model_id(str(path)),
    }
    accepted = []
    for name, load in loaders.items():
        try:
            load()
        except Exception:  # each loader fails its own way (OSError, ValueError, ModelNotFoundError ...)
            continue
        accepted.append(name)
    return accepted


def test_killed_lora_run_never_looks_finished_and_resumes_to_the_same_loss(tmp_path, tiny_neox_dir, monkeypatch):
    data = write_jsonl(tmp_path / "dolly.jsonl", synthetic_records(48, seed=7))

    def argv(out: Path, *extra: str) -> list[str]:
        # 48 records at batch 4: 12 steps, killed after the checkpoint of step 6.
        return cli_args(tiny_neox_dir, data, out, *LORA, "--epochs", "1", "--per-device-train-batch-size", "4",
                        "--max-length", "96", "--save-steps", "3", *extra)

    whole = run_finetune_process(argv(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_finetune_process(argv(tmp_path / "killed"), kill_at=KILL_AT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "killed" / f"checkpoint-{KILL_AT}" / "adapter_model.safetensors").is_file()
    assert _loads_anywhere(tmp_path / "killed") == []

    resumed = run_finetune_process(argv(tmp_path / "killed", "--resume-from-checkpoint", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = losses(log_history(tmp_path / "whole")), losses(log_history(tmp_path / "killed"))
    assert max(expected) > KILL_AT + 4 and got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
    whole_adapter = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed_adapter = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    for name, tensor in whole_adapter.items():
        torch.testing.assert_close(resumed_adapter[name], tensor, rtol=1e-4, atol=1e-5)
    assert _loads_anywhere(tmp_path / "killed") == [
        "AutoModelForCausalLM", "AutoTokenizer", "pipeline", "load_model_tokenizer_for_generate", "DollyLLM",
    ]


def test_run_killed_while_saving_never_looks_finished(tmp_path, tiny_neox_dir, monkeypatch):
    """Killed after the model was written but before the rename that publishes it: the root's links dangle."""
    import finetune.rundir as ft

    data = write_jsonl(tmp_path / "dolly.jsonl", synthetic_records(16))
    argv = cli_args(tiny_neox_dir, data, tmp_path / "run", "--epochs", "1", "--save-steps", "100")

    def killed_while_renaming(src, dst):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ft, "_replace_dir", killed_while_renaming)
    with pytest.raises(KeyboardInterrupt):
        run_training(argv)
    run = tmp_path / "run"
    assert (run / ".model.partial" / "config.json").is_file() and (run / "config.json").is_symlink()
    assert not (run / "config.json").exists() and not (run / "model").exists()
    assert _loads_anywhere(run) == []
    monkeypatch.undo()
    run_training([*argv, "--resume-from-checkpoint", "auto"])
    assert (run / "config.json").is_file() and not (run / ".model.partial").exists()


# --- DeepSpeed ZeRO-3 and MLflow --------------------------------------------------------------------------------


def test_lora_under_zero3_on_two_cpu_ranks(tmp_path, base_neox_dir):
    from integration.test_finetune_deepspeed import _launch

    from dolly_langchain.llm import DollyLLM

    data = write_jsonl(tmp_path / "dolly.jsonl", synthetic_records(64, seed=11))
    _launch(base_neox_dir, data, tmp_path / "run", "--lora", "--lora-r", "8", "--lr", "5e-3")
    run = tmp_path / "run"
    values = list(losses(log_history(run)).values())
    assert len(values) == 8 and sum(values[-3:]) / 3 < sum(values[:3]) / 3 - 0.1
    assert (run / "checkpoint-8" / "adapter_model.safetensors").is_file()
    adapter = load_file(run / "model" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.numel() and t.abs().sum() > 0 for t in lora_b)  # gathered from the shards, trained
    base, merged = load_file(base_neox_dir / "model.safetensors"), load_file(run / "model.safetensors")
    n_base = base["gpt_neox.embed_in.weight"].shape[0]
    assert torch.equal(merged["gpt_neox.layers.1.post_attention_layernorm.weight"],
                       base["gpt_neox.layers.1.post_attention_layernorm.weight"])
    assert torch.equal(merged["embed_out.weight"][:n_base], base["embed_out.weight"])  # old tokens' rows untouched
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    assert not torch.equal(merged[name], base[name])
    assert isinstance(DollyLLM.from_model_id(str(run), max_new_tokens=4).invoke("Say hi"), str)


def test_mlflow_run_is_recorded_in_a_local_sqlite_store(tmp_path, tiny_neox_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dolly-lora-test")
    data = write_jsonl(tmp_path / "dolly.jsonl", synthetic_records(16))
    final = run_training(cli_args(tiny_neox_dir, data, tmp_path / "run", *LORA, "--epochs", "1",
                                  "--save-steps", "100", "--report-to", "mlflow"))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("dolly-lora-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["final_model_dir"] == str(final.resolve())
    assert params["dolly_finetune.lora"] == "True" and params["dolly_finetune.lora_r"] == "8"
    assert float(params["learning_rate"]) == 5e-3  # the Trainer's own params, logged by transformers' callback
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) == 2 and all(m.value > 0 for m in history)  # 16 records, batch 8, a loss every step
