"""Slots of a runner: a start command is fetched only while one is free."""

from __future__ import annotations

import asyncio


class Slots:
    def __init__(self, n: int) -> None:
        self._free = list(range(n))
        self._cond = asyncio.Condition()

    @property
    def free(self) -> int:
        return len(self._free)

    async def take(self) -> int:
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._free))
            return self._free.pop(0)

    async def give(self, slot: int) -> None:
        async with self._cond:
            self._free.append(slot)
            self._free.sort()
            self._cond.notify_all()

    async def wait_free(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._free))
