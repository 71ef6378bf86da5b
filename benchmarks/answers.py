"""Do answers loop, and which decoding settings fix it? Loop rate and answer quality per decoding setting.

    python benchmarks/answers.py                                  # 48 records, 128 new tokens, 8 settings
    python benchmarks/answers.py --records 16 --settings greedy,rp1.2   # a quick look at two settings

On a shared 2-core CPU (CTranslate2 int8, one thread) a setting takes about 4 minutes at the defaults, about
20 generated tokens/s: the whole run about 32 minutes; ``--records 24`` halves it.
    python benchmarks/answers.py --model databricks/dolly-v2-3b --engine transformers

Prints one JSON object; progress goes to stderr.

``--records`` records of databricks-dolly-15k, sampled with ``random.Random(--seed)`` over the whole file, are answered
by ``DollyLLM`` (the embedded SmolLM2-135M-Instruct unless ``--model``) once per decoding setting: the instruction,
with the record's context as Dolly's ``Input:`` block when it has one, rendered with Dolly's LangChain templates
exactly as ``dolly ask --context`` does, and passed through ``DollyLLM``. All records of a setting go through one
``generate`` call (what ``llm.batch`` does underneath, kept here for the token counts), so they share engine batches.
A record whose prompt plus ``--max-new-tokens`` does not fit the model's window is skipped (``skipped_too_long``).

Each setting is a dict of ``DollyLLM`` per-call options (:data:`SETTINGS`). A sampled setting is seeded with
``--seed`` where the engine honours a per-call seed; CTranslate2 cannot (it refuses ``seed=``), so there it runs
unseeded and its entry says so (``note``): its numbers then vary from run to run. Per setting:

- ``loop_rate``: share of answers that loop, by :func:`loops` (some word 3-gram occurs 4 or more times);
  ``reference_loop_rate`` at the top applies the same test to the human responses, for scale;
- ``rouge_l``: mean ROUGE-L F1 against the human response (``dolly_langchain.evaluation.generation.rouge_l``:
  rouge-score with stemming, as ``dolly eval --generation`` reports it);
- ``closed_qa_token_f1``: mean SQuAD-style token F1 (``token_f1`` of ``benchmarks/rag.py``) on the closed_qa
  records among them (``closed_qa_records`` of them);
- ``mean_new_tokens`` (generated token ids per answer, as ``usage_metadata`` counts them), ``length_share`` (answers
  cut at ``--max-new-tokens`` rather than ended by the model), ``seconds`` (wall time of the setting's call) and
  ``tokens_per_s`` (generated tokens over those seconds);
- ``loop_examples``: the first few looping answers (first 80 characters) and their most repeated 3-gram;
- ``rouge_l_minus_greedy`` (settings run after ``greedy``): the mean per-record ROUGE-L difference from greedy's
  answers to the same records, with a seeded 95% paired-bootstrap interval, to tell a real loss from sample noise.

``recommendation``, the rule: among settings with ``loop_rate`` <= 0.05 whose ``rouge_l`` is at least greedy's, the
one with the best ``rouge_l``; ties (equal to 4 decimals) go to the setting with fewer options that differ from greedy
decoding (:func:`deviations`). None qualifies: ``null``, with the reason; ``best_loop_free`` then names the
setting the same rule picks without the ROUGE-L condition (the least ROUGE-L lost for loop_rate <= 0.05). Deterministic (greedy) settings give
reproducible answers, which is what the command line's defaults are for; when a sampled setting wins, the
recommendation says so and also names the best deterministic setting that meets the rule (``best_deterministic``).

The data come from ``--data`` (default ``$DOLLY_15K_PATH``); none are stored here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Greedy decoding with every repetition control off: the baseline each setting is compared with.
GREEDY = {"do_sample": False, "temperature": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}

#: The decoding settings compared: name -> DollyLLM per-call options. ``seed`` of sampled settings is --seed.
# Every setting names every anti-loop option: the embedded model's own defaults (generation.ANSWER_DEFAULTS) must not leak in.
OFF = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "stop_loops": False}
SETTINGS = {
    "greedy": {"temperature": 0, **OFF},
    "dolly_sampling": {"do_sample": True, "temperature": 1.0, "top_p": 0.92, "seed": None, **OFF},
    "rp1.1": {"temperature": 0, **OFF, "repetition_penalty": 1.1},
    "rp1.2": {"temperature": 0, **OFF, "repetition_penalty": 1.2},
    "rp1.3": {"temperature": 0, **OFF, "repetition_penalty": 1.3},
    "nrng3": {"temperature": 0, **OFF, "no_repeat_ngram_size": 3},
    "nrng4": {"temperature": 0, **OFF, "no_repeat_ngram_size": 4},
    "nrng5": {"temperature": 0, **OFF, "no_repeat_ngram_size": 5},
    "nrng6": {"temperature": 0, **OFF, "no_repeat_ngram_size": 6},
    "rp1.1+nrng4": {"temperature": 0, **OFF, "repetition_penalty": 1.1, "no_repeat_ngram_size": 4},
    "stoploops": {"temperature": 0, **OFF, "stop_loops": True},
}

LOOP_NGRAM, LOOP_TIMES = 3, 4
MAX_LOOP_RATE = 0.05
EXAMPLES = 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("DOLLY_15K_PATH"),
                        help="databricks-dolly-15k.jsonl (default: $DOLLY_15K_PATH)")
    parser.add_argument("--model", default=None, help="hub id or directory (default: the embedded SmolLM2)")
    parser.add_argument("--engine", default="auto", choices=("auto", "transformers", "ctranslate2"))
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="record sample, and the seed of sampled settings")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated names among {', '.join(SETTINGS)} (greedy is always run)")
    args = parser.parse_args(argv)
    if args.data is None or not Path(args.data).is_file():
        parser.error("--data: databricks-dolly-15k.jsonl not found; pass --data PATH or set DOLLY_15K_PATH")
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        parser.error(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
    args.settings = ["greedy", *(n for n in dict.fromkeys(names) if n != "greedy")]
    return args


def loops(text: str, n: int = LOOP_NGRAM, times: int = LOOP_TIMES) -> bool:
    """Whether ``text`` loops: some word ``n``-gram (3) occurs ``times`` (4) or more times in it.

    Words are the lowercase ``\\w+`` tokens of the text; n-grams are counted at every position, so overlapping
    occurrences count ("a a a a a a" holds the 3-gram "a a a" four times).
    """
    return _top_ngram(text, n)[1] >= times


def _top_ngram(text: str, n: int = LOOP_NGRAM) -> tuple[str, int]:
    """The most frequent word ``n``-gram of ``text`` (words as in :func:`loops`) and its count; ``("", 0)`` if none."""
    words = re.findall(r"\w+", text.lower())
    counts = Counter(zip(*(words[i:] for i in range(n))))
    if not counts:
        return "", 0
    gram, count = counts.most_common(1)[0]
    return " ".join(gram), count


def load_records(path: Path, count: int, seed: int) -> list[dict]:
    """``count`` records sampled with ``random.Random(seed)`` over the whole file."""
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return random.Random(seed).sample(records, min(count, len(records)))


def render(record: dict) -> str:
    """The instruction, with the record's context as Dolly's ``Input:`` block: what ``dolly ask --context`` passes
    to ``DollyLLM`` (``dolly_langchain/cli/ask.py``)."""
    from dolly_langchain.prompts import INSTRUCTION_PROMPT, INSTRUCTION_WITH_CONTEXT_PROMPT

    instruction, context = record["instruction"].strip(), (record.get("context") or "").strip() or None
    if context:
        return INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction=instruction, context=context)
    return INSTRUCTION_PROMPT.format(instruction=instruction)


def options_of(name: str, seed: int, engine) -> dict:
    """The setting's options; a sampled setting gets ``seed``, or none where the engine cannot honour a per-call
    seed (CTranslate2: ``supports_seed`` is False, and a seed is refused), which the report then says."""
    options = dict(SETTINGS[name])
    if "seed" in options:
        if getattr(engine, "supports_seed", True):
            options["seed"] = seed
        else:
            del options["seed"]
    return options


def deviations(options: dict) -> int:
    """How many options differ from greedy decoding with repetition controls off (:data:`GREEDY`); a seed alone
    is not counted (greedy ignores it), and ``temperature=0`` is greedy however ``do_sample`` is set."""
    sampled = bool(options.get("do_sample", GREEDY["do_sample"])) and options.get("temperature", 1) != 0
    count = int(sampled)
    if sampled:
        count += sum(name in options for name in ("temperature", "top_p", "top_k"))
    for name in ("repetition_penalty", "no_repeat_ngram_size"):
        count += options.get(name, GREEDY[name]) != GREEDY[name]
    return count


def run_setting(llm, name: str, options: dict, prompts: list[str], records: list[dict]) -> tuple[dict, list[str]]:
    from dolly_langchain.evaluation.generation import rouge_l
    from rag import token_f1

    started = time.perf_counter()
    result = llm.generate(prompts, **options)  # what llm.batch(prompts, **options) runs: one call, shared batches
    seconds = time.perf_counter() - started
    generations = [g[0] for g in result.generations]
    answers = [g.text for g in generations]
    new_tokens = [g.generation_info["usage_metadata"]["output_tokens"] for g in generations]
    looping = [loops(a) for a in answers]
    closed_qa = [token_f1(a, r["response"]) for a, r in zip(answers, records) if r["category"] == "closed_qa"]
    examples = []
    for answer, loop in zip(answers, looping):
        if loop and len(examples) < EXAMPLES:
            gram, count = _top_ngram(answer)
            examples.append({"answer": " ".join(answer.split())[:80], "ngram": gram, "count": count})
    scores = [rouge_l(r["response"], a) for a, r in zip(answers, records)]
    summary = {
        "options": options,
        "deviations_from_greedy": deviations(options),
        "loop_rate": round(sum(looping) / len(answers), 4),
        "loops": sum(looping),
        "rouge_l": round(statistics.fmean(scores), 4),
        "closed_qa_token_f1": round(statistics.fmean(closed_qa), 4) if closed_qa else None,
        "closed_qa_records": len(closed_qa),
        "mean_new_tokens": round(statistics.fmean(new_tokens), 1),
        "length_share": round(sum(g.generation_info["finish_reason"] == "length" for g in generations)
                              / len(generations), 4),
        "empty_answers": sum(not a.strip() for a in answers),
        "seconds": round(seconds, 1),
        "tokens_per_s": round(sum(new_tokens) / seconds, 1),
        "loop_examples": examples,
    }
    print(f"answers benchmark: {name}: loop rate {summary['loop_rate']}, ROUGE-L {summary['rouge_l']}, "
          f"closed_qa F1 {summary['closed_qa_token_f1']}, {summary['mean_new_tokens']} tokens/answer, "
          f"{summary['seconds']} s", file=sys.stderr)
    return summary, scores


def paired_difference(scores: list[float], baseline: list[float], seed: int, resamples: int = 10_000) -> dict:
    """Mean of ``scores - baseline`` over the same records, with a 95% paired-bootstrap interval (seeded): whether
    a setting's ROUGE-L is lower than greedy's beyond what the record sample alone explains."""
    diffs = [a - b for a, b in zip(scores, baseline)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return {"mean": round(statistics.fmean(diffs), 4),
            "ci95": [round(means[int(0.025 * resamples)], 4), round(means[int(0.975 * resamples) - 1], 4)]}


def recommend(results: dict) -> dict:
    """The rule of the module docstring, applied to ``results`` (name -> summary)."""
    greedy = results["greedy"]["rouge_l"]
    rule = (f"among settings with loop_rate <= {MAX_LOOP_RATE} and rouge_l >= greedy's ({greedy}), the best rouge_l; "
            "ties: fewer deviations from greedy")

    def best(names, floor=greedy):
        eligible = [n for n in names
                    if results[n]["loop_rate"] <= MAX_LOOP_RATE and results[n]["rouge_l"] >= floor]
        return min(eligible, key=lambda n: (-results[n]["rouge_l"], results[n]["deviations_from_greedy"]),
                   default=None)

    chosen = best(results)
    deterministic = best([n for n in results if not results[n]["options"].get("do_sample")])
    recommendation = {"rule": rule, "setting": chosen, "options": results[chosen]["options"] if chosen else None,
                      "best_deterministic": deterministic}
    if chosen is None:
        loop_free = best(results, floor=float("-inf"))
        recommendation["best_loop_free"] = loop_free
        recommendation["note"] = "no setting meets the rule" + (
            f"; without the ROUGE-L condition: {loop_free} (rouge_l {results[loop_free]['rouge_l']}, "
            f"loop_rate {results[loop_free]['loop_rate']})" if loop_free else "")
    elif results[chosen]["options"].get("do_sample"):
        recommendation["note"] = (f"a sampled setting wins; its answers are not reproducible across batches, so for "
                                  f"CLI defaults prefer the best deterministic one: {deterministic}")
    else:
        recommendation["note"] = "deterministic (greedy) setting: reproducible answers, suitable as a CLI default"
    return recommendation


def main(argv=None) -> int:
    args = parse_args(argv)
    from dolly_langchain.llm import DollyLLM

    records = load_records(args.data, args.records, args.seed)
    started = time.perf_counter()
    llm = DollyLLM.from_model_id(args.model, engine=None if args.engine == "auto" else args.engine,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    load_seconds = time.perf_counter() - started
    fits = []
    for record in records:
        prompt = render(record)
        if llm.context_window is None or llm.count_prompt_tokens(prompt) + args.max_new_tokens <= llm.context_window:
            fits.append((record, prompt))
    skipped = len(records) - len(fits)
    records, prompts = [r for r, _ in fits], [p for _, p in fits]
    print(f"answers benchmark: {len(records)} records ({skipped} too long), {len(args.settings)} settings, "
          f"loaded in {load_seconds:.1f} s", file=sys.stderr)
    llm.invoke(prompts[0], max_new_tokens=4, temperature=0)  # warm-up: first-call allocations

    categories = Counter(r["category"] for r in records)
    report: dict = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv),
        "model": llm.model_name,
        "engine": llm.generation_engine.describe(),
        "prompt_format": llm.prompt_format,
        "data": str(args.data),
        "records": len(records),
        "skipped_too_long": skipped,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "categories": dict(sorted(categories.items())),
        "loop_definition": f"some word {LOOP_NGRAM}-gram (lowercase \\w+ tokens) occurs {LOOP_TIMES}+ times",
        "reference_loop_rate": round(sum(loops(r["response"]) for r in records) / len(records), 4),
        "load_seconds": round(load_seconds, 1),
        "settings": {},
    }
    per_record = {}
    for name in args.settings:
        options = options_of(name, args.seed, llm.generation_engine)
        report["settings"][name], per_record[name] = run_setting(llm, name, options, prompts, records)
        if name != "greedy" and "greedy" in per_record:
            report["settings"][name]["rouge_l_minus_greedy"] = paired_difference(
                per_record[name], per_record["greedy"], args.seed)
        if "seed" in SETTINGS[name] and "seed" not in options:
            report["settings"][name]["note"] = (f"not seeded: the {llm.generation_engine.name} engine cannot seed a "
                                                "call; this setting's numbers vary from run to run")
    report["total_generation_seconds"] = round(sum(s["seconds"] for s in report["settings"].values()), 1)
    report["recommendation"] = recommend(report["settings"])
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
