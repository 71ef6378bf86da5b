"""The house plan holds: no import circles, one error base, one home for generation settings, one command tree.

The import graph is read from the source (``ast``), module-level and function-level imports alike: a lazy import
inside a function still ties two modules together, and a circle of them makes every import order fragile.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dolly_langchain", "finetune")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (a ``from package import submodule`` counts as the submodule)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_lazy_imports_and_circles():
    graph = import_graph()
    assert "dolly_langchain.generation" in graph["dolly_langchain.runtime"]  # module level
    assert "dolly_langchain.engines.transformers_engine" in graph["dolly_langchain.runtime"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_anywhere_in_the_project():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_evaluation_reaches_training_code_only_through_finetune_data():
    graph = import_graph()
    for module, imported in graph.items():
        if module.startswith("dolly_langchain.evaluation"):
            training = {m for m in imported if m.startswith("finetune")}
            assert training <= {"finetune.data"}, (module, training)


def test_no_core_module_imports_the_pipeline_adapter():
    """InstructionTextGenerationPipeline is a compatibility adapter over a runtime; generation never needs it."""
    graph = import_graph()
    core = ["dolly_langchain.runtime", "dolly_langchain.generation", "dolly_langchain.codec", "dolly_langchain.llm",
            "dolly_langchain.chat", "dolly_langchain.models"]
    core += [m for m in graph if m.startswith("dolly_langchain.engines")]
    for module in core:
        assert "dolly_langchain.pipeline" not in graph[module], module


def test_every_error_class_of_the_project_is_a_dolly_error():
    import importlib

    from dolly_langchain import DollyError

    checked = 0
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)
                   and (n.name.endswith("Error") or n.name.endswith("Exception") or n.name == "MissingTaskFile")]
        if not classes:
            continue
        module = importlib.import_module(name)
        for cls_name in classes:
            cls = getattr(module, cls_name)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                assert issubclass(cls, DollyError), f"{name}.{cls_name}"
                checked += 1
    assert checked >= 10


def test_errors_keep_the_builtin_base_callers_catch():
    from dolly_langchain.errors import DollyError
    from dolly_langchain.models import ModelNotFoundError
    from dolly_langchain.rag import IndexFileError, IndexMismatchError
    from finetune.data import BadRecordError
    from finetune.train import FinetuneError

    assert issubclass(ModelNotFoundError, RuntimeError) and issubclass(FinetuneError, RuntimeError)
    assert issubclass(IndexFileError, RuntimeError) and issubclass(IndexMismatchError, ValueError)
    assert issubclass(BadRecordError, ValueError)
    assert all(issubclass(cls, DollyError) for cls in (ModelNotFoundError, FinetuneError, IndexFileError,
                                                        IndexMismatchError, BadRecordError))


def test_generation_settings_are_defined_once():
    """The defaults the issue names live in dolly_langchain.generation; the old homes re-export the same objects."""
    from dolly_langchain import generation, pipeline
    from dolly_langchain.engines import base, scheduler
    from dolly_langchain.llm import DollyLLM

    assert base.SamplingOptions is generation.SamplingOptions and base.ENGINES is generation.ENGINES
    assert pipeline.DEFAULT_GENERATION is generation.DEFAULT_GENERATION
    assert pipeline.check_window is generation.check_window
    assert DollyLLM.model_fields["batch_size"].default == generation.DEFAULT_BATCH_SIZE
    assert DollyLLM.model_fields["top_p"].default == generation.DEFAULT_GENERATION["top_p"]
    import inspect

    assert inspect.signature(scheduler.BatchScheduler).parameters["batch_size"].default == generation.DEFAULT_BATCH_SIZE
    literal = '"SmolLM2-135M-Instruct (embedded)"'
    for path in (ROOT / "dolly_langchain").rglob("*.py"):
        assert literal not in path.read_text(encoding="utf-8"), path


def test_sampling_options_conversion():
    from dolly_langchain.generation import SamplingOptions, sampling_options

    assert sampling_options({}) == SamplingOptions(max_new_tokens=256, do_sample=True, top_p=0.92, top_k=0)
    greedy = sampling_options({"do_sample": False, "temperature": 0.3, "top_p": 0.5, "max_new_tokens": 7})
    assert greedy == SamplingOptions(max_new_tokens=7)  # greedy ignores the sampling knobs, so batches are shared
    assert sampling_options({"temperature": None, "logprobs": True}).logprobs is True
    # LangChain's temperature=0 means greedy, even where do_sample is on (Dolly's default).
    assert sampling_options({"do_sample": True, "temperature": 0, "seed": 3}) == SamplingOptions(max_new_tokens=256)
    with pytest.raises(ValueError, match="temperature"):
        sampling_options({"do_sample": True, "temperature": -0.5})


def test_no_shared_folder_in_package_code():
    """``../shared`` exists only on this repository's machines; users get the data elsewhere."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert "../shared" not in path.read_text(encoding="utf-8"), path


def test_importing_the_package_and_building_the_command_tree_stays_light():
    code = ("import sys, dolly_langchain, dolly_langchain.generation; from dolly_langchain.cli import build_parser; "
            "build_parser(); print(sorted(m for m in ('torch', 'transformers', 'datasets', 'lm_eval') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_no_bare_builtin_errors_are_raised_on_purpose():
    """Every error raised on purpose is a DollyError (a room's own class, or one of errors.py's general kinds that
    keep the built-in base), so a caller can tell "fix your input" from a bug and the CLI prints it as one line."""
    import re

    builtin = re.compile(r"raise (ValueError|TypeError|RuntimeError|ImportError|NotImplementedError|KeyError|"
                         r"FileNotFoundError|OSError|Exception)\(")
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                assert not builtin.search(line), f"{path.relative_to(ROOT)}:{number}: {line.strip()}"


def test_the_general_error_kinds_keep_their_builtin_base():
    from dolly_langchain import errors
    from dolly_langchain.generation import ContextWindowError
    from finetune.presets import get_preset

    pairs = [(errors.DollyValueError, ValueError), (errors.DollyTypeError, TypeError),
             (errors.DollyRuntimeError, RuntimeError), (errors.MissingDependencyError, ImportError),
             (errors.NotSupportedError, NotImplementedError), (errors.DollyLookupError, KeyError),
             (errors.MissingFileError, FileNotFoundError), (ContextWindowError, ValueError)]
    for kind, builtin in pairs:
        assert issubclass(kind, errors.DollyError) and issubclass(kind, builtin), kind
    with pytest.raises(KeyError) as info:
        get_preset("no-such-preset")
    assert str(info.value).startswith("unknown preset 'no-such-preset'")  # no quotes around the whole message
