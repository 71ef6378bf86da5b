"""JSON-constrained decoding: the grammar layer behind ``ChatDolly.with_structured_output``.

A JSON schema (from a pydantic model, a TypedDict or a dict), or plain JSON mode (any JSON object), becomes a
token mask per generated row, so the response always parses and validates:

- :func:`json_schema_of`: the JSON schema of what the caller passed, or a :class:`DollyValueError` naming the fix.
- :class:`JsonGrammar`: a hashable constraint that lives inside ``SamplingOptions`` (equal constraints share a batch).
- :func:`constraint_factory`: compile once per (tokenizer, logits width, EOS ids, grammar); each call of the result
  is a fresh :class:`RowConstraint` (mask, accept, finished) for one row.
- :func:`parse_output`: the response text back to a JSON value, checked against the grammar.

The engine loop, per row and step: ``logits[~row.allowed_mask()] = -inf``, pick a token, ``row.accept(token)``; once
``row.finished`` only the EOS ids are allowed. Special/control tokens are never allowed (llguidance keeps them out
of every lexeme), nor are ids a padded embedding has beyond ``len(tokenizer)``.

Why llguidance (1.9): measured on the SmolLM2-135M-Instruct tokenizer (49,152 tokens) on 2 busy shared CPU cores, a
mid-size schema (nested object, array with minItems/maxItems, enum, optional field, bounded integer, date string),
walking three valid documents token by token (236 steps cold, 1,180 warm); mask = the library's bitmask fill:

=============  ===========================  =========  ===============  ===================================
library        installs                     compile    mask µs med/p95  schema features (of 11 checked)
=============  ===========================  =========  ===============  ===================================
llguidance     itself (3 MB), no deps       2-7 ms     36-54 / 110-200  all 11
xgrammar       triton 286 MB, tvm-ffi 13    31-57 ms   6 / 49           all 11 (installed with --no-deps,
               MB; requires torch and                                   without triton, to measure)
               transformers
outlines-core  itself (2 MB), no deps       2.5-3 s    7-9 / 190-290    10: numeric bounds not enforced;
                                                                        ``{"type": "object"}`` takes 20 s
=============  ===========================  =========  ===============  ===================================

The 11 features (a valid document accepted, an invalid one refused): nested objects, minItems/maxItems, enum,
optional fields, numeric bounds, formats date/email/uuid, pattern, additionalProperties false, maxLength. xgrammar
fills masks faster, but ~40 µs a step is noise beside a forward pass, and it would add triton to every Linux
install; llguidance adds nothing, and refuses the keywords it does not implement (``uniqueItems``, ``not``,
``if``...) at :meth:`JsonGrammar.from_schema` instead of generating values that would not validate. Measured with
JSON slices (below); JSON mode fills in ~11-24 µs. Wrapping a 49k tokenizer costs ~1 s, once per tokenizer.

NOTE, where we differ from llguidance's defaults:

- whitespace: llguidance allows any run of whitespace between JSON tokens, and small models loop on ``"\\n\\n..."``
  inside JSON until ``max_new_tokens``. We allow none, with ``json.dumps``'s default separators (``", "``, ``": "``),
  the style most JSON the models were trained on has; it also leaves tokens to force (:meth:`forced_tokens`).
  A schema's own ``"x-guidance"`` options still win over these defaults.
- escapes: ``\\u00fc``-style escapes of printable characters are allowed (llguidance allows them for control
  characters only): ``json.dumps`` writes them by default, so models have seen plenty; raw UTF-8 stays allowed.
- slices: JSON slices instead of the general ones (about 1.5-2x faster masks on JSON schemas).
- log level 0: a refused token is reported by our return value, not printed to stderr.

Properties come out in the schema's order (llguidance's rule), which is why :class:`JsonGrammar` keeps the
schema's key order instead of sorting keys: a "reasoning" field before an "answer" field is part of the prompt.
Closing within the budget: a small model can run a string or a number on until ``max_new_tokens`` cuts it ("0.52389
746888888..."), which would leave text that is not JSON. So the engines tell :meth:`RowConstraint.allowed_mask` how
many tokens a row has left, and near the end the row closes its value: a model-free policy (the grammar's forced
tokens, else a closing ``"``/``}``/``]``, else the shortest value such as ``0`` or ``""``; inside a string whose
format refuses the quote, filler characters in turn, so an email gets its ``@``) is walked on a copy of the
grammar state to count the tokens a valid end takes, EOS included; when that count (plus a small margin for the
last free token) reaches the tokens left, the row follows the policy from then on. The value then parses and
validates, with its last field shortened, instead of being cut. Nothing changes for rows that end by themselves.
"""

from __future__ import annotations

import functools
import json
import reprlib
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dolly_langchain.errors import DollyValueError, MissingDependencyError

if TYPE_CHECKING:
    import numpy

__all__ = ["JsonGrammar", "RowConstraint", "constraint_factory", "grammar_of_response_format", "is_pydantic_model",
           "json_schema_of", "parse_output"]

INSTALL_HINT = "pip install 'llguidance>=1.9,<2'"

# llguidance's JSON compiler options (see the NOTE above): no free whitespace, json.dumps's separators and escapes.
_JSON_COMPILE_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "json_allow_general_unicode_escapes": True,
}

# A schema dict must have one of these: they say what the value is (anything else is not a JSON schema).
_VALUE_KEYWORDS = ("type", "properties", "items", "prefixItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref")
# JSON mode: any JSON object.
_ANY_OBJECT = {"type": "object"}


def json_schema_of(schema: Any) -> dict[str, Any]:
    """The JSON schema of a pydantic ``BaseModel`` subclass (pydantic 2, or ``pydantic.v1``), a ``TypedDict`` class,
    or a JSON-schema dict.

    A dict is returned as it is, once it is known to be a schema: it needs a keyword that says what the value is
    (``type``, ``properties``, ``enum``, ``anyOf``, ``$ref``, ...), and an OpenAI tool/function dict is refused
    with the fix (pass its ``parameters``). Any top-level type is allowed, not only objects.
    """
    if isinstance(schema, dict):
        return _checked_schema_dict(schema)
    if isinstance(schema, type):
        from pydantic import BaseModel, PydanticUserError
        from typing_extensions import is_typeddict  # also knows typing.TypedDict classes, unlike typing's

        try:
            if issubclass(schema, BaseModel):
                return schema.model_json_schema()
            if is_pydantic_model(schema):  # pydantic.v1
                return schema.schema()
            if is_typeddict(schema):
                from pydantic import TypeAdapter

                return TypeAdapter(schema).json_schema()
        except PydanticUserError as err:  # e.g. typing.TypedDict on Python < 3.12, a field with no JSON form
            raise DollyValueError(f"cannot make a JSON schema from {schema.__name__}: {err.message}") from err
    raise DollyValueError(
        f"cannot make a JSON schema from {reprlib.repr(schema)} ({type(schema).__name__}): pass a pydantic "
        "BaseModel subclass, a TypedDict class or a JSON-schema dict"
    )


def is_pydantic_model(schema: Any) -> bool:
    """A pydantic ``BaseModel`` subclass, of pydantic 2 or of ``pydantic.v1`` (code still on pydantic 1's API, which
    LangChain supports): what ``with_structured_output`` parses into an instance."""
    from pydantic import BaseModel, v1

    return isinstance(schema, type) and issubclass(schema, (BaseModel, v1.BaseModel))


def _checked_schema_dict(schema: dict[str, Any]) -> dict[str, Any]:
    keys = ", ".join(repr(key) for key in list(schema)[:8]) or "none"
    if "function" in schema or "parameters" in schema:
        raise DollyValueError(
            f"this dict (keys {keys}) looks like a tool/function definition, not a JSON schema: pass its "
            "'parameters' JSON schema, or a pydantic model or TypedDict"
        )
    if not any(keyword in schema for keyword in _VALUE_KEYWORDS):
        raise DollyValueError(
            f"this dict (keys {keys}) is not a JSON schema: it has none of {', '.join(_VALUE_KEYWORDS)}; "
            "for any JSON object use JSON mode"
        )
    return schema


@dataclass(frozen=True)
class JsonGrammar:
    """A JSON constraint, hashable so that ``SamplingOptions`` holding it stays a dict key (equal constraints share
    engine batches). Build it with :meth:`from_schema` or :meth:`json_mode`."""

    schema_json: str | None
    """Compact JSON text of the schema, keys in the schema's own order (they set the order properties are
    generated in); ``None`` is JSON mode: any JSON object."""

    @classmethod
    def from_schema(cls, schema: Any) -> JsonGrammar:
        """The constraint for ``schema`` (see :func:`json_schema_of`; ``None`` is JSON mode). Raises
        :class:`DollyValueError` now, not at generation time, for a schema llguidance cannot enforce."""
        if schema is None:
            return cls.json_mode()
        as_dict = json_schema_of(schema)
        try:
            text = json.dumps(as_dict, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise DollyValueError(f"the JSON schema must be plain JSON data: {err}") from err
        llguidance = _llguidance()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(_grammar_text(text))
        if is_error:
            name = f" {as_dict['title']!r}" if isinstance(as_dict.get("title"), str) else ""
            raise DollyValueError(
                f"JSON schema{name} cannot be enforced while generating: {messages[0]} (remove or rewrite that part "
                "of the schema)"
            )
        return cls(text)

    @classmethod
    def json_mode(cls) -> JsonGrammar:
        """Any JSON object."""
        return cls(None)

    @property
    def schema(self) -> dict[str, Any] | None:
        """The schema as a dict (a fresh copy); ``None`` in JSON mode."""
        return None if self.schema_json is None else json.loads(self.schema_json)


def _grammar_text(schema_json: str | None) -> str:
    """llguidance's grammar for a schema's JSON text (``None``: any JSON object)."""
    schema = _ANY_OBJECT if schema_json is None else json.dumps(_closed_objects(json.loads(schema_json)))
    return _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_COMPILE_OPTIONS)


# Where a JSON schema holds subschemas: keyword -> how (one schema, a list of them, or a name -> schema mapping).
_SUBSCHEMAS = {
    "items": "one_or_list", "additionalProperties": "one", "not": "one", "if": "one", "then": "one", "else": "one",
    "contains": "one", "prefixItems": "list", "anyOf": "list", "oneOf": "list", "allOf": "list",
    "properties": "mapping", "patternProperties": "mapping", "$defs": "mapping", "definitions": "mapping",
}


def _closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on each object schema that lists ``properties`` and does not
    say whether others may appear.

    JSON Schema allows undeclared keys by default (pydantic's and pydantic.v1's schemas leave the keyword out), and
    a grammar that allows them lets a small model invent keys ("has no similar creatures" next to setup and
    punchline); callers of ``with_structured_output`` expect the fields they declared, as with OpenAI's strict
    mode. The output still validates against the schema as given; say ``"additionalProperties": true`` to allow
    other keys.
    """
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for keyword, kind in _SUBSCHEMAS.items():
        value = closed.get(keyword)
        if kind == "mapping" and isinstance(value, dict):
            closed[keyword] = {name: _closed_objects(sub) for name, sub in value.items()}
        elif kind in ("list", "one_or_list") and isinstance(value, list):
            closed[keyword] = [_closed_objects(sub) for sub in value]
        elif kind in ("one", "one_or_list") and isinstance(value, dict):
            closed[keyword] = _closed_objects(value)
    if isinstance(closed.get("properties"), dict) and not any(
        keyword in closed for keyword in ("additionalProperties", "patternProperties", "unevaluatedProperties")
    ):
        closed["additionalProperties"] = False
    return closed


def _llguidance():
    try:
        import llguidance
    except ImportError as err:
        raise MissingDependencyError(f"structured output needs the llguidance package: {INSTALL_HINT}") from err
    return llguidance


# Tokens the closing policy tries, in order, where the grammar forces nothing: end a string and its container in one
# token, end a string, end a container, then the shortest values. Only those that are one token in a vocabulary count.
_CLOSING_TEXTS = ('"}', '"]', '""', "}", "]", "[]", "{}", "0", "null", "false", "true", '"', "[", "{")
# Inside a string: the closing quote, else content that moves a formatted string on (an email needs "@" and ".", a
# date or uuid digits and "-").
_STRING_TEXTS = ('"', "a", "0", "@", ".", "1", "-", ":", "x")
# The policy picks one token at most this many times in a row (unless the grammar forces it), so that a string
# whose format refuses the quote still moves on.
_MAX_SAME_IN_A_ROW = 3
# Start checking how a row would close once it has this many tokens left beyond twice its minimal document's length.
_CLOSE_WINDOW = 64
# Tokens of slack kept for the last freely chosen token, which may open more structure than the check foresaw.
_CLOSE_MARGIN = 4


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, a key of the compiled-grammar cache
class _Vocabulary:
    """llguidance's view of one tokenizer at one logits width with one set of EOS ids."""

    ll_tokenizer: Any
    size: int
    eos_ids: frozenset[int]

    @functools.cached_property
    def closing_ids(self) -> tuple[int, ...]:
        """The ids of :data:`_CLOSING_TEXTS` that are single tokens here, in that order."""
        return self._single_tokens(_CLOSING_TEXTS)

    @functools.cached_property
    def string_ids(self) -> tuple[int, ...]:
        """The ids of :data:`_STRING_TEXTS` that are single tokens here, in that order."""
        return self._single_tokens(_STRING_TEXTS)

    def _single_tokens(self, texts: tuple[str, ...]) -> tuple[int, ...]:
        ids: list[int] = []
        for text in texts:
            tokens = self.ll_tokenizer.tokenize_str(text)
            if len(tokens) == 1 and tokens[0] < self.size and tokens[0] not in ids:
                ids.append(tokens[0])
        return tuple(ids)

    def token_bytes(self, token: int) -> bytes:
        return self.ll_tokenizer.decode_bytes([token])


@dataclass(frozen=True)
class _Walk:
    """What the closing policy remembers of the text so far: inside a JSON string or not (after a backslash or
    not), and the last token with how many times in a row it came."""

    in_string: bool = False
    escaped: bool = False
    last: int = -1
    times: int = 0

    def after(self, token: int, vocabulary: _Vocabulary) -> _Walk:
        in_string, escaped = self.in_string, self.escaped
        for byte in vocabulary.token_bytes(token):
            if escaped:
                escaped = False
            elif in_string and byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = not in_string
        return _Walk(in_string, escaped, token, self.times + 1 if token == self.last else 1)


# tokenizer -> {(vocab_size, eos ids): _Vocabulary}; building one costs ~1 s on a 49k vocabulary, so it is done once
# per tokenizer object (under the lock, so that two threads do not both build it). The entry goes with the tokenizer;
# the llguidance vocabulary itself lives on while one of the last 128 compiled grammars below uses it.
_VOCABULARIES: weakref.WeakKeyDictionary[Any, dict[tuple[int, frozenset[int]], _Vocabulary]] = (
    weakref.WeakKeyDictionary()
)
_VOCABULARIES_LOCK = threading.Lock()


def _vocabulary(tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> _Vocabulary:
    with _VOCABULARIES_LOCK:
        per_tokenizer = _VOCABULARIES.setdefault(tokenizer, {})
        key = (vocab_size, eos_ids)
        if key not in per_tokenizer:
            llguidance = _llguidance()
            from llguidance.hf import from_tokenizer

            try:
                ll_tokenizer = from_tokenizer(
                    tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids),
                    slices=llguidance.LLTokenizer.json_slices(),
                )
            except ValueError as err:  # llguidance reads only fast (Rust `tokenizers`) tokenizers
                raise DollyValueError(
                    f"structured output needs a fast tokenizer ({type(tokenizer).__name__} given): {err}"
                ) from err
            per_tokenizer[key] = _Vocabulary(ll_tokenizer, vocab_size, eos_ids)
        return per_tokenizer[key]


@functools.lru_cache(maxsize=128)
def _compiled(vocabulary: _Vocabulary, grammar: JsonGrammar):
    """A matcher in its start state, never advanced: rows start from copies of it, which share its compiled
    grammar and lexer cache (llguidance guards those for use from many threads)."""
    matcher = _llguidance().LLMatcher(vocabulary.ll_tokenizer, _grammar_text(grammar.schema_json), log_level=0)
    if matcher.is_error():
        raise DollyValueError(f"the JSON schema cannot be enforced while generating: {matcher.get_error()}")
    return matcher


class RowConstraint:
    """One generated row's grammar state. Use it from one thread at a time; rows are independent of each other."""

    def __init__(self, matcher: Any, vocabulary: _Vocabulary) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = matcher
        self._vocabulary = vocabulary
        self._bits = allocate_token_bitmask(1, vocabulary.size)  # one bit a token, reused at every step
        self._closing = False  # following the closing policy (see the module's docstring) for the rest of the row
        self._check_below: int | None = None  # tokens left under which the closing check runs; set on first use
        self._walk = _Walk()  # string state and repeats of the text so far, for the closing policy

    def allowed_mask(self, tokens_left: int | None = None) -> numpy.ndarray:
        """Bool array of the logits width: True for each token allowed next (~70 µs on 49k tokens: ~50 to fill the
        bitmask, ~25 to unpack it).

        ``tokens_left`` is how many tokens the row may still generate, this one included (``None``: unbounded). Near
        the end only the closing policy's one token is allowed, so the value ends, EOS included, within them."""
        import numpy as np

        if tokens_left is not None and self._must_close(tokens_left):
            mask = np.zeros(self._vocabulary.size, dtype=np.bool_)
            mask[_closing_choice(self._matcher, self._vocabulary, self._bits, self._walk)] = True
            return mask
        _fill_bitmask(self._matcher, self._bits)
        return _unpack(self._bits, self._vocabulary.size)

    def closing_length(self, limit: int) -> int | None:
        """How many tokens, EOS included, the closing policy takes to end the value from here; ``None`` if it
        does not end within ``limit``. The state does not move."""
        return _closing_length(self._matcher, self._vocabulary, self._bits, limit, self._walk)

    def _must_close(self, tokens_left: int) -> bool:
        if self._closing or self._matcher.is_stopped():
            return self._closing
        if self._check_below is None:  # first step: size the window by the shortest whole document
            shortest = self.closing_length(limit=tokens_left + 1)
            self._check_below = 2 * (shortest if shortest is not None else 0) + _CLOSE_WINDOW
        if tokens_left <= self._check_below:
            needed = self.closing_length(limit=tokens_left)
            # When the policy cannot end the value in time, forcing it would only make things worse than the model
            # left to itself: the row goes on unsteered.
            self._closing = needed is not None and needed + _CLOSE_MARGIN >= tokens_left
        return self._closing

    def is_allowed(self, token_id: int) -> bool:
        """Whether ``token_id`` may come next, without advancing."""
        if token_id in self._vocabulary.eos_ids:
            # llguidance counts EOS as a token only before the value is complete; once finished it is the only one.
            return self._matcher.is_accepting()
        return self._matcher.validate_tokens([token_id]) == 1

    def accept(self, token_id: int) -> bool:
        """Advance with the token the engine picked; False (state unchanged) if the grammar refuses it."""
        # Check first: a token llguidance refuses while consuming leaves the matcher in an error state for good.
        if not (self.is_allowed(token_id) and self._matcher.consume_token(token_id)):
            return False
        if token_id not in self._vocabulary.eos_ids:
            self._walk = self._walk.after(token_id, self._vocabulary)
        return True

    @property
    def finished(self) -> bool:
        """The JSON value is complete and nothing but EOS can follow. A top-level number that could still take digits
        is not finished, though EOS is allowed there too."""
        return self._matcher.is_stopped()

    def forced_tokens(self) -> list[int]:
        """The tokens the grammar forces next (e.g. ``{"name": "`` when ``name`` comes first), possibly none; the
        state does not move: :meth:`accept` each of them to use them."""
        return list(self._matcher.compute_ff_tokens())


def _fill_bitmask(matcher: Any, bits: numpy.ndarray) -> None:
    from llguidance.numpy import fill_next_token_bitmask

    fill_next_token_bitmask(matcher, bits)


def _unpack(bits: numpy.ndarray, size: int) -> numpy.ndarray:
    import numpy as np

    # Token i is bit i % 32 of int32 word i // 32; on little-endian hosts (x86, ARM) that is bit i of the bytes.
    return np.unpackbits(bits.view(np.uint8), bitorder="little")[:size].view(np.bool_)


def _closing_choice(matcher: Any, vocabulary: _Vocabulary, bits: numpy.ndarray, walk: _Walk) -> int:
    """The closing policy's next token: EOS once the value may end, else the first token the grammar forces,
    else the first of :data:`_STRING_TEXTS` (inside a string) or :data:`_CLOSING_TEXTS` (outside) it allows, never
    one more time after :data:`_MAX_SAME_IN_A_ROW` in a row, else the lowest allowed id. Deterministic and
    model-free."""
    if matcher.is_stopped() or matcher.is_accepting():
        return min(vocabulary.eos_ids)
    forced = matcher.compute_ff_tokens()
    if forced:
        return forced[0]
    tired = walk.last if walk.times >= _MAX_SAME_IN_A_ROW else -1
    candidates = vocabulary.closing_ids
    if walk.in_string:
        # The closing quote first, then the fillers in turn, starting after the last one used, so that each gets
        # its chance ("@" after "a" in an email) instead of one filler forever.
        quote, fillers = vocabulary.string_ids[:1], vocabulary.string_ids[1:]
        start = fillers.index(walk.last) + 1 if walk.last in fillers else 0
        candidates = quote + fillers[start:] + fillers[:start]
    for token in candidates:
        if token != tired and matcher.validate_tokens([token]) == 1:
            return token
    _fill_bitmask(matcher, bits)
    allowed = [int(t) for t in _unpack(bits, vocabulary.size).nonzero()[0][:2]]
    allowed = [t for t in allowed if t != tired] or allowed
    return allowed[0] if allowed else min(vocabulary.eos_ids)


def _closing_length(matcher: Any, vocabulary: _Vocabulary, bits: numpy.ndarray, limit: int,
                    walk: _Walk) -> int | None:
    if matcher.is_stopped() or matcher.is_accepting():
        return 1
    matcher = matcher.deep_copy()
    scratch = bits.copy()
    for steps in range(1, limit + 1):
        token = _closing_choice(matcher, vocabulary, scratch, walk)
        if token in vocabulary.eos_ids:
            return steps
        if not matcher.consume_token(token) or matcher.is_error():
            return None
        walk = walk.after(token, vocabulary)
    return None


def constraint_factory(
    grammar: JsonGrammar, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]
) -> Callable[[], RowConstraint]:
    """Compile ``grammar`` for ``tokenizer`` once (cached per tokenizer object, logits width, EOS ids and grammar) and
    return a function that makes a fresh :class:`RowConstraint` per call (a copy of the compiled start state, ~2 µs).

    ``vocab_size`` is the model's logits width; it may exceed ``len(tokenizer)`` (a padded embedding), and the
    ids past the tokenizer are never allowed. ``eos_token_ids`` are every id the engine ends a row on (a chat
    model's end-of-turn, Dolly's ``### End``): they are the allowed tokens once the value is complete.
    """
    eos_ids = frozenset(eos_token_ids)
    if not eos_ids:
        raise DollyValueError("structured output needs at least one EOS token id to end the row with")
    if vocab_size < len(tokenizer):
        raise DollyValueError(
            f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens: pass the model's "
            "logits width (config.vocab_size)"
        )
    outside = sorted(i for i in eos_ids if not 0 <= i < vocab_size)
    if outside:
        raise DollyValueError(f"EOS token ids {outside} are outside the vocabulary (0..{vocab_size - 1})")
    vocabulary = _vocabulary(tokenizer, vocab_size, eos_ids)
    start = _compiled(vocabulary, grammar)

    def new_row() -> RowConstraint:
        return RowConstraint(start.deep_copy(), vocabulary)

    return new_row


class _ByteTokenizer:
    """One token per byte plus an EOS: lets llguidance check finished text against a grammar, no model needed."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids = [256]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


@functools.lru_cache(maxsize=1)
def _byte_vocabulary() -> _Vocabulary:
    llguidance = _llguidance()
    return _Vocabulary(llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer())), 257, frozenset({256}))


def grammar_of_response_format(response_format: Any) -> JsonGrammar:
    """The :class:`~dolly_langchain.structured.JsonGrammar` of a call's ``response_format``: OpenAI's shapes
    (``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"schema": {...}}}``) or a
    ``JsonGrammar``."""
    if isinstance(response_format, JsonGrammar):
        return response_format
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return JsonGrammar.json_mode()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise DollyValueError('response_format={"type": "json_schema"} needs "json_schema": {"schema": {...}}')
        return JsonGrammar.from_schema(schema)
    raise DollyValueError(
        'response_format must be {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": ...}} '
        f"or a dolly_langchain.structured.JsonGrammar; got {response_format!r}"
    )


def parse_output(text: str, grammar: JsonGrammar) -> Any:
    """The JSON value of a structured response, checked against ``grammar``.

    The value is checked by llguidance with the same grammar that constrained generation (``jsonschema`` is not a
    dependency), re-serialized in ``json.dumps`` style first so that whitespace does not matter; properties must come
    in the schema's order, as generation emits them. Raises :class:`DollyValueError` for text that is not JSON
    (often a response cut at ``max_new_tokens``) or a value the schema refuses.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DollyValueError(
            f"structured output is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}) in "
            f"{reprlib.repr(text)}; a response cut at max_new_tokens ends mid-value: raise max_new_tokens"
        ) from err
    compact = json.dumps(value, ensure_ascii=False)  # json.dumps's separators: the style the grammar generates
    data = list(compact.encode("utf-8"))
    matcher = _compiled(_byte_vocabulary(), grammar).deep_copy()
    valid_bytes = matcher.validate_tokens(data)
    if valid_bytes == len(data):
        matcher.consume_tokens(data)
        if matcher.is_accepting():
            return value
    expected = "any JSON object" if grammar.schema_json is None else "the JSON schema"
    at = len(compact.encode("utf-8")[:valid_bytes].decode("utf-8", errors="ignore"))
    raise DollyValueError(
        f"structured output does not match {expected} at character {at} of {len(compact)}: "
        f"{compact[max(0, at - 40):at]!r} then {compact[at:at + 20]!r}"
    )
