"""The engine seam: token ids in, token ids out.

An engine knows how to run a model and nothing about prompts: :class:`~dolly_langchain.codec.PromptCodec` turns
instructions into token ids (control-token safe) and generated ids back into a response, the same for every engine,
and :class:`~dolly_langchain.engines.scheduler.BatchScheduler` feeds engines batches gathered from concurrent calls.

An engine implements :meth:`GenerationEngine.generate`: a batch of prompts (lists of token ids) sharing one
:class:`SamplingOptions`, generation that ends per row at a stop token id, at ``max_new_tokens``, or when the
``on_token`` callback returns ``True`` for that row (stop strings, a cancelled call). ``on_token`` sees every
generated token as it comes, which is how streaming works; the returned :class:`EngineOutput` holds the same tokens.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dolly_langchain.errors import DollyValueError, MissingDependencyError
from dolly_langchain.generation import ENGINES, SamplingOptions  # noqa: F401  (defined once there; re-exported)

#: ``on_token(row, token_id, logprob)``; return ``True`` to stop generating for that row. ``logprob`` is ``None``
#: unless :attr:`SamplingOptions.logprobs` is set.
TokenCallback = Callable[[int, int, "float | None"], bool]


@dataclass
class EngineOutput:
    """One row's generated tokens: up to, not including, a stop token id; including the token ``on_token`` stopped at."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None


class GenerationEngine(ABC):
    """Runs a causal LM on token ids. Not thread-safe: :class:`BatchScheduler` is its only caller in a ``DollyLLM``."""

    #: ``"transformers"`` or ``"ctranslate2"``.
    name: str = ""
    #: Whether a call's ``SamplingOptions.seed`` makes its sampling reproducible on this engine.
    supports_seed: bool = True
    #: Whether the engine can constrain generation with ``SamplingOptions.grammar`` (structured output).
    supports_grammar: bool = False

    @property
    @abstractmethod
    def device(self) -> str:
        """Where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:0"``...)."""

    @property
    @abstractmethod
    def context_window(self) -> int | None:
        """Most tokens (prompt + generated) the model attends over; ``None`` if unknown."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        options: SamplingOptions,
        stop_token_ids: Sequence[int],
        on_token: TokenCallback | None = None,
    ) -> list[EngineOutput]:
        """Generate for every prompt in one batch; blocks until every row has ended.

        An engine with :attr:`supports_grammar` also takes ``constraints=``: one
        :class:`~dolly_langchain.structured.RowConstraint` per row, whose allowed tokens are the only ones it may
        pick (the scheduler passes it only for calls with ``options.grammar``)."""

    @property
    def logits_width(self) -> int | None:
        """How many token scores the model produces per step (its embedding size, which may exceed the tokenizer's
        vocabulary); what a grammar mask must cover. ``None`` where unknown."""
        return None

    def describe(self) -> dict:
        """What tracing and ``--json`` output report about the engine."""
        return {"engine": self.name, "device": self.device}


class RowTracker:
    """Per-row bookkeeping shared by engines: collects tokens, applies stop ids and ``on_token``'s verdict."""

    def __init__(self, rows: int, stop_token_ids: Sequence[int], on_token: TokenCallback | None, logprobs: bool):
        self.outputs = [EngineOutput(logprobs=[] if logprobs else None) for _ in range(rows)]
        self.done = [False] * rows
        self.stop_ids = set(stop_token_ids)
        self.on_token = on_token

    def add(self, row: int, token_id: int, logprob: float | None) -> bool:
        """Record a generated token; ``True`` when the row has ended (now or before)."""
        if self.done[row]:
            return True
        if token_id in self.stop_ids:
            self.done[row] = True
            return True
        output = self.outputs[row]
        output.token_ids.append(token_id)
        if output.logprobs is not None:
            output.logprobs.append(float(logprob) if logprob is not None else float("nan"))
        if self.on_token is not None and self.on_token(row, token_id, logprob):
            self.done[row] = True
        return self.done[row]

    @property
    def all_done(self) -> bool:
        return all(self.done)


def length_groups(lengths: Sequence[int], max_new_tokens: int, step_cost: float) -> list[list[int]]:
    """Split one batch into runs of similar prompt length, to spend less compute on padding.

    A batch is padded to its longest prompt, so one 250-token RAG prompt among fifteen 40-token questions makes
    the prompt pass cost sixteen 250-token prompts. Running it as its own batch saves that, but costs a second
    decoding loop, whose fixed cost per step is ``step_cost`` (in prompt tokens' worth of compute). This returns
    the grouping of the length-sorted rows that minimises ``padded prompt tokens + groups * step_cost *
    max_new_tokens`` (exact, by dynamic programming over the sorted lengths). Each group lists indices into
    ``lengths``; a batch of similar lengths stays one group.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    loop_cost = step_cost * max_new_tokens
    best = [0.0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + (end - start) * sorted_lengths[end - 1] + loop_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups = []
    end = len(order)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def import_engine_package(module: str, engine: str, install_hint: str):
    """Import an engine's package, or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(f"engine={engine!r} needs the {module} package: {install_hint}") from err


def threads_from_env(variable: str, minimum: int) -> int | None:
    """An engine's thread count from the environment variable ``variable`` (``None`` when unset)."""
    value = os.environ.get(variable)
    if not value:
        return None
    try:
        return max(minimum, int(value))
    except ValueError:
        raise DollyValueError(f"{variable} must be an integer, got {value!r}") from None


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
