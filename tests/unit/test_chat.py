"""ChatDolly: the chat model over the same engines, with Dolly-format folding and chat templates."""

import asyncio

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool

from conftest import MEMORIZED
from dolly_langchain.chat import ChatDolly
from dolly_langchain.codec import PromptCodec
from dolly_langchain.llm import DollyLLM
from dolly_langchain.prompts import format_prompt

FRANCE, COLOR, SUMMARY = MEMORIZED


@pytest.fixture(scope="module", params=["transformers", "ctranslate2", "llamacpp"])
def chat(request, memorized_neox_dir, ct2_cache):
    options = {"engine": request.param}
    if request.param == "ctranslate2":
        pytest.importorskip("ctranslate2")
        options["compute_type"] = "float32"
    if request.param == "llamacpp":
        pytest.importorskip("xllamacpp")
        options["compute_type"] = "f32"
    return ChatDolly.from_model_id(str(memorized_neox_dir), do_sample=False, max_new_tokens=40, **options)


def test_one_human_message_equals_the_llm(chat):
    message = chat.invoke([HumanMessage(FRANCE[0])])
    assert isinstance(message, AIMessage) and message.content == FRANCE[2]
    assert chat.invoke(COLOR[0]).content == COLOR[2]  # a plain string is one human message
    llm = DollyLLM(runtime=chat.runtime, do_sample=False, max_new_tokens=40)
    assert llm.invoke(FRANCE[0]) == message.content


def test_stream_batch_stop_and_callbacks(chat):
    tokens = []

    class Collect(BaseCallbackHandler):
        def on_llm_new_token(self, token, **kwargs):
            tokens.append(token)

    chunks = [c.content for c in chat.stream([HumanMessage(FRANCE[0])], config={"callbacks": [Collect()]})]
    assert len(chunks) > 1 and "".join(chunks) == FRANCE[2] and tokens == chunks
    assert [m.content for m in chat.batch([[HumanMessage(FRANCE[0])], [HumanMessage(COLOR[0])]])] == [FRANCE[2], COLOR[2]]
    assert chat.invoke([HumanMessage(FRANCE[0])], stop=[" capital"]).content == "Paris is the"

    async def run():
        answers = await chat.abatch([[HumanMessage(COLOR[0])], [HumanMessage(FRANCE[0])]])
        streamed = [c.content async for c in chat.astream([HumanMessage(COLOR[0])])]
        return [a.content for a in answers], "".join(streamed)

    assert asyncio.run(run()) == ([COLOR[2], FRANCE[2]], COLOR[2])


def test_lcel_with_chat_prompt_template(chat):
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = prompt | chat | StrOutputParser()
    assert chain.invoke({"question": FRANCE[0]}) == FRANCE[2]


def test_dolly_format_folds_history_into_the_context(dolly_tokenizer):
    codec = PromptCodec(dolly_tokenizer, "dolly")
    messages = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", FRANCE[0])]
    text = "".join(t for t, _ in codec.message_segments(messages))
    assert text == format_prompt(FRANCE[0], "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!")
    assert codec.message_segments([("user", FRANCE[0])]) == codec.prompt_segments(FRANCE[0])


def test_chat_template_renders_the_conversation(plain_tokenizer):
    import copy

    tok = copy.deepcopy(plain_tokenizer)  # keep the session fixture untouched
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    codec = PromptCodec(tok)
    assert codec.prompt_format == "chat"
    messages = [("system", "Be brief."), ("user", "Hi <|im_end|> there"), ("assistant", "Hello!"), ("user", "Bye")]
    text = "".join(t for t, _ in codec.message_segments(messages))
    assert text == tok.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                           add_generation_prompt=True)
    ids = codec.encode_messages(messages)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 4  # the template's own four turn ends; the one typed in a message is plain text


def test_logprobs_in_response_metadata(chat):
    message = chat.invoke([HumanMessage(FRANCE[0])], logprobs=True)
    content = message.response_metadata["logprobs"]["content"]
    assert "".join(t["token"] for t in content).strip() == FRANCE[2]
    assert all(t["logprob"] <= 0 for t in content)
    assert "logprobs" not in chat.invoke([HumanMessage(FRANCE[0])]).response_metadata


def test_no_tool_calling(chat):
    @tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    with pytest.raises(NotImplementedError, match="tool calling"):
        chat.bind_tools([add])
    with pytest.raises(ValueError, match="tool"):
        chat.invoke([HumanMessage("hi"), AIMessage("", tool_calls=[{"name": "add", "args": {}, "id": "1"}]),
                     ToolMessage("3", tool_call_id="1"), HumanMessage("so?")])


def test_bad_conversations_are_refused(chat):
    with pytest.raises(ValueError, match="last message must be a human message"):
        chat.invoke([HumanMessage(FRANCE[0]), AIMessage("Paris.")])
    with pytest.raises(ValueError, match="empty"):
        chat.invoke([SystemMessage("x"), HumanMessage("  ")])
    with pytest.raises(ValueError, match="reads text only"):
        chat.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "http://x"}}])])
    with pytest.raises(TypeError, match="unknown keyword"):
        chat.invoke(FRANCE[0], max_length=3)


def test_from_llm_shares_the_model_and_scheduler(memorized_neox_dir):
    llm = DollyLLM.from_model_id(str(memorized_neox_dir), engine="transformers", do_sample=False, max_new_tokens=40)
    chat = ChatDolly.from_llm(llm)
    assert chat.runtime is llm.runtime and chat.max_new_tokens == 40 and chat.do_sample is False
    assert chat._identifying_params["engine"] == "transformers"
    assert chat._get_ls_params()["ls_model_type"] == "chat"
    # it streams token by token (an explicit streaming=False copied from the LLM made LangChain fall back to invoke)
    assert len(list(chat.stream(FRANCE[0]))) > 2
    assert ChatDolly.from_llm(llm.model_copy(update={"streaming": True})).streaming is True


def test_an_empty_answer_streams_as_one_empty_chunk(chat):
    assert chat.invoke(FRANCE[0], stop=["Paris"]).content == ""
    chunks = list(chat.stream(FRANCE[0], stop=["Paris"]))  # LangChain refuses a stream without chunks
    assert chunks and "".join(c.content for c in chunks) == ""
