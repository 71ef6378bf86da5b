"""``retrieval_qa_chain``: retrieve passages, fit them into Dolly's context prompt, answer with sources (LCEL).

::

    from dolly_langchain.llm import DollyLLM
    from dolly_langchain.rag import DocumentIndex, retrieval_qa_chain

    llm = DollyLLM.from_model_id(max_new_tokens=128, do_sample=False)
    chain = retrieval_qa_chain(llm, DocumentIndex(path="docs.sqlite", k=4))
    result = chain.invoke("How do I reset my password?")
    result["answer"], [d.metadata["source"] for d in result["sources"]]
    for part in chain.stream("..."):          # {"sources": [...]} once, then {"answer": "..."} pieces
        print(part.get("answer", ""), end="")

The prompt is Dolly's :data:`~dolly_langchain.prompts.INSTRUCTION_WITH_CONTEXT_PROMPT` with the question as the
instruction and the passages, joined by blank lines, as the context. Passages go in rank order into a **token
budget**: the model's window minus the prompt scaffold (question and format, counted as the model will read them)
minus ``max_new_tokens``. The first passage that does not fit whole is cut at a word boundary to fill the budget
(if at least ``min_passage_tokens`` of it fit) and the rest are dropped; the question is never cut. This is what
LangChain's old ``RetrievalQA`` over ``HuggingFacePipeline`` did not do, and why it overflowed Dolly's 2048-token
window. When nothing is retrieved the chain answers :data:`NO_PASSAGES_ANSWER` without calling the model, rather
than let it answer from an empty context. A question that leaves no room for ``min_passage_tokens`` of the best
passage raises ``ValueError`` (as does one that does not fit on its own), since answering without the passages
that were found would be wrong.

LangChain's own ``create_retrieval_chain`` works with :class:`~dolly_langchain.llm.DollyLLM` too (the question
arrives as ``input``; Dolly's template calls it ``instruction``), but it stuffs every retrieved document whole, so a
large ``k`` can exceed the window, which DollyLLM refuses with a ``ValueError``::

    from operator import itemgetter
    from langchain_classic.chains import create_retrieval_chain
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain
    from langchain_core.runnables import RunnablePassthrough
    from dolly_langchain.prompts import INSTRUCTION_WITH_CONTEXT_PROMPT

    answer_from_documents = RunnablePassthrough.assign(instruction=itemgetter("input")) | create_stuff_documents_chain(
        llm, INSTRUCTION_WITH_CONTEXT_PROMPT
    )
    chain = create_retrieval_chain(index.as_retriever(k=2), answer_from_documents)
    result = chain.invoke({"input": "How do I reset my password?"})   # {"input", "context": [Document], "answer"}

Any LangChain retriever works: this package's :class:`~dolly_langchain.rag.index.DocumentIndex`, or
``QdrantVectorStore(...).as_retriever()``, Elasticsearch, pgvector, ...
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseLanguageModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel

from dolly_langchain.errors import DollyValueError
from dolly_langchain.prompts import INSTRUCTION_WITH_CONTEXT_PROMPT

NO_PASSAGES_ANSWER = "I found no passage about this question in the documents, so I cannot answer it from them."
PASSAGE_SEPARATOR = "\n\n"


def retrieval_qa_chain(
    llm: BaseLanguageModel,
    retriever: BaseRetriever,
    *,
    context_window: int | None = None,
    max_new_tokens: int | None = None,
    min_passage_tokens: int = 32,
) -> Runnable:
    """An LCEL chain: a question (string, or ``{"question": ...}``) -> ``{"answer": str, "sources": [Document]}``.

    ``sources`` are the passages the model was given, in rank order, with their metadata (``source``,
    ``chunk_id``, ...); a passage cut to fit carries ``metadata["truncated"] = True`` and the text actually used.
    For a :class:`~dolly_langchain.llm.DollyLLM` the window, ``max_new_tokens`` and token counts come from the
    model; for any other LLM pass ``context_window`` and ``max_new_tokens`` (tokens are counted with
    ``llm.get_num_tokens``). With a DollyLLM, ``context_window`` can only lower the model's window, and
    ``max_new_tokens`` overrides the model's for this chain's generations.
    """
    packer = PromptPacker.for_llm(llm, context_window, max_new_tokens, min_passage_tokens)
    model: Runnable = llm
    if max_new_tokens is not None and _is_dolly(llm):
        # The budget was computed for this max_new_tokens, so the model must generate with it.
        model = llm.bind(max_new_tokens=max_new_tokens)
    answer = RunnableLambda(itemgetter("prompt")) | model | StrOutputParser()

    def answer_or_say_none(packed: dict) -> Runnable | str:
        return answer if packed["sources"] else NO_PASSAGES_ANSWER

    return (
        RunnableLambda(_question)
        | RunnableParallel(question=lambda question: question, documents=retriever)
        | RunnableLambda(lambda retrieved: packer.pack(retrieved["question"], retrieved["documents"]))
        | RunnableParallel(answer=RunnableLambda(answer_or_say_none), sources=itemgetter("sources"))
    ).with_config(run_name="retrieval_qa_chain")


@dataclass(frozen=True)
class PromptPacker:
    """Fits retrieved passages into the prompt within the model's window (see the module docstring)."""

    count_tokens: Callable[[str], int]
    """Tokens the model reads for a rendered prompt (its format or chat template included)."""
    limit: int
    """Most prompt tokens: the window minus ``max_new_tokens``."""
    min_passage_tokens: int
    """A cut passage shorter than this is dropped instead."""
    count_text: Callable[[str], int]
    """Tokens of a bare text (``llm.get_num_tokens``)."""

    @classmethod
    def for_llm(
        cls, llm: BaseLanguageModel, context_window: int | None, max_new_tokens: int | None, min_passage_tokens: int
    ) -> PromptPacker:
        if _is_dolly(llm):
            if context_window is None or (llm.context_window is not None and llm.context_window < context_window):
                context_window = llm.context_window
            max_new_tokens = llm.max_new_tokens if max_new_tokens is None else max_new_tokens
            count_tokens = llm.count_prompt_tokens
        else:
            count_tokens = llm.get_num_tokens
        if context_window is None or max_new_tokens is None:
            raise DollyValueError(
                "retrieval_qa_chain needs the model's window: pass context_window=... and max_new_tokens=... "
                f"for a {type(llm).__name__}"
            )
        if max_new_tokens >= context_window:
            raise DollyValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a window of {context_window} tokens; "
                "lower max_new_tokens"
            )
        return cls(count_tokens, context_window - max_new_tokens, min_passage_tokens, llm.get_num_tokens)

    def pack(self, question: str, documents: list[Document]) -> dict[str, Any]:
        """``{"question", "prompt", "sources"}``: the prompt with as many passages as fit, and those passages.

        Raises ``ValueError`` when the question alone does not fit, or when passages were retrieved but the
        question leaves room for fewer than ``min_passage_tokens`` of the first one.
        """
        scaffold = self.count_tokens(_render(question, ""))
        if scaffold > self.limit:
            raise DollyValueError(
                f"the question alone is {scaffold} tokens with Dolly's prompt scaffold, over the {self.limit} left "
                "after max_new_tokens; shorten the question or lower max_new_tokens"
            )
        used: list[Document] = []
        context = ""
        documents = [document for document in documents if document.page_content.strip()]
        for document in documents:
            joined = _join(context, document.page_content)
            if self.count_tokens(_render(question, joined)) <= self.limit:
                used.append(document)
                context = joined
                continue
            cut = self._cut(question, context, document.page_content)
            if cut and self.count_text(cut) >= self.min_passage_tokens:
                used.append(Document(id=document.id, page_content=cut, metadata={**document.metadata, "truncated": True}))
                context = _join(context, cut)
            break
        if documents and not used:
            raise DollyValueError(
                f"the question takes {scaffold} of the {self.limit} prompt tokens left after max_new_tokens, leaving "
                f"{self.limit - scaffold} for passages: fewer than min_passage_tokens={self.min_passage_tokens} of "
                "the best one fit; shorten the question, lower max_new_tokens or min_passage_tokens"
            )
        return {"question": question, "prompt": _render(question, context), "sources": used}

    def _cut(self, question: str, context: str, passage: str) -> str:
        """The longest word-boundary prefix of ``passage`` that still fits (binary search on the token count).

        Text without spaces (Chinese, Japanese, long URLs) is cut between characters instead.
        """
        ends = _cut_points(passage)
        low, high = 0, len(ends)  # ends[:low] fit; ends[high:] do not
        while low < high:
            middle = (low + high) // 2
            if self.count_tokens(_render(question, _join(context, passage[: ends[middle]]))) <= self.limit:
                low = middle + 1
            else:
                high = middle
        return passage[: ends[low - 1]].rstrip() if low else ""


# A run of non-space characters longer than this is not one word (CJK text, URLs): it may be cut inside.
_LONGEST_WORD = 24


def _cut_points(passage: str) -> list[int]:
    """Sorted positions where ``passage`` may be cut: after each word (run of non-space characters) and, inside a
    run longer than ``_LONGEST_WORD``, after every character."""
    points = []
    for match in re.finditer(r"\S+", passage):
        if match.end() - match.start() > _LONGEST_WORD:
            points += range(match.start() + 1, match.end())
        points.append(match.end())
    return points or [len(passage)]


def _is_dolly(llm: Any) -> bool:
    from dolly_langchain.llm import DollyLLM

    return isinstance(llm, DollyLLM)


def _render(question: str, context: str) -> str:
    return INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction=question, context=context)


def _join(context: str, passage: str) -> str:
    return f"{context}{PASSAGE_SEPARATOR}{passage}" if context else passage


def _question(inputs: str | dict) -> str:
    if isinstance(inputs, dict):
        keys = [key for key in ("question", "input", "instruction") if key in inputs]
        if len(keys) != 1:
            raise DollyValueError(f"pass the question as a string or as {{'question': ...}}, got keys {sorted(inputs)}")
        inputs = inputs[keys[0]]
    if not isinstance(inputs, str) or not inputs.strip():
        raise DollyValueError("the question is empty: ask the chain something")
    return inputs.strip()
