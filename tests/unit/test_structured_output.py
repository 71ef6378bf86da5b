"""Structured output through the LangChain classes (issue 17, item 4): ``with_structured_output`` and
``response_format`` decode under a grammar on both engines (CTranslate2 routes constrained calls to transformers),
so even a tiny random model's output parses and validates; the embedded model's anti-loop defaults (item 7)."""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import AIMessage
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from dolly_langchain.chat import ChatDolly
from dolly_langchain.errors import DollyValueError
from dolly_langchain.generation import ANSWER_DEFAULTS, STRUCTURED_DEFAULTS
from dolly_langchain.llm import DollyLLM
from dolly_langchain.structured import JsonGrammar, parse_output

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


class Point(TypedDict):
    x: int
    y: int


@pytest.fixture(scope="module", params=["transformers", "ctranslate2", "llamacpp"])
def chat(request, tiny_neox_dir, ct2_cache):
    """A tiny *random* model: left free it writes noise, so only the grammar can make its output valid JSON."""
    options = {"engine": request.param}
    if request.param == "ctranslate2":
        pytest.importorskip("ctranslate2")
        options["compute_type"] = "float32"
    if request.param == "llamacpp":
        pytest.importorskip("xllamacpp")
        options["compute_type"] = "f32"
    return ChatDolly.from_model_id(str(tiny_neox_dir), temperature=0, max_new_tokens=120, **options)


def _valid(value: dict) -> bool:
    return (set(value) == {"name", "age", "color", "tags"} and isinstance(value["name"], str)
            and len(value["name"]) <= 12 and isinstance(value["age"], int) and 0 <= value["age"] <= 120
            and value["color"] in ("red", "green", "blue") and 1 <= len(value["tags"]) <= 2)


def test_json_schema_output_always_validates(chat):
    free = chat.invoke("Describe a person.").content
    with pytest.raises(ValueError):
        json.loads(free)  # the random model's own text is not JSON
    structured = chat.with_structured_output(SCHEMA)
    for prompt in ("Describe a person.", "Another one, please.", "x"):
        assert _valid(structured.invoke(prompt))
    person = chat.with_structured_output(Person).invoke("Who?")
    assert isinstance(person, Person)
    point = chat.with_structured_output(Point).invoke("Where?")
    assert set(point) == {"x", "y"} and all(isinstance(v, int) for v in point.values())


def test_json_mode_include_raw_batch_and_stream(chat):
    # json_mode with a schema enforces it too (a random model's unbounded strings would never end otherwise).
    raw = chat.with_structured_output(SCHEMA, method="json_mode", include_raw=True).invoke("Any JSON object.")
    assert isinstance(raw["raw"], AIMessage) and raw["parsing_error"] is None
    assert _valid(raw["parsed"]) and json.loads(raw["raw"].content) == raw["parsed"]
    assert raw["raw"].usage_metadata["output_tokens"] > 0
    # Without a schema: a JSON object, as far as max_tokens lets it go.
    anything = chat.with_structured_output(None, method="json_mode", include_raw=True).invoke("JSON.")
    assert anything["raw"].content.startswith("{")
    if anything["raw"].response_metadata["finish_reason"] == "stop":
        assert isinstance(anything["parsed"], dict)
    else:
        assert anything["parsing_error"] is not None
    structured = chat.with_structured_output(SCHEMA)
    assert all(_valid(v) for v in structured.batch(["a", "b", "c"]))
    chunks = list(structured.stream("Describe a person."))
    assert chunks and _valid(chunks[-1])


def test_response_format_on_the_llm_and_chat(chat):
    grammar = JsonGrammar.from_schema(SCHEMA)
    llm = DollyLLM(runtime=chat.runtime, temperature=0, max_new_tokens=120)
    text = llm.invoke("Describe a person.", response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    assert _valid(parse_output(text, grammar))
    assert llm.bind(response_format={"type": "json_object"}).invoke("JSON.").startswith("{")
    message = chat.invoke("Describe.", response_format=grammar)
    assert _valid(json.loads(message.content))
    with pytest.raises(DollyValueError, match="response_format"):
        llm.invoke("x", response_format={"type": "xml"})


def test_a_cut_response_is_reported_as_a_parsing_error(chat):
    tight = ChatDolly(runtime=chat.runtime, temperature=0, max_tokens=3)
    short = tight.with_structured_output(SCHEMA, include_raw=True).invoke("Describe.")
    assert short["parsed"] is None and short["parsing_error"] is not None
    assert short["raw"].response_metadata["finish_reason"] == "length"


def test_bad_schemas_and_methods_are_clear_errors(chat):
    with pytest.raises(DollyValueError):
        chat.with_structured_output(42)
    with pytest.raises(DollyValueError, match="method"):
        chat.with_structured_output(SCHEMA, method="xml")
    assert _valid(chat.with_structured_output(SCHEMA, method="function_calling").invoke("Who?"))
    with pytest.raises(DollyValueError, match="json_mode"):
        chat.with_structured_output(None)
    with pytest.raises(TypeError, match="unknown"):
        chat.with_structured_output(SCHEMA, tools=[])


def test_ctranslate2_runs_constrained_calls_on_transformers(chat):
    scheduler = chat.runtime.grammar_scheduler()
    if chat.engine in ("ctranslate2", "llamacpp"):  # neither can mask logits per step from Python
        assert scheduler is not chat.runtime.scheduler and scheduler.engine.name == "transformers"
    else:
        assert scheduler is chat.runtime.scheduler


# -- the embedded model's anti-loop defaults --------------------------------------------------------------------------


def test_embedded_model_defaults_to_answer_defaults_without_loading():
    chat = ChatDolly(temperature=0)
    options = chat._sampling({})
    assert chat.given_runtime is None  # resolving the defaults did not load the model
    assert options.repetition_penalty == ANSWER_DEFAULTS["repetition_penalty"]
    assert options.no_repeat_ngram_size == ANSWER_DEFAULTS["no_repeat_ngram_size"]
    assert options.stop_loops is ANSWER_DEFAULTS["stop_loops"] is True
    assert chat._sampling({"stop_loops": False}).stop_loops is False
    assert chat._sampling({"response_format": {"type": "json_object"}}).stop_loops is False  # never cut a JSON value
    assert chat._sampling({"repetition_penalty": 1, "no_repeat_ngram_size": 0}).repetition_penalty == 1
    assert chat._sampling({"response_format": {"type": "json_object"}}).repetition_penalty == (
        STRUCTURED_DEFAULTS["repetition_penalty"])
    assert ChatDolly(temperature=0, repetition_penalty=1.0)._sampling({}).repetition_penalty == 1.0


def test_other_models_keep_penalties_off(chat):
    named = ChatDolly(model="some/other-model")
    assert named._sampling({}).repetition_penalty == 1.0 and named._sampling({}).no_repeat_ngram_size == 0
    assert named._sampling({}).stop_loops is False
    assert chat._sampling({}).repetition_penalty == 1.0
