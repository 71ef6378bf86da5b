"""A tokenizer without transformers: what :class:`~dolly_langchain.codec.PromptCodec` needs, on ``tokenizers`` alone.

Importing transformers costs about a second on a 2-core CPU (and its ``AutoTokenizer`` pulls in torch, another
1.5 s), although a transformers fast tokenizer is a thin layer over the ``tokenizers`` library. The CTranslate2 engine
needs nothing else from transformers, so its runtime encodes and decodes with :class:`LightTokenizer`, which reads the
files transformers' ``save_pretrained`` wrote (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``) and reproduces the calls the codec makes: ``__call__`` (with ``add_special_tokens`` and
``split_special_tokens``), ``decode``, the added and special tokens, ``apply_chat_template(..., tokenize=False)``.

It is used only where :func:`matches_transformers` has checked it against the transformers tokenizer of the same
directory (the CTranslate2 conversion does this once and records the verdict), so a model whose tokenizer class adds
behaviour of its own keeps the transformers tokenizer. :meth:`LightTokenizer.transformers_tokenizer` loads that one
on demand, for callers that need the real object (RAG chunking, structured output, the pipeline adapter).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dolly_langchain.errors import DollyTypeError, DollyValueError

#: transformers' ``VERY_LARGE_INTEGER``: the ``model_max_length`` of a tokenizer that names none.
NO_LENGTH_LIMIT = int(1e30)
#: The named special tokens (transformers' ``SPECIAL_TOKENS_ATTRIBUTES``), as the chat template sees them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class LightTokenizer:
    """The transformers fast-tokenizer calls :class:`~dolly_langchain.codec.PromptCodec` makes, on ``tokenizers``."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.name_or_path = str(path)
        directory = Path(path)
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # transformers turns both off per call unless asked for (the codec never asks).
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        self._special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        self.model_max_length = int(config.get("model_max_length") or NO_LENGTH_LIMIT)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.padding_side = config.get("padding_side", "right")
        template = config.get("chat_template")
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) else None
        self._compiled_template = None
        self._full = None
        self._full_lock = threading.Lock()

    # -- special tokens ----------------------------------------------------------------------------------------

    def __getattr__(self, name: str):
        # bos_token, eos_token_id, pad_token, ... as transformers names them (only called for missing attributes).
        special = self.__dict__.get("_special")
        if special is not None:
            if name in special:
                return special[name]
            if name.endswith("_id") and name[:-3] in special:
                token = special[name[:-3]]
                return None if token is None else self.convert_tokens_to_ids(token)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SPECIAL_TOKEN_NAMES:
            self._special[name] = _token_text(value)
        else:
            object.__setattr__(self, name, value)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {name: token for name, token in self._special.items() if token is not None}

    @property
    def added_tokens_decoder(self) -> dict:
        """``{id: tokenizers.AddedToken}`` (``.content``, ``.special``), as transformers returns it."""
        return self._tokenizer.get_added_tokens_decoder()

    def get_added_vocab(self) -> dict[str, int]:
        return {token.content: i for i, token in sorted(self.added_tokens_decoder.items(), key=lambda item: item[0])}

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            if index is None:
                unk = self._special["unk_token"]
                return None if unk is None else self._tokenizer.token_to_id(unk)
            return index
        return [self.convert_tokens_to_ids(token) for token in tokens]

    # -- text <-> ids ------------------------------------------------------------------------------------------

    def __call__(self, text: str, *, add_special_tokens: bool = True, split_special_tokens: bool = False,
                 verbose: bool = True) -> dict[str, list[int]]:
        """``{"input_ids": [...]}`` of one text, as transformers' fast tokenizer encodes it."""
        if not isinstance(text, str):
            raise DollyTypeError(f"{type(self).__name__} encodes one str at a time, got {type(text).__name__}")
        # transformers sets this flag on the shared backend per call too (the codec encodes from one thread at a time).
        self._tokenizer.encode_special_tokens = split_special_tokens
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, token_ids: Sequence[int] | int, skip_special_tokens: bool = False) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self._tokenizer.model).__name__ != "BPE":
            for before, after in _CLEAN_UP:  # transformers skips this for BPE models, and so do we
                text = text.replace(before, after)
        return text

    def apply_chat_template(self, conversation: Sequence[dict], *, tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The chat template rendered as transformers renders it (its sandboxed Jinja environment); text only."""
        if tokenize:
            raise DollyTypeError(f"{type(self).__name__}.apply_chat_template renders text only: pass tokenize=False")
        if self.chat_template is None:
            raise DollyValueError("this tokenizer has no chat template")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        messages = [{key: value for key, value in dict(message).items() if value is not None} for message in conversation]
        return self._compiled_template.render(messages=messages, tools=None, documents=None,
                                              add_generation_prompt=add_generation_prompt,
                                              **{**self.special_tokens_map, **kwargs})

    # -- the transformers tokenizer of the same files ----------------------------------------------------------

    def transformers_tokenizer(self):
        """transformers' tokenizer of the same directory, loaded on first use (imports transformers), with this
        tokenizer's padding side and pad token."""
        with self._full_lock:
            if self._full is None:
                from transformers import AutoTokenizer

                full = AutoTokenizer.from_pretrained(self.name_or_path)
                full.padding_side = self.padding_side
                if full.pad_token != self.pad_token:
                    full.pad_token = self.pad_token
                self._full = full
        return self._full


def full_tokenizer(tokenizer):
    """The transformers tokenizer behind ``tokenizer``: itself, or a :class:`LightTokenizer`'s twin."""
    return tokenizer.transformers_tokenizer() if isinstance(tokenizer, LightTokenizer) else tokenizer


#: Probes for :func:`matches_transformers`: plain and accented text, whitespace runs, digits, emoji, markup, and the
#: strings that are special in Dolly's and chat formats.
PROBE_TEXTS = (
    "Name three colors.",
    "  leading and trailing spaces  \n\n\tand tabs\r\n",
    "Ünïcödé: café, naïve, Straße, 日本語のテキスト, русский текст, العربية",
    "Numbers 1234567890 3.14159 -42 1e10; emoji 😀👍🏽 and symbols ~!@#$%^&*()_+{}|:\"<>?",
    "### Instruction:\nWrite\n\n### Response:\nok\n\n### End",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> <s></s><unk> [INST] x [/INST]",
    "Don't stop . , ? ! 's 're 've n't 'm",
    "a",
    "",
)


def matches_transformers(path: str | Path, reference=None) -> bool:
    """Whether :class:`LightTokenizer` of ``path`` gives exactly what transformers' tokenizer of ``path`` gives on
    :data:`PROBE_TEXTS` and every added token: ids (with and without special tokens, split or not), decoded text
    (special tokens skipped or kept), special tokens, added tokens, vocabulary size, length limit and the chat
    template's rendering. ``reference``: that transformers tokenizer, when already loaded."""
    if reference is None:
        from transformers import AutoTokenizer

        reference = AutoTokenizer.from_pretrained(str(path))
    try:
        light = LightTokenizer(path)
        if not getattr(reference, "is_fast", False) or len(light) != len(reference):
            return False
        if light.special_tokens_map != reference.special_tokens_map:
            return False
        if light.model_max_length != reference.model_max_length or light.chat_template != reference.chat_template:
            return False
        if light.get_added_vocab() != reference.get_added_vocab():
            return False
        if {i: t.special for i, t in light.added_tokens_decoder.items()} != {
                i: t.special for i, t in reference.added_tokens_decoder.items()}:
            return False
        texts = [*PROBE_TEXTS, *light.get_added_vocab(), " ".join(light.get_added_vocab())]
        for text in texts:
            for add in (False, True):
                for split in (False, True):
                    ids = light(text, add_special_tokens=add, split_special_tokens=split)["input_ids"]
                    if ids != reference(text, add_special_tokens=add, split_special_tokens=split)["input_ids"]:
                        return False
                    for skip in (False, True):
                        if light.decode(ids, skip_special_tokens=skip) != reference.decode(ids, skip_special_tokens=skip):
                            return False
        if light.chat_template is not None:
            for conversation in ([{"role": "user", "content": "hi"}],
                                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]):
                for prompt in (False, True):
                    if light.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt) != \
                            reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt):
                        return False
    except Exception:  # noqa: BLE001 - anything this tokenizer cannot reproduce means: keep transformers'
        return False
    return True


_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _token_text(value: Any) -> str | None:
    """A special token as configured: a string, or transformers' serialized ``AddedToken`` (``{"content": ...}``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    return str(getattr(value, "content", value))


def _compile_template(template: str):
    """The template in an environment like transformers' (``chat_template_utils._compile_jinja_template``): sandboxed,
    ``trim_blocks`` and ``lstrip_blocks``, loop controls, ``{% generation %}`` blocks, and its ``tojson``,
    ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers tracks it for masks only)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)
