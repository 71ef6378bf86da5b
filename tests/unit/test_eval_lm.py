"""DollyEvalLM (lm-eval's LM over this library's engines) against lm-eval's own HFLM on a tiny random model: the same
log-likelihoods on fp32 transformers (shared contexts, one-token and longer choices, an empty context, a context cut
to the window), close ones on CTranslate2, rolling log-likelihoods, generation, and --engine reaching the LM."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

WORDS = "the cat sat on the mat and the dog ran to the capital of France where Paris is a blue city".split()


def _instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def _requests():
    long_context = " ".join(WORDS[i % len(WORDS)] for i in range(700))  # > 512 tokens: cut from the left
    shared = "Question: Which is a color? Answer:"
    return [
        (shared, " blue"), (shared, " the mat"), (shared, " cat sat on the"), (shared, " Paris"),
        ("The capital of France is ", "Paris."),  # trailing space moves to the continuation
        ("the dog ran to", " the city"), ("the dog ran to", " the"),
        ("", "the cat sat"),  # empty context: the prefix token
        (long_context, " the cat"), (long_context, " blue city where the dog ran"),
    ]


@pytest.fixture(scope="module")
def tiny(tiny_neox_dir):
    from dolly_langchain.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_neox_dir))
    return model, tokenizer


@pytest.fixture(scope="module")
def hflm_scores(tiny):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3)
    return hflm.loglikelihood(_instances("loglikelihood", _requests()), disable_tqdm=True), hflm


def _ours(tiny, batch_size=2):
    from dolly_langchain.evaluation.lm import DollyEvalLM
    from dolly_langchain.runtime import DollyRuntime

    model, tokenizer = tiny
    return DollyEvalLM(DollyRuntime.for_transformers(model, tokenizer), batch_size=batch_size)


def test_fp32_transformers_loglikelihoods_equal_hflm(tiny, hflm_scores):
    expected, hflm = hflm_scores
    for batch_size in (1, 3, 16):
        lm = _ours(tiny, batch_size)
        assert lm.max_length == hflm.max_length == 512
        got = lm.loglikelihood(_instances("loglikelihood", _requests()), disable_tqdm=True)
        assert len(got) == len(expected)
        for (value, greedy), (ref, ref_greedy) in zip(got, expected):
            assert value == pytest.approx(ref, abs=1e-4)
            assert greedy == ref_greedy
    # the shared context ran once: 4 choices of one context cost its tokens once plus the choices' own
    lm = _ours(tiny, 16)
    lm.loglikelihood(_instances("loglikelihood", _requests()[:4]), disable_tqdm=True)
    tok = tiny[1]
    context = len(tok.encode("Question: Which is a color? Answer:"))
    choices = sum(len(tok.encode(c)) - 1 for c in (" blue", " the mat", " cat sat on the", " Paris"))
    assert lm.scored_tokens == context + choices


def test_the_tokens_lm_eval_sees_are_hflms(tiny, hflm_scores):
    _, hflm = hflm_scores
    lm = _ours(tiny)
    for text in ("Question: Which is a color? Answer:", "<|endoftext|>the cat", "The capital of France is"):
        assert lm.tok_encode(text) == hflm.tok_encode(text)
    assert (lm.prefix_token_id, lm.eot_token_id) == (hflm.prefix_token_id, hflm.eot_token_id)


def test_loglikelihood_rolling_equals_hflm(tiny):
    from lm_eval.models.huggingface import HFLM

    # HFLM at batch size 1: batched, its windows of one text came out 2.4 nats apart from the same windows run one by
    # one here (lm-eval 0.4.13), while ours equal the one-by-one values at every batch size
    hflm = HFLM(pretrained=tiny[0], tokenizer=tiny[1], batch_size=1)
    texts = [(" ".join(WORDS * 40),), ("the cat sat on the mat",)]  # the first needs several windows
    ours = _ours(tiny).loglikelihood_rolling(_instances("loglikelihood_rolling", texts), disable_tqdm=True)
    ref = hflm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts), disable_tqdm=True)
    assert ours == pytest.approx(ref, abs=1e-3)
    assert all(v < 0 for v in ours)


def test_generate_until_greedy_through_the_runtime(memorized_neox_dir):
    from lm_eval.models.huggingface import HFLM

    from dolly_langchain.evaluation.lm import DollyEvalLM
    from dolly_langchain.models import load_model_and_tokenizer
    from dolly_langchain.prompts import format_prompt
    from dolly_langchain.runtime import DollyRuntime

    model, tokenizer = load_model_and_tokenizer(str(memorized_neox_dir))
    lm = DollyEvalLM(DollyRuntime.for_transformers(model, tokenizer), batch_size=4)
    prompts = [format_prompt("What is the capital of France?"), format_prompt("Name a primary color.")]
    args = [(p, {"until": [" of", "\n\n"], "max_gen_toks": 20, "do_sample": False}) for p in prompts]
    got = lm.generate_until(_instances("generate_until", args))
    assert got[0] == "Paris is the capital"  # the memorized answer, cut before the stop string " of"
    assert got[1].startswith("Blue is a primary color.")
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    assert got == hflm.generate_until(_instances("generate_until", args), disable_tqdm=True)


def test_ctranslate2_loglikelihoods_are_close(tiny_neox_dir, hflm_scores):
    pytest.importorskip("ctranslate2")
    from dolly_langchain.evaluation.lm import DollyEvalLM
    from dolly_langchain.runtime import load_runtime

    expected, _ = hflm_scores
    lm = DollyEvalLM(load_runtime(str(tiny_neox_dir), engine="ctranslate2", compute_type="float32"), batch_size=4)
    assert lm.max_length == 512
    got = lm.loglikelihood(_instances("loglikelihood", _requests()), disable_tqdm=True)
    for (value, greedy), (ref, ref_greedy) in zip(got, expected):
        assert value == pytest.approx(ref, abs=2e-3)
    lm8 = DollyEvalLM(load_runtime(str(tiny_neox_dir), engine="ctranslate2", compute_type="int8"), batch_size=4)
    got8 = lm8.loglikelihood(_instances("loglikelihood", _requests()), disable_tqdm=True)
    for (value, _), (ref, _) in zip(got8, expected):
        assert value == pytest.approx(ref, rel=0.1, abs=0.5)


def test_engine_flag_reaches_the_lm_and_the_cache_key(tmp_path, tiny_neox_dir, monkeypatch, capsys):
    from dolly_langchain.evaluation import harness, lm as lm_module
    from dolly_langchain.evaluation.cli import main
    from eval_helpers import write_eval_dir

    monkeypatch.setattr(harness, "cache_root", lambda: tmp_path / "cache")
    seen = []
    real = lm_module.DollyEvalLM

    class Spy(real):
        def __init__(self, runtime, **kwargs):
            seen.append(runtime.engine.describe())
            super().__init__(runtime, **kwargs)

    monkeypatch.setattr(lm_module, "DollyEvalLM", Spy)
    data = write_eval_dir(tmp_path / "eval", tasks=("piqa",))
    scores = {}
    for engine, extra in (("transformers", []), ("ctranslate2", ["--compute-type", "float32"])):
        out = tmp_path / engine
        argv = [str(tiny_neox_dir), "--tasks", "piqa", "--data-dir", str(data), "--output", str(out), "--device",
                "cpu", "--engine", engine, *extra]
        assert main(argv) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["dolly_eval"]["engine"] == engine
        scores[engine] = results["card"]["rows"][0]["scores"]["piqa"]["value"]
    assert [d["engine"] for d in seen] == ["transformers", "ctranslate2"]
    assert seen[1]["compute_type"] == "float32"
    assert scores["transformers"] == scores["ctranslate2"]
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one cache per engine and compute type
    with pytest.raises(SystemExit):
        main([str(tiny_neox_dir), "--tasks", "piqa", "--engine", "onnx"])
    assert "--engine" in capsys.readouterr().err


def test_forward_passes_per_batch(tiny, hflm_scores):
    """A context with one continuation is one forward (context + continuation); a shared context is one forward
    and its choices' tails run over its cache in runs of similar length; the scores stay HFLM's."""
    lm = _ours(tiny, 16)
    model = lm.scorer.model
    calls = []
    real = model.forward

    def counting(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return real(*args, **kwargs)

    model.forward = counting
    try:
        # winogrande's shape: the choice in the context, one shared multi-token continuation
        lm.loglikelihood(_instances("loglikelihood", [("the cat sat on", " the mat and"),
                                                      ("the dog ran to", " the mat and")]), disable_tqdm=True)
        assert len(calls) == 1
        calls.clear()
        expected, _ = hflm_scores
        got = lm.loglikelihood(_instances("loglikelihood", _requests()[:4]), disable_tqdm=True)
        # the context once; tails of 3 and 1 tokens (" cat sat on the", " the mat") in separate runs
        assert len(calls) == 3
        assert [v for v, _ in got] == pytest.approx([v for v, _ in expected[:4]], abs=1e-4)
    finally:
        model.forward = real
    assert lm.scorer._tail_runs([6, 5, 3, 2, 1, 1]) == [(0, 3), (3, 6)]
    assert lm.scorer._tail_runs([]) == []
