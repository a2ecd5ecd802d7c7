"""A reentrant lock granted in the order it was asked for.

`threading.RLock` is not fair. The engine thread holds a model's lock for each step and takes it again right after,
while it still holds the GIL; a thread waiting to start a request on that model is woken, but finds the lock taken
again before it runs. Requests then joined the batch one every few steps, and the platform ran at a fraction of the
engine. With tickets, the engine's next step waits for whoever asked before it.
"""

from __future__ import annotations

import threading


class FairLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._next_ticket = 0
        self._serving = 0

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking`` False only if nobody holds it or waits for it (False otherwise)."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            if not blocking and (self._owner is not None or self._serving != self._next_ticket):
                return False
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                self._cond.wait()
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("FairLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._serving += 1
                self._cond.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
