"""Runs reward functions in worker processes, so that one bad sample cannot stall or kill a run.

A reward function may raise, hang (a sympy simplification that never ends) or take its process
down (``os._exit``, a segfault in a C extension, the OOM killer). Each of these costs only the
sample being scored: it gets ``failure_score``, its counter goes up, a dead or hung worker is
replaced, and the batch carries on. Outcomes come back in input order.

Workers are started with "spawn" (or "forkserver"), which is safe next to threads and Ray where
fork is not. They live across batches and receive samples in chunks; they answer one sample at a
time, so the driver always knows which sample a worker is on and since when. That sample's clock
starts when the previous answer arrives, so every sample gets at least ``timeout_s``.

``num_workers=0`` scores in the calling process: exceptions are still caught and counted, but
nothing protects against a hang or a crash. Use it only for trusted, fast graders and debugging.

    with ScoringPool("my_pkg.rewards:compute_score", num_workers=4, timeout_s=10) as pool:
        outcomes = pool.score([{"data_source": ..., "solution_str": ..., "ground_truth": ...}])
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import multiprocessing.util  # noqa: F401  (its exit hook must be registered before ours, see below)
import os
import pickle
import signal
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import connection
from typing import Any

from .scorers import ScorerRef, resolve_scorer

logger = logging.getLogger(__name__)

FAILURE_KINDS = ("exception", "timeout", "crash")
DEFAULT_NUM_WORKERS = min(8, os.cpu_count() or 1)
_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded node can take tens of seconds
_STOP_GRACE_S = 2.0
_LIVE_POOLS: weakref.WeakSet[ScoringPool] = weakref.WeakSet()


def failure_metric(kind: str) -> str:
    """Metric/counter name for one failure kind, e.g. ``reward/failures_timeout``."""
    return f"reward/failures_{kind}"


@dataclass
class ScoreOutcome:
    """What scoring one sample produced."""

    result: dict[str, Any]  # the function's dict (or {"score": value}); {"score": failure_score} on failure
    failure: str | None = None  # None, or one of FAILURE_KINDS
    error: str = ""  # one-line description of the failure


class ScoringPool:
    """Scores samples with one reward function in ``num_workers`` processes, each call limited to
    ``timeout_s`` seconds (None: no limit). Not safe to call from several threads at once."""

    def __init__(
        self,
        scorer_ref: ScorerRef = None,
        num_workers: int = DEFAULT_NUM_WORKERS,
        timeout_s: float | None = 10.0,
        failure_score: float = -1.0,
        scorer_kwargs: Mapping[str, Any] | None = None,
        mp_context: str = "spawn",
        chunk_size: int = 16,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if mp_context not in ("spawn", "forkserver"):
            raise ValueError(
                f"mp_context must be 'spawn' or 'forkserver' (fork is unsafe with threads), got {mp_context!r}"
            )
        self._function = resolve_scorer(scorer_ref)  # a wrong reference fails here, in the driver
        self.scorer_ref = scorer_ref
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.failure_score = float(failure_score)
        self.scorer_kwargs = dict(scorer_kwargs or {})
        self.chunk_size = chunk_size
        self.counters = {failure_metric(kind): 0 for kind in FAILURE_KINDS}  # since the pool was made
        self._context = multiprocessing.get_context(mp_context)
        self._workers: list[_Worker] = []  # started on first use, so building a pool is cheap
        _LIVE_POOLS.add(self)

    def score(self, calls: Sequence[Mapping[str, Any]]) -> list[ScoreOutcome]:
        """One outcome per call (the reward function's keyword arguments), in input order."""
        if not calls:
            return []
        if self.num_workers == 0:
            outcomes = [self._outcome(*_call_scorer(self._function, call, self.scorer_kwargs)) for call in calls]
        else:
            outcomes = self._score_in_workers(list(calls))
        self._count(outcomes)
        return outcomes

    def close(self) -> None:
        """Stops the workers; idle ones exit on request, others are killed after a grace period."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.request_stop()
        for worker in workers:
            worker.finish(_STOP_GRACE_S)

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _score_in_workers(self, calls: list[Mapping[str, Any]]) -> list[ScoreOutcome]:
        if not self._workers:
            self._workers = [self._start_worker() for _ in range(self.num_workers)]
        outcomes: list[ScoreOutcome] = [None] * len(calls)  # type: ignore[list-item]  # all filled below
        pending = deque(range(len(calls)))
        while pending or any(worker.in_flight for worker in self._workers):
            self._dispatch(pending, calls)
            self._collect(pending, outcomes)
        return outcomes

    def _start_worker(self) -> _Worker:
        return _Worker(self._context, self.scorer_ref, self.scorer_kwargs)

    def _dispatch(self, pending: deque[int], calls: list[Mapping[str, Any]]) -> None:
        """Gives a chunk of pending samples to every idle worker."""
        size = max(1, min(self.chunk_size, len(pending) // self.num_workers))
        for slot, worker in enumerate(self._workers):
            if not pending:
                return
            if worker.ready and not worker.in_flight:
                chunk = [pending.popleft() for _ in range(min(size, len(pending)))]
                if not worker.assign(chunk, calls, self.timeout_s):
                    pending.extendleft(reversed(chunk))
                    self._workers[slot] = self._start_worker()

    def _collect(self, pending: deque[int], outcomes: list[ScoreOutcome]) -> None:
        """Waits for answers, a dead worker or the next deadline, and handles what happened."""
        deadline = min(worker.deadline for worker in self._workers)
        waitables = [worker.conn for worker in self._workers] + [worker.process.sentinel for worker in self._workers]
        ready = connection.wait(waitables, None if deadline == math.inf else max(0.0, deadline - time.monotonic()))
        for slot, worker in enumerate(self._workers):
            if (worker.conn in ready or worker.process.sentinel in ready) and not self._drain(worker, outcomes):
                self._retire(slot, "crash", pending, outcomes)
            elif time.monotonic() >= worker.deadline:
                self._retire(slot, "timeout", pending, outcomes)

    def _drain(self, worker: _Worker, outcomes: list[ScoreOutcome]) -> bool:
        """Handles every message the worker has sent; False once its process is gone."""
        exited = worker.process.exitcode is not None  # checked first: its last messages may still be queued
        while worker.conn.poll():
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                return False
            except Exception as exc:  # e.g. the result holds a class the driver cannot import
                message = ("error", f"result could not be unpickled: {_describe(exc)}")
            self._handle(worker, message, outcomes)
        return not exited

    def _handle(self, worker: _Worker, message: tuple[str, Any], outcomes: list[ScoreOutcome]) -> None:
        kind, payload = message
        if kind == "load_error":
            raise RuntimeError(f"reward function failed to load in a worker process: {payload}")
        if kind != "ready":
            outcomes[worker.in_flight.popleft()] = self._outcome(kind, payload)  # answers come in sending order
        worker.ready = True
        worker.arm(self.timeout_s)

    def _retire(self, slot: int, kind: str, pending: deque[int], outcomes: list[ScoreOutcome]) -> None:
        """Kills a crashed or hung worker, fails the sample it was on, requeues the rest, replaces it."""
        worker = self._workers[slot]
        worker.kill()
        error = self._retirement_reason(worker, kind)
        if not worker.ready:  # retrying would fail the same way for every sample
            raise RuntimeError(f"reward worker did not start: {error}")
        if worker.in_flight:
            outcomes[worker.in_flight.popleft()] = self._failure(kind, error)
            pending.extendleft(reversed(worker.in_flight))
        self._workers[slot] = self._start_worker()

    def _retirement_reason(self, worker: _Worker, kind: str) -> str:
        if kind == "crash":
            return _exit_description(worker.process)
        return f"no result within {self.timeout_s} s" if worker.ready else f"not ready within {_STARTUP_TIMEOUT_S:.0f} s"

    def _outcome(self, status: str, payload: Any) -> ScoreOutcome:
        return ScoreOutcome(payload) if status == "ok" else self._failure("exception", payload)

    def _failure(self, kind: str, error: str) -> ScoreOutcome:
        return ScoreOutcome({"score": self.failure_score}, kind, error)

    def _count(self, outcomes: list[ScoreOutcome]) -> None:
        failed = [outcome for outcome in outcomes if outcome.failure]
        for outcome in failed:
            self.counters[failure_metric(outcome.failure)] += 1
        if failed:
            kinds = ", ".join(f"{kind}={sum(o.failure == kind for o in failed)}" for kind in FAILURE_KINDS)
            logger.warning(
                "%d of %d reward calls failed and got score %s (%s); first: %s",
                len(failed), len(outcomes), self.failure_score, kinds, failed[0].error,
            )


class _Worker:
    """The driver's handle on one worker process and the samples it holds."""

    def __init__(self, context: Any, scorer_ref: ScorerRef, scorer_kwargs: dict[str, Any]) -> None:
        self.conn, child_conn = context.Pipe()
        # Not daemonic: reward functions such as code sandboxes may start processes of their own.
        self.process = context.Process(
            target=_worker_main, args=(child_conn, scorer_ref, scorer_kwargs), name="verl_mtp-reward-worker"
        )
        self.process.start()
        child_conn.close()  # now only the child holds that end, so its death reads as EOF here
        self.ready = False  # set by the worker's first message, once the reward function is loaded
        self.in_flight: deque[int] = deque()  # indices of samples sent and not yet answered, in order
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S

    def assign(self, chunk: list[int], calls: list[Mapping[str, Any]], timeout_s: float | None) -> bool:
        """Sends samples to score; False if the worker died while idle."""
        try:
            self.conn.send([calls[index] for index in chunk])
        except OSError:
            return False
        self.in_flight.extend(chunk)
        self.arm(timeout_s)
        return True

    def arm(self, timeout_s: float | None) -> None:
        """Starts the clock for the sample now at the head of ``in_flight``."""
        busy = self.in_flight and timeout_s is not None
        self.deadline = time.monotonic() + timeout_s if busy else math.inf

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def request_stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:  # already dead
            pass

    def finish(self, grace_s: float) -> None:
        self.process.join(grace_s)
        self.kill()


def _worker_main(conn: connection.Connection, scorer_ref: ScorerRef, scorer_kwargs: dict[str, Any]) -> None:
    """Worker process: load the reward function, then score chunks until told to stop."""
    # Ctrl-C reaches the whole process group; the driver decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        function = resolve_scorer(scorer_ref)
    except Exception as exc:
        conn.send(("load_error", _describe(exc)))
        return
    conn.send(("ready", None))
    while (chunk := _receive(conn)) is not None:
        for call in chunk:
            _send_answer(conn, _call_scorer(function, call, scorer_kwargs))


def _receive(conn: connection.Connection) -> list[Mapping[str, Any]] | None:
    try:
        return conn.recv()
    except EOFError:  # the driver is gone
        return None


def _send_answer(conn: connection.Connection, answer: tuple[str, Any]) -> None:
    try:
        conn.send(answer)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:  # raised before any byte is sent
        conn.send(("error", f"result cannot be pickled: {_describe(exc)}"))


def _call_scorer(function: Callable, call: Mapping[str, Any], scorer_kwargs: Mapping[str, Any]) -> tuple[str, Any]:
    """("ok", result dict) or ("error", description); never raises for the function's faults."""
    try:
        return "ok", _as_result(function(**call, **scorer_kwargs))
    except Exception as exc:
        return "error", _describe(exc)


def _as_result(value: Any) -> dict[str, Any]:
    """The function's return value as a dict with a finite float "score"."""
    result = dict(value) if isinstance(value, Mapping) else {"score": value}
    if "score" not in result:
        raise ValueError(f"reward function returned a dict without 'score' (keys: {sorted(result)})")
    result["score"] = float(result["score"])
    if not math.isfinite(result["score"]):  # a NaN reward would poison every advantage in its group
        raise ValueError(f"reward function returned a non-finite score {result['score']}")
    return result


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _exit_description(process: multiprocessing.process.BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"worker killed by {signal.Signals(-code).name}"
    return f"worker exited with code {code}"


@atexit.register
def _close_live_pools() -> None:
    # atexit runs hooks last-registered-first, so this runs before multiprocessing's own hook,
    # which would otherwise wait forever for our idle (non-daemonic) workers.
    for pool in list(_LIVE_POOLS):
        pool.close()
