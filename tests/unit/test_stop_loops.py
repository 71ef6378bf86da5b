"""stop_loops: a response that repeats itself ends there, with decoding unchanged up to that point."""

import pytest

from dolly_langchain.codec import LOOP_MIN_TOKENS, repeats_itself
from dolly_langchain.llm import DollyLLM


@pytest.mark.parametrize("ids, loops", [
    ([1, 2, 3] * 3, True),                       # a 3-token run three times in a row
    ([9, 8] + [1, 2, 3] * 3, True),              # after other text
    ([1, 2, 3] * 2 + [1, 2], False),             # not three full copies yet
    ([1, 2, 3, 1, 2, 4, 1, 2, 3], False),        # not periodic
    ([7] * (LOOP_MIN_TOKENS - 1), False),        # "!!!!!!!": too short to call a loop
    ([7] * LOOP_MIN_TOKENS, True),
    ([5, 6] * 3, False),                         # 6 tokens of a 2-token run: a table rule, not yet a loop
    ([5, 6] * 4, True),
    (list(range(40)) * 2 + list(range(40)), False),  # a run longer than LOOP_MAX_PERIOD is not looked for
    (list(range(20)) * 3, True),
    ([], False),
])
def test_repeats_itself(ids, loops):
    assert repeats_itself(ids) is loops


def test_a_looping_answer_stops_and_is_the_same_up_to_there(tiny_neox_dir):
    llm = DollyLLM.from_model_id(str(tiny_neox_dir), engine="transformers", do_sample=False, max_new_tokens=96)
    prompt = "Tell me about the moon."
    free = llm.generate([prompt]).generations[0][0]
    stopped = llm.generate([prompt], stop_loops=True).generations[0][0]
    free_ids = llm.runtime.codec.tokenizer(free.text)["input_ids"]
    assert repeats_itself(free_ids) or free.generation_info["finish_reason"] == "length"  # random weights loop
    assert stopped.generation_info["usage_metadata"]["output_tokens"] < 96
    assert free.text.startswith(stopped.text)
    assert stopped.generation_info["finish_reason"] == "stop"
    assert "".join(llm.stream(prompt, stop_loops=True)) == stopped.text


@pytest.mark.parametrize("text, loops", [
    ("Player of the Year, College Player of the Year, and Player of the Year.", True),
    ("Player of the Year, College Player of the Year, and Player of the", False),   # "the" may still grow
    ("Player of the Year, College Player of the Year, and Player of the ", True),
    ("a game that is fun, a game that is", False),                                  # only twice
    ("One, two, three. Four, five, six. Seven.", False),
    ("", False),
])
def test_repeats_a_phrase(text, loops):
    from dolly_langchain.codec import repeats_a_phrase

    assert repeats_a_phrase(text) is loops
