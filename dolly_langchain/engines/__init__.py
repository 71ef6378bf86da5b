"""Generation engines behind ``DollyLLM`` and ``ChatDolly``: one small interface, two implementations.

- ``"transformers"`` (:class:`~dolly_langchain.engines.transformers_engine.TransformersEngine`): anything
  transformers loads; GPUs, ``device_map``, ``quantization_config``; the reference outputs.
- ``"ctranslate2"`` (:class:`~dolly_langchain.engines.ctranslate2_engine.CTranslate2Engine`): CTranslate2 on a
  converted copy of the model (cached, see :mod:`~dolly_langchain.engines.conversion`); int8 on CPU, float16 or
  int8_float16 on CUDA; measured 2.1x transformers at batch 1 on a 2-core CPU (benchmarks/generation.py).

:class:`~dolly_langchain.engines.scheduler.BatchScheduler` gathers concurrent calls into shared batches.
"""

from dolly_langchain.engines.base import EngineOutput, GenerationEngine
from dolly_langchain.generation import ENGINES, SamplingOptions

__all__ = ["ENGINES", "EngineOutput", "GenerationEngine", "SamplingOptions"]
