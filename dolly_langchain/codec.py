"""From instructions to token ids and back, the same for every engine.

:class:`PromptCodec` holds everything about a model's prompt format that is not running the model:

- which format the model reads (``"dolly"``, ``"chat"``, ``"dolly-text"``; see :func:`detect_prompt_format`);
- the prompt for an instruction (with optional context) or a list of chat messages, as ``(text, is_user_text)``
  segments, encoded so that user text never becomes a control token;
- where generation stops (stop token ids, stop strings) and how generated ids become the response.

Engines (:mod:`dolly_langchain.engines`) only ever see token ids, so prompt-injection safety is the same for all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from dolly_langchain.errors import DollyTypeError, DollyValueError
from dolly_langchain.prompts import (
    DOLLY_SPECIAL_TOKENS,
    END_KEY,
    instruction_text,
    prompt_segments,
    read_format_record,
)

PROMPT_FORMATS = ("dolly", "chat", "dolly-text")
CHAT_ROLES = ("system", "user", "assistant")

# Stand-ins for message texts while a chat template is rendered, so the template's own text can be told apart
# from user text (private-use code points no tokenizer template alters).
_SENTINEL = "\ue000dolly-text-{}\ue000"
_SENTINEL_PATTERN = re.compile("\ue000dolly-text-(\\d+)\ue000")

# How a conversation is folded into Dolly's instruction format (see PromptCodec.message_segments).
_ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def detect_prompt_format(tokenizer, model_dir: str | None = None) -> str:
    """Pick the format a model reads.

    - ``"dolly"``: the tokenizer has Dolly's special tokens (``### End`` ...): generation stops at the ``### End``
      token id.
    - ``"chat"``: no Dolly tokens but a chat template, and no Dolly format record beside the checkpoint: the
      instruction is the user message; generation stops at the template's end-of-turn token.
    - ``"dolly-text"``: anything else: Dolly's text format, generation stops at the *text* ``### End``.
    """
    added = tokenizer.get_added_vocab()
    if all(token in added for token in DOLLY_SPECIAL_TOKENS):
        return "dolly"
    record = read_format_record(model_dir) if model_dir else None
    if record is None and tokenizer.chat_template:
        return "chat"
    return "dolly-text"


class PromptCodec:
    """Prompt building, control-token-safe encoding and response extraction for one tokenizer.

    ``eos_token_ids`` are the model's own end ids (its ``generation_config.eos_token_id``); the tokenizer's EOS
    and, for the ``dolly`` format, the ``### End`` token are added. The tokenizer is set to pad on the left, with
    its EOS as pad token when it has none (Pythia), as batched decoder-only generation needs.
    """

    def __init__(
        self,
        tokenizer,
        prompt_format: str | None = None,
        *,
        model_dir: str | None = None,
        eos_token_ids: Sequence[int] | int | None = None,
    ):
        if tokenizer is None:
            raise DollyValueError("a tokenizer is needed: pass tokenizer=...")
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.prompt_format = prompt_format or detect_prompt_format(tokenizer, model_dir)
        if self.prompt_format not in PROMPT_FORMATS:
            raise DollyValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        self._control_ids = {
            token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
        }
        self._control_pattern = re.compile(
            "|".join(re.escape(t) for t in sorted(self._control_ids, key=len, reverse=True)) or r"(?!)"
        )
        self._bos_ids = _leading_special_ids(tokenizer) if self.prompt_format != "chat" else []
        self.stop_token_ids = self._find_stop_token_ids(eos_token_ids)

    # -- prompts -----------------------------------------------------------------------------------------------

    def prompt_segments(self, instruction: str, context: str | None = None) -> list[tuple[str, bool]]:
        """The model-format prompt as ``(text, is_user_text)`` pieces; their texts joined are the prompt."""
        if self.prompt_format != "chat":
            return prompt_segments(instruction, context)
        user = instruction_text(instruction, context)
        return self._chat_segments([("user", user)])

    def message_segments(self, messages: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
        """The prompt for a conversation of ``(role, text)`` pairs, roles ``system``/``user``/``assistant``.

        With a chat template (``"chat"`` format) the template renders the whole conversation. A Dolly-format
        model was trained on single instructions, so the conversation is folded into that format: the last user
        message is the instruction, and the system message and earlier turns become its ``Input:`` block, one
        ``System: ...``, ``User: ...``, ``Assistant: ...`` paragraph per message. A single user message gives
        exactly the prompt of that instruction alone.
        """
        messages = [(role, text) for role, text in messages]
        if not messages:
            raise DollyValueError("no messages: give the chat model at least one human message")
        for role, text in messages:
            if role not in CHAT_ROLES:
                raise DollyValueError(f"unsupported message role {role!r}; expected one of {CHAT_ROLES}")
            if not isinstance(text, str):
                raise DollyValueError(f"message content must be text, got {type(text).__name__} for a {role} message")
        if messages[-1][0] != "user":
            raise DollyValueError(f"the last message must be a human message to answer, got a {messages[-1][0]} message")
        if not messages[-1][1].strip():
            raise DollyValueError("the last human message is empty: give the model something to answer")
        if self.prompt_format == "chat":
            return self._chat_segments(messages)
        history = "\n\n".join(f"{_ROLE_LABELS[role]}: {text}" for role, text in messages[:-1])
        return prompt_segments(messages[-1][1], history or None)

    def _chat_segments(self, messages: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
        rendered = self.tokenizer.apply_chat_template(
            [{"role": role, "content": _SENTINEL.format(i)} for i, (role, _) in enumerate(messages)],
            tokenize=False,
            add_generation_prompt=True,
        )
        found = [int(m.group(1)) for m in _SENTINEL_PATTERN.finditer(rendered)]
        if found != list(range(len(messages))):
            raise DollyValueError("the tokenizer's chat template does not place each message verbatim and in order; "
                             "pass prompt_format='dolly-text'")
        segments: list[tuple[str, bool]] = []
        start = 0
        for match in _SENTINEL_PATTERN.finditer(rendered):
            segments.append((rendered[start : match.start()], False))
            segments.append((messages[int(match.group(1))][1], True))
            start = match.end()
        segments.append((rendered[start:], False))
        return [(text, is_user) for text, is_user in segments if text]

    def prompt_text(self, instruction: str, context: str | None = None) -> str:
        """The exact text the model sees for this instruction."""
        return "".join(text for text, _ in self.prompt_segments(instruction, context))

    def encode_prompt(self, instruction: str, context: str | None = None) -> list[int]:
        """Token ids of an instruction's prompt; see :meth:`encode_segments`."""
        return self.encode_segments(self.prompt_segments(instruction, context))

    def encode_messages(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of a conversation's prompt; see :meth:`message_segments` and :meth:`encode_segments`."""
        return self.encode_segments(self.message_segments(messages))

    def encode_segments(self, segments: Sequence[tuple[str, bool]]) -> list[int]:
        """Token ids of a prompt. Control tokens come only from the template, never from user text.

        Text between the template's control tokens is encoded with ``split_special_tokens=True``, so a user who
        writes ``### End`` or ``<|im_end|>`` gets those characters as plain text. For text without such strings
        the ids equal tokenizing the whole prompt at once (what training saw): HF tokenizers split at added
        tokens before any other step.
        """
        ids = list(self._bos_ids)
        pending = ""
        for text, is_user in segments:
            if is_user:
                check_text(text)  # here, so the error counts characters in the user's own text
                pending += text
                continue
            start = 0
            for match in self._control_pattern.finditer(text):
                pending += text[start : match.start()]
                ids += self._encode_plain(pending)
                pending = ""
                ids.append(self._control_ids[match.group()])
                start = match.end()
            pending += text[start:]
        return ids + self._encode_plain(pending)

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        check_text(text)
        # verbose=False: no "sequence length is longer than the maximum" warning; check_window refuses those.
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain ``text``, control strings in it kept as plain text (no prompt format, no BOS)."""
        return self._encode_plain(text)

    def count_tokens(self, text: str) -> int:
        """Tokens of plain ``text`` (control strings in it count as the plain text the model reads them as)."""
        return len(self._encode_plain(text))

    # -- responses ---------------------------------------------------------------------------------------------

    def stop_strings(self, stop_sequences: Sequence[str] | None = None) -> list[str]:
        """Strings at which text must end: ``### End`` for ``dolly-text``, plus the caller's stop sequences."""
        strings = [END_KEY] if self.prompt_format == "dolly-text" else []
        return strings + [s for s in check_stop(stop_sequences) if s]

    def decode_response(self, new_ids: Sequence[int], stop_sequences: Sequence[str] | None = None) -> str:
        """Turn generated ids into the response: cut at the first stop token, decode, cut at stop strings."""
        ids = new_ids.tolist() if hasattr(new_ids, "tolist") else list(new_ids)
        stops = set(self.stop_token_ids)
        end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        return cut_at_stop(text, self.stop_strings(stop_sequences)).strip()

    def response_tokens(
        self, ids: Sequence[int], logprobs: Sequence[float], stop_sequences: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """``[{"token", "token_id", "logprob"}]`` for the generated tokens that make up the response.

        Tokens after a stop string are left out (the one that completed the stop string is kept only when part
        of it belongs to the response). ``token`` is the token's own decoded text.
        """
        body = cut_at_stop(self.tokenizer.decode(list(ids), skip_special_tokens=True), self.stop_strings(stop_sequences))
        body = body.rstrip()
        out = []
        for k, (token_id, logprob) in enumerate(zip(ids, logprobs)):
            if k and len(self.tokenizer.decode(list(ids[:k]), skip_special_tokens=True).rstrip()) >= len(body):
                break
            out.append({
                "token": self.tokenizer.decode([token_id], skip_special_tokens=False),
                "token_id": int(token_id),
                "logprob": float(logprob),
            })
        return out

    def watcher(self, stop_sequences: Sequence[str] | None = None, stop_loops: bool = False) -> ResponseWatcher:
        """A :class:`ResponseWatcher` for one generation with these stop sequences (and loop stopping)."""
        return ResponseWatcher(self.tokenizer, self.stop_strings(stop_sequences), stop_loops=stop_loops)

    def _find_stop_token_ids(self, eos_token_ids) -> list[int]:
        ids = []
        if self.prompt_format == "dolly":
            ids.append(self.tokenizer.convert_tokens_to_ids(END_KEY))
        for source in (eos_token_ids, self.tokenizer.eos_token_id):
            ids += list(source) if isinstance(source, (list, tuple)) else [source] if source is not None else []
        return list(dict.fromkeys(int(i) for i in ids))


class ResponseWatcher:
    """Follows one row's generated tokens: decodes them incrementally, spots stop strings, yields stream chunks.

    :meth:`push` takes each generated token and returns ``(text_to_emit, stopped)``; :meth:`finish` returns the
    held-back tail. Everything emitted, joined, is the streamed response (see :class:`StreamingResponse`).
    Decoding is incremental (only the last few tokens are decoded each step), so watching costs microseconds.
    """

    def __init__(self, tokenizer, stop_strings: list[str], stop_loops: bool = False):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # tokens before _prefix are already text
        self._read = 0
        self.text = StreamingResponse(stop_strings)
        self.stop_loops = stop_loops
        self.looped = False
        """The row ended because it repeated itself (``stop_loops``)."""

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        out, stopped = self._advance()
        if not stopped and self.stop_loops and (repeats_itself(self.ids) or repeats_a_phrase(self.text.text)):
            # The loop's text so far stays (it was streamed already, and invoke must equal the stream); the row ends.
            self.looped = True
            return out, True
        return out, stopped

    def _advance(self) -> tuple[str, bool]:
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        # A token may hold part of a multi-byte character (decodes to U+FFFD until the rest arrives): wait for it.
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            out = self.text.feed(piece)
            return out, self.text.stopped
        return "", False

    def finish(self) -> str:
        rest = self._decode(self.ids[self._prefix :])[len(self._decode(self.ids[self._prefix : self._read])) :]
        # Text held back until generation ended (an incomplete multi-byte character decodes as U+FFFD until its
        # last byte comes) still belongs to the answer: feed() may release some of it, finish() the rest.
        released = self.text.feed(rest) if rest and not self.text.stopped else ""
        return released + self.text.finish()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


#: A loop, for ``stop_loops``, is either of two things. The last tokens are one run of at most LOOP_MAX_PERIOD
#: tokens, LOOP_COPIES times in a row and at least LOOP_MIN_TOKENS tokens in all (so "!!!" or a 3-column table rule
#: is not a loop; 8 "!" are). Or a run of LOOP_PHRASE_WORDS words (lowercase ``\w+``) has just come for the
#: LOOP_PHRASE_TIMES-th time: "Player of the Year, ... Player of the Year, ... Player of the". Measured on seeded
#: dolly-15k records (``benchmarks/answers.py``): the human answers have a 3-word run 4 or more times in 2% of
#: responses, the embedded model's greedy answers in 27%.
LOOP_MAX_PERIOD = 32
LOOP_COPIES = 3
LOOP_MIN_TOKENS = 8
LOOP_PHRASE_WORDS = 3
LOOP_PHRASE_TIMES = 3
_WORD = re.compile(r"\w+")


def repeats_a_phrase(text: str) -> bool:
    """Whether the last complete run of :data:`LOOP_PHRASE_WORDS` words of ``text`` is its
    :data:`LOOP_PHRASE_TIMES`-th occurrence (a word is complete once a non-word character follows it)."""
    words = _WORD.findall(text.lower())
    if text and (text[-1].isalnum() or text[-1] == "_"):
        words = words[:-1]  # the last word may still grow
    n = LOOP_PHRASE_WORDS
    if len(words) < n * LOOP_PHRASE_TIMES:
        return False
    last = words[-n:]
    count = sum(1 for i in range(len(words) - n + 1) if words[i:i + n] == last)
    return count >= LOOP_PHRASE_TIMES


def repeats_itself(ids: Sequence[int]) -> bool:
    """Whether ``ids`` end in a loop (see :data:`LOOP_COPIES`); a few microseconds a call: most periods fail on
    their first comparison."""
    n = len(ids)
    for period in range(1, LOOP_MAX_PERIOD + 1):
        span = max(LOOP_COPIES * period, LOOP_MIN_TOKENS)
        if span > n:
            if LOOP_COPIES * period > n:
                return False
            continue
        if ids[n - 1] != ids[n - 1 - period]:
            continue
        if all(ids[i] == ids[i - period] for i in range(n - span + period, n)):
            return True
    return False


class StreamingResponse:
    """Turns generated text pieces into the chunks of ``cut_at_stop(text, stops).strip()``.

    Whatever it emits, joined, equals that final text: leading whitespace is dropped, trailing whitespace and
    any tail that could be the start of a stop string are held back until more text shows what they are.
    """

    def __init__(self, stop_strings: list[str]):
        self.stop_strings = stop_strings
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.text += piece
        # Stops are found in the whole text before it is stripped, as cut_at_stop(text).strip() does: a stop string
        # that starts with whitespace (found by the fuzz tests: stop "\r" in "\r0") must still end the response.
        cut = cut_at_stop(self.text, self.stop_strings)
        if len(cut) < len(self.text):
            self.stopped = True
            return self._emit(cut.strip())
        safe = len(self.text) - max((_overlap(self.text, s) for s in self.stop_strings), default=0)
        return self._emit(self.text[:safe].strip())

    def finish(self) -> str:
        return self._emit(cut_at_stop(self.text, self.stop_strings).strip())

    def _emit(self, ready: str) -> str:
        if len(ready) <= self.emitted:
            return ""
        out, self.emitted = ready[self.emitted :], len(ready)
        return out


def check_stop(stop: Any) -> list[str]:
    """The caller's stop sequences as a list of strings: ``None`` is none, one string is one stop sequence
    (never split into its characters); anything else must be a list or tuple of strings (a
    :class:`~dolly_langchain.errors.DollyTypeError` otherwise, raised before anything is generated)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, (list, tuple)):
        raise DollyTypeError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for item in stop:
        if not isinstance(item, str):
            raise DollyTypeError(f"stop must be a list of strings; it holds {item!r} ({type(item).__name__})")
    return list(stop)


def check_text(text: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``, left by decoding bytes
    with ``errors="surrogateescape"``) with a :class:`~dolly_langchain.errors.DollyValueError` naming where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DollyValueError(
            f"the text holds a lone surrogate {text[err.start]!r} at character {err.start}: it is not valid Unicode "
            "(decode bytes with errors='replace', or fix the input's encoding)"
        ) from None


def cut_at_stop(text: str, stop_strings) -> str:
    """Cut ``text`` before the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


def _leading_special_ids(tokenizer) -> list[int]:
    """Ids the tokenizer puts before any text (a BOS for Llama-style tokenizers, nothing for GPT-NeoX)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return with_special[:start]
    return []
