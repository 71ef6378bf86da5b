"""``dolly chat``: a multi-turn conversation with a local model in the terminal, streamed as it is generated.

    dolly chat                                         # the embedded SmolLM2-135M-Instruct
    dolly chat --system "Answer in one sentence." --temperature 0.7
    dolly chat --model runs/my-dolly --engine transformers

Type a message and press Enter; the answer streams in token by token. The conversation is kept: each answer sees
the turns before it (through :class:`~dolly_langchain.chat.ChatDolly`: the model's chat template, or Dolly's
instruction format with the history as context). When the conversation outgrows the model's window, the oldest
turns are dropped (and a note says so). ``/reset`` starts over (the ``--system`` message stays), ``/exit`` or
Ctrl-D leaves, ``/help`` lists the commands, Ctrl-C stops an answer half-way (the turn is discarded) or, at the
prompt, leaves.
"""

from __future__ import annotations

import argparse
import sys

from dolly_langchain.clitools import add_model_arguments, load_llm, text_problem
from dolly_langchain.clitools import text as text_type
from dolly_langchain.errors import DollyError

HELP = "talk with the model, turn by turn (history kept, answers streamed)"
PARSER_OPTIONS = {
    "description": "A multi-turn chat with the model in the terminal. Commands: /reset clears the conversation, "
    "/exit (or Ctrl-D) leaves.",
}
COMMANDS = {
    "/reset": "forget the conversation; the --system message stays",
    "/exit": "leave; Ctrl-D too",
    "/help": "list these commands",
}


def register(commands) -> None:
    configure(commands.add_parser("chat", help=HELP, **PARSER_OPTIONS))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", type=text_type, metavar="TEXT", default=None,
                        help="a system message that opens every conversation (e.g. how to answer)")
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    chat = load_llm(args, chat=True)
    session = ChatSession(chat, args.system)
    interactive = sys.stdin.isatty()
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:  # bytes that are not UTF-8 arrive as lone surrogates, reported below, not a traceback
        reconfigure(errors="surrogateescape")
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"dolly chat with {chat.model_id}. /reset starts over, /exit or Ctrl-D leaves, /help lists commands.",
              file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        problem = text_problem(text)
        if problem:
            print(f"dolly: error: that message {problem}", file=sys.stderr)
            continue
        if text.startswith("/"):
            if text == "/exit":
                return 0
            if text == "/reset":
                session.reset()
                print("(conversation cleared)", file=sys.stderr)
            else:
                if text != "/help":
                    print(f"unknown command {text.split()[0]}", file=sys.stderr)
                print("\n".join(f"  {name:7} {what}" for name, what in COMMANDS.items()), file=sys.stderr)
            continue
        session.say(text)


class ChatSession:
    """The conversation of one ``dolly chat``: its messages, and one turn at a time streamed to stdout."""

    def __init__(self, chat, system: str | None = None):
        from langchain_core.messages import SystemMessage

        self.chat = chat
        self.opening = [SystemMessage(system)] if system else []
        self.messages = list(self.opening)

    def reset(self) -> None:
        self.messages = list(self.opening)

    def say(self, text: str) -> str | None:
        """Stream the answer to ``text`` to stdout and keep both in the history; ``None`` (and the history as it
        was) when the answer was interrupted or the message cannot be answered."""
        from langchain_core.messages import AIMessage, HumanMessage

        conversation, dropped = self._fitted([*self.messages, HumanMessage(text)])
        parts: list[str] = []
        try:
            for chunk in self.chat.stream(conversation):
                print(chunk.content, end="", flush=True)
                parts.append(chunk.content)
        except KeyboardInterrupt:
            print("\n(answer interrupted; that turn is discarded)", file=sys.stderr)
            return None
        except DollyError as err:  # e.g. a message that alone does not fit the window
            print(f"dolly: error: {err}", file=sys.stderr)
            return None
        print()
        if dropped:
            print(f"(dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to fit the model's window of "
                  f"{self.chat.context_window} tokens)", file=sys.stderr)
        answer = "".join(parts)
        self.messages = [*conversation, AIMessage(answer)]
        return answer

    def _fitted(self, messages: list) -> tuple[list, int]:
        """``messages`` without their oldest turns, a question and its answer at a time (never the system message or
        the new message), so that the prompt and a full answer fit the model's window; and how many were dropped."""
        window = self.chat.context_window
        first = len(self.opening)
        dropped = 0
        while (window is not None and len(messages) - first > 1
               and self.chat.count_prompt_tokens(messages) + self.chat.max_new_tokens > window):
            n = min(2, len(messages) - first - 1)
            messages = messages[:first] + messages[first + n:]
            dropped += n
        return messages, dropped
