"""The JSON grammar layer: masks, acceptance, end of value, schema sources and output checks, on the tiny trained
tokenizer and the real SmolLM2 tokenizer (from the embedded model's cached checkpoint, converted on first use). No
model weights are loaded."""

import json
import random
import sys
import threading
import time
import typing
from typing import Literal, Optional

import numpy as np
import pytest
from pydantic import BaseModel, Field
from typing_extensions import NotRequired, TypedDict

from dolly_langchain.errors import DollyValueError
from dolly_langchain.prompts import END_KEY
from dolly_langchain.structured import JsonGrammar, constraint_factory, json_schema_of, parse_output

# Every value is bounded (enum, integer range, short strings, item counts), so a random walk must end.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "birthday": {"type": "string", "format": "date"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "string", "maxLength": 5}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "verified": {"type": "boolean"},
    },
    "required": ["name", "birthday", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
ADA = {"name": "Ada", "birthday": "1815-12-10", "age": 36, "role": "admin", "tags": ["math", "poem"],
       "address": {"city": "London"}, "verified": True}
ALAN = {"name": "Alan", "birthday": "1912-06-23", "age": 41, "role": "user", "tags": ["code"],
        "address": {"city": "Wilmslow", "zip": "SK9"}}


def check_person(value):
    """PERSON's rules, written out by hand: an independent check of what the grammar let through."""
    assert set(value) <= set(PERSON["properties"]) and set(PERSON["required"]) <= set(value)
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    year, month, day = (int(part) for part in value["birthday"].split("-"))
    assert 1 <= month <= 12 and 1 <= day <= 31 and len(value["birthday"]) == 10
    assert type(value["age"]) is int and 0 <= value["age"] <= 150
    assert value["role"] in ("admin", "user", "guest")
    assert 1 <= len(value["tags"]) <= 3 and all(isinstance(t, str) and len(t) <= 4 for t in value["tags"])
    assert set(value["address"]) <= {"city", "zip"} and len(value["address"]["city"]) <= 8
    assert type(value.get("verified", True)) is bool


@pytest.fixture(scope="module")
def smollm2_tokenizer(embedded_checkpoint):
    """The embedded model's real tokenizer (49k tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_checkpoint)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def vocab(request, dolly_tokenizer):
    """(tokenizer, EOS ids): the tiny trained tokenizer ends rows on EOS and Dolly's ``### End``; SmolLM2 on
    ``<|im_end|>`` and ``<|endoftext|>``."""
    if request.param == "tiny":
        return dolly_tokenizer, [dolly_tokenizer.eos_token_id, dolly_tokenizer.convert_tokens_to_ids(END_KEY)]
    tokenizer = request.getfixturevalue("smollm2_tokenizer")
    return tokenizer, [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def rows(vocab, schema, vocab_size=None):
    tokenizer, eos = vocab
    grammar = schema if isinstance(schema, JsonGrammar) else JsonGrammar.from_schema(schema)
    return constraint_factory(grammar, tokenizer, vocab_size or len(tokenizer), eos)


def encode(vocab, text):
    return vocab[0].encode(text, add_special_tokens=False)


def follows(vocab, schema, text):
    """Whether the grammar takes every token of ``text`` and the value is then finished."""
    row = rows(vocab, schema)()
    return all(row.accept(token) for token in encode(vocab, text)) and row.finished


def test_walking_a_valid_document_is_allowed_and_ends_finished(vocab):
    tokenizer, eos = vocab
    special = set(tokenizer.all_special_ids)
    for value in (ADA, ALAN):
        row = rows(vocab, PERSON)()
        for token in encode(vocab, json.dumps(value)):
            mask = row.allowed_mask()
            assert mask.dtype == np.bool_ and mask.shape == (len(tokenizer),)
            assert mask[token] and row.is_allowed(token) and not row.finished
            assert not mask[sorted(special)].any(), "a special token is allowed inside the JSON"
            assert row.accept(token)
        assert row.finished
        assert sorted(np.flatnonzero(row.allowed_mask())) == sorted(eos)
        assert not row.is_allowed(encode(vocab, " ")[0])
        assert row.accept(eos[0]) and row.finished


def test_a_refused_token_leaves_the_state_unchanged(vocab):
    row = rows(vocab, PERSON)()
    prefix, rest = '{"name": "Ada", "birthday": "1815-12-10", "age": ', '36, "role": "admin"'
    assert all(row.accept(token) for token in encode(vocab, prefix))
    before = row.allowed_mask().copy()
    for wrong in ('"', "x", "-", " ", "}"):  # the age is an integer in 0..150 and comes next
        token = encode(vocab, wrong)[0]
        assert not row.is_allowed(token) and not before[token]
        assert not row.accept(token)
        assert np.array_equal(row.allowed_mask(), before)
    assert all(row.accept(token) for token in encode(vocab, rest))


def test_the_mask_agrees_with_is_allowed(vocab):
    tokenizer, _ = vocab
    rng = random.Random(0)
    row = rows(vocab, PERSON)()
    for step, token in enumerate(encode(vocab, json.dumps(ADA))):
        if step % 5 == 0:
            mask = row.allowed_mask()
            sample = rng.sample(range(len(tokenizer)), 150) + list(np.flatnonzero(mask)[:50])
            assert [row.is_allowed(int(i)) for i in sample] == [bool(mask[i]) for i in sample]
        row.accept(token)


def test_json_mode_accepts_any_object_and_only_objects(vocab):
    mode = JsonGrammar.json_mode()
    for value in ({}, {"a": [1, 2.5, None, True]}, {"nested": {"deep": {"list": [{"x": "ü\n\"q\""}]}}}):
        assert follows(vocab, mode, json.dumps(value)) and follows(vocab, mode, json.dumps(value, ensure_ascii=False))
    for text in ("[1, 2]", '"text"', "42", "null"):
        assert not follows(vocab, mode, text), text


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        ({"enum": ["red", "green"]}, ['"red"', '"green"'], ['"blue"', '"re"', '"redd"']),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
         ["[1, 2]", "[1, 2, 3]"], ["[1]", "[]", "[1, 2, 3, 4]"]),
        ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 10},
                                           "f": {"type": "number", "exclusiveMaximum": 1}}, "required": ["n", "f"]},
         ['{"n": 7, "f": 0.5}', '{"n": 10, "f": -3}'], ['{"n": 11, "f": 0.5}', '{"n": 0, "f": 0.5}',
                                                         '{"n": 5, "f": 1}', '{"n": 5.5, "f": 0}']),
        ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"],
          "additionalProperties": False}, ['{"a": 1}', '{"a": 1, "b": 2}'], ['{"b": 2}', '{"a": 1, "z": 2}']),
        ({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, ['"ABC-12"'], ['"abc-12"', '"ABC-123"']),
        # a schema that does not say (pydantic's, pydantic.v1's) gets only its declared keys, nested ones too
        ({"type": "object", "properties": {"setup": {"type": "string"}, "inner": {"$ref": "#/$defs/Inner"}},
          "required": ["setup"], "$defs": {"Inner": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
         ['{"setup": "a"}', '{"setup": "a", "inner": {"x": 1}}'],
         ['{"setup": "a", "other": "b"}', '{"setup": "a", "inner": {"x": 1, "y": 2}}']),
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
          "additionalProperties": True}, ['{"a": 1}', '{"a": 1, "z": 2}'], ['{"z": 2}']),
    ],
    ids=["enum", "min-max-items", "numeric-bounds", "optional-and-no-extra-properties", "pattern",
         "undeclared-keys-refused-by-default", "undeclared-keys-allowed-when-asked"],
)
def test_schema_rules_are_enforced(dolly_tokenizer, schema, good, bad):
    vocab = (dolly_tokenizer, [dolly_tokenizer.eos_token_id])
    for text in good:
        assert follows(vocab, schema, text), text
    for text in bad:
        assert not follows(vocab, schema, text), text


def test_whitespace_is_json_dumps_style_and_never_runs_on(dolly_tokenizer):
    vocab = (dolly_tokenizer, [dolly_tokenizer.eos_token_id])
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}
    assert follows(vocab, schema, '{"a": [1, 2]}')
    for text in ('{"a":[1,2]}', '{ "a": [1, 2]}', '{"a": [1,  2]}', '{"a":\n[1, 2]}', '{"a": [1, 2]}\n'):
        assert not follows(vocab, schema, text), repr(text)


def test_a_top_level_number_allows_eos_before_it_is_finished(dolly_tokenizer):
    eos = dolly_tokenizer.eos_token_id
    row = constraint_factory(JsonGrammar.from_schema({"type": "integer"}), dolly_tokenizer, len(dolly_tokenizer),
                             [eos])()
    assert not row.is_allowed(eos)  # nothing generated yet
    assert all(row.accept(token) for token in dolly_tokenizer.encode("12", add_special_tokens=False))
    assert not row.finished and row.is_allowed(eos) and row.allowed_mask()[eos]
    assert row.accept(eos) and row.finished


def test_ids_of_a_padded_embedding_are_never_allowed(vocab):
    tokenizer, _ = vocab
    width = len(tokenizer) + 17
    row = rows(vocab, JsonGrammar.json_mode(), vocab_size=width)()
    for token in encode(vocab, json.dumps({"k": [1, "v"]})):
        mask = row.allowed_mask()
        assert mask.shape == (width,) and not mask[len(tokenizer):].any()
        assert not row.is_allowed(len(tokenizer) + 3)
        assert row.accept(token)
    assert row.finished


def test_forced_tokens_are_the_text_the_grammar_fixes(vocab):
    tokenizer, _ = vocab
    row = rows(vocab, PERSON)()
    forced = row.forced_tokens()
    assert forced and '{"name": "'.startswith(tokenizer.decode(forced))
    assert all(row.accept(token) for token in forced)
    assert row.forced_tokens() == [] or not row.finished


def test_rows_are_independent_and_can_run_on_many_threads(vocab):
    new_row = rows(vocab, PERSON)
    results = []

    def walk(value):
        row = new_row()
        for token in encode(vocab, json.dumps(value)):
            row.allowed_mask()
            if not row.accept(token):
                results.append(False)
                return
        results.append(row.finished)

    threads = [threading.Thread(target=walk, args=((ADA, ALAN)[i % 2],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 6


def test_the_compiled_grammar_and_tokenizer_are_cached(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer  # building llguidance's view of its 49k tokens takes about a second
    grammar = JsonGrammar.from_schema(PERSON)
    constraint_factory(grammar, tokenizer, len(tokenizer), [2])
    start = time.perf_counter()
    constraint_factory(grammar, tokenizer, len(tokenizer), [2])()
    assert time.perf_counter() - start < 0.2


def test_random_walks_end_in_values_that_parse_and_validate(vocab):
    grammar = JsonGrammar.from_schema(PERSON)
    new_row = rows(vocab, grammar)
    for seed in range(6):
        rng = random.Random(seed)
        row, tokens = new_row(), []
        while not row.finished and len(tokens) < 200:
            token = int(rng.choice(np.flatnonzero(row.allowed_mask())))  # never EOS: the value is an object
            assert row.accept(token)
            tokens.append(token)
        assert row.finished, "every value of PERSON is bounded, so a walk must end"
        text = vocab[0].decode(tokens)
        check_person(json.loads(text))
        assert parse_output(text, grammar) == json.loads(text)


# Unbounded values a small model can run on forever: free strings and numbers, an array without maxItems, nested.
RAMBLING = {
    "type": "object",
    "properties": {
        "setup": {"type": "string"},
        "score": {"type": "number"},
        "details": {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}},
                                                      "count": {"type": "integer"}},
                    "required": ["notes", "count"]},
        "punchline": {"type": "string"},
    },
    "required": ["setup", "score", "details", "punchline"],
}


_CLOSING_TOKENS: dict = {}


def _closing_tokens(tokenizer, eos):
    key = (id(tokenizer), eos)
    if key not in _CLOSING_TOKENS:
        texts = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))  # byte-level forms keep '"}],' as is
        _CLOSING_TOKENS[key] = np.array([t in eos or any(c in text for c in '"}],') for t, text in enumerate(texts)])
    return _CLOSING_TOKENS[key]


def rambling_walk(vocab, grammar, budget, rng):
    """Generate under ``allowed_mask(tokens_left)`` as a model that never wants to stop would: it picks any allowed
    token that closes nothing (no quote, bracket, comma or EOS), while the grammar lets it. Returns (tokens, ended
    with EOS)."""
    tokenizer, eos = vocab
    closes = _closing_tokens(tokenizer, tuple(eos))
    row, tokens = rows(vocab, grammar)(), []
    while len(tokens) < budget:
        allowed = np.flatnonzero(row.allowed_mask(budget - len(tokens)))
        rambling = [int(t) for t in allowed if not closes[t]]
        token = rng.choice(rambling) if rambling and len(allowed) > 1 else int(allowed[0])
        if token in eos:
            assert row.is_allowed(token)
            return tokens, True
        assert row.accept(token)
        tokens.append(token)
    return tokens, False


@pytest.mark.parametrize("room", [0, 8, 30, 80])
def test_a_rambling_row_closes_its_value_within_the_budget(vocab, room):
    grammar = JsonGrammar.from_schema(RAMBLING)
    shortest = rows(vocab, grammar)().closing_length(limit=500)  # the shortest whole document and its EOS
    budget = shortest + room
    for seed in range(3):
        tokens, ended = rambling_walk(vocab, grammar, budget, random.Random(seed))
        assert ended and len(tokens) < budget, "the EOS must fit in the budget too"
        value = parse_output(vocab[0].decode(tokens), grammar)
        assert list(value) == ["setup", "score", "details", "punchline"] and isinstance(value["punchline"], str)


FORMATTED = {
    "type": "object",
    "properties": {"note": {"type": "string"}, "email": {"type": "string", "format": "email"},
                   "id": {"type": "string", "format": "uuid"}, "day": {"type": "string", "format": "date"}},
    "required": ["note", "email", "id", "day"],
}


@pytest.mark.parametrize("room", [0, 20])
def test_formatted_strings_close_within_the_budget(vocab, room):
    # A string whose format refuses the closing quote (an email needs "@") must still be closed by the policy,
    # not filled with the same token forever.
    grammar = JsonGrammar.from_schema(FORMATTED)
    shortest = rows(vocab, grammar)().closing_length(limit=500)
    assert shortest is not None
    tokens, ended = rambling_walk(vocab, grammar, shortest + room, random.Random(1))
    assert ended
    value = parse_output(vocab[0].decode(tokens), grammar)
    assert "@" in value["email"] and value["id"].count("-") == 4 and value["day"].count("-") == 2


def test_json_mode_closes_within_the_budget_too(vocab):
    grammar = JsonGrammar.json_mode()
    tokens, ended = rambling_walk(vocab, grammar, 30, random.Random(0))
    assert ended and isinstance(parse_output(vocab[0].decode(tokens), grammar), dict)


def test_rows_with_room_to_spare_are_never_steered(vocab):
    tokenizer, eos = vocab
    grammar = JsonGrammar.from_schema(PERSON)
    row = rows(vocab, grammar)()
    for token in encode(vocab, json.dumps(ADA)):
        free = row.allowed_mask()
        assert np.array_equal(row.allowed_mask(10_000), free)  # far from the end: the grammar's own mask
        assert row.accept(token)
    assert row.finished


def test_the_closing_length_counts_the_shortest_document_and_eos(vocab):
    grammar = JsonGrammar.from_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                       "required": ["a"]})
    row = rows(vocab, grammar)()
    shortest = row.closing_length(limit=100)
    assert shortest is not None and shortest >= 3  # at least {"a": 0} in some tokens, then EOS
    assert row.closing_length(limit=shortest - 1) is None
    for token in encode(vocab, '{"a": 12}'):
        assert row.accept(token)
    assert row.closing_length(limit=5) == 1  # finished: only the EOS is left


def test_random_walks_in_json_mode_end_in_objects(dolly_tokenizer):
    vocab = (dolly_tokenizer, [dolly_tokenizer.eos_token_id])
    new_row = rows(vocab, JsonGrammar.json_mode())
    for seed in range(6):
        rng = random.Random(seed)
        row, tokens = new_row(), []
        while not row.finished and len(tokens) < 200:
            token = int(rng.choice(np.flatnonzero(row.allowed_mask())))
            assert row.accept(token)
            tokens.append(token)
        if row.finished:
            assert isinstance(json.loads(dolly_tokenizer.decode(tokens)), dict)


class Address(BaseModel):
    city: str
    zip: Optional[str] = None


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)
    role: Literal["admin", "user"]
    address: Address


class Movie(TypedDict):
    title: str
    year: int
    rating: NotRequired[float]


def test_json_schema_of_pydantic_typeddict_and_dict():
    person = json_schema_of(Person)
    assert person["properties"]["age"] == {"maximum": 150, "minimum": 0, "title": "Age", "type": "integer"}
    assert "Address" in person["$defs"]
    movie = json_schema_of(Movie)
    assert movie["type"] == "object" and movie["required"] == ["title", "year"]
    schema = {"type": "array", "items": {"type": "integer"}}  # any top-level type is fine
    assert json_schema_of(schema) is schema


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="pydantic reads typing.TypedDict from Python 3.12 on")
def test_a_typing_typeddict_on_old_python_names_the_fix():
    class Old(typing.TypedDict):
        a: int

    with pytest.raises(DollyValueError, match="typing_extensions"):
        json_schema_of(Old)


@pytest.mark.parametrize(
    ("junk", "message"),
    [
        (42, "pass a pydantic BaseModel subclass, a TypedDict class or a JSON-schema dict"),
        ([{"type": "object"}], "list"),
        ("object", "str"),
        (dict, "type"),
        ({"name": "get_weather", "parameters": {"type": "object"}}, "'parameters' JSON schema"),
        ({"type": "function", "function": {"name": "f"}}, "tool/function"),
        ({"name": "x", "description": "no schema here"}, "is not a JSON schema"),
        ({}, "JSON mode"),
    ],
)
def test_json_schema_of_refuses_junk_with_the_fix(junk, message):
    with pytest.raises(DollyValueError, match=message):
        json_schema_of(junk)


def test_json_grammar_is_a_hashable_canonical_key():
    assert JsonGrammar.from_schema(Person) == JsonGrammar.from_schema(Person)
    assert hash(JsonGrammar.from_schema(Movie)) == hash(JsonGrammar.from_schema(Movie))
    assert JsonGrammar.from_schema(None) == JsonGrammar.json_mode() and JsonGrammar.json_mode().schema is None
    grammar = JsonGrammar.from_schema(PERSON)
    assert grammar.schema == PERSON and " " not in grammar.schema_json.replace("maxLength", "")
    assert list(grammar.schema["properties"]) == list(PERSON["properties"])  # key order is generation order


def test_schemas_the_grammar_cannot_enforce_are_refused_early():
    with pytest.raises(DollyValueError, match="uniqueItems"):
        JsonGrammar.from_schema({"type": "array", "uniqueItems": True, "title": "Tags"})
    with pytest.raises(DollyValueError, match="Unknown format"):
        JsonGrammar.from_schema({"type": "string", "format": "no-such-format"})
    with pytest.raises(DollyValueError, match="plain JSON data"):
        JsonGrammar.from_schema({"type": "number", "maximum": float("nan")})


def test_constraint_factory_refuses_impossible_settings(dolly_tokenizer):
    grammar = JsonGrammar.json_mode()
    with pytest.raises(DollyValueError, match="EOS"):
        constraint_factory(grammar, dolly_tokenizer, len(dolly_tokenizer), [])
    with pytest.raises(DollyValueError, match="config.vocab_size"):
        constraint_factory(grammar, dolly_tokenizer, len(dolly_tokenizer) - 1, [0])
    with pytest.raises(DollyValueError, match="outside the vocabulary"):
        constraint_factory(grammar, dolly_tokenizer, len(dolly_tokenizer), [len(dolly_tokenizer)])


def test_parse_output_returns_the_value_and_names_what_is_wrong():
    grammar = JsonGrammar.from_schema(PERSON)
    assert parse_output(json.dumps(ADA), grammar) == ADA
    assert parse_output(json.dumps(ALAN, indent=2), grammar) == ALAN  # whitespace does not matter here
    with pytest.raises(DollyValueError, match="not valid JSON .*max_new_tokens"):
        parse_output('{"name": "Ada", "birth', grammar)
    with pytest.raises(DollyValueError, match="not valid JSON"):
        parse_output("", grammar)
    for wrong in ({**ADA, "age": 151}, {**ADA, "role": "root"}, {**ADA, "tags": []}, {**ADA, "extra": 1},
                  {k: v for k, v in ADA.items() if k != "address"}):
        with pytest.raises(DollyValueError, match="does not match the JSON schema at character"):
            parse_output(json.dumps(wrong), grammar)
    with pytest.raises(DollyValueError, match="does not match any JSON object"):
        parse_output("[1, 2]", JsonGrammar.json_mode())
    assert parse_output('{"x":\n [1, {"y": null}]}', JsonGrammar.json_mode()) == {"x": [1, {"y": None}]}
