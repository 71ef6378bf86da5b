import pytest
from langchain_classic.chains import LLMChain

from conftest import MEMORIZED
from dolly_langchain.chains import instruction_chain, instruction_with_context_chain
from dolly_langchain.llm import DollyLLM
from dolly_langchain.pipeline import InstructionTextGenerationPipeline
from dolly_langchain.prompts import INSTRUCTION_PROMPT, INSTRUCTION_WITH_CONTEXT_PROMPT

FRANCE, COLOR, SUMMARY = MEMORIZED


@pytest.fixture(scope="module")
def llm(memorized_neox_dir):
    return DollyLLM.from_model_id(str(memorized_neox_dir), do_sample=False, max_new_tokens=40)


def test_lcel_chains(llm):
    assert instruction_chain(llm).invoke({"instruction": FRANCE[0]}) == FRANCE[2]
    chain = instruction_with_context_chain(llm)
    assert chain.invoke({"instruction": SUMMARY[0], "context": SUMMARY[1]}) == SUMMARY[2]
    assert chain.batch([{"instruction": SUMMARY[0], "context": SUMMARY[1]}] * 2) == [SUMMARY[2]] * 2
    assert "".join(instruction_chain(llm).stream({"instruction": COLOR[0]})) == COLOR[2]


def test_dollys_llmchain_route(llm):
    assert LLMChain(llm=llm, prompt=INSTRUCTION_PROMPT).predict(instruction=COLOR[0]) == COLOR[2]
    with_context = LLMChain(llm=llm, prompt=INSTRUCTION_WITH_CONTEXT_PROMPT)
    assert with_context.predict(instruction=SUMMARY[0], context=SUMMARY[1]) == SUMMARY[2]


def test_huggingface_pipeline_route_gives_only_the_response(llm):
    from langchain_huggingface import HuggingFacePipeline

    pipe = InstructionTextGenerationPipeline(
        model=llm.pipeline.model, tokenizer=llm.pipeline.tokenizer, return_full_text=False, do_sample=False,
        max_new_tokens=40,
    )
    hf = HuggingFacePipeline(pipeline=pipe)
    assert hf.invoke(FRANCE[0]) == FRANCE[2]
    chain = LLMChain(llm=hf, prompt=INSTRUCTION_WITH_CONTEXT_PROMPT)
    assert chain.predict(instruction=SUMMARY[0], context=SUMMARY[1]) == SUMMARY[2]
    assert hf.batch([FRANCE[0], COLOR[0]]) == [FRANCE[2], COLOR[2]]
