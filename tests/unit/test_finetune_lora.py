"""dolly-finetune --lora: flags, target modules per architecture, the PEFT config, refusals before loading, and the
plan's LoRA/QLoRA numbers against sizes computed by hand."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_gptj, tiny_neox
from finetune.common import DEFAULT_LORA_LR, LORA_TARGET_MODULES, lora_target_modules
from finetune.plan import QLORA_BITS_PER_WEIGHT, load_model_config, lora_parameters
from finetune.plan import main as plan_main
from finetune.train import FinetuneError, lora_config, main, parse_args

REQUIRED = ["--local-output-dir", "out"]


def tiny_llama(vocab_size: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def _linear_leaf_names(model) -> set[str]:
    output = model.get_output_embeddings()
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not output}


@pytest.mark.parametrize(
    ("build", "model_type", "expected"),
    [
        (tiny_neox, "gpt_neox", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
        (tiny_gptj, "gptj", ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]),
        (tiny_llama, "llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ],
)
def test_auto_targets_every_attention_and_mlp_projection(build, model_type, expected):
    """`auto` names exactly the linear layers of each block (all of them but the output layer) in transformers'
    own modeling code."""
    model = build(512)
    assert model.config.model_type == model_type
    assert lora_target_modules(model_type) == expected == LORA_TARGET_MODULES[model_type]
    assert set(expected) == _linear_leaf_names(model)


def test_other_architectures_and_explicit_lists():
    assert lora_target_modules("mistral") == "all-linear"
    assert lora_target_modules("gpt_neox", "query_key_value, dense") == ["query_key_value", "dense"]
    with pytest.raises(FinetuneError, match="--lora-target-modules"):
        lora_target_modules("gpt_neox", " , ")


def test_lora_flags_and_defaults():
    args = parse_args([*REQUIRED, "--lora"])
    assert (args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules) == (16, 32, 0.05, "auto")
    assert args.merge_lora and not args.load_in_4bit and args.lr == DEFAULT_LORA_LR == 2e-4
    assert parse_args(REQUIRED).lr == 1e-5  # full fine-tuning keeps Dolly's lr
    assert parse_args([*REQUIRED, "--lora", "--lr", "1e-3"]).lr == 1e-3
    assert not parse_args([*REQUIRED, "--lora", "--no-merge-lora"]).merge_lora


def test_lora_flags_are_documented(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--lora", "--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target-modules", "--merge-lora",
                 "--no-merge-lora", "--load-in-4bit", "mlflow"):
        assert flag in text, flag


def test_load_in_4bit_is_qlora():
    args = parse_args([*REQUIRED, "--load-in-4bit"])
    assert args.lora and args.load_in_4bit and args.lr == DEFAULT_LORA_LR


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_load_in_4bit_without_cuda_fails_in_one_line_before_loading_anything(tmp_path, capsys):
    # The model and data do not exist: the error must come before anything tries to load them.
    with pytest.raises(SystemExit) as exit_:
        main(["--local-output-dir", str(tmp_path / "run"), "--input-model", str(tmp_path / "no-model"),
              "--training-dataset", str(tmp_path / "no-data.jsonl"), "--load-in-4bit"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--load-in-4bit" in err and "CUDA" in err
    assert not (tmp_path / "run").exists()


def test_lora_config_trains_the_rows_of_dollys_tokens(dolly_tokenizer):
    """Untied output layer (GPT-NeoX, named lm_head in transformers 5): the rows of both matrices; tied (Llama): the
    input rows only, which PEFT ties to the output layer."""
    from dolly_langchain.prompts import DOLLY_SPECIAL_TOKENS

    args = parse_args([*REQUIRED, "--lora", "--lora-r", "4"])
    ids = dolly_tokenizer.convert_tokens_to_ids(list(DOLLY_SPECIAL_TOKENS))
    assert len(set(ids)) == 3
    neox = lora_config(args, tiny_neox(len(dolly_tokenizer)), dolly_tokenizer)
    assert neox.trainable_token_indices == {"gpt_neox.embed_in": ids, "lm_head": ids}
    assert neox.r == 4 and neox.lora_alpha == 32 and set(neox.target_modules) == set(LORA_TARGET_MODULES["gpt_neox"])
    assert not neox.modules_to_save
    llama = lora_config(args, tiny_llama(len(dolly_tokenizer)), dolly_tokenizer)
    assert llama.trainable_token_indices == ids


def test_peft_model_trains_only_adapters_and_token_rows(dolly_tokenizer):
    from peft import get_peft_model

    model = tiny_neox(len(dolly_tokenizer))
    args = parse_args([*REQUIRED, "--lora", "--lora-r", "4"])
    peft_model = get_peft_model(model, lora_config(args, model, dolly_tokenizer))
    trainable = {name: p.numel() for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "trainable_tokens_delta" in name for name in trainable)
    hidden, layers = 64, 2
    per_layer = 4 * ((64 + 192) + (64 + 64) + (64 + 128) + (128 + 64))  # r * (in + out) of each projection
    assert sum(trainable.values()) == layers * per_layer + 2 * 3 * hidden


# --- The plan ---------------------------------------------------------------------------------------------------


def test_lora_parameters_of_a_tiny_model_by_hand(tiny_neox_dir):
    config, _ = load_model_config(str(tiny_neox_dir))
    vocab = config.vocab_size
    lora = lora_parameters(config, 8, "auto", load_in_4bit=False)
    adapter = 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 128) + (128 + 64))
    assert lora["adapter_parameters"] == adapter == 12288
    assert lora["token_parameters"] == 3 * 64 * 2  # input and output rows: GPT-NeoX does not tie them
    linear = 2 * (64 * 192 + 64 * 64 + 64 * 128 + 128 * 64)  # the weights bitsandbytes would quantize
    total = sum(p.numel() for p in tiny_neox(vocab).parameters())
    assert lora["frozen_bytes"] == 2 * total
    qlora = lora_parameters(config, 8, "auto", load_in_4bit=True)
    assert qlora["frozen_bytes"] == int(linear * 4.127 / 8 + (total - linear) * 2)
    assert lora["inputs_per_layer"] == 64 + 64 + 64 + 128


def _plan(capsys, *argv) -> dict:
    assert plan_main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# pythia-12b (36 layers, hidden 5120, ffn 20480, vocab 50688, untied): sizes by hand.
LINEAR_PER_LAYER = 5120 * 15360 + 5120 * 5120 + 2 * 5120 * 20480  # query_key_value, dense, dense_h_to_4h, 4h_to_h
ADAPTER_PER_LAYER = 16 * ((5120 + 15360) + (5120 + 5120) + (5120 + 20480) + (20480 + 5120))
PYTHIA_12B = 11_846_072_320


def test_pythia_12b_qlora_on_one_a10_by_hand(capsys):
    plan = _plan(capsys, "--preset", "dolly-v2-12b-qlora-a10", "--num-gpus", "1")
    lora, memory = plan["lora"], plan["memory_per_gpu_gb"]
    trainable = 36 * ADAPTER_PER_LAYER + 2 * 3 * 5120
    assert lora["trainable_parameters"] == trainable == 47_216_640
    frozen = 36 * LINEAR_PER_LAYER * QLORA_BITS_PER_WEIGHT / 8 + (PYTHIA_12B - 36 * LINEAR_PER_LAYER) * 2
    assert lora["frozen_bytes"] == int(frozen)
    gib = 2**30
    assert memory["model_states"] * gib == pytest.approx(int(frozen) + 16 * trainable)  # weights, grads, Adam: 16 B
    assert plan["hardware"]["gpu"] == "A10 24GB" and plan["hardware"]["deepspeed_config"] is None
    assert memory["fits"] is True and memory["total"] < 0.9 * 24
    assert plan["memory_per_node_host_gb"]["total"] * gib == pytest.approx(2 * PYTHIA_12B)  # merged in 16-bit


def test_pythia_12b_16bit_lora_needs_more_than_an_a10(capsys):
    a10 = _plan(capsys, "--preset", "dolly-v2-12b-lora-a100", "--num-gpus", "1", "--gpu-memory-gb", "24")
    a100 = _plan(capsys, "--preset", "dolly-v2-12b-lora-a100", "--num-gpus", "1")
    assert a10["lora"]["frozen_bytes"] == 2 * PYTHIA_12B
    assert a10["memory_per_gpu_gb"]["fits"] is False and a10["memory_per_gpu_gb"]["max_per_device_batch"] == 0
    assert a100["memory_per_gpu_gb"]["fits"] is True and a100["hardware"]["gpu"] == "A100 40GB"


def test_lora_under_zero3_splits_the_frozen_base(capsys):
    one = _plan(capsys, "--preset", "dolly-v2-12b-lora-a100", "--num-gpus", "1")
    eight = _plan(capsys, "--preset", "dolly-v2-12b-lora-a100", "--num-gpus", "8", "--deepspeed", "a100_config.json")
    frozen, trainable = 2 * PYTHIA_12B, eight["lora"]["trainable_parameters"]
    largest = 50688 * 5120
    expected = frozen // 8 + 4 * largest + 8 * trainable + 8 * trainable // 8
    assert eight["memory_per_gpu_gb"]["model_states"] * 2**30 == pytest.approx(expected)
    assert eight["memory_per_gpu_gb"]["model_states"] < one["memory_per_gpu_gb"]["model_states"] / 4


def test_lora_without_deepspeed_is_one_gpu(capsys):
    assert plan_main(["--preset", "dolly-v2-7b-qlora-a10", "--num-gpus", "2"]) == 2
    assert "--num-gpus 2: several GPUs need a --deepspeed config" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["3b", "7b", "12b"])
def test_one_gpu_presets_fit_their_gpu(capsys, size):
    for kind in ("lora-a100", "qlora-a10"):
        plan = _plan(capsys, "--preset", f"dolly-v2-{size}-{kind}", "--num-gpus", "1")
        assert plan["memory_per_gpu_gb"]["fits"] is True, kind
        assert plan["memory_per_node_host_gb"]["fits"] is True, kind


def test_plan_and_train_do_not_import_each_other():
    """Both import finetune.common; neither imports the other (a circle made every import order fragile)."""
    root = Path(__file__).resolve().parents[2] / "finetune"

    def imported(module: str) -> set[str]:
        tree = ast.parse((root / f"{module}.py").read_text(encoding="utf-8"))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    assert "finetune.train" not in imported("plan") and "finetune.common" in imported("plan")
    assert "finetune.plan" not in imported("common") and "finetune.train" not in imported("common")


@pytest.mark.parametrize("build", [tiny_gptj, tiny_neox], ids=["gptj", "gpt_neox"])
def test_a_fresh_adapter_gives_the_base_models_logits(dolly_tokenizer, build):
    """LoRA's B matrices start at zero and the token rows start as copies: before training, the wrapped model must
    compute exactly what the base computes. GPT-J's LM head has a bias that PEFT's token wrapper drops
    (huggingface/peft#3649); keep_output_bias puts it back."""
    import torch
    from peft import get_peft_model

    from finetune.train import keep_output_bias

    torch.manual_seed(0)
    model = build(len(dolly_tokenizer)).eval()
    bias = model.get_output_embeddings().bias
    if bias is not None:  # initialised to zero: give it values that matter
        torch.nn.init.normal_(bias)
    ids = torch.tensor([dolly_tokenizer("### Instruction: name a colour ### Response:")["input_ids"]])
    with torch.no_grad():
        expected = model(ids).logits.clone()
    args = parse_args([*REQUIRED, "--lora", "--lora-r", "4"])
    peft_model = get_peft_model(model, lora_config(args, model, dolly_tokenizer)).eval()
    hooked = keep_output_bias(peft_model)
    assert hooked == (1 if build is tiny_gptj else 0)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, expected)
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(ids).logits, expected)
