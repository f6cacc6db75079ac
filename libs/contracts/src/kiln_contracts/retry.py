"""Retrying with backoff, the one way Kiln services do it: tenacity underneath, the policy pieces here.

A service builds its policy from :func:`retrying` and keeps its own words and counters in the hooks, so that every
retry loop stops, waits and logs the way its service documents, and none is written by hand::

    write = retrying(backoff(0.2, 10.0), retry=unless(is_data_error), before_sleep=say_it)
    await write(engine.write, batch)          # retried until it works or the database refuses the data itself

What is retried is an ``Exception`` (never a cancellation, ``KeyboardInterrupt`` or ``SystemExit``: a task being
cancelled stops at once).  When the policy gives up, the last error itself is raised (not tenacity's
``RetryError``), so callers catch what the operation raises.

Example:
    >>> import asyncio
    >>> calls = []
    >>> async def flaky() -> str:
    ...     calls.append(1)
    ...     if len(calls) < 3:
    ...         raise ConnectionError("away")
    ...     return "stored"
    >>> asyncio.run(retrying(steps(0.0), attempts=5)(flaky)), len(calls)
    ('stored', 3)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    after_nothing,
    before_sleep_nothing,
    retry_base,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    stop_never,
    wait_chain,
    wait_exponential,
    wait_fixed,
)
from tenacity.wait import wait_base

__all__ = ["RetryCallState", "backoff", "failure", "retry_if_result", "retrying", "steps", "unless"]

Hook = Callable[[RetryCallState], Awaitable[None] | None]


def backoff(initial_s: float, max_s: float) -> wait_base:
    """Doubling waits: ``initial_s`` after the first failure, twice that after the second, never more than ``max_s``.

    No jitter: each caller retries one operation of its own (a batch, a job's lane), not a crowd of clients
    hammering one server at the same instant.

    Example:
        >>> wait = backoff(0.2, 1.0)
        >>> [wait(_after(n)) for n in (1, 2, 3, 4, 5)]
        [0.2, 0.4, 0.8, 1.0, 1.0]
    """
    return wait_exponential(multiplier=initial_s, exp_base=2, max=max_s)


def steps(*waits_s: float) -> wait_base:
    """Waits taken in turn, one per failure; the last one repeats.

    Example:
        >>> wait = steps(0.2, 0.5)
        >>> [wait(_after(n)) for n in (1, 2, 3)]
        [0.2, 0.5, 0.5]
    """
    return wait_chain(*(wait_fixed(w) for w in waits_s))


def unless(permanent: Callable[[BaseException], bool]) -> retry_base:
    """Retry any ``Exception`` that ``permanent`` does not call final (e.g. the data refused, a 4xx answer).

    Example:
        >>> retry = unless(lambda exc: isinstance(exc, ValueError))
        >>> [retry(_after(1, exc)) for exc in (OSError(), ValueError(), asyncio.CancelledError())]
        [True, False, False]
    """
    return retry_if_exception(lambda exc: isinstance(exc, Exception) and not permanent(exc))


def retrying(wait: wait_base, *, attempts: int | None = None, retry: retry_base | None = None,
             after: Hook | None = None, before_sleep: Hook | None = None,
             sleep: Callable[[float], Awaitable[None]] | None = None) -> AsyncRetrying:
    """An asynchronous retry policy: ``await policy(fn, *args)``, or ``async for attempt in policy: with attempt:``.

    Args:
        wait: Seconds between attempts (:func:`backoff`, :func:`steps`).
        attempts: Give up after this many attempts (the last error is raised); ``None``: never give up.
        retry: Which failures are retried (:func:`unless`; ``retry_if_result(pred)`` retries while ``pred`` holds
            for what the call returned); default: every ``Exception``.
        after: Called after every failed attempt that ``retry`` accepts, the last one included (logging).
        before_sleep: Called before each wait, when the next wait is known (:func:`failure` reads it).
        sleep: How to wait (e.g. one that keeps messages alive and ends early on shutdown); default
            ``asyncio.sleep``.
    """
    return AsyncRetrying(
        wait=wait, stop=stop_after_attempt(attempts) if attempts is not None else stop_never,
        retry=retry or unless(lambda exc: False), after=after or after_nothing,
        before_sleep=before_sleep or before_sleep_nothing,
        sleep=sleep or asyncio.sleep, reraise=True,
    )


def failure(state: RetryCallState) -> tuple[BaseException, int, float]:
    """The error of the attempt that just failed, how many attempts failed so far, and the wait before the next
    (known in a ``before_sleep`` hook only, not yet in an ``after`` one): what a retry's log line says.

    Example:
        >>> failure(_after(2, OSError("refused"), 0.4))
        (OSError('refused'), 2, 0.4)
    """
    exc = state.outcome.exception() if state.outcome is not None else None
    return exc or RuntimeError("no error"), state.attempt_number, state.upcoming_sleep


def _after(attempt: int, exc: BaseException | None = None, upcoming: float = 0.0) -> RetryCallState:
    """The state tenacity has after ``attempt`` attempts (for the examples)."""
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = attempt
    if exc is not None:
        state.set_exception((type(exc), exc, None))
    state.upcoming_sleep = upcoming
    return state
