"""The ``ctranslate2`` engine: CTranslate2's ``Generator`` on a converted copy of the model.

    engine = CTranslate2Engine.from_model(None)                       # embedded model, int8 on CPU
    engine = CTranslate2Engine.from_model("runs/dolly-7b", device="cuda", compute_type="int8_float16")

Compute types (``compute_type=``): ``"auto"`` (the default) picks ``int8`` on CPU and ``int8_float16`` on CUDA
(``float16`` where the GPU has no int8 kernels). On a 2-core AMD CPU, CTranslate2 leaves Intel MKL off and uses
oneDNN; there int8 ran at 48 tok/s at batch 1 against 24 for float32 and 18 for transformers fp32
(``benchmarks/generation.py``, one run), and ``CT2_USE_MKL=1`` made both slower. int8 changes greedy outputs
(ROUGE-L F1 0.52 against fp32 answers on 50 dolly-15k instructions, 5 identical) and makes them depend on batch
composition: padding a short prompt to a long one changes int8 rounding. Use ``compute_type="float32"`` for
reference outputs; float32 batches equal lone calls token for token.

CTranslate2's Python API takes token *strings*. Each id is mapped to its string in the converted model's own
vocabulary, which is checked to hold each string once, so the ids reaching the model are exactly the ids the
:class:`~dolly_langchain.codec.PromptCodec` encoded: user text can no more become a control token here than
with transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dolly_langchain.engines.base import (
    EngineOutput,
    GenerationEngine,
    RowTracker,
    TokenCallback,
    import_engine_package,
    length_groups,
    threads_from_env,
    usable_cpus,
)
from dolly_langchain.errors import DollyValueError
from dolly_langchain.generation import COMPUTE_TYPE_CHOICES, DEVICES, SamplingOptions

COMPUTE_TYPES = COMPUTE_TYPE_CHOICES  # this module's name for them before dolly_langchain.generation held them

# Fixed cost of one decoding step of a batch, in prompt tokens' worth of compute (see length_groups). On CPU,
# measured with SmolLM2-135M int8: a step costs ~16 ms plus ~3.5 ms per row, one prompt token ~1 ms. On CUDA the
# prompt pass is nearly free next to a step's kernel launches, so batches are split only for extreme padding.
STEP_COST_CPU = 16
STEP_COST_CUDA = 256
INSTALL_HINT = "pip install 'ctranslate2>=4.5'"


def import_ctranslate2():
    """Import ``ctranslate2`` or raise an ImportError that says how to install it."""
    return import_engine_package("ctranslate2", "ctranslate2", INSTALL_HINT)


def available() -> bool:
    """Whether the ``ctranslate2`` package can be imported."""
    try:
        import_ctranslate2()
    except ImportError:
        return False
    return True


def default_intra_threads(device: str) -> int:
    """Threads per CTranslate2 replica when none are named: half the usable CPUs (at least 1) on CPU.

    CTranslate2's own default (0) lets OpenMP use every CPU. For a model as small as SmolLM2-135M the per-step
    matrices are tiny and the threads spend more time synchronising than computing: on the 2-vCPU machine this
    project is developed on, int8 ran at 50.6 tok/s (batch 1) and 240 tok/s (batch 16 short prompts, 64 new
    tokens) with one thread against 33.6 / 159 with the default and 37.0 / 190 with two (one run of a bare
    ``ctranslate2.Generator``). Half the CPUs also keeps one hyper-thread sibling per core free. Pass ``intra_threads=`` (or ``DOLLY_CT2_THREADS``) to override.
    """
    if device != "cpu":
        return 0  # CTranslate2's default; threads only matter for CPU compute
    env = threads_from_env("DOLLY_CT2_THREADS", 0)
    if env is not None:
        return env
    return max(1, usable_cpus() // 2)


def resolve_compute_type(compute_type: str, device: str) -> str:
    """Turn ``"auto"`` into a concrete type for ``device`` and check that the device supports it."""
    ctranslate2 = import_ctranslate2()
    if compute_type not in COMPUTE_TYPE_CHOICES:
        raise DollyValueError(f"compute_type must be one of {COMPUTE_TYPE_CHOICES}, got {compute_type!r}")
    if device not in DEVICES:
        raise DollyValueError(f"device must be one of {DEVICES} for engine='ctranslate2', got {device!r}")
    if device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        raise DollyValueError("device='cuda' but CTranslate2 sees no CUDA GPU; use device='cpu'")
    supported = ctranslate2.get_supported_compute_types(device)
    if compute_type == "auto":
        preference = ("int8",) if device == "cpu" else ("int8_float16", "float16", "int8", "float32")
        return next((t for t in preference if t in supported), "float32")
    if compute_type not in supported:
        raise DollyValueError(
            f"compute_type {compute_type!r} is not supported on {device} here; supported: {sorted(supported)}"
        )
    return compute_type


class CTranslate2Engine(GenerationEngine):
    """Generates with a CTranslate2 model directory (see :func:`~dolly_langchain.engines.conversion.convert_to_ctranslate2`)."""

    name = "ctranslate2"
    # CTranslate2 seeds each worker thread's sampler once, when the thread first samples
    # (ctranslate2.set_random_seed has no effect afterwards), so a call cannot be seeded.
    supports_seed = False

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        compute_type: str = "auto",
        device_index: int = 0,
        intra_threads: int | None = None,
        context_window: int | None = None,
    ):
        ctranslate2 = import_ctranslate2()
        self.model_dir = Path(model_dir)
        self.compute_type = resolve_compute_type(compute_type, device)
        self._device = device
        self.intra_threads = default_intra_threads(device) if intra_threads is None else intra_threads
        self.generator = ctranslate2.Generator(
            str(self.model_dir), device=device, device_index=device_index, compute_type=self.compute_type,
            intra_threads=self.intra_threads,
        )
        vocabulary = json.loads((self.model_dir / "vocabulary.json").read_text(encoding="utf-8"))
        if len(set(vocabulary)) != len(vocabulary):
            raise DollyValueError(f"{self.model_dir}/vocabulary.json holds a token string twice; token ids would be "
                             "ambiguous for CTranslate2. Use engine='transformers' for this model.")
        self._vocabulary = vocabulary
        if context_window is None:
            from dolly_langchain.engines.conversion import read_conversion_record

            record = read_conversion_record(self.model_dir) or {}
            context_window = record.get("context_window")
        self._context_window = context_window

    @classmethod
    def from_model(
        cls, model_id: str | None = None, *, device: str = "cpu", compute_type: str = "auto", **kwargs
    ) -> CTranslate2Engine:
        """Convert (once, cached) and load a model by hub id, local directory, or ``None`` for the embedded one."""
        from dolly_langchain.engines.conversion import convert_to_ctranslate2
        from dolly_langchain.models import resolve_model_path

        concrete = resolve_compute_type(compute_type, device)
        model_dir = convert_to_ctranslate2(resolve_model_path(model_id), concrete)
        return cls(model_dir, device=device, compute_type=concrete, **kwargs)

    @property
    def device(self) -> str:
        return self._device

    @property
    def source_checkpoint(self) -> str | None:
        """The transformers checkpoint (hub id or directory) this conversion was made from, per its record."""
        from dolly_langchain.engines.conversion import read_conversion_record

        return (read_conversion_record(self.model_dir) or {}).get("source")

    @property
    def context_window(self) -> int | None:
        return self._context_window

    def describe(self) -> dict:
        return {**super().describe(), "compute_type": self.compute_type, "intra_threads": self.intra_threads}

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary strings of ``ids`` (what CTranslate2's API takes)."""
        try:
            return [self._vocabulary[i] for i in ids]
        except IndexError:
            bad = next(i for i in ids if not 0 <= i < len(self._vocabulary))
            raise DollyValueError(f"token id {bad} is outside the model's vocabulary of {len(self._vocabulary)}") from None

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        options: SamplingOptions,
        stop_token_ids: Sequence[int],
        on_token: TokenCallback | None = None,
    ) -> list[EngineOutput]:
        if not prompts:
            return []
        tracker = RowTracker(len(prompts), stop_token_ids, on_token, options.logprobs)

        if options.do_sample:
            # CTranslate2: sampling_topk=0 samples from the whole vocabulary, like top_k=0 in transformers.
            sampling = {"sampling_topk": options.top_k, "sampling_topp": options.top_p,
                        "sampling_temperature": options.temperature}
        else:
            sampling = {"sampling_topk": 1}
        sampling.update(repetition_penalty=options.repetition_penalty, no_repeat_ngram_size=options.no_repeat_ngram_size)
        # CTranslate2 pads a batch to its longest prompt (its own max_batch_size splitting only sorts by length
        # when a batch exceeds that size), so rows of very different prompt lengths run as separate batches.
        step_cost = STEP_COST_CPU if self._device == "cpu" else STEP_COST_CUDA
        for group in length_groups([len(p) for p in prompts], options.max_new_tokens, step_cost):
            def step(result, group=group) -> bool:
                return tracker.add(group[result.batch_id], result.token_id, result.log_prob)

            self.generator.generate_batch(
                [self.tokens(prompts[row]) for row in group],
                max_length=options.max_new_tokens,
                # The prompt is forwarded at once to fill the KV cache instead of being "generated" token by token.
                include_prompt_in_result=False,
                end_token=list(stop_token_ids) or None,
                return_scores=options.logprobs,  # makes log_prob available in the per-step callback
                callback=step,
                **sampling,
            )
        return tracker.outputs
