"""Concurrent calls gathered into shared batches.

A web app that shares one ``DollyLLM`` between requests used to get one generation at a time behind a lock.
:class:`BatchScheduler` instead queues every call's prompts; one worker thread takes up to ``batch_size`` queued
prompts with equal :class:`~dolly_langchain.engines.base.SamplingOptions` and runs them as one engine batch. Calls
arriving while a batch runs form the next one. After the first prompt of a batch arrives, the worker waits up to
``window`` seconds for more (again after each new arrival, up to ten windows), so calls made at about the same
time share a batch; a lone call waits one window (5 ms by default).

Each call keeps its own result and its own errors: a row whose own callback fails while decoding (a bad stop
string, a failing stream listener) stops there and its request fails with that error while the other rows go on;
a batch that fails before any token is rerun one prompt at a time, so only the prompt that fails raises. A cancelled call (``Request.cancel``) leaves the queue, or, when already generating,
its row stops at the next token.

With float32 (transformers or CTranslate2) a prompt's greedy output in a shared batch equals its output alone,
token for token (tested). With CTranslate2 int8 it often does not when prompts of different lengths share a
batch: padding changes int8 rounding (8 of 16 concurrent answers equalled the lone answer in
``benchmarks/generation.py``); the answers come from the same quantized model but may be worded differently.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from dolly_langchain.engines.base import EngineOutput, GenerationEngine
from dolly_langchain.errors import DollyRuntimeError
from dolly_langchain.generation import DEFAULT_BATCH_SIZE, SamplingOptions

DEFAULT_WINDOW = 0.005
IDLE_EXIT_SECONDS = 10.0  # the worker thread ends after this long without work; the next call starts a new one
EXIT_WAIT_SECONDS = 10.0  # at interpreter exit, how long a generating batch gets to stop before the process goes on

# Every scheduler alive, closed when the interpreter exits (see ``_close_all``).
_SCHEDULERS: weakref.WeakSet[BatchScheduler] = weakref.WeakSet()


class Request:
    """One prompt waiting for, or going through, generation. ``future`` resolves to an :class:`EngineOutput`.

    ``on_token(token_id, logprob) -> bool`` (optional) sees each token as it is generated, in the worker
    thread, and returns ``True`` to stop this row (a stop string); ``on_finish()`` runs once before the future
    resolves (successfully or not).
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        options: SamplingOptions,
        on_token: Callable[[int, float | None], bool] | None = None,
        on_finish: Callable[[], None] | None = None,
    ):
        self.prompt_ids = list(prompt_ids)
        self.options = options
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._on_token = on_token
        self._on_finish = on_finish
        self._cancelled = threading.Event()
        self.tokens_seen = 0
        self.error: BaseException | None = None
        """The error this row's own ``on_token`` raised: the row stops, and only this request fails with it."""
        self.watcher: Any = None
        """What the caller follows the row with (the runtime's stop-string watcher); the scheduler ignores it."""
        self.constraint: Any = None
        """This row's :class:`~dolly_langchain.structured.RowConstraint` when ``options.grammar`` is set."""

    def cancel(self) -> None:
        """Give up on this request: it leaves the queue, or its row stops generating at the next token."""
        self._cancelled.set()
        self.future.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def accept(self, token_id: int, logprob: float | None) -> bool:
        self.tokens_seen += 1
        if self._cancelled.is_set() or self.error is not None:
            return True
        if self._on_token is None:
            return False
        try:
            return bool(self._on_token(token_id, logprob))
        except BaseException as err:  # noqa: BLE001 - fails only this row; the engine goes on with the others
            self.error = err
            return True

    def finish(self, output: EngineOutput | None = None, error: BaseException | None = None) -> None:
        if self.error is not None:
            error = self.error
        try:
            if self._on_finish is not None and error is None:
                self._on_finish()
        except BaseException as err:  # noqa: BLE001 - a failing stream callback fails only this request
            error = err
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(output)


class BatchScheduler:
    """Feeds an engine batches of up to ``batch_size`` requests from any number of threads or event loops."""

    def __init__(self, engine: GenerationEngine, stop_token_ids: Sequence[int], *, batch_size: int = DEFAULT_BATCH_SIZE,
                 window: float = DEFAULT_WINDOW):
        self.engine = engine
        self.stop_token_ids = list(stop_token_ids)
        self.batch_size = batch_size
        self.window = window
        self._pending: list[Request] = []
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._current: list[Request] = []
        self._closed = False
        self.batches_run = 0
        _SCHEDULERS.add(self)

    @property
    def running(self) -> int:
        """Requests of the batch generating now that are still wanted (not cancelled, not finished)."""
        return sum(1 for r in list(self._current) if not r.cancelled and not r.future.done())

    @property
    def waiting(self) -> int:
        """Requests queued for a later batch (cancelled ones, about to be dropped, are not counted)."""
        with self._cond:
            return sum(1 for r in self._pending if not r.cancelled)

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue requests (together, so one caller's prompts can share a batch)."""
        with self._cond:
            if self._closed:
                raise DollyRuntimeError("this model's scheduler was closed (the process is exiting); load it again")
            self._pending.extend(requests)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="dolly-batcher", daemon=True)
                self._worker.start()
            self._cond.notify_all()

    def close(self, timeout: float = EXIT_WAIT_SECONDS) -> None:
        """Take no more work: queued requests are cancelled, rows generating now stop at their next token, and the
        worker thread is waited for (up to ``timeout`` seconds).

        Called for every scheduler when the interpreter exits: a worker thread still inside an engine's native
        code while Python finalizes can abort the process ("terminate called without an active exception",
        exit code -6) after the program itself has finished.
        """
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            worker = self._worker
            self._cond.notify_all()
        for request in [*pending, *list(self._current)]:
            request.cancel()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    # -- worker --------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[Request] | None:
        with self._cond:
            while not self._pending:
                if self._closed:
                    self._worker = None
                    return None
                if not self._cond.wait(timeout=IDLE_EXIT_SECONDS) and not self._pending:
                    self._worker = None
                    return None
            options = self._pending[0].options
            deadline = time.monotonic() + 10 * self.window
            while self._count(options) < self.batch_size and time.monotonic() < deadline:
                before = len(self._pending)
                self._cond.wait(timeout=self.window)
                if len(self._pending) == before:
                    break  # nothing new within a window: go
            batch, rest = [], []
            for request in self._pending:
                if len(batch) < self.batch_size and request.options == options:
                    if request.future.set_running_or_notify_cancel():
                        batch.append(request)
                else:
                    rest.append(request)
            self._pending = rest
            return batch

    def _count(self, options: SamplingOptions) -> int:
        return sum(1 for r in self._pending if r.options == options and not r.cancelled)

    def _execute(self, batch: list[Request]) -> None:
        if not batch:
            return
        self._current = batch
        try:
            self._execute_batch(batch)
        finally:
            self._current = []

    def _execute_batch(self, batch: list[Request]) -> None:
        try:
            outputs = self._generate(batch)
        except BaseException as err:  # noqa: BLE001 - delivered to the callers, never lost in this thread
            if len(batch) > 1 and all(r.tokens_seen == 0 for r in batch):
                # Find the culprit: rerun each request alone so an error reaches only the call that caused it.
                for request in batch:
                    self._execute_alone(request)
                return
            for request in batch:
                request.finish(error=err)
            return
        for request, output in zip(batch, outputs):
            request.finish(output)

    def _execute_alone(self, request: Request) -> None:
        try:
            output = self._generate([request])[0]
        except BaseException as err:  # noqa: BLE001
            request.finish(error=err)
        else:
            request.finish(output)

    def _generate(self, batch: list[Request]) -> list[EngineOutput]:
        self.batches_run += 1
        extra = {}
        if batch[0].options.grammar is not None:  # structured output: each row's own grammar state
            extra["constraints"] = [r.constraint for r in batch]
        return self.engine.generate(
            [r.prompt_ids for r in batch],
            batch[0].options,
            self.stop_token_ids,
            lambda row, token, logprob: batch[row].accept(token, logprob),
            **extra,
        )


@atexit.register
def _close_all() -> None:
    # atexit handlers run before Python finalizes, while worker threads can still take the interpreter lock.
    for scheduler in list(_SCHEDULERS):
        scheduler.close()
