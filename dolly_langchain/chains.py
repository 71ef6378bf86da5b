"""Chains in Dolly's two shapes: an instruction, and an instruction with context.

LCEL (LangChain 1.x)::

    from dolly_langchain.chains import instruction_chain, instruction_with_context_chain

    instruction_chain(llm).invoke({"instruction": "Explain to me the difference between nuclear fission and fusion."})
    instruction_with_context_chain(llm).invoke({"instruction": "Who founded Databricks?", "context": "..."})

Dolly's original ``LLMChain`` route keeps working (``langchain-classic``)::

    from langchain_classic.chains import LLMChain
    from dolly_langchain.prompts import INSTRUCTION_WITH_CONTEXT_PROMPT

    LLMChain(llm=llm, prompt=INSTRUCTION_WITH_CONTEXT_PROMPT).predict(instruction="...", context="...")

The templates render the user-visible text only; :class:`~dolly_langchain.llm.DollyLLM` wraps it in the model's
own format (Dolly's ``### Instruction:`` text, or the chat template), so chains never repeat the format.
"""

from __future__ import annotations

from langchain_core.language_models import BaseLanguageModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import Runnable

from dolly_langchain.prompts import INSTRUCTION_PROMPT, INSTRUCTION_WITH_CONTEXT_PROMPT


def instruction_chain(llm: BaseLanguageModel) -> Runnable:
    """``{"instruction": ...}`` -> response text."""
    return INSTRUCTION_PROMPT | llm | StrOutputParser()


def instruction_with_context_chain(llm: BaseLanguageModel) -> Runnable:
    """``{"instruction": ..., "context": ...}`` -> response text (Dolly's closed QA / summarization shape)."""
    return INSTRUCTION_WITH_CONTEXT_PROMPT | llm | StrOutputParser()
