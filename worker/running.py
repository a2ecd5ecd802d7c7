"""The requests a worker is generating: the one piece of state its consumer, engine and cancel threads share.

Every access goes through `RunningTable`'s lock; a `Running` itself is touched only by the thread that steps its
engine, except `finished`, which a cancel sets before the request leaves the table.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from gpu_runtime.tokenizer import IncrementalDecoder
from protocol.messages import Event, Invocation


@dataclass
class Choice:
    """One of a request's n sequences as it is streamed: its own text, positions and end."""

    decoder: IncrementalDecoder
    text: str = ""  # everything decoded so far (for stop strings)
    sent_chars: int = 0  # how much of `text` has been turned into events
    pos: int = 0
    finished: bool = False


@dataclass
class Running:
    """One invocation being generated here."""

    inv: Invocation
    entry_id: bytes
    choices: list[Choice] = field(default_factory=list)  # one per sequence; none for a request failed before start
    start_pending: bool = False  # Start carries the prompt's logprobs (echo), which come with the first output
    started: float = field(default_factory=time.time)  # read from its function's stream (this worker's clock)
    added: float = 0.0  # joined its engine
    first_out: float = 0.0  # the end of the engine step that produced its first token
    last_out: float = 0.0  # ... and its last one
    outbox: list[Event] = field(default_factory=list)  # events not yet written to Redis
    finished: bool = False  # every choice finished, or the request failed
    answered: bool = False  # the whole answer is on its stream: acknowledge (again, if Redis failed the last try)


class RunningTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, Running] = {}
        self._last_used: dict[str, float] = {}  # keep-alive clock per function, read by the warmer

    def add(self, run: Running) -> bool:
        """False when the request is already running here (an entry claimed twice)."""
        with self._lock:
            if run.inv.request_id in self._runs:
                return False
            self._runs[run.inv.request_id] = run
            self._last_used[run.inv.function] = time.time()
            return True

    def pop(self, request_id: str) -> Running | None:
        with self._lock:
            run = self._runs.pop(request_id, None)
            if run is not None:
                self._last_used[run.inv.function] = time.time()
            return run

    def get(self, request_id: str) -> Running | None:
        with self._lock:
            return self._runs.get(request_id)

    def all(self) -> list[Running]:
        with self._lock:
            return list(self._runs.values())

    def of(self, function: str) -> list[Running]:
        with self._lock:
            return [run for run in self._runs.values() if run.inv.function == function]

    def entry_ids(self) -> set[bytes]:
        with self._lock:
            return {run.entry_id for run in self._runs.values()}

    def inflight(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(run.inv.function for run in self._runs.values()))

    def last_used(self) -> dict[str, float]:
        with self._lock:
            return dict(self._last_used)


class Counters:
    """Events an operator wants counted (re-deliveries, cancels, failures by status), published with every
    heartbeat in WorkerInfo.counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def add_many(self, counts: dict[str, int]) -> None:
        with self._lock:
            self._counts.update(counts)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
