"""Dolly's LangChain workflow on the embedded SmolLM2-135M-Instruct: LLMChain, LCEL, streaming and batching.

    python examples/langchain_chains.py
    python examples/langchain_chains.py --model databricks/dolly-v2-3b   # a real Dolly model, if you can reach it
"""

import argparse

from langchain_classic.chains import LLMChain

from dolly_langchain.chains import instruction_chain, instruction_with_context_chain
from dolly_langchain.llm import DollyLLM
from dolly_langchain.prompts import INSTRUCTION_PROMPT, INSTRUCTION_WITH_CONTEXT_PROMPT

CONTEXT = (
    "Databricks, Inc. is a global data, analytics and artificial intelligence company founded by the original "
    "creators of Apache Spark. In 2023 it released Dolly, an instruction-following language model trained on "
    "databricks-dolly-15k, a corpus of 15,000 records written by Databricks employees."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or directory (default: the embedded model)")
    args = parser.parse_args()
    llm = DollyLLM.from_model_id(args.model, do_sample=False, max_new_tokens=96)

    print("== LLMChain, instruction only (Dolly's model card)")
    print(LLMChain(llm=llm, prompt=INSTRUCTION_PROMPT).predict(instruction="Explain what an API is in two sentences."))

    print("\n== LLMChain, instruction with context")
    qa = LLMChain(llm=llm, prompt=INSTRUCTION_WITH_CONTEXT_PROMPT)
    print(qa.predict(instruction="What did Databricks release in 2023?", context=CONTEXT))

    print("\n== LCEL, streamed")
    for chunk in instruction_chain(llm).stream({"instruction": "Write a haiku about autumn."}):
        print(chunk, end="", flush=True)
    print()

    print("\n== LCEL, batched (one generate call)")
    answers = instruction_with_context_chain(llm).batch([
        {"instruction": "Who created Apache Spark?", "context": CONTEXT},
        {"instruction": "How many records does databricks-dolly-15k have?", "context": CONTEXT},
    ])
    for answer in answers:
        print("-", answer)


if __name__ == "__main__":
    main()
