"""The per-model lock hands over in arrival order, so a request never waits behind many engine steps."""

import threading

import pytest
from conftest import wait_for

from worker.fairlock import FairLock


def test_waiters_get_the_lock_in_the_order_they_asked_even_if_the_holder_asks_again():
    lock, order = FairLock(), []

    def take(name: str) -> None:
        with lock:
            order.append(name)

    lock.acquire()  # the "engine" holds it
    waiters = []
    for i, name in enumerate(["start-1", "start-2"]):
        waiters.append(threading.Thread(target=take, args=(name,)))
        waiters[-1].start()
        wait_for(lambda i=i: lock._next_ticket == i + 2, 10, f"{name} to queue")  # white box: its ticket is taken
    lock.release()
    take("engine-again")  # the engine asks again at once: it queues behind both
    for t in waiters:
        t.join()
    assert order == ["start-1", "start-2", "engine-again"]


def test_reentrant_for_its_owner_and_refused_to_others():
    lock = FairLock()
    with lock, lock:
        pass
    with lock:
        errors: list = []

        def release_elsewhere() -> None:
            with pytest.raises(RuntimeError):
                lock.release()
            errors.append("refused")

        t = threading.Thread(target=release_elsewhere)
        t.start()
        t.join()
        assert errors == ["refused"]
    with lock:  # still usable after all that
        pass
