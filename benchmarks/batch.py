"""A batch job in one process against the same job on Spark: ``DollyLLM.batch`` vs ``dolly batch --spark local[2]``.

    python benchmarks/batch.py                          # 400 seeded dolly-15k records, 32 new tokens, greedy
    python benchmarks/batch.py --rows 100 --master 'local[2]' --max-new-tokens 32

Prints one JSON object. The same records (instruction and context, sampled with ``--seed`` from
``$DOLLY_15K_PATH``; none are stored here) go through

- ``in_process``: ``DollyLLM(max_new_tokens=N, do_sample=False).batch(prompts)`` in a fresh Python process, the
  embedded SmolLM2 on CTranslate2 int8 (the library's default engine and threads);
- ``spark``: ``dolly batch RECORDS.jsonl OUT --spark MASTER`` in a fresh process: JVM and session start-up, the
  length pass, the planned batches on the workers, and the Parquet write.

Each side is timed end to end from the start of its process (start-up and model loads included); ``peak_rss_gb``
is the largest sum of resident memory over the process and all its children (JVM and Python workers), sampled
every 0.2 s. ``tokens_per_s`` counts generated tokens (``completion_tokens``). ``outputs_equal`` counts records
whose Spark answer equals the in-process answer, token for token. Target on a 2-core CPU: Spark >= 1.2x the
in-process tokens/s end to end, and every output equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("DOLLY_15K_PATH"),
                        help="databricks-dolly-15k.jsonl (default: $DOLLY_15K_PATH)")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--child", choices=["in-process"], help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--answers", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None and (args.data is None or not Path(args.data).is_file()):
        parser.error("databricks-dolly-15k.jsonl not found: pass --data or set DOLLY_15K_PATH")
    return args


def sample_records(path: Path, rows: int, seed: int) -> list[dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    chosen = random.Random(seed).sample(records, rows)
    return [{"id": i, "instruction": r["instruction"], "context": r.get("context", "")} for i, r in enumerate(chosen)]


def in_process_child(args: argparse.Namespace) -> None:
    """The child process of the in-process side: ``DollyLLM.batch`` over every record, answers to ``--answers``."""
    from dolly_langchain.batch.frames import prompt_text
    from dolly_langchain.llm import DollyLLM

    records = [json.loads(line) for line in args.records.read_text(encoding="utf-8").splitlines()]
    prompts = [prompt_text(r["instruction"], r["context"].strip() or None) for r in records]
    llm = DollyLLM(max_new_tokens=args.max_new_tokens, do_sample=False, batch_size=args.batch_size)
    result = llm.generate(prompts)  # what DollyLLM.batch runs, with the token counts
    answers = [{"id": r["id"], "response": g[0].text,
                "completion_tokens": g[0].generation_info["usage_metadata"]["output_tokens"]}
               for r, g in zip(records, result.generations)]
    args.answers.write_text(json.dumps(answers), encoding="utf-8")


def timed(command: list[str], log: Path) -> dict:
    """Run ``command``; wall seconds from its start and the peak RSS of its process tree."""
    import psutil

    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        parent = psutil.Process(process.pid)
        peak, most = 0, 0
        while process.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                rss = 0
                for p in tree:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak, most = max(peak, rss), max(most, len(tree))
            except psutil.Error:
                pass
            time.sleep(0.2)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{command[:4]} failed with exit code {process.returncode}; see {log}:\n"
                         + log.read_text()[-3000:])
    return {"wall_s": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2), "processes": most}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "in-process":
        in_process_child(args)
        return 0
    import pandas as pd

    records = sample_records(args.data, args.rows, args.seed)
    with tempfile.TemporaryDirectory(prefix="dolly-bench-batch-") as tmp:
        tmp = Path(tmp)
        source = tmp / "records.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        answers = tmp / "answers.json"
        local = timed([sys.executable, __file__, "--child", "in-process", "--records", str(source), "--answers",
                       str(answers), "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
                       str(args.batch_size)], tmp / "in-process.log")
        reference = json.loads(answers.read_text(encoding="utf-8"))
        print(f"in-process: {local['wall_s']} s", file=sys.stderr, flush=True)
        dolly = str(Path(sys.executable).with_name("dolly"))
        spark = timed([dolly, "batch", str(source), str(tmp / "out"), "--spark", args.master, "--max-new-tokens",
                       str(args.max_new_tokens), "--batch-size", str(args.batch_size)], tmp / "spark.log")
        print(f"spark: {spark['wall_s']} s", file=sys.stderr, flush=True)
        out = pd.read_parquet(tmp / "out").set_index("id").sort_index()
    local["tokens"] = sum(a["completion_tokens"] for a in reference)
    spark["tokens"] = int(out["completion_tokens"].sum())
    for side in (local, spark):
        side["tokens_per_s"] = round(side["tokens"] / side["wall_s"], 1)
    equal = sum(out.loc[a["id"], "response"] == a["response"] for a in reference)
    print(json.dumps({
        "rows": args.rows, "seed": args.seed, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "model": "embedded SmolLM2-135M-Instruct, CTranslate2 int8, greedy", "cpus": os.cpu_count(),
        "in_process": local, "spark": {"master": args.master, **spark},
        "spark_speedup_tokens_per_s": round(spark["tokens_per_s"] / local["tokens_per_s"], 2),
        "outputs_equal": int(equal), "errors": int(out["error"].notna().sum()),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
