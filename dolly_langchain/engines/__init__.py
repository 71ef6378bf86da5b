"""Generation engines behind ``DollyLLM`` and ``ChatDolly``: one small interface, three implementations.

- ``"transformers"`` (:class:`~dolly_langchain.engines.transformers_engine.TransformersEngine`): anything
  transformers loads; GPUs, ``device_map``, ``quantization_config``; the reference outputs.
- ``"ctranslate2"`` (:class:`~dolly_langchain.engines.ctranslate2_engine.CTranslate2Engine`): CTranslate2 on a
  converted copy of the model (cached, see :mod:`~dolly_langchain.engines.conversion`); int8 on CPU, float16 or
  int8_float16 on CUDA; measured 2.1x transformers at batch 1 on a 2-core CPU (benchmarks/generation.py).

- ``"llamacpp"`` (:class:`~dolly_langchain.engines.llamacpp_engine.LlamaCppEngine`): llama.cpp's server engine in
  process (``xllamacpp``) on a GGUF conversion (see :mod:`~dolly_langchain.engines.gguf_conversion`; Llama and
  GPT-NeoX); the fastest for one answer at a time on CPU.
- ``"auto"`` on the embedded model (:class:`~dolly_langchain.engines.routing.RoutingEngine`): llama.cpp for lone
  prompts, CTranslate2 int8 for batches.

:class:`~dolly_langchain.engines.scheduler.BatchScheduler` gathers concurrent calls into shared batches.
"""

from dolly_langchain.engines.base import EngineOutput, GenerationEngine
from dolly_langchain.generation import ENGINES, SamplingOptions

__all__ = ["ENGINES", "EngineOutput", "GenerationEngine", "SamplingOptions"]
