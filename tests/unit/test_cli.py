import json
import os
import subprocess
import sys

import pytest

from conftest import MEMORIZED
from dolly_langchain.cli import main

FRANCE, COLOR, SUMMARY = MEMORIZED


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ask_prints_the_response(capsys, memorized_neox_dir):
    code, out, _ = run(capsys, "ask", FRANCE[0], "--model", str(memorized_neox_dir), "--max-new-tokens", "40")
    assert code == 0 and out == FRANCE[2] + "\n"


def test_ask_with_context_file_and_stream(capsys, memorized_neox_dir, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text(SUMMARY[1] + "\n", encoding="utf-8")
    code, out, _ = run(capsys, "ask", SUMMARY[0], "--context-file", str(context), "--model", str(memorized_neox_dir),
                       "--stream")
    assert code == 0 and out == SUMMARY[2] + "\n"
    code, out, _ = run(capsys, "ask", SUMMARY[0], "--context", SUMMARY[1], "--model", str(memorized_neox_dir))
    assert out == SUMMARY[2] + "\n"


def test_ask_json(capsys, memorized_neox_dir):
    code, out, _ = run(capsys, "ask", COLOR[0], "--model", str(memorized_neox_dir), "--json")
    record = json.loads(out)
    assert code == 0 and record["response"] == COLOR[2] and record["prompt_format"] == "dolly"
    assert record["instruction"] == COLOR[0] and record["context"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask", "   "], "instruction is empty"),
        (["ask", "hi", "--context-file", "/no/such/file.txt"], "cannot read --context-file /no/such/file.txt"),
        (["ask", "hi", "--model", "./no-such-model-dir"], "does not exist"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("dolly: error")]
    assert code == 2 and len(lines) == 1 and message in lines[0]


def test_directory_without_model_is_reported(capsys, tmp_path):
    code, _, err = run(capsys, "ask", "hi", "--model", str(tmp_path))
    assert code == 2 and "holds no model" in err


def test_unreachable_hub_is_named(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "dolly_langchain.cli", "ask", "hi", "--model", "databricks/dolly-v2-3b"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2
    assert "hub is unreachable" in result.stderr and "databricks/dolly-v2-3b" in result.stderr


def test_bad_flag_values_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "hi", "--max-new-tokens", "0"])
    assert exit_info.value.code == 2
    assert "--max-new-tokens" in capsys.readouterr().err


# --- the command tree --------------------------------------------------------------------------------------------


def test_dolly_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for command in ("ask", "chat", "rag", "eval", "finetune"):
        assert f"    {command} " in out, command
    for argv in (["rag", "--help"], ["finetune", "--help"], ["finetune", "plan", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0, argv
        assert capsys.readouterr().out.startswith(f"usage: dolly {' '.join(argv[:-1])}"), argv


def test_a_dolly_error_from_any_subcommand_is_one_line_and_exit_2(capsys, monkeypatch):
    from dolly_langchain import DollyError
    from dolly_langchain.cli import ask

    def failing(args):
        raise DollyError("the flag --x is wrong: pass --x 3")

    monkeypatch.setattr(ask, "run", failing)
    code, out, err = run(capsys, "ask", "hi")
    assert code == 2 and out == "" and err == "dolly: error: the flag --x is wrong: pass --x 3\n"


# --- dolly chat ----------------------------------------------------------------------------------------------------


def test_chat_keeps_the_conversation_resets_and_exits(capsys, monkeypatch, memorized_neox_dir):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{FRANCE[0]}\n\n/reset\n/nonsense\n{COLOR[0]}\n/exit\nnot read\n"))
    code, out, err = run(capsys, "chat", "--model", str(memorized_neox_dir), "--max-new-tokens", "40")
    assert code == 0
    assert out == f"{FRANCE[2]}\n{COLOR[2]}\n"  # each question alone after /reset: the memorized answers
    assert "(conversation cleared)" in err and "unknown command /nonsense" in err and "/reset " in err


def test_chat_ends_at_end_of_input(capsys, monkeypatch, memorized_neox_dir):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(FRANCE[0]))
    code, out, _ = run(capsys, "chat", "--model", str(memorized_neox_dir), "--max-new-tokens", "40")
    assert code == 0 and out == FRANCE[2] + "\n"


def test_chat_session_history_and_window(memorized_neox_dir, capsys):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from dolly_langchain.chat import ChatDolly
    from dolly_langchain.cli.chat import ChatSession

    chat = ChatDolly.from_model_id(str(memorized_neox_dir), engine="transformers", do_sample=False, max_new_tokens=20)
    session = ChatSession(chat, system="Be brief.")
    first = session.say(FRANCE[0])
    assert session.messages[0] == SystemMessage("Be brief.")
    assert session.messages[1:] == [HumanMessage(FRANCE[0]), AIMessage(first)]
    session.say(COLOR[0])
    assert [type(m) for m in session.messages] == [SystemMessage, HumanMessage, AIMessage, HumanMessage, AIMessage]
    session.reset()
    assert session.messages == [SystemMessage("Be brief.")]

    long_turn = " ".join(["the water is blue and the people can see it"] * 25)
    assert chat.count_prompt_tokens([HumanMessage(long_turn)]) < chat.context_window - 20
    for _ in range(4):
        session.say(long_turn)
        assert chat.count_prompt_tokens(session.messages[:-1]) + 20 <= chat.context_window
    assert session.messages[0] == SystemMessage("Be brief.")
    assert "oldest message" in capsys.readouterr().err


class FakeChat:
    """A stand-in for ChatDolly: counts a word as a token, streams scripted pieces, records what it was asked."""

    context_window = 30
    max_new_tokens = 10

    def __init__(self, pieces=("Hel", "lo"), fail=None, capsys=None):
        self.pieces, self.fail, self.capsys = pieces, fail, capsys
        self.asked = []
        self.printed_before_each_piece = []

    def count_prompt_tokens(self, messages):
        return sum(len(m.content.split()) for m in messages)

    def stream(self, messages):
        from langchain_core.messages import AIMessageChunk

        self.asked.append(list(messages))
        for piece in self.pieces:
            if self.capsys is not None:
                self.printed_before_each_piece.append(self.capsys.readouterr().out)
            if self.fail is not None and piece == self.pieces[-1]:
                raise self.fail
            yield AIMessageChunk(content=piece)


def test_chat_session_streams_each_piece_as_it_comes_and_sends_the_history(capsys):
    from langchain_core.messages import AIMessage, HumanMessage

    from dolly_langchain.cli.chat import ChatSession

    fake = FakeChat(pieces=("Hel", "lo", "!"), capsys=capsys)
    session = ChatSession(fake)
    assert session.say("hi") == "Hello!"
    assert fake.printed_before_each_piece == ["", "Hel", "lo"]  # printed one by one, not at the end
    session.say("again")
    assert fake.asked[-1] == [HumanMessage("hi"), AIMessage("Hello!"), HumanMessage("again")]


def test_chat_session_keeps_its_history_when_a_turn_fails(capsys):
    from langchain_core.messages import AIMessage, HumanMessage

    from dolly_langchain.cli.chat import ChatSession
    from dolly_langchain.generation import ContextWindowError

    fake = FakeChat()
    session = ChatSession(fake)
    session.say("one two three")
    before = list(session.messages)
    assert before == [HumanMessage("one two three"), AIMessage("Hello")]

    fake.fail = KeyboardInterrupt()  # Ctrl-C half-way through the answer
    assert session.say("four") is None
    assert session.messages == before and "interrupted" in capsys.readouterr().err

    fake.fail = ContextWindowError("the prompt is 40 tokens ...")  # a message too long even alone
    assert session.say(" ".join(["word"] * 25)) is None
    assert session.messages == before  # the history was trimmed only in the copy sent, and is kept
    assert "dolly: error: the prompt is 40 tokens" in capsys.readouterr().err


def test_chat_session_drops_the_oldest_turns_to_fit_the_window(capsys):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from dolly_langchain.cli.chat import ChatSession

    fake = FakeChat(pieces=("ok",))
    session = ChatSession(fake, system="be brief")
    for turn in ("a b c d e f", "g h i j k l", "m n o p q r"):
        session.say(turn)
    # 2 + 6 + 1 + 6 + 1 + 6 words + 10 new tokens > 30: the first question and its answer went
    assert fake.asked[-1] == [SystemMessage("be brief"), HumanMessage("g h i j k l"), AIMessage("ok"),
                              HumanMessage("m n o p q r")]
    assert "dropped the 2 oldest messages" in capsys.readouterr().err


def test_errors_raised_deep_in_the_library_are_one_line_too(capsys, memorized_neox_dir):
    """Not only the CLI's own checks: a prompt over the model's window (generation.ContextWindowError) and a bad
    engine option (runtime) are DollyErrors, so every command reports them as one line with exit code 2."""
    code, out, err = run(capsys, "ask", FRANCE[0], "--model", str(memorized_neox_dir), "--max-new-tokens", "600")
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith("dolly: error: the prompt is ") and "Traceback" not in err
    code, _, err = run(capsys, "ask", FRANCE[0], "--model", str(memorized_neox_dir), "--engine", "transformers",
                       "--compute-type", "int8")
    assert code == 2 and err.splitlines()[-1].startswith("dolly: error: compute_type is a CTranslate2 option")


def test_finetune_plan_takes_training_flags_before_and_after_plan(capsys):
    def global_batch(*argv):
        code, out, err = run(capsys, *argv, "--json")
        assert code == 0, err
        return json.loads(out)["steps"]["global_batch"]

    preset = ["--preset", "dolly-v2-12b-a100"]
    assert global_batch("finetune", "plan", *preset, "--num-gpus", "8") == 48  # the preset's batch 6 on 8 GPUs
    assert global_batch("finetune", *preset, "plan", "--num-gpus", "8") == 48
    assert global_batch("finetune", "--per-device-train-batch-size", "2", "plan", *preset, "--num-gpus", "8") == 16
    assert global_batch("finetune", *preset, "plan", "--num-gpus", "8", "--per-device-train-batch-size", "1") == 8
