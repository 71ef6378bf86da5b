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

from dolly_langchain.clitools import add_model_arguments, load_llm

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
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="a system message that opens every conversation (e.g. how to answer)")
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    chat = load_llm(args, chat=True)
    session = ChatSession(chat, args.system)
    interactive = sys.stdin.isatty()
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
        if text.startswith("/"):
            if text in ("/exit", "/quit"):
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
        """Stream the answer to ``text`` to stdout and keep both in the history; ``None`` if it was cut short."""
        from langchain_core.messages import AIMessage, HumanMessage

        self.messages.append(HumanMessage(text))
        self._fit_window()
        parts: list[str] = []
        try:
            for chunk in self.chat.stream(self.messages):
                print(chunk.content, end="", flush=True)
                parts.append(chunk.content)
        except KeyboardInterrupt:
            print("\n(answer interrupted; that turn is discarded)", file=sys.stderr)
            self.messages.pop()
            return None
        except ValueError as err:  # a message that alone does not fit the window
            print(f"dolly: error: {err}", file=sys.stderr)
            self.messages.pop()
            return None
        print()
        answer = "".join(parts)
        self.messages.append(AIMessage(answer))
        return answer

    def _fit_window(self) -> None:
        """Drop the oldest turns, a question and its answer at a time (never the system message or the new message),
        until the prompt and a full answer fit the model's window."""
        window = self.chat.context_window
        if window is None:
            return
        dropped = 0
        first = len(self.opening)
        while (len(self.messages) - first > 1
               and self.chat.count_prompt_tokens(self.messages) + self.chat.max_new_tokens > window):
            n = min(2, len(self.messages) - first - 1)
            del self.messages[first:first + n]
            dropped += n
        if dropped:
            print(f"(dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to fit the model's window of "
                  f"{window} tokens)", file=sys.stderr)
