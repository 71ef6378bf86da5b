"""lm-eval's ``LM`` over this library's engines: the card's tasks scored through a :class:`~dolly_langchain.runtime.
DollyRuntime` (``dolly eval --engine``), each shared context computed once for all its choices.

:class:`DollyEvalLM` subclasses lm-eval's ``TemplateLM`` (its ``LM`` with the documented tokenisation boilerplate), so
requests become tokens exactly as lm-eval's ``HFLM`` makes them: the context and context+continuation are encoded
whole and split, trailing spaces of the context move to the continuation, an empty context gets the prefix token,
and a context too long for the window is cut from the left (``(context + continuation)[-(max_length + 1):]``).
:meth:`DollyEvalLM.tok_encode` and ``max_length`` follow ``HFLM``'s rules (BOS prefix check, ``n_positions`` /
``max_position_embeddings`` / ``n_ctx`` of the config, else the tokenizer's limit, else 2048).

What differs is how the tokens are scored (``_loglikelihood_tokens``):

- Requests are grouped by their (truncated) context, groups sorted longest first (as ``HFLM`` sorts requests) and
  batched ``batch_size`` contexts at a time.
- **transformers** (:class:`TorchScorer`): a context with several choices runs once, left-padded with the batch's
  other contexts, with ``logits_to_keep=1`` (the vocabulary projection and log-softmax only where a continuation is
  predicted, not at every context position), which also gives every choice's first token; the choices' remaining
  tokens then run over the contexts' KV cache, repeated per choice, sorted by length and cut into runs whose
  padding at most doubles their tokens. A context with one continuation (winogrande, whose choice is in the
  context; rolling windows) runs as one sequence, context + continuation, with logits kept only at the
  continuation. ``HFLM`` runs context + choice as a full sequence per choice with logits at every position (only
  one-token choices share logits there). On fp32 the log-likelihoods equal ``HFLM``'s to float rounding
  (``tests/unit/test_eval_lm.py`` checks 1e-4), so the accuracies are the same.
- **ctranslate2** (:class:`CTranslate2Scorer`): one-token choices (boolq's yes/no, many ARC labels) read the
  distribution after the context once per context (``generate_batch`` with ``return_logits_vocab``, one step);
  longer choices are scored as context + choice with ``forward_batch``. CTranslate2's int8 (its default on CPU)
  changes log-likelihoods slightly; ``benchmarks/eval_card.py --compare-hflm`` measures what that does to scores.

``loglikelihood_rolling`` uses lm-eval's rolling windows over the same scorer; ``generate_until`` generates through
the runtime's scheduler (greedy unless the task asks to sample), cut at the task's stop strings as ``HFLM`` cuts.

Nothing here is imported by ``import dolly_langchain.evaluation``; lm-eval, torch and the engines load when an
evaluation runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import TemplateLM

from dolly_langchain.errors import DollyValueError
from dolly_langchain.generation import DEFAULT_BATCH_SIZE

logger = logging.getLogger(__name__)

__all__ = ["CTranslate2Scorer", "DollyEvalLM", "TorchScorer", "load_eval_lm"]

#: ``HFLM``'s window when neither the model's config nor its tokenizer names one.
DEFAULT_MAX_LENGTH = 2048
#: ``HFLM.max_gen_toks``: the longest generation when a task does not say.
DEFAULT_MAX_GEN_TOKS = 256

# A group: (context ids, [(request index, continuation ids), ...]).
Group = tuple[list[int], list[tuple[int, list[int]]]]


class DollyEvalLM(TemplateLM):
    """lm-eval's language model over a :class:`~dolly_langchain.runtime.DollyRuntime` (either engine).

    ``batch_size``: contexts per forward pass. ``max_length``: the window (default: as ``HFLM`` resolves it).
    """

    backend = "causal"

    def __init__(self, runtime, *, batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise DollyValueError(f"--batch-size must be at least 1, got {batch_size}")
        self.runtime = runtime
        self.tokenizer = runtime.tokenizer  # transformers' tokenizer: what HFLM encodes with
        self.batch_size = batch_size
        engine = runtime.engine
        if engine.name == "transformers":
            self.scorer: TorchScorer | CTranslate2Scorer = TorchScorer(engine.model)
            config = engine.model.config
        elif engine.name == "ctranslate2":
            self.scorer = CTranslate2Scorer(engine)
            config = _WindowConfig(engine.context_window)
        else:
            raise DollyValueError(f"--engine {engine.name}: the lm-eval table scores on transformers or ctranslate2 "
                                  "only (this engine returns no log-likelihoods of given tokens)")
        if max_length is None:
            from lm_eval.models.utils import resolve_max_length

            max_length = resolve_max_length(config, self.tokenizer, default=DEFAULT_MAX_LENGTH)
        self.max_length = int(max_length)
        self.scored_tokens = 0  # tokens the model ran over (contexts once, choices once): what tokens/s counts
        self.scoring_seconds = 0.0  # time spent in the model (lm-eval's task building and metrics excluded)

    # -- what lm-eval asks of a model ------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def describe(self) -> dict[str, Any]:
        """The engine as ``results.json`` reports it (engine, device, compute type or dtype)."""
        return self.runtime.engine.describe()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """``HFLM.tok_encode``: no special tokens added when the text already starts with the prefix token."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is greedy)`` per ``((context, continuation), ctx ids,
        continuation ids)`` request, contexts shared by their choices computed once."""
        import time

        from tqdm.auto import tqdm

        began = time.perf_counter()
        groups = self._groups(requests)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Scoring requests")
        for start in range(0, len(groups), self.batch_size):
            batch = groups[start:start + self.batch_size]
            scored = self.scorer.score(batch)
            self.scored_tokens += sum(len(ctx) + sum(len(c) - 1 for _, c in conts) for ctx, conts in batch)
            for (_, conts), answers in zip(batch, scored):
                for (index, _), answer in zip(conts, answers):
                    results[index] = answer
                    key = requests[index][0]
                    if key is not None:  # rolling windows are cached per document by loglikelihood_rolling
                        self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(sum(len(conts) for _, conts in batch))
        bar.close()
        self.scoring_seconds += time.perf_counter() - began
        return results  # type: ignore[return-value]

    def _groups(self, requests) -> list[Group]:
        """Requests grouped by the context the model sees (left-truncated to the window), longest first."""
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            context, continuation = list(context), list(continuation)
            if not context or not continuation:
                raise DollyValueError("lm-eval sent an empty context or continuation; the task's prompts are broken")
            if len(continuation) > self.max_length:
                raise DollyValueError(f"a continuation of {len(continuation)} tokens does not fit the model's window "
                                      f"of {self.max_length}")
            overflow = len(context) + len(continuation) - (self.max_length + 1)
            if overflow > 0:  # HFLM: (context + continuation)[-(max_length + 1):], the last token only predicted
                context = context[overflow:]
            by_context.setdefault(tuple(context), []).append((index, continuation))
        groups = [(list(ctx), conts) for ctx, conts in by_context.items()]
        groups.sort(key=lambda g: (-(len(g[0]) + max(len(c) for _, c in g[1])), g[0]))
        return groups

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over lm-eval's disjoint rolling windows of the model's length."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, predicted))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's sampling) generation through the runtime, cut at the task's stop strings."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from dolly_langchain.generation import SamplingOptions

        eos = self.tokenizer.decode(self.eot_token_id)
        results: list[str | None] = [None] * len(requests)
        batches: dict[str, list[int]] = {}  # requests with the same generation settings run as one batch call
        for index, req in enumerate(requests):
            batches.setdefault(repr(sorted(req.args[1].items())), []).append(index)
        for indices in batches.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise DollyValueError(f"the task asks for {max_new} new tokens, the model's window is "
                                      f"{self.max_length}")
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
            options = SamplingOptions(max_new_tokens=max_new, do_sample=sample,
                                      **({"temperature": float(kwargs["temperature"]),
                                          "top_p": float(kwargs.get("top_p", 1.0)),
                                          "top_k": int(kwargs.get("top_k", 0))} if sample else {}))
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                       for i in indices]
            completions = self.runtime.generate(prompts, options, stop=[u for u in until if u])
            for i, completion in zip(indices, completions):
                text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                results[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results  # type: ignore[return-value]


class _WindowConfig:
    """A config-shaped holder of a CTranslate2 conversion's window, for lm-eval's ``resolve_max_length``."""

    def __init__(self, window: int | None):
        self.max_position_embeddings = window


class TorchScorer:
    """Scores groups on a transformers causal LM.

    A context with one continuation (winogrande's, whose choice is in the context; rolling windows) runs as one
    left-padded sequence, context + continuation, with logits kept only at the continuation's positions. A context
    with several continuations runs once (logits at its last position only, which scores every one-token choice);
    the choices' remaining tokens then run together over its KV cache, repeated per choice."""

    #: Positions whose vocabulary logits one forward may keep (rows x kept positions): bounds the logits' memory
    #: (2048 x 49,152 fp32 is 400 MB) when continuations are long, as rolling windows are.
    MAX_KEPT_POSITIONS = 2048

    def __init__(self, model):
        import inspect

        self.model = model
        self.pad_id = 0
        parameters = inspect.signature(model.forward).parameters
        self.keeps_logits = "logits_to_keep" in parameters
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"  # transformers 5 renames it

    def score(self, groups: Sequence[Group]) -> list[list[tuple[float, bool]]]:
        answers: list[list[tuple[float, bool]]] = [[] for _ in groups]
        single = [g for g, (_, conts) in enumerate(groups) if len(conts) == 1]
        shared = [g for g, (_, conts) in enumerate(groups) if len(conts) > 1]
        for chunk in self._chunks(single, [len(groups[g][1][0][1]) for g in single]):
            for g, answer in zip(chunk, self._score_whole([groups[g] for g in chunk])):
                answers[g] = [answer]
        if shared:
            for g, mine in zip(shared, self._score_shared([groups[g] for g in shared])):
                answers[g] = mine
        return answers

    def _chunks(self, indices: list[int], kept: list[int]) -> list[list[int]]:
        """``indices`` in runs whose rows x longest kept span stays within :attr:`MAX_KEPT_POSITIONS`."""
        chunks: list[list[int]] = []
        longest = 0
        for index, span in zip(indices, kept):
            if chunks and (len(chunks[-1]) + 1) * max(longest, span) <= self.MAX_KEPT_POSITIONS:
                chunks[-1].append(index)
                longest = max(longest, span)
            else:
                chunks.append([index])
                longest = span
        return chunks

    @staticmethod
    def _left_padded(sequences: list[list[int]], pad_id: int):
        import torch

        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        return ids, mask

    @staticmethod
    def _continuation(logits, cont: list[int]) -> tuple[float, bool]:
        """``(log-likelihood, greedy)`` of ``cont`` from the logits that predict its tokens (one row each)."""
        import torch

        logprobs = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(cont, device=logprobs.device)
        total = float(logprobs.gather(1, target[:, None]).sum())
        return total, bool((logprobs.argmax(-1) == target).all())

    def _forward(self, ids, mask, keep: int, **extra):
        model = self.model
        device = model.device
        positions = extra.pop("position_ids", None)
        if positions is None:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": keep} if self.keeps_logits else {}
        return model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                     **kwargs, **extra)

    def _tail_runs(self, tails: list[int]) -> list[tuple[int, int]]:
        """Split choice tails (sorted longest first) into runs of one forward each: a run ends where a tail is
        shorter than half the run's longest (so padding at most doubles a run's tokens) or the run's kept logits
        would pass :attr:`MAX_KEPT_POSITIONS`."""
        if not tails:
            return []
        runs: list[tuple[int, int]] = []
        start = 0
        for i, tail in enumerate(tails):
            if i > start and (2 * tail < tails[start] or (i - start + 1) * tails[start] > self.MAX_KEPT_POSITIONS):
                runs.append((start, i))
                start = i
        runs.append((start, len(tails)))
        return runs

    def _score_whole(self, groups: Sequence[Group]) -> list[tuple[float, bool]]:
        """One continuation per context: context + continuation in one forward, logits at the continuation only."""
        import torch

        conts = [conts[0][1] for _, conts in groups]
        ids, mask = self._left_padded([ctx + cont[:-1] for (ctx, _), cont in zip(groups, conts)], self.pad_id)
        keep = max(len(c) for c in conts)
        with torch.inference_mode():
            logits = self._forward(ids, mask, keep, use_cache=False).logits[:, -keep:, :]
            return [self._continuation(logits[row, keep - len(cont):], cont) for row, cont in enumerate(conts)]

    def _score_shared(self, groups: Sequence[Group]) -> list[list[tuple[float, bool]]]:
        """Several continuations per context: the context once, then the choices over its KV cache."""
        import torch

        ids, mask = self._left_padded([ctx for ctx, _ in groups], self.pad_id)
        width = ids.shape[1]
        lengths = [len(ctx) for ctx, _ in groups]
        answers: list[list[tuple[float, bool] | None]] = [[None] * len(conts) for _, conts in groups]
        with torch.inference_mode():
            out = self._forward(ids, mask, 1, use_cache=True)
            first = out.logits[:, -1, :]  # after each context: every choice's first token
            rows = []
            for g, (_, conts) in enumerate(groups):
                for k, (_, cont) in enumerate(conts):
                    if len(cont) == 1:
                        answers[g][k] = self._continuation(first[g:g + 1], cont)
                    else:
                        rows.append((g, k))
            cache = out.past_key_values
            rows.sort(key=lambda gk: -len(groups[gk[0]][1][gk[1]][1]))
            runs = self._tail_runs([len(groups[g][1][k][1]) - 1 for g, k in rows])
            for run_start, run_end in runs:
                run = rows[run_start:run_end]
                selected = torch.tensor([g for g, _ in run], device=self.model.device)
                run_cache = cache if len(runs) == 1 else _cache_copy(cache)
                run_cache.batch_select_indices(selected)
                tail = len(groups[run[0][0]][1][run[0][1]][1]) - 1  # rows are sorted longest first
                ids2 = torch.full((len(run), tail), self.pad_id, dtype=torch.long)
                mask2 = torch.zeros((len(run), width + tail), dtype=torch.long)
                pos2 = torch.zeros((len(run), tail), dtype=torch.long)
                for r, (g, k) in enumerate(run):
                    cont = groups[g][1][k][1][:-1]
                    ids2[r, :len(cont)] = torch.tensor(cont)
                    mask2[r, :width] = mask[g]
                    mask2[r, width:width + len(cont)] = 1
                    pos2[r] = lengths[g] + torch.arange(tail)
                logits = self._forward(ids2, mask2, tail, position_ids=pos2, use_cache=False,
                                       **{self.cache_name: run_cache}).logits
                for r, (g, k) in enumerate(run):
                    cont = groups[g][1][k][1]
                    predicting = torch.cat([first[g:g + 1], logits[r, :len(cont) - 1]])
                    answers[g][k] = self._continuation(predicting, cont)
        return answers  # type: ignore[return-value]


def _cache_copy(cache):
    """A cache whose rows can be selected without touching ``cache``'s (selecting and extending a layer replace its
    tensors, so copying the layer objects is enough; other cache types are copied whole)."""
    import copy

    layers = getattr(cache, "layers", None)
    if layers is None:
        return copy.deepcopy(cache)
    twin = copy.copy(cache)
    twin.layers = [copy.copy(layer) for layer in layers]
    return twin


class CTranslate2Scorer:
    """Scores groups on a CTranslate2 generator: one-token choices from the distribution after their context (one
    decoding step per context), longer choices as context + choice."""

    #: Rows per ``forward_batch`` call: it returns every position's log-probabilities over the vocabulary.
    FORWARD_ROWS = 4

    def __init__(self, engine):
        self.engine = engine
        self.generator = engine.generator

    def score(self, groups: Sequence[Group]) -> list[list[tuple[float, bool]]]:
        import numpy as np

        answers: list[list[tuple[float, bool] | None]] = [[None] * len(conts) for _, conts in groups]
        single = [g for g, (_, conts) in enumerate(groups) if any(len(c) == 1 for _, c in conts)]
        if single:
            results = self.generator.generate_batch(
                [self.engine.tokens(groups[g][0]) for g in single], max_length=1, sampling_topk=1,
                include_prompt_in_result=False, return_logits_vocab=True)
            for g, result in zip(single, results):
                logits = np.asarray(result.logits[0], dtype=np.float64).reshape(-1)
                logprobs = logits - _logsumexp(logits)
                best = int(logprobs.argmax())
                for k, (_, cont) in enumerate(groups[g][1]):
                    if len(cont) == 1:
                        answers[g][k] = (float(logprobs[cont[0]]), best == cont[0])
        longer = [(g, k) for g, (_, conts) in enumerate(groups) for k, (_, c) in enumerate(conts) if len(c) > 1]
        longer.sort(key=lambda gk: -(len(groups[gk[0]][0]) + len(groups[gk[0]][1][gk[1]][1])))
        for start in range(0, len(longer), self.FORWARD_ROWS):
            chunk = longer[start:start + self.FORWARD_ROWS]
            seqs = [groups[g][0] + groups[g][1][k][1] for g, k in chunk]
            inputs = [self.engine.tokens(s[:-1]) for s in seqs]
            logprobs = np.asarray(self.generator.forward_batch(inputs, return_log_probs=True))
            for row, ((g, k), seq) in enumerate(zip(chunk, seqs)):
                cont = groups[g][1][k][1]
                n = len(seq) - 1
                lp = logprobs[row, n - len(cont):n]
                total = float(lp[np.arange(len(cont)), cont].sum())
                answers[g][k] = (total, bool((lp.argmax(-1) == np.asarray(cont)).all()))
        return answers  # type: ignore[return-value]


def _logsumexp(values):
    import numpy as np

    top = values.max()
    return top + np.log(np.exp(values - top).sum())


def load_eval_lm(model_id: str | None, *, engine: str, compute_type: str = "auto", device: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> DollyEvalLM:
    """A :class:`DollyEvalLM` on a freshly loaded runtime (not the process-wide shared one: evaluation holds the
    engine for its own batches)."""
    from dolly_langchain.runtime import load_runtime

    runtime = load_runtime(model_id, engine=engine, compute_type=compute_type, device=device)
    return DollyEvalLM(runtime, batch_size=batch_size)
