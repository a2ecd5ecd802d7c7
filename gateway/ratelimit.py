"""Per-key rate limits (requests and tokens per minute), counted in Redis so they hold across gateways.

Fixed one-minute windows: one INCRBY and one EXPIRE per check, atomic in a MULTI, no clock shared beyond the
minute number. A window lets a key spend up to twice its limit across a boundary; that is the price of one round
trip per request instead of a sorted set of timestamps per key, and fine for keeping one client from starving the
others. Tokens are counted at admission as prompt + max_tokens (a reservation, as OpenAI does), because the
gateway must decide before the work is queued.
"""

from __future__ import annotations

import time

import redis.asyncio as aredis

from protocol import keys

WINDOW_S = 60


class Limited(Exception):
    def __init__(self, what: str, limit: int, retry_after_s: int) -> None:
        super().__init__(f"rate limit: over {limit} {what} per minute for this key; retry in {retry_after_s} s")
        self.what, self.limit, self.retry_after_s = what, limit, retry_after_s


async def charge(r: aredis.Redis, key_id: str, what: str, amount: int, limit: int) -> None:
    """Count `amount` against the key's `what` this minute; Limited when that goes over `limit` (0: unlimited).

    A refused charge is given back, so one oversized request does not use up the minute for the key's others; a
    client that keeps hammering still finds the counter at its limit until the window ends."""
    if limit <= 0:
        return
    now = time.time()
    minute = int(now // WINDOW_S)
    counter = keys.rate(key_id, "req" if what == "requests" else "tok", minute)
    async with r.pipeline(transaction=True) as p:
        p.incrby(counter, amount)
        p.expire(counter, WINDOW_S * 2)
        used, _ = await p.execute()
    if used > limit:
        await r.decrby(counter, amount)
        raise Limited(what, limit, max(1, int((minute + 1) * WINDOW_S - now) + 1))
