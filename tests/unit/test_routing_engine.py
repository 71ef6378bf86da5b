"""engine='auto' on the embedded model: lone prompts on one engine, batches on another loaded on first use."""

import pytest

from dolly_langchain.engines.base import EngineOutput, GenerationEngine
from dolly_langchain.engines.routing import RoutingEngine
from dolly_langchain.generation import SamplingOptions
from dolly_langchain.runtime import routes_auto


class Recording(GenerationEngine):
    def __init__(self, name):
        self.name, self.calls = name, []

    device = "cpu"
    context_window = 128

    def generate(self, prompts, options, stop_token_ids, on_token=None):
        self.calls.append(len(prompts))
        for row in range(len(prompts)):
            if on_token is not None:
                on_token(row, 7, None)
        return [EngineOutput([7]) for _ in prompts]


def test_lone_prompts_go_to_one_engine_and_batches_to_the_other_loaded_once():
    single, batched, loads = Recording("llamacpp"), Recording("ctranslate2"), []
    engine = RoutingEngine(single, lambda: loads.append(1) or batched)
    options = SamplingOptions(max_new_tokens=4)
    assert engine.generate([[1, 2]], options, []) == [EngineOutput([7])]
    assert loads == [] and "not loaded" in str(engine.describe()["batched"])  # a lone prompt loads nothing else
    seen = []
    engine.generate([[1], [2], [3]], options, [], lambda row, token, logprob: seen.append(row) or False)
    engine.generate([[1], [2]], options, [])
    assert single.calls == [1] and batched.calls == [3, 2] and loads == [1] and sorted(seen) == [0, 1, 2]
    # llama.cpp has no no_repeat_ngram_size sampler: such calls run on the batch engine even alone.
    engine.generate([[1]], SamplingOptions(max_new_tokens=4, no_repeat_ngram_size=3), [])
    assert batched.calls[-1] == 1 and single.calls == [1]
    assert engine.describe()["batched"]["engine"] == "ctranslate2" and not engine.supports_seed


@pytest.mark.parametrize(("engine", "model", "compute_type", "device", "expected"), [
    ("auto", None, "auto", None, True),
    (None, None, "auto", "cpu", True),
    ("ctranslate2", None, "auto", None, False),
    ("auto", "runs/mine", "auto", None, False),
    ("auto", None, "int8", None, False),
    ("auto", None, "auto", "cuda", False),
])
def test_auto_routes_only_the_embedded_model_on_cpu(engine, model, compute_type, device, expected):
    pytest.importorskip("xllamacpp")
    pytest.importorskip("ctranslate2")
    assert routes_auto(engine, model, compute_type, device) is expected
