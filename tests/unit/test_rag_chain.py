"""``retrieval_qa_chain``: passages into Dolly's context prompt within the window, ``{"answer", "sources"}`` out.

Runs on the memorized tiny GPT-NeoX (window 512 tokens), an in-memory retriever and a DocumentIndex in a temp file.
"""

import random

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.retrievers import BaseRetriever

from conftest import _WORDS, MEMORIZED
from dolly_langchain.llm import DollyLLM
from dolly_langchain.prompts import INSTRUCTION_WITH_CONTEXT_PROMPT
from dolly_langchain.rag import NO_PASSAGES_ANSWER, DocumentIndex, retrieval_qa_chain
from dolly_langchain.rag.chain import PromptPacker

FRANCE, COLOR, SUMMARY = MEMORIZED
MAX_NEW_TOKENS = 40


class ListRetriever(BaseRetriever):
    """Returns its documents in their order (the rank order) and records the queries it was given."""

    documents: list[Document]
    queries: list[str] = []

    def _get_relevant_documents(self, query, *, run_manager=None):
        self.queries.append(query)
        return [d.model_copy(deep=True) for d in self.documents]


class Prompts(BaseCallbackHandler):
    """Records the prompts the LLM was called with."""

    def __init__(self):
        self.prompts = []

    def on_llm_start(self, serialized, prompts, **kwargs):
        self.prompts += prompts


def doc(text: str, source: str, chunk: str) -> Document:
    return Document(id=chunk, page_content=text, metadata={"source": source, "chunk_id": chunk})


def filler(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


def render(question: str, passages: list[str]) -> str:
    return INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction=question, context="\n\n".join(passages))


@pytest.fixture(scope="module")
def llm(memorized_neox_dir):
    return DollyLLM.from_model_id(str(memorized_neox_dir), do_sample=False, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture
def cat():
    return doc(SUMMARY[1], "notes/cat.txt", "cat-0")


def test_answers_from_the_passage_with_its_sources(llm, cat):
    retriever = ListRetriever(documents=[cat], queries=[])
    chain = retrieval_qa_chain(llm, retriever)
    result = chain.invoke(SUMMARY[0])
    assert result == {"answer": SUMMARY[2], "sources": [cat]}
    assert result["sources"][0].metadata == {"source": "notes/cat.txt", "chunk_id": "cat-0"}
    assert retriever.queries == [SUMMARY[0]]
    # The question can also come as a dict, and surrounding blanks are ignored.
    assert chain.invoke({"question": f"  {SUMMARY[0]}\n"}) == result
    assert chain.invoke({"input": SUMMARY[0]})["answer"] == SUMMARY[2]


def test_prompt_is_dollys_context_prompt_with_passages_in_rank_order(llm):
    passages = [doc(filler(i, 12), f"s{i}.txt", f"c{i}") for i in range(3)]
    seen = Prompts()
    result = retrieval_qa_chain(llm, ListRetriever(documents=passages, queries=[])).invoke(
        COLOR[0], config={"callbacks": [seen]}
    )
    assert seen.prompts == [render(COLOR[0], [d.page_content for d in passages])]
    assert result["sources"] == passages
    assert [d.metadata["chunk_id"] for d in result["sources"]] == ["c0", "c1", "c2"]
    assert not any("truncated" in d.metadata for d in result["sources"])


@pytest.mark.parametrize("window, used", [(160, 1), (350, 3), (460, 4)])  # passages used, the last one cut
def test_passages_fill_the_token_budget_and_only_the_last_is_cut(llm, window, used):
    question = SUMMARY[0]
    passages = [doc(filler(10 + i, 80), f"s{i}.txt", f"c{i}") for i in range(8)]  # ~100 tokens each
    seen = Prompts()
    chain = retrieval_qa_chain(llm, ListRetriever(documents=passages, queries=[]), context_window=window)
    result = chain.invoke(question, config={"callbacks": [seen]})

    [prompt] = seen.prompts
    limit = window - MAX_NEW_TOKENS  # budget for the whole prompt; the scaffold is counted inside it
    assert llm.count_prompt_tokens(prompt) <= limit
    sources = result["sources"]
    assert len(sources) == used
    assert prompt == render(question, [d.page_content for d in sources])  # the question is intact, never cut
    # Rank order; every passage but the last is whole; the last is a shorter prefix of its original, marked.
    assert [d.metadata["chunk_id"] for d in sources] == [f"c{i}" for i in range(len(sources))]
    assert sources[:-1] == passages[: len(sources) - 1]
    last, original = sources[-1], passages[len(sources) - 1]
    assert last.metadata["truncated"] is True
    assert len(last.page_content) < len(original.page_content)
    assert original.page_content.startswith(last.page_content)
    assert last.metadata["source"] == original.metadata["source"] and last.id == original.id
    assert "truncated" not in original.metadata  # the retriever's document was not modified
    # The cut fills the budget: one more word of the passage would not fit.
    rest = original.page_content[len(last.page_content) :].split()
    longer = [d.page_content for d in sources[:-1]] + [f"{last.page_content} {rest[0]}"]
    assert llm.count_prompt_tokens(render(question, longer)) > limit
    # The exact arithmetic: scaffold + passages + max_new_tokens <= window.
    scaffold = llm.count_prompt_tokens(render(question, []))
    assert scaffold < llm.count_prompt_tokens(prompt) <= window - MAX_NEW_TOKENS


def test_default_window_is_the_models_and_a_larger_one_is_capped(llm):
    assert llm.context_window == 512
    passages = [doc(filler(20 + i, 80), f"s{i}.txt", f"c{i}") for i in range(8)]  # ~800 tokens in all
    for window in (None, 100_000):
        seen = Prompts()
        retrieval_qa_chain(llm, ListRetriever(documents=passages, queries=[]), context_window=window).invoke(
            FRANCE[0], config={"callbacks": [seen]}
        )
        assert 400 < llm.count_prompt_tokens(seen.prompts[0]) <= 512 - MAX_NEW_TOKENS


def test_chain_max_new_tokens_sets_the_budget_and_the_generation(llm, cat):
    seen = Prompts()
    chain = retrieval_qa_chain(llm, ListRetriever(documents=[cat], queries=[]), max_new_tokens=2)
    answer = chain.invoke(SUMMARY[0], config={"callbacks": [seen]})["answer"]
    assert answer and SUMMARY[2].startswith(answer) and len(answer) < len(SUMMARY[2])
    # A window that only fits the prompt with max_new_tokens=2, not with the model's 40.
    passages = [doc(filler(30 + i, 80), f"s{i}.txt", f"c{i}") for i in range(8)]
    seen = Prompts()
    retrieval_qa_chain(llm, ListRetriever(documents=passages, queries=[]), max_new_tokens=2).invoke(
        COLOR[0], config={"callbacks": [seen]}
    )
    assert 512 - MAX_NEW_TOKENS < llm.count_prompt_tokens(seen.prompts[0]) <= 512 - 2


def test_no_passage_says_so_without_calling_the_model(llm, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("the model must not be called without passages")

    monkeypatch.setattr(llm.pipeline.model, "generate", no_generation)
    chain = retrieval_qa_chain(llm, ListRetriever(documents=[], queries=[]))
    assert chain.invoke(FRANCE[0]) == {"answer": NO_PASSAGES_ANSWER, "sources": []}
    parts = list(chain.stream(FRANCE[0]))
    assert "".join(p.get("answer", "") for p in parts) == NO_PASSAGES_ANSWER
    assert [p["sources"] for p in parts if "sources" in p] == [[]]
    # Passages with no text are no passages either.
    blank = ListRetriever(documents=[doc("  \n", "empty.txt", "e0")], queries=[])
    assert retrieval_qa_chain(llm, blank).invoke(FRANCE[0]) == {"answer": NO_PASSAGES_ANSWER, "sources": []}


def test_stream_yields_sources_then_answer_pieces_that_join_to_invoke(llm, cat):
    chain = retrieval_qa_chain(llm, ListRetriever(documents=[cat], queries=[]))
    parts = list(chain.stream(SUMMARY[0]))
    pieces = [p["answer"] for p in parts if "answer" in p]
    assert len(pieces) > 1
    assert "".join(pieces) == chain.invoke(SUMMARY[0])["answer"] == SUMMARY[2]
    assert [p["sources"] for p in parts if "sources" in p] == [[cat]]


def test_question_too_long_alone_raises_before_generation(llm, monkeypatch, cat):
    monkeypatch.setattr(llm.pipeline.model, "generate", lambda *a, **k: pytest.fail("generated"))
    chain = retrieval_qa_chain(llm, ListRetriever(documents=[cat], queries=[]), context_window=200)
    question = filler(40, 200) + "?"
    with pytest.raises(ValueError, match=r"question alone is \d+ tokens.* 160 left after max_new_tokens"):
        chain.invoke(question)
    with pytest.raises(ValueError, match="question alone"):
        list(chain.stream(question))


def test_question_leaving_no_room_for_a_passage_raises(llm, monkeypatch):
    monkeypatch.setattr(llm.pipeline.model, "generate", lambda *a, **k: pytest.fail("generated"))
    question = COLOR[0]
    window = llm.count_prompt_tokens(render(question, [])) + MAX_NEW_TOKENS + 20  # 20 tokens for passages
    chain = retrieval_qa_chain(llm, ListRetriever(documents=[doc(filler(42, 80), "a", "a0")], queries=[]),
                               context_window=window)
    with pytest.raises(ValueError, match=r"leaving 20 for passages.*min_passage_tokens=32"):
        chain.invoke(question)
    # Rather than answering "no passage found" from nothing: the passage is there, the room is not.
    packed = PromptPacker.for_llm(llm, window, None, min_passage_tokens=8).pack(question, [doc(filler(42, 80), "a", "a0")])
    [cut] = packed["sources"]
    assert cut.metadata["truncated"] is True and llm.count_prompt_tokens(packed["prompt"]) <= window - MAX_NEW_TOKENS


def test_a_short_remainder_is_dropped_not_cut(llm):
    question = COLOR[0]
    first = doc(filler(50, 80), "a", "a0")
    second = doc(filler(51, 80), "b", "b0")
    whole = llm.count_prompt_tokens(render(question, [first.page_content]))
    window = whole + 10 + MAX_NEW_TOKENS  # 10 tokens left after the first passage: under min_passage_tokens
    seen = Prompts()
    result = retrieval_qa_chain(llm, ListRetriever(documents=[first, second], queries=[]), context_window=window).invoke(
        question, config={"callbacks": [seen]}
    )
    assert result["sources"] == [first]
    assert seen.prompts == [render(question, [first.page_content])]
    # With min_passage_tokens=4 those 10 tokens hold a cut of the second passage.
    packer = PromptPacker.for_llm(llm, window, None, min_passage_tokens=4)
    packed = packer.pack(question, [first, second])
    assert [d.metadata["chunk_id"] for d in packed["sources"]] == ["a0", "b0"]
    assert packed["sources"][1].metadata["truncated"] is True
    assert llm.count_prompt_tokens(packed["prompt"]) <= window - MAX_NEW_TOKENS


def test_text_without_spaces_is_cut_between_characters(llm):
    passage = doc("猫がマットの上に座っていた。" * 60, "ja.txt", "j0")  # no whitespace at all
    packer = PromptPacker.for_llm(llm, 300, None, min_passage_tokens=32)
    packed = packer.pack(SUMMARY[0], [passage])
    [cut] = packed["sources"]
    assert cut.metadata["truncated"] is True and passage.page_content.startswith(cut.page_content)
    assert 0 < len(cut.page_content) < len(passage.page_content)
    assert llm.count_prompt_tokens(packed["prompt"]) <= 300 - MAX_NEW_TOKENS


def test_empty_or_malformed_question_is_refused(llm, cat):
    chain = retrieval_qa_chain(llm, ListRetriever(documents=[cat], queries=[]))
    for question in ("", "   \n", {"question": ""}):
        with pytest.raises(ValueError, match="empty"):
            chain.invoke(question)
    with pytest.raises(ValueError, match="question"):
        chain.invoke({"query": SUMMARY[0]})
    with pytest.raises(ValueError, match="question"):
        chain.invoke({"question": SUMMARY[0], "input": SUMMARY[0]})


def test_window_settings_are_checked(llm, cat):
    with pytest.raises(ValueError, match="max_new_tokens=600 leaves no room"):
        retrieval_qa_chain(llm, ListRetriever(documents=[cat], queries=[]), max_new_tokens=600)


def test_any_llm_with_an_explicit_window(cat):
    words = lambda text: text.split()  # noqa: E731 - a whitespace "tokenizer": never the hub's gpt2
    fake = FakeListLLM(responses=["It sat."], custom_get_token_ids=words)
    with pytest.raises(ValueError, match="pass context_window=... and max_new_tokens=..."):
        retrieval_qa_chain(fake, ListRetriever(documents=[cat], queries=[]))
    passages = [doc(" ".join(filler(60 + i, 25).split()), f"s{i}", f"c{i}") for i in range(4)]  # 25 words each
    chain = retrieval_qa_chain(fake, ListRetriever(documents=passages, queries=[]), context_window=70,
                               max_new_tokens=10, min_passage_tokens=5)
    result = chain.invoke(SUMMARY[0])
    assert result["answer"] == "It sat."
    used = result["sources"]
    # 60 words of prompt: 4 of question and "Input:", 25 + 25 whole, 6 of the third passage.
    assert [d.metadata["chunk_id"] for d in used] == ["c0", "c1", "c2"] and used[2].metadata["truncated"] is True
    assert len(words(used[2].page_content)) == 6
    assert len(words(render(SUMMARY[0], [d.page_content for d in used]))) == 60


@pytest.fixture
def index(tmp_path, dolly_tokenizer):
    index = DocumentIndex(path=tmp_path / "docs.sqlite", tokenizer=dolly_tokenizer, k=1)
    index.add_documents([
        Document(page_content=SUMMARY[1], metadata={"source": "notes/cat.txt"}),
        Document(page_content="Paris is the capital of France, the text says.", metadata={"source": "notes/paris.txt"}),
    ])
    return index


# BM25 drops function words, so the question names the cat: "summarize", "text", "cat", "mat" reach the index.
CAT_QUESTION = "Summarize the text about the cat on the mat."


def cat_answer(llm):
    """What the model answers to CAT_QUESTION given the cat passage: what a chain that retrieved it must return."""
    return llm.invoke(INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction=CAT_QUESTION, context=SUMMARY[1]))


def test_document_index_retriever(llm, index):
    result = retrieval_qa_chain(llm, index).invoke(CAT_QUESTION)
    assert result["answer"] == cat_answer(llm)
    [source] = result["sources"]
    assert source.page_content == SUMMARY[1]
    assert source.metadata["source"] == "notes/cat.txt" and source.metadata["chunk_id"] == source.id
    chain = retrieval_qa_chain(llm, index.as_retriever(k=2))
    assert [d.metadata["source"] for d in chain.invoke(CAT_QUESTION)["sources"]] == ["notes/cat.txt", "notes/paris.txt"]


def test_langchain_create_retrieval_chain_route(llm, index):
    from operator import itemgetter

    from langchain_classic.chains import create_retrieval_chain
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain
    from langchain_core.runnables import RunnablePassthrough

    answer_from_documents = RunnablePassthrough.assign(instruction=itemgetter("input")) | create_stuff_documents_chain(
        llm, INSTRUCTION_WITH_CONTEXT_PROMPT
    )
    chain = create_retrieval_chain(index, answer_from_documents)
    result = chain.invoke({"input": CAT_QUESTION})
    assert result["answer"] == cat_answer(llm)
    assert [d.metadata["source"] for d in result["context"]] == ["notes/cat.txt"]
    streamed = "".join(part.get("answer", "") for part in chain.stream({"input": CAT_QUESTION}))
    assert streamed == cat_answer(llm)
    # It stuffs every document whole: too many for the window and DollyLLM refuses instead of overflowing.
    long_docs = ListRetriever(documents=[doc(filler(70 + i, 80), f"s{i}", f"c{i}") for i in range(6)], queries=[])
    with pytest.raises(ValueError, match="window of 512"):
        create_retrieval_chain(long_docs, answer_from_documents).invoke({"input": SUMMARY[0]})
