"""Structured output measured: does constrained decoding always validate, what does it cost, and how does the bare
model do without it?

    python benchmarks/structured.py                         # 34 schemas, embedded SmolLM2, transformers, greedy
    python benchmarks/structured.py --schemas 5 --contrast-schemas 2      # a quick look
    python benchmarks/structured.py --repetition-penalty 1.0            # the embedded model's penalty off

Prints one JSON object; progress goes to stderr. The whole run takes about 27 minutes on a 2-core CPU shared with
other work (about 5 tokens/s on transformers, one thread); the free answers, most of them cut at ``--max-tokens``,
take more than half of it.

:data:`SCHEMAS` holds 34 JSON schemas with a natural prompt each (30 JSON-schema dicts, 4 pydantic models): nested
objects, arrays with minItems/maxItems, enums, optional fields, bounded integers and numbers, string formats (date,
email, uuid), booleans, arrays of objects, pattern, maxLength, additionalProperties false, pydantic's ``$ref``/
``anyOf`` for nested and optional fields. Each compiles (:meth:`JsonGrammar.from_schema`) before anything runs.

The model is ``ChatDolly(model=None, engine=--engine, temperature=0, max_tokens=--max-tokens)``: the embedded
SmolLM2-135M-Instruct, greedy. Every prompt is the same two messages in every mode: a system message asking for
JSON only, and the task followed by the schema's JSON text. Per schema, one call at a time, warm (one warm-up call
per mode first, not counted), in this order:

- ``constrained``: ``chat.with_structured_output(schema, include_raw=True)`` (the grammar of
  :mod:`dolly_langchain.structured`); the raw ``AIMessage`` gives ``usage_metadata["output_tokens"]`` and
  ``response_metadata["finish_reason"]``. Its text is checked twice: ``parse_output(text, grammar)`` (llguidance,
  the same grammar that constrained it: ``parse_ok``) and an independent validator (``jsonschema`` when importable,
  else :func:`validate`, written here for the keywords used: ``valid``); a pydantic schema must also come back as
  an instance (``parsed_ok``). A response cut by ``--max-tokens`` (finish_reason ``length``) cannot parse; those
  are listed apart (``cut_by_length``).
- ``free``: ``chat.invoke`` with the same messages and no grammar. ``json_parses``: the text, stripped and with
  a surrounding ``` fence removed, is one JSON value; ``valid``: that value passes the independent validator (the
  bare model's validity). ``prefix_*``: the same for the first JSON value in the text, with any prose after it
  ignored (a looser reading: what a forgiving parser would salvage).
- ``free_matched``: ``chat.invoke`` with no grammar and ``max_tokens`` = the constrained answer's generated tokens +
  1 (its end token), so it runs as many decoding steps as the constrained call did on the same prompt: the grammar's
  cost per step, without the per-call prefill spread over answers of different lengths.

Tokens/s = total ``output_tokens`` / total wall seconds of the timed invokes (``usage_metadata`` does not count the
end token; ``steps_per_s`` counts it for answers that ended on it, as ``benchmarks/generation.py`` does). Targets:
constrained ``valid_share`` = 1.0 and ``constrained_cost`` = 1 - constrained tokens/s / free tokens/s <= 0.20.
``constrained_cost_matched`` is the same from ``free_matched``, per decoding step.

``default_engine``: the same for the first ``--contrast-schemas`` schemas with ``engine=None`` (CTranslate2 int8 for
free text; constrained calls go to a transformers copy of the same checkpoint, ``DollyRuntime.grammar_scheduler``),
and how many constrained answers equal those of the main engine (greedy on the same fp32 weights: all should).

Threads: torch runs on as many threads as the CTranslate2 engine does by default (half the CPUs, see
``ctranslate2_engine.default_intra_threads``), so the two engines are compared at equal threads; ``--torch-threads
0`` keeps torch's own default (one per core), which on a 2-core CPU that other processes also keep busy ran about 4x
slower than one thread (1.4-1.7 against 5.0-5.5 tokens/s for SmolLM2-135M, threads waiting on each other).
The embedded model decodes structured output with ``repetition_penalty`` 1.2 by default
(``generation.STRUCTURED_DEFAULTS``), in every mode here; it also penalises the prompt's tokens, values to copy and
the schema's punctuation included (``--repetition-penalty 1.0`` turns it off). Measured: with 1.2, names in the task
come out as ``"<NAME>"``; two schemas' numbers never ended (``0.52389746888...``, ``9999...``) until the grammar
learned to close a value within ``max_tokens`` (:mod:`dolly_langchain.structured`), and now end in valid JSON.
Schemas and prompts are defined here; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import time
import uuid as uuid_module
from collections import Counter
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

SYSTEM = "You are a helpful assistant. You answer with a single JSON object and nothing else."


def _obj(properties: dict, required: list[str] | None = None, **extra: Any) -> dict:
    """An object schema; every property required unless ``required`` says otherwise; no other properties."""
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, "additionalProperties": False, **extra}


STR = {"type": "string"}  # unbounded: only the model (and max_tokens) ends it
SHORT = {"type": "string", "maxLength": 60}
BOOL = {"type": "boolean"}
DATE = {"type": "string", "format": "date"}
EMAIL = {"type": "string", "format": "email"}
UUID = {"type": "string", "format": "uuid"}


def _int(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _num(lo: float, hi: float) -> dict:
    return {"type": "number", "minimum": lo, "maximum": hi}


def _arr(items: dict, lo: int, hi: int) -> dict:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


def _enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


# -- pydantic models: the with_structured_output(BaseModel) path ($defs/$ref, anyOf with null, Literal enums) ------

class Pet(BaseModel):
    name: str
    species: Literal["dog", "cat", "rabbit", "bird"]
    age_years: int = Field(ge=0, le=30)
    vaccinated: bool


class Location(BaseModel):
    city: str = Field(max_length=40)
    country: str = Field(max_length=40)


class StaffMember(BaseModel):
    name: str = Field(max_length=40)
    role: str = Field(max_length=40)


class Company(BaseModel):
    name: str = Field(max_length=40)
    founded: int = Field(ge=1800, le=2025)
    headquarters: Location
    people: list[StaffMember] = Field(min_length=1, max_length=3)


class Review(BaseModel):
    product: str = Field(max_length=40)
    stars: int = Field(ge=1, le=5)
    summary: str = Field(max_length=60)
    would_buy: Optional[bool] = None


class Registration(BaseModel):
    full_name: str
    event_date: datetime.date
    ticket: uuid_module.UUID
    guests: int = Field(ge=0, le=4)


#: (name, schema: a JSON-schema dict or a pydantic model, task text). The schema's JSON follows the task in the prompt.
SCHEMAS: list[tuple[str, Any, str]] = [
    ("person_name_age", _obj({"name": STR, "age": _int(0, 130)}),
     "Extract the person's name and age from: 'Maria Lopez turned 34 last week.'"),
    ("city", _obj({"name": STR, "country": STR, "population": {"type": "integer", "minimum": 0},
                   "is_capital": BOOL}),
     "Describe the city of Paris as JSON: its name, country, approximate population and whether it is a capital."),
    ("book", _obj({"title": STR, "author": STR, "year": _int(1400, 2030), "genres": _arr(SHORT, 1, 3)}),
     "Extract the book from: 'Pride and Prejudice, a romance novel by Jane Austen, was published in 1813.'"),
    ("sentiment", _obj({"sentiment": _enum("positive", "negative", "neutral"), "confidence": _num(0, 1)}),
     "Classify the sentiment of this review: 'The battery died after two days and support never answered.'"),
    ("event_date", _obj({"event": STR, "date": DATE, "venue": STR}),
     "Extract the event from: 'The Spring Jazz Night takes place on 2024-04-12 at the Blue Room.'"),
    ("contact_email", _obj({"name": STR, "email": EMAIL, "phone": SHORT}, required=["name", "email"]),
     "Extract the contact from: 'You can reach John Smith at john.smith@example.com.'"),
    ("order_uuid", _obj({"order_id": UUID, "item": STR, "quantity": _int(1, 100)}),
     "Extract the order from: 'Order 3f2b9c1e-8a7d-4e2f-9b1a-0c5d6e7f8a9b: 12 blue mugs.'"),
    ("address_nested", _obj({"name": SHORT, "address": _obj({"street": STR, "city": STR,
                                                             "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
     "Extract the recipient and address from: 'Ship to Ann Lee, 12 Oak Street, Springfield 62704.'"),
    ("shopping_list", _obj({"items": _arr(_obj({"name": STR, "quantity": _int(1, 20)}), 1, 5)}),
     "Make a shopping list from: 'We need 2 loaves of bread, 6 eggs and 1 bag of rice.'"),
    ("weather", _obj({"city": STR, "temperature_c": _num(-60, 60), "condition": _enum("sunny", "cloudy", "rain",
                                                                                         "snow"), "windy": BOOL}),
     "Extract the weather report from: 'Oslo: 3 degrees Celsius, heavy snow, strong winds.'"),
    ("movie_rating", _obj({"title": STR, "rating": _int(1, 10), "recommend": BOOL}),
     "Rate the movie 'The Matrix' from 1 to 10 and say whether you recommend it."),
    ("recipe", _obj({"dish": STR, "ingredients": _arr(SHORT, 2, 6), "minutes": _int(1, 300)}),
     "Give a simple recipe for pancakes: the dish, its main ingredients and the cooking time in minutes."),
    ("product_sku", _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                          "price": {"type": "number", "minimum": 0}, "in_stock": BOOL}),
     "Extract the product from: 'Product ABC-1234 costs 19.99 dollars and is in stock.'"),
    ("meeting", _obj({"title": STR, "date": DATE, "attendees": _arr(EMAIL, 1, 4)}),
     "Extract the meeting from: 'Budget review on 2024-05-03 with ann@corp.com and bob@corp.com.'"),
    ("palette", _obj({"colors": _arr(_enum("red", "orange", "yellow", "green", "blue", "purple", "black",
                                           "white"), 3, 3)}),
     "Pick three colors for a beach-themed poster."),
    ("arithmetic", _obj({"question": STR, "answer": {"type": "integer"}}),
     "What is 7 times 8?"),
    ("yes_no", _obj({"answer": BOOL, "reason": SHORT}),
     "Is the Pacific the largest ocean on Earth?"),
    ("employee_optional", _obj({"name": STR, "department": _enum("sales", "engineering", "finance", "hr"),
                                "start_date": DATE, "manager": _obj({"name": SHORT})},
                               required=["name", "department", "start_date"]),
     "Extract the employee from: 'Tom Reed joined engineering on 2023-09-01.'"),
    ("country", _obj({"name": STR, "capital": STR,
                      "continent": _enum("Africa", "Antarctica", "Asia", "Europe", "North America", "Oceania",
                                         "South America"),
                      "languages": _arr(SHORT, 1, 3)}),
     "Describe the country Japan: its name, capital, continent and main languages."),
    ("translation", _obj({"target_language": _enum("Spanish", "French", "German", "Italian"), "source": STR,
                          "translation": STR}),
     "Translate 'good morning' into Spanish."),
    ("bug_report", _obj({"title": SHORT, "severity": _enum("low", "medium", "high", "critical"),
                         "steps": _arr(SHORT, 1, 4), "reproducible": BOOL}),
     "Write a bug report from: 'The app crashes every time I tap Save on the settings page.'"),
    ("coordinates", _obj({"place": STR, "latitude": _num(-90, 90), "longitude": _num(-180, 180)}),
     "Give the coordinates of the Eiffel Tower in Paris."),
    ("user_profile", _obj({"username": {"type": "string", "pattern": "^[a-z0-9_]{3,16}$"}, "email": EMAIL,
                           "age": _int(13, 120)}, required=["username", "email"]),
     "Create a user profile for: 'username jdoe_42, email jdoe@mail.com, 29 years old.'"),
    ("invoice", _obj({"invoice_id": UUID, "lines": _arr(_obj({"description": SHORT,
                                                              "amount": {"type": "number", "minimum": 0}}), 1, 3),
                      "total": {"type": "number", "minimum": 0}}),
     "Extract the invoice from: 'Invoice 9b2e4c6a-1d3f-4a5b-8c7d-2e4f6a8b0c1d: design work 300, hosting 50; "
     "total 350.'"),
    ("keywords", _obj({"keywords": _arr(SHORT, 3, 5)}),
     "Give keywords for this text: 'Solar panels turn sunlight into electricity for homes and offices.'"),
    ("flight", _obj({"flight": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2,4}$"}, "date": DATE,
                     "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                     "destination": {"type": "string", "pattern": "^[A-Z]{3}$"}}),
     "Extract the flight from: 'Flight LH400 from FRA to JFK on 2024-07-19.'"),
    ("animal", _obj({"name": STR, "class": _enum("mammal", "bird", "fish", "reptile", "amphibian", "insect"),
                     "legs": _int(0, 8), "can_fly": BOOL}),
     "Describe a penguin: its name, animal class, number of legs and whether it can fly."),
    ("todo_list", _obj({"tasks": _arr(_obj({"task": STR, "done": BOOL,
                                            "priority": _enum("low", "medium", "high")}), 1, 4)}),
     "Make a to-do list from: 'Pay rent (urgent, not done), water plants (done), call mom (not done).'"),
    ("quiz", _obj({"question": STR, "options": _arr(SHORT, 4, 4), "correct_index": _int(0, 3)}),
     "Write a multiple-choice question about the capital of Italy with four options."),
    ("server_config", _obj({"host": STR, "port": _int(1, 65535), "tls": BOOL, "tags": _arr(SHORT, 0, 3)},
                           required=["host", "port", "tls"]),
     "Write the config from: 'Serve on api.example.com port 8443 with TLS enabled.'"),
    ("pet_pydantic", Pet,
     "Extract the pet from: 'Bella is a 3-year-old dog, fully vaccinated.'"),
    ("company_pydantic", Company,
     "Extract the company from: 'Acme Corp was founded in 1948 in Chicago, USA. Jane Roe is its CEO.'"),
    ("review_pydantic", Review,
     "Summarize this review: 'The X200 headphones sound great but the ear pads are thin. 4 stars.'"),
    ("registration_pydantic", Registration,
     "Extract the registration from: 'Lena Park booked ticket 5d1c2b3a-4e5f-4a6b-9c8d-7e6f5a4b3c2d for 2024-10-05 "
     "with 2 guests.'"),
]


def schema_dict(schema: Any) -> dict:
    return schema.model_json_schema() if isinstance(schema, type) else schema


def messages_for(schema: Any, task: str) -> list:
    from langchain_core.messages import HumanMessage, SystemMessage

    text = (f"{task}\n\nAnswer with only a JSON object that matches this JSON schema:\n"
            f"{json.dumps(schema_dict(schema))}")
    return [SystemMessage(SYSTEM), HumanMessage(text)]


# -- the independent validator ---------------------------------------------------------------------------------

# Keywords that only annotate; everything else not handled below is reported as unchecked, never silently passed.
_ANNOTATIONS = {"title", "description", "default", "examples", "$defs", "definitions", "$schema", "$id"}
_HANDLED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
            "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
            "pattern", "format", "anyOf", "oneOf", "allOf", "$ref"}
_FORMATS = {
    # RFC 3339 full-date: the shape, then a real calendar day (checked below).
    "date": re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
    # RFC 5321's Mailbox syntax: a dot-atom or quoted local part; a domain of labels (a dotless one is legal) or an
    # address literal in brackets.
    "email": re.compile(r"""([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*|"([^"\\]|\\.)*")"""
                        r"@([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
                        r"|\[[^\[\]\s]+\])"),
    "uuid": re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"),
}


def _is_calendar_date(text: str) -> bool:
    """RFC 3339 full-date: a month 01-12 and a day that month has (February 29 in leap years only); any year
    0000-9999 (``datetime.date`` would refuse year 0)."""
    year, month, day = (int(part) for part in text.split("-"))
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days = [31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    return 1 <= month <= 12 and 1 <= day <= days[month - 1]


def _is_type(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind == "integer":  # JSON Schema: a number with no fractional part (1.0 too); never a boolean
        return not isinstance(value, bool) and (isinstance(value, int)
                                                or (isinstance(value, float) and value.is_integer()))
    if kind == "number":
        return not isinstance(value, bool) and isinstance(value, (int, float))
    raise ValueError(f"unknown type {kind!r}")


def validate(value: Any, schema: dict, root: dict | None = None, path: str = "$",
             unchecked: set | None = None) -> list[str]:
    """Errors of ``value`` against ``schema`` (empty: valid), for the keywords :data:`SCHEMAS` use. Patterns are
    searched as JSON Schema says (unanchored; the patterns here are all anchored with ^...$, so this is a full
    match). Keywords it does not implement are added to ``unchecked``."""
    root = schema if root is None else root
    unchecked = set() if unchecked is None else unchecked
    errors: list[str] = []
    for key in schema:
        if key not in _HANDLED and key not in _ANNOTATIONS:
            unchecked.add(key)
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            unchecked.add(f"$ref {ref}")
            return errors
        target = root
        for part in ref[2:].split("/"):
            target = target[part]
        errors += validate(value, target, root, path, unchecked)
    if "allOf" in schema:
        for sub in schema["allOf"]:
            errors += validate(value, sub, root, path, unchecked)
    if "anyOf" in schema:
        if not any(not validate(value, sub, root, path, unchecked) for sub in schema["anyOf"]):
            errors.append(f"{path}: matches none of anyOf")
    if "oneOf" in schema:
        matching = sum(not validate(value, sub, root, path, unchecked) for sub in schema["oneOf"])
        if matching != 1:
            errors.append(f"{path}: matches {matching} of oneOf, not 1")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} is not the const {schema['const']!r}")
    if "enum" in schema and not any(value == option and type(value) is type(option) for option in schema["enum"]):
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, kind) for kind in kinds):
            return errors + [f"{path}: {type(value).__name__} {value!r:.40} is not of type {schema['type']}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {value} <= exclusiveMinimum {schema['exclusiveMinimum']}")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            errors.append(f"{path}: {value} >= exclusiveMaximum {schema['exclusiveMaximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: length {len(value)} < minLength {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: length {len(value)} > maxLength {schema['maxLength']}")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            errors.append(f"{path}: {value!r} does not match {schema['pattern']!r}")
        if "format" in schema:
            kind = schema["format"]
            if kind not in _FORMATS:
                unchecked.add(f"format {kind}")
            elif not _FORMATS[kind].fullmatch(value):
                errors.append(f"{path}: {value!r} is not a {kind}")
            elif kind == "date" and not _is_calendar_date(value):
                errors.append(f"{path}: {value!r} is not a calendar date")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{path}: {len(value)} items < minItems {schema['minItems']}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: {len(value)} items > maxItems {schema['maxItems']}")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                errors += validate(item, schema["items"], root, f"{path}[{i}]", unchecked)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: missing required {name!r}")
        for name, item in value.items():
            if name in properties:
                errors += validate(item, properties[name], root, f"{path}.{name}", unchecked)
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: property {name!r} not allowed")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(item, schema["additionalProperties"], root, f"{path}.{name}", unchecked)
    return errors


def independent_validator():
    """(name, check): ``check(value, schema)`` gives a list of errors; ``jsonschema`` when importable."""
    try:
        import jsonschema
    except ImportError:
        unchecked: set = set()
        return "benchmarks/structured.py validate()", lambda value, schema: validate(value, schema, None, "$",
                                                                                    unchecked), unchecked
    cls = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    checker = cls.FORMAT_CHECKER

    def check(value, schema):
        errors = [e.message for e in cls(schema, format_checker=checker).iter_errors(value)]
        # jsonschema checks email only for an "@" and date/uuid only with extra packages: this file's checks too.
        return errors + [e for e in validate(value, schema) if " is not a " in e]

    from importlib.metadata import version

    return f"jsonschema {version('jsonschema')} (+ this file's date/email/uuid checks)", check, set()


# -- free text: what a caller without a grammar would parse -------------------------------------------------------

_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.S)


def strip_fences(text: str) -> str:
    text = text.strip()
    match = _FENCE.match(text)
    return match.group(1).strip() if match else text


def first_json_value(text: str) -> tuple[bool, Any]:
    """The first JSON object or array in ``text`` (prose after it ignored), if one parses."""
    match = re.search(r"```[A-Za-z0-9_-]*\s*\n(.*?)```", text, re.S)  # a fenced block anywhere
    candidates = [match.group(1)] if match else []
    candidates.append(text)
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start in (i for i, ch in enumerate(candidate) if ch in "{["):
            try:
                return True, decoder.raw_decode(candidate, start)[0]
            except json.JSONDecodeError:
                continue
    return False, None


# -- running -----------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemas", type=int, default=len(SCHEMAS), help=f"first N schemas (of {len(SCHEMAS)})")
    parser.add_argument("--engine", default="transformers", help="engine of the main measurement (default: "
                        "transformers, where the grammar runs inside generation)")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--contrast-schemas", type=int, default=8,
                        help="first N schemas also run on the default engine (engine=None); 0 skips")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads; default: the CTranslate2 engine's CPU default (half the CPUs), "
                        "so both engines run on as many threads; 0: torch's own default (one per core)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="ChatDolly's repetition_penalty (default: the library's for the embedded model)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None,
                        help="ChatDolly's no_repeat_ngram_size (default: the library's for the embedded model)")
    parser.add_argument("--free-decoding", choices=("same", "library"), default="same",
                        help="'same': free calls decode with the constrained calls' options, so the grammar is the "
                        "only difference (default); 'library': with the library's defaults for a call without one")
    args = parser.parse_args(argv)
    args.schemas = max(1, min(args.schemas, len(SCHEMAS)))
    args.contrast_schemas = max(0, min(args.contrast_schemas, args.schemas))
    return args


def log(message: str) -> None:
    print(f"structured benchmark: {message}", file=sys.stderr, flush=True)


def timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def tokens_of(message) -> tuple[int, str]:
    return message.usage_metadata["output_tokens"], message.response_metadata.get("finish_reason")


def run_constrained(chat, schema, messages, check) -> dict:
    from dolly_langchain.errors import DollyValueError
    from dolly_langchain.structured import JsonGrammar, parse_output

    grammar = JsonGrammar.from_schema(schema)
    runnable = chat.with_structured_output(schema, include_raw=True)
    result, seconds = timed(lambda: runnable.invoke(messages))
    raw = result["raw"]
    tokens, finish = tokens_of(raw)
    row = {"tokens": tokens, "finish_reason": finish, "seconds": round(seconds, 3), "text": raw.content}
    try:
        value = parse_output(raw.content, grammar)
        row["parse_ok"] = True
    except DollyValueError as err:
        row["parse_ok"], row["parse_error"] = False, str(err)[:200]
        try:
            value = json.loads(raw.content)
        except json.JSONDecodeError:
            value = None
            row["validator_errors"] = ["not JSON"]
    if "validator_errors" not in row:
        row["validator_errors"] = check(value, schema_dict(schema))[:5]
    row["valid"] = not row["validator_errors"]
    row["parsed_ok"] = result["parsing_error"] is None and result["parsed"] is not None
    if isinstance(schema, type):
        row["parsed_ok"] = row["parsed_ok"] and isinstance(result["parsed"], schema)
    if result["parsing_error"] is not None:
        row["parsing_error"] = str(result["parsing_error"])[:200]
    return row


def run_free(chat, schema, messages, check, **call) -> dict:
    message, seconds = timed(lambda: chat.invoke(messages, **call))
    tokens, finish = tokens_of(message)
    row = {"tokens": tokens, "finish_reason": finish, "seconds": round(seconds, 3), "text": message.content}
    try:
        value = json.loads(strip_fences(message.content))
        row["json_parses"] = True
        row["validator_errors"] = check(value, schema_dict(schema))[:5]
        row["valid"] = not row["validator_errors"]
    except json.JSONDecodeError:
        row["json_parses"] = row["valid"] = False
    found, value = first_json_value(message.content)
    row["prefix_parses"] = found
    row["prefix_valid"] = found and not check(value, schema_dict(schema))
    return row


def steps(row: dict) -> int:
    """Decoding steps: generated tokens, plus the end token of an answer the model ended."""
    return row["tokens"] + (row["finish_reason"] == "stop")


def rate(rows: list[dict]) -> dict:
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
    return {"calls": len(rows), "tokens": tokens, "steps": sum(steps(r) for r in rows), "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 3) if seconds else None,
            "steps_per_s": round(sum(steps(r) for r in rows) / seconds, 3) if seconds else None}


def share(rows: list[dict], key: str) -> float | None:
    return round(sum(bool(r[key]) for r in rows) / len(rows), 4) if rows else None


def summarize_constrained(rows: list[dict]) -> dict:
    return {"valid_share": share(rows, "valid"), "parse_ok_share": share(rows, "parse_ok"),
            "parsed_ok_share": share(rows, "parsed_ok"),
            "both_valid_share": round(sum(r["valid"] and r["parse_ok"] for r in rows) / len(rows), 4),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in rows)), **rate(rows)}


def summarize_free(rows: list[dict]) -> dict:
    return {"json_parses_share": share(rows, "json_parses"), "valid_share": share(rows, "valid"),
            "prefix_parses_share": share(rows, "prefix_parses"), "prefix_valid_share": share(rows, "prefix_valid"),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in rows)), **rate(rows)}


def cost(constrained: dict, free: dict, key: str) -> float | None:
    if not constrained[key] or not free[key]:
        return None
    return round(1 - constrained[key] / free[key], 4)


def decoding(chat, grammar: bool) -> dict:
    """The anti-loop options a call with (or without) a grammar resolves to on this model (the embedded model has
    defaults of its own for each: ``generation.ANSWER_DEFAULTS``, ``generation.STRUCTURED_DEFAULTS``)."""
    from dolly_langchain.structured import JsonGrammar

    options = chat._sampling({"response_format": JsonGrammar.json_mode()} if grammar else {})
    return {"repetition_penalty": options.repetition_penalty, "no_repeat_ngram_size": options.no_repeat_ngram_size}


def warm_up(chat, label: str) -> None:
    """One constrained and one free call, not counted: first-call allocations, the grammar vocabulary (~1 s)."""
    _, schema, task = SCHEMAS[0]
    messages = messages_for(schema, task)
    _, seconds = timed(lambda: chat.with_structured_output(schema, include_raw=True).invoke(messages))
    _, free_seconds = timed(lambda: chat.invoke(messages, max_tokens=16, **decoding(chat, grammar=True)))
    log(f"{label}: warm-up constrained {seconds:.1f} s, free {free_seconds:.1f} s")


def measure(chat, indices: list[int], check, label: str, matched: bool, free_options: dict) -> dict[str, list[dict]]:
    """Per schema in turn: constrained, free and (``matched``) free_matched calls, one at a time; free calls get
    ``free_options``, free_matched calls the constrained calls' own decoding options."""
    rows: dict[str, list[dict]] = {"constrained": [], "free": [], "free_matched": []}
    for n, index in enumerate(indices, 1):
        name, schema, task = SCHEMAS[index]
        messages = messages_for(schema, task)
        c = run_constrained(chat, schema, messages, check)
        f = run_free(chat, schema, messages, check, **free_options)
        for row in (c, f):
            row["name"] = name
        rows["constrained"].append(c)
        rows["free"].append(f)
        note = ""
        if matched:
            m = run_free(chat, schema, messages, check, max_tokens=steps(c), **decoding(chat, grammar=True))
            m["name"] = name
            rows["free_matched"].append(m)
            note = f" | matched {m['tokens']} tok {m['seconds']:.1f} s"
        log(f"{label} [{n}/{len(indices)}] {name}: constrained valid={c['valid']} parse_ok={c['parse_ok']} "
            f"{c['tokens']} tok {c['seconds']:.1f} s {c['finish_reason']} | free json={f['json_parses']} "
            f"valid={f['valid']} {f['tokens']} tok {f['seconds']:.1f} s{note} | {c['text'][:70]!r}")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch

    if args.torch_threads is None:
        from dolly_langchain.engines.ctranslate2_engine import default_intra_threads

        args.torch_threads = default_intra_threads("cpu") or 0
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    from dolly_langchain.chat import ChatDolly
    from dolly_langchain.structured import JsonGrammar

    for name, schema, _ in SCHEMAS:  # every schema compiles, before any model loads
        JsonGrammar.from_schema(schema)
    validator_name, check, unchecked = independent_validator()
    indices = list(range(args.schemas))

    fields = {"temperature": 0, "max_tokens": args.max_tokens, "repetition_penalty": args.repetition_penalty,
              "no_repeat_ngram_size": args.no_repeat_ngram_size}
    chat = ChatDolly(model=None, engine=args.engine, **fields)
    plain = ChatDolly(model=None, engine=args.engine, temperature=0)  # not loaded: only asked for its defaults
    library_defaults = {"with_grammar": decoding(plain, grammar=True),
                        "without_grammar": decoding(plain, grammar=False)}
    constrained_options = decoding(chat, grammar=True)
    free_options = constrained_options if args.free_decoding == "same" else decoding(chat, grammar=False)
    log(f"decoding: constrained {constrained_options}, free {free_options}")
    load_seconds = timed(lambda: chat.runtime)[1]
    warm_up(chat, args.engine)
    rows = measure(chat, indices, check, args.engine, matched=True, free_options=free_options)
    constrained = summarize_constrained(rows["constrained"])
    free = summarize_free(rows["free"])
    matched = summarize_free(rows["free_matched"])

    report: dict[str, Any] = {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "model": chat.model_name,
        "generation_engine": chat.generation_engine.describe(),
        "grammar_engine": chat.runtime.grammar_scheduler().engine.describe(),
        "options": {"temperature": 0, "max_tokens": args.max_tokens, "system": SYSTEM,
                    "constrained": constrained_options, "free": free_options, "free_matched": constrained_options,
                    "free_decoding": args.free_decoding, "library_defaults": library_defaults},
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_seconds": round(load_seconds, 2),
        "validator": validator_name,
        "schemas": len(indices),
        "pydantic_schemas": sum(isinstance(SCHEMAS[i][1], type) for i in indices),
        "constrained": constrained,
        "free": free,
        "free_matched": matched,
        "constrained_cost": cost(constrained, free, "tokens_per_s"),
        "constrained_cost_steps": cost(constrained, free, "steps_per_s"),
        "constrained_cost_matched": cost(constrained, matched, "steps_per_s"),
        "cut_by_length": [{"name": r["name"], "tokens": r["tokens"], "output": r["text"][:100]}
                          for r in rows["constrained"] if r["finish_reason"] == "length"],
        "not_valid": [{"name": r["name"], "finish_reason": r["finish_reason"], "output": r["text"],
                       "validator_errors": r["validator_errors"], "parse_error": r.get("parse_error")}
                      for r in rows["constrained"] if not (r["valid"] and r["parse_ok"] and r["parsed_ok"])],
    }

    if args.contrast_schemas:
        default = ChatDolly(model=None, engine=None, **fields)
        default_load = timed(lambda: default.runtime)[1]
        warm_up(default, "default engine")
        contrast = measure(default, indices[: args.contrast_schemas], check, "default engine", matched=False,
                           free_options=free_options)
        main_rows = {r["name"]: r for r in rows["constrained"]}
        d_constrained = summarize_constrained(contrast["constrained"])
        d_free = summarize_free(contrast["free"])
        report["default_engine"] = {
            "generation_engine": default.generation_engine.describe(),
            "grammar_engine": default.runtime.grammar_scheduler().engine.describe(),
            "load_seconds": round(default_load, 2),
            "schemas": args.contrast_schemas,
            "constrained": d_constrained,
            "free": d_free,
            "constrained_equal_main_engine": sum(r["text"] == main_rows[r["name"]]["text"]
                                                 for r in contrast["constrained"]),
            "main_engine_on_these_schemas": {"constrained": rate(rows["constrained"][: args.contrast_schemas]),
                                             "free": rate(rows["free"][: args.contrast_schemas])},
            "constrained_over_free_tokens_per_s": round(d_constrained["tokens_per_s"] / d_free["tokens_per_s"], 4),
        }

    report["targets"] = {"constrained_valid_share==1.0": constrained["valid_share"] == 1.0
                         and constrained["parse_ok_share"] == 1.0,
                         "constrained_cost<=0.20": report["constrained_cost"] is not None
                         and report["constrained_cost"] <= 0.20}
    report["unchecked_keywords"] = sorted(unchecked)
    report["per_schema"] = [
        {"name": c["name"], "valid": c["valid"], "parse_ok": c["parse_ok"], "tokens": c["tokens"],
         "finish_reason": c["finish_reason"], "seconds": c["seconds"], "output": c["text"][:100],
         "free": {"json_parses": f["json_parses"], "valid": f["valid"], "prefix_valid": f["prefix_valid"],
                  "tokens": f["tokens"], "finish_reason": f["finish_reason"], "output": f["text"][:100]}}
        for c, f in zip(rows["constrained"], rows["free"])]
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
