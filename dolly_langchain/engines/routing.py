"""``engine="auto"`` on the embedded model: llama.cpp for one answer at a time, CTranslate2 for batches.

The two engines win different workloads on a small CPU (``benchmarks/engine_comparison.py``, one run): llama.cpp
decodes one stream fastest (4-bit block kernels), CTranslate2 int8 batches best (one padded matrix product per
step for up to 16 rows, where llama.cpp's slots gain little). :class:`RoutingEngine` sends each batch the scheduler
forms to the engine that is faster for its size: a lone call (``dolly ask``, a chat turn, one RAG answer) to
llama.cpp, a batch of ``batch_rows`` or more rows (``DollyLLM.batch``, concurrent requests of ``dolly serve``,
``dolly batch``) to CTranslate2. The batched engine is loaded on the first batch, so a process that only ever
answers one question at a time never loads it.

Both run the same checkpoint, quantized differently (the shipped Q4_1 tensors; CTranslate2's int8), so the same
prompt may be worded differently alone and in a batch, as CTranslate2 int8 answers already may with batch
composition (see the README). Pass ``engine="llamacpp"`` or ``engine="ctranslate2"`` for one engine throughout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from dolly_langchain.engines.base import EngineOutput, GenerationEngine, TokenCallback
from dolly_langchain.generation import SamplingOptions

#: Batches of this many rows or more go to the batched engine.
BATCH_ROWS = 2


class RoutingEngine(GenerationEngine):
    """One engine for lone prompts, another (loaded on first use) for batches; both on the same checkpoint."""

    name = "auto"

    def __init__(self, single: GenerationEngine, load_batched: Callable[[], GenerationEngine], *,
                 batch_rows: int = BATCH_ROWS):
        self.single = single
        self._load_batched = load_batched
        self._batched: GenerationEngine | None = None
        self._lock = threading.Lock()
        self.batch_rows = batch_rows
        # Seeds only mean something if both engines honour them; CTranslate2 does not.
        self.supports_seed = False
        self.supports_grammar = False
        self.model_dir = getattr(single, "model_dir", None)

    @property
    def batched(self) -> GenerationEngine:
        """The batch engine, loaded on first access."""
        with self._lock:
            if self._batched is None:
                self._batched = self._load_batched()
            return self._batched

    @property
    def device(self) -> str:
        return self.single.device

    @property
    def context_window(self) -> int | None:
        return self.single.context_window

    @property
    def logits_width(self) -> int | None:
        return self.single.logits_width

    @property
    def source_checkpoint(self) -> str | None:
        return getattr(self.single, "source_checkpoint", None)

    @property
    def compute_type(self) -> str:
        batched = self._batched.describe().get("compute_type") if self._batched is not None else "int8"
        return f"{self.single.describe().get('compute_type')} / {batched}"

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device, "compute_type": self.compute_type,
                "single": self.single.describe(),
                "batched": self._batched.describe() if self._batched is not None else "ctranslate2 (not loaded yet)",
                "batch_rows": self.batch_rows}

    def engine_for(self, rows: int, options: SamplingOptions | None = None) -> GenerationEngine:
        """The engine a batch of ``rows`` prompts runs on. ``no_repeat_ngram_size``, which llama.cpp has no
        sampler for, always runs on the batched engine."""
        if rows >= self.batch_rows or (options is not None and options.no_repeat_ngram_size):
            return self.batched
        return self.single

    def generate(self, prompts: Sequence[Sequence[int]], options: SamplingOptions, stop_token_ids: Sequence[int],
                 on_token: TokenCallback | None = None) -> list[EngineOutput]:
        return self.engine_for(len(prompts), options).generate(prompts, options, stop_token_ids, on_token)
