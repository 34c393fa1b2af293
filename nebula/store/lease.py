"""The scheduler's leader lease: redis-py's Lock, token-checked.

Key: `nebula:scheduler:leader` (SET NX PX; value = the holder's identity).
The lock's extend and release run a script that checks the token, so a
scheduler that lost its lease (paused, partitioned) cannot renew or delete
its successor's; its writes are fenced by `fenced` in the same transaction.
"""

from __future__ import annotations

import contextlib

from redis.asyncio.client import Pipeline
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from nebula import redis_keys
from nebula.store.core import Core


class Lease:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._locks: dict[tuple[str, float], Lock] = {}

    def _lock(self, me: str, ttl_s: float) -> Lock:
        lock = self._locks.get((me, ttl_s))
        if lock is None:
            lock = self.core.redis.lock(
                redis_keys.SCHEDULER_LEADER, timeout=ttl_s, blocking=False, thread_local=False
            )
            self._locks[(me, ttl_s)] = lock
        # The token is our identity, whatever the lock object remembers (redis-py
        # forgets it on release): the checks in Redis compare it with the key's value.
        lock.local.token = me.encode()
        return lock

    async def acquire_or_renew(self, me: str, ttl_s: float, *, held: bool) -> bool:
        """Renew the lease if `me` holds it, else try to take it."""
        lock = self._lock(me, ttl_s)
        async with self.core.reachable():
            if held:
                try:
                    await lock.reacquire()
                    return True
                except LockError:
                    pass  # lapsed, or someone else's: try to take it
            return bool(await lock.acquire(token=me))

    async def release(self, me: str) -> None:
        ttl = next((t for who, t in self._locks if who == me), None)
        if ttl is None:
            return
        lock = self._lock(me, ttl)
        async with self.core.reachable():
            # Lapsed or taken over: nothing of ours to release.
            with contextlib.suppress(LockError):
                await lock.release()

    async def holder(self) -> str | None:
        async with self.core.reachable():
            value = await self.core.redis.get(redis_keys.SCHEDULER_LEADER)
        return str(value) if value else None

    @staticmethod
    async def fenced(pipe: Pipeline, me: str) -> bool:
        """WATCH the lease on `pipe` (before MULTI): True while `me` holds it, and
        the transaction that follows fails if the lease changes hands meanwhile."""
        await pipe.watch(redis_keys.SCHEDULER_LEADER)
        return bool(await pipe.get(redis_keys.SCHEDULER_LEADER) == me)
