"""What kiln_contracts.retry (tenacity) costs around an operation that goes through the first time: the metrics
writer pays it once per batch (docs/performance.md#metrics-writer).

    .venv/bin/python bench/bench_retry.py [N]

Per call, median of 5 rounds of N (default 20,000): a bare ``await`` of a no-op coroutine; the writer's form (the
policy built, then ``async for attempt in policy: with attempt: await write()``); the call form
(``await retrying(...)(write)``).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from kiln_contracts.retry import backoff, retrying, unless


async def write() -> None:
    return None


async def main(n: int) -> None:
    rounds: dict[str, list[float]] = {"bare await": [], "writer's form": [], "call form": []}
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            await write()
        rounds["bare await"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n):
            async for attempt in retrying(backoff(0.2, 10.0), retry=unless(lambda exc: False),
                                          before_sleep=lambda state: None):
                with attempt:
                    await write()
        rounds["writer's form"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n):
            await retrying(backoff(0.2, 10.0))(write)
        rounds["call form"].append(time.perf_counter() - t0)
    for name, times in rounds.items():
        print(f"{name:14s} {statistics.median(times) / n * 1e6:7.2f} us per call")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))
