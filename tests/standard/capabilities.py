"""What ``ChatDolly`` can and cannot do, told to LangChain's standard suites (shared by the unit and integration
classes so the two never disagree)."""

from __future__ import annotations

from typing import Any


class ChatDollyCapabilities:
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # model=None: the embedded SmolLM2-135M-Instruct on the default engine (CTranslate2 int8), loaded on first use.
        return {"model": None}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # LangChain's standard parameters as the suite sets them, minus api_key: a local model has none.
        params = dict(super().standard_chat_model_params)
        params.pop("api_key", None)
        return params

    @property
    def has_tool_calling(self) -> bool:
        return False  # these models were not trained to call tools; bind_tools refuses

    @property
    def has_structured_output(self) -> bool:
        return True  # with_structured_output: grammar-constrained JSON

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one loaded model per instance; a call cannot switch models

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False
