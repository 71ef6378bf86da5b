"""dolly-langchain: Databricks' Dolly recipe on transformers 5 and LangChain 1.x.

The rooms (``docs/architecture.md`` draws how they connect):

- :mod:`dolly_langchain.prompts`: Dolly's prompt format (one source of truth) and LangChain prompt templates.
- :mod:`dolly_langchain.generation`: every generation default (Dolly's sampling, ``SamplingOptions``, engines,
  compute types, batch size, the context-window check), defined once.
- :mod:`dolly_langchain.llm`: ``DollyLLM``, the LangChain LLM; :mod:`dolly_langchain.chat`: ``ChatDolly``, the chat model.
- :mod:`dolly_langchain.runtime`: ``load_runtime`` and ``DollyRuntime``, the codec + engine + batching scheduler
  both LangChain classes run on.
- :mod:`dolly_langchain.engines`: the generation engines (transformers, CTranslate2) and the batching scheduler.
- :mod:`dolly_langchain.codec`: prompt building, control-token-safe encoding and response extraction.
- :mod:`dolly_langchain.pipeline`: ``InstructionTextGenerationPipeline``, a drop-in for Dolly's hub pipeline (an
  adapter over a runtime).
- :mod:`dolly_langchain.chains`: LCEL chains for an instruction and an instruction with context.
- :mod:`dolly_langchain.models`: loading hub/local models and the embedded SmolLM2-135M-Instruct.
- :mod:`dolly_langchain.rag`: a persistent document index (a LangChain retriever) and ``retrieval_qa_chain``.
- :mod:`dolly_langchain.evaluation`: ``dolly eval``, the model card's lm-eval table and instruction following.
- :mod:`dolly_langchain.cli`: the ``dolly`` command tree (ask, chat, rag, eval, finetune).
- :mod:`dolly_langchain.errors`: ``DollyError``, the base of every error this project raises on purpose.
- :mod:`dolly_langchain.files`: JSONL reading, atomic writes and checkpoint fingerprints, shared by every room.

Training lives beside this package in :mod:`finetune`. Heavy modules (LangChain, torch, transformers) load on first
use of the names below, so ``import dolly_langchain`` is cheap; torch and transformers load only with a model on the
transformers engine (the CTranslate2 engine runs on ``tokenizers``, see :mod:`dolly_langchain.tokenizer`).
"""

from dolly_langchain.errors import DollyError
from dolly_langchain.prompts import format_prompt, format_training_text

__version__ = "0.1.0"

_LAZY = {
    "INSTRUCTION_PROMPT": "dolly_langchain.prompts",
    "INSTRUCTION_WITH_CONTEXT_PROMPT": "dolly_langchain.prompts",
    "DollyLLM": "dolly_langchain.llm",
    "ChatDolly": "dolly_langchain.chat",
    "InstructionTextGenerationPipeline": "dolly_langchain.pipeline",
    "instruction_chain": "dolly_langchain.chains",
    "instruction_with_context_chain": "dolly_langchain.chains",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dolly_langchain' has no attribute {name!r}")


__all__ = [
    "DollyError",
    "format_prompt",
    "format_training_text",
    *_LAZY,
]
