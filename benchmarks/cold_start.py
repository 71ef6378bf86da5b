"""Cold start with warm caches: ``dolly ask`` in fresh processes, and what importing the package costs.

    python benchmarks/cold_start.py                      # or: python benchmarks/generation.py --cold-start-only
    python benchmarks/cold_start.py --runs 5 --question "What is the capital of France?"

Prints one JSON object:

- ``ask``: per question, ``dolly ask QUESTION --json`` run ``--runs`` times (after one untimed run that warms the
  model caches and the OS file cache), each in a fresh process: the median wall time (what a person waits for),
  the median ``load_seconds`` and ``generate_seconds`` that the command reports, and what is left (interpreter
  start, imports, argument parsing: ``wall - load - generate``);
- ``imports``: wall-clock medians (fresh interpreter, ``--runs`` times) of ``import dolly_langchain``,
  ``from dolly_langchain.chat import ChatDolly``, ``from dolly_langchain.llm import DollyLLM``, ``dolly --help``
  and a bare interpreter, and which of torch, transformers and LangChain each one loads;
- ``ask_importtime``: ``python -X importtime`` of one ``dolly ask``: the cumulative import time of the heavy
  packages it loads (milliseconds) and the project's largest imports.

Target (issue 19): ``dolly ask`` on the embedded model, caches warm, median of 5 <= 1.5 s wall on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_QUESTIONS = ("What is the capital of France?", "Name three colors.")
HEAVY = ("torch", "transformers", "langchain_core", "ctranslate2", "tokenizers", "jinja2", "numpy", "pydantic")
IMPORTS = {
    "python": "pass",
    "import dolly_langchain": "import dolly_langchain",
    "from dolly_langchain.chat import ChatDolly": "from dolly_langchain.chat import ChatDolly",
    "from dolly_langchain.llm import DollyLLM": "from dolly_langchain.llm import DollyLLM",
}
TARGET_SECONDS = 1.5


def dolly_command() -> list[str]:
    """The ``dolly`` console script beside this interpreter, else ``python -m dolly_langchain.cli``."""
    script = Path(sys.executable).parent / "dolly"
    if script.is_file():
        return [str(script)]
    found = shutil.which("dolly")
    return [found] if found else [sys.executable, "-m", "dolly_langchain.cli"]


def _wall(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds, done


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def measure_ask(question: str, runs: int, extra: list[str]) -> dict:
    argv = [*dolly_command(), "ask", question, "--json", *extra]
    _wall(argv)  # warm: converts on a cold cache, fills the OS file cache
    walls, loads, generates = [], [], []
    record = {}
    for _ in range(runs):
        seconds, done = _wall(argv)
        record = json.loads(done.stdout.strip().splitlines()[-1])
        walls.append(seconds)
        loads.append(record["load_seconds"])
        generates.append(record["generate_seconds"])
    rest = [w - lo - g for w, lo, g in zip(walls, loads, generates)]
    return {
        "command": " ".join(["dolly", "ask", json.dumps(question), "--json", *extra]),
        "runs": runs,
        "wall_median_s": _median(walls),
        "wall_s": [round(w, 3) for w in walls],
        "load_median_s": _median(loads),
        "generate_median_s": _median(generates),
        "startup_median_s": _median(rest),
        "response": record.get("response"),
        "engine": {k: record.get(k) for k in ("engine", "compute_type", "intra_threads")},
        "meets_target": statistics.median(walls) <= TARGET_SECONDS,
    }


def measure_imports(runs: int) -> dict:
    out = {}
    probe = "\nimport json, sys\nprint(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    for label, statement in IMPORTS.items():
        argv = [sys.executable, "-c", statement + probe.format(heavy=HEAVY[:3])]
        _wall(argv)
        timings, loaded = [], []
        for _ in range(runs):
            seconds, done = _wall(argv)
            timings.append(seconds)
            loaded = json.loads(done.stdout.strip().splitlines()[-1])
        out[label] = {"wall_median_s": _median(timings), "loads": loaded}
    help_argv = [*dolly_command(), "--help"]
    _wall(help_argv)
    out["dolly --help"] = {"wall_median_s": _median([_wall(help_argv)[0] for _ in range(runs)])}
    return out


def ask_importtime(question: str, extra: list[str]) -> dict:
    """``-X importtime`` of one ``dolly ask``: cumulative ms of each heavy package, the project's biggest imports."""
    script = dolly_command()
    argv = ([sys.executable, "-X", "importtime", *script] if script[0] != sys.executable
            else [sys.executable, "-X", "importtime", *script[1:]])
    _, done = _wall([*argv, "ask", question, *extra])
    cumulative: dict[str, int] = {}
    for line in done.stderr.splitlines():  # "import time: self [us] | cumulative | imported package"
        parts = line[len("import time:"):].split("|") if line.startswith("import time:") else []
        if len(parts) == 3 and parts[1].strip().isdigit():
            cumulative.setdefault(parts[2].strip(), int(parts[1].strip()))
    heavy = {name: round(cumulative[name] / 1000, 1) for name in HEAVY if name in cumulative}
    own = sorted(((name, us) for name, us in cumulative.items() if name.startswith("dolly_langchain")),
                  key=lambda item: -item[1])[:8]
    return {"heavy_ms": heavy, "not_imported": [name for name in HEAVY[:3] if name not in cumulative],
            "largest_project_imports_ms": {name: round(us / 1000, 1) for name, us in own}}


def run(questions=DEFAULT_QUESTIONS, runs: int = 5, extra: list[str] | None = None) -> dict:
    extra = list(extra or [])
    report = {"target_wall_s": TARGET_SECONDS, "runs": runs,
              "ask": [measure_ask(q, runs, extra) for q in questions]}
    report["imports"] = measure_imports(runs)
    report["ask_importtime"] = ask_importtime(questions[0], extra)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--question", action="append", help="ask this (repeatable; default: two questions, a short "
                        "and a longer answer)")
    parser.add_argument("--runs", type=int, default=5, help="timed fresh processes per measurement (median)")
    args = parser.parse_args(argv)
    print(json.dumps(run(tuple(args.question or DEFAULT_QUESTIONS), args.runs), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
