"""LangChain's own integration suite for chat models (``langchain-tests``) on ``ChatDolly`` with the real embedded
SmolLM2-135M-Instruct, built with LangChain's standard parameters (``temperature=0, max_tokens=100, timeout=60,
stop=[], max_retries=2``, and again with ``streaming=True``). Capability flags say what is true; nothing is skipped
or xfailed by hand."""

from __future__ import annotations

from langchain_tests.integration_tests import ChatModelIntegrationTests

from dolly_langchain.chat import ChatDolly
from standard.capabilities import ChatDollyCapabilities


class TestChatDollyIntegration(ChatDollyCapabilities, ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatDolly]:
        return ChatDolly
