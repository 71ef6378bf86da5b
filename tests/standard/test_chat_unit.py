"""LangChain's own unit suite for chat models (``langchain-tests``), run on ``ChatDolly`` as every partner package
runs it. Capability flags say what is true of a local model; nothing is skipped or xfailed by hand."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from dolly_langchain.chat import ChatDolly
from standard.capabilities import ChatDollyCapabilities


class TestChatDollyUnit(ChatDollyCapabilities, ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatDolly]:
        return ChatDolly
