"""The publisher: a process of its own that turns engine outputs into answer events on Redis.

Why a process: detokenizing, cutting at stop strings, encoding events and writing them cost Python time per
token. In the worker process that time competes for one GIL with the engine thread, whose own Python
(scheduling, launching the step) is what keeps a small model's GPU busy at a few hundred streams. Here it runs
beside the engine, as vLLM v1 runs detokenizing apart from its engine core.

The worker sends, over one pipe and in order: `Started` when a request begins (under its model's lock, before
the engine can produce for it), `Produced` after each engine step, `Fail` for an answer that ends in an error,
`Forget` for a request nobody reads any more (the client went away). Everything written to an answer stream,
and every acknowledgement of an invocation, happens here: an invocation leaves its function's stream (XACK +
XDEL) only after its whole answer is written, and when Redis fails, events wait in their outbox and go with the
next flush (the gateway skips positions it has). The publisher tells the worker, on a second pipe, when a request
is done (`Acked`: it leaves the worker's table) and when a stop string ended it (`StopEngine`: the engine must
stop generating it).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING

import redis

from gpu_runtime.tokenizer import IncrementalDecoder, Tokenizer
from protocol import keys
from protocol.messages import Done, Failed, FinishReason, Invocation, Start, Token, encode_events
from protocol.settings import Settings
from worker.running import Choice, Running

if TYPE_CHECKING:  # for annotations only (unpickling the worker's outputs imports it when the first arrives)
    from gpu_runtime.engine.sequence import StepOutput

log = logging.getLogger(__name__)
# With nothing to do, the publisher still flushes this often: outboxes a failed write left behind (a Redis
# outage) and acknowledgements are retried on that beat.
IDLE_FLUSH_S = 0.05
READY_TIMEOUT_S = 60.0
PIPE_BYTES = 1 << 20
PR_SET_PDEATHSIG = 1  # linux/prctl.h


# ---- worker -> publisher ----
@dataclass(frozen=True)
class Started:
    """A request began; `model` names the directory of its tokenizer, or is None for a request failing before
    it started (then no `Start` event is written, so the client gets the failure's own HTTP status)."""

    inv: Invocation
    entry_id: bytes
    model: str | None
    added: float = 0.0  # when it joined its engine (the worker's clock)


@dataclass(frozen=True)
class Produced:
    outs: list  # the StepOutputs of one engine step
    at: float = 0.0  # when the step ended (the worker's clock)

    def __reduce__(self) -> tuple:
        # Hundreds of outputs cross the pipe every step, on the engine thread's time: as plain tuples they pickle
        # about 7x faster than as dataclasses (which pickle through copyreg and a __dict__ each).
        return _produced, ([tuple(vars(o).values()) for o in self.outs], self.at)


def _produced(rows: list[tuple], at: float) -> Produced:
    from gpu_runtime.engine.sequence import StepOutput  # noqa: F811 (imported here, as unpickling would)

    return Produced([StepOutput(*row) for row in rows], at)


@dataclass(frozen=True)
class Fail:
    request_id: str
    answer: Failed


@dataclass(frozen=True)
class Forget:
    """Nobody reads this answer any more: acknowledge the invocation and write nothing else."""

    request_id: str


@dataclass(frozen=True)
class Stop:
    pass


# ---- publisher -> worker ----
@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class Acked:
    request_id: str
    # For the worker's counters (0 for an answer without tokens): its engine start to the end of the step with its
    # first token, and the end of the step with its last token to its whole answer written and acknowledged.
    first_token_s: float = field(default=0.0, compare=False)
    written_s: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class StopEngine:
    request_id: str
    index: int | None = None  # the sequence a stop string ended (None: the whole request)


def hold_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of `text`'s tail that could still grow into a stop string, so it must not be streamed yet."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


class Publisher:
    """The publisher's state and work, driven by `run` in its own process (or directly by tests)."""

    def __init__(self, r: redis.Redis, settings: Settings, worker_id: str, feedback: Connection) -> None:
        self.r = r
        self.settings = settings
        self.worker_id = worker_id
        self.feedback = feedback
        self.runs: dict[str, Running] = {}
        self.tokenizers: dict[str, Tokenizer] = {}

    def handle(self, msg: object) -> None:
        if isinstance(msg, Produced):
            self.collect(msg.outs, msg.at)
        elif isinstance(msg, Started):
            self.started(msg)
        elif isinstance(msg, Fail):
            run = self.runs.get(msg.request_id)
            if run is not None and not run.finished:
                run.outbox.append(msg.answer)
                run.finished = True
        elif isinstance(msg, Forget):
            run = self.runs.get(msg.request_id)
            if run is not None:
                run.outbox.clear()
                run.finished = run.answered = True

    def started(self, msg: Started) -> None:
        run = self.runs[msg.inv.request_id] = Running(msg.inv, msg.entry_id, added=msg.added)
        if msg.model is None:
            return
        try:
            tok = self.tokenizers.get(msg.model) or Tokenizer.from_pretrained(msg.model)
        except Exception as exc:  # the worker loaded it a moment ago: the files changed under us
            log.exception("publisher: cannot load the tokenizer of %s", msg.model)
            run.outbox.append(Failed(500, f"function '{msg.inv.function}': cannot load its tokenizer: {exc}"))
            run.finished = True
            self.feedback.send(StopEngine(msg.inv.request_id))
            return
        self.tokenizers[msg.model] = tok
        sampling = msg.inv.sampling
        run.choices = [Choice(IncrementalDecoder(tok, list(msg.inv.prompt_ids))) for _ in range(sampling.n)]
        if sampling.prompt_logprobs is None:
            run.outbox.append(Start(self.worker_id, len(msg.inv.prompt_ids)))
        else:
            run.start_pending = True

    def collect(self, outs: list, at: float = 0.0) -> None:
        """Turn engine outputs into events in each request's outbox (positions advance here, once); `at` is when
        the step that produced them ended."""
        for out in outs:
            run = self.runs.get(out.request_id)
            if run is None or run.finished or not run.choices:
                continue  # finished here already (a failure): the engine's late tokens go nowhere
            run.first_out = run.first_out or at
            run.last_out = at
            if run.start_pending:  # the first output of a request that echoes its prompt carries its logprobs
                run.start_pending = False
                prompt = None if out.prompt_logprobs is None else tuple(out.prompt_logprobs)
                run.outbox.append(Start(self.worker_id, len(run.inv.prompt_ids), prompt))
            choice = run.choices[out.index]
            if not choice.finished:  # else a stop string ended it: its late tokens go nowhere
                self.collect_choice(run, choice, out)

    def collect_choice(self, run: Running, choice: Choice, out: StepOutput) -> None:
        """One sequence's new tokens as Token events (text cut at a stop string), and its Done when it ends."""
        finished, reason, index = out.finished, out.finish_reason, out.index
        stops = run.inv.sampling.stop
        longest = max((len(s) for s in stops), default=0)
        for j, tok in enumerate(out.new_token_ids):
            choice.text += choice.decoder.push([tok])
            start = max(0, choice.sent_chars - longest)  # a stop can only begin in the text not yet sent
            hit = min((i for i in (choice.text.find(s, start) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                choice.text, finished, reason = choice.text[:hit], True, FinishReason.STOP
            limit = len(choice.text) if finished else len(choice.text) - hold_back(choice.text, stops)
            delta = choice.text[choice.sent_chars : max(limit, choice.sent_chars)]
            choice.sent_chars += len(delta)
            logprob, top = out.logprobs[j] if out.logprobs else (None, ())
            run.outbox.append(Token(choice.pos, tok, delta, index, logprob, top))
            choice.pos += 1
            if hit >= 0:
                break
        if finished:
            if not out.finished:  # a stop string ended it: the engine must stop too
                self.feedback.send(StopEngine(run.inv.request_id, index))
            if choice.sent_chars < len(choice.text):
                run.outbox.append(Token(choice.pos, -1, choice.text[choice.sent_chars :], index))
            run.outbox.append(Done(reason or FinishReason.STOP, choice.pos, index, out.cumulative_logprob))
            choice.finished = True
            run.finished = all(c.finished for c in run.choices)  # the answer is complete with every Done

    def flush(self) -> None:
        """Write every outbox in one round trip, one entry per request; only then are finished invocations
        acknowledged. When Redis fails, the events stay in their outboxes for the next flush."""
        taken = [run for run in self.runs.values() if run.outbox]
        if taken:
            ttl = self.settings.response_ttl_s
            with self.r.pipeline(transaction=False) as p:
                for run in taken:
                    p.xadd(keys.response(run.inv.request_id), encode_events(run.outbox))
                    if run.finished:
                        p.expire(keys.response(run.inv.request_id), ttl)
                p.execute()
            for run in taken:
                run.outbox.clear()
                run.answered = run.finished
        done = [run for run in self.runs.values() if run.answered]
        if done:
            with self.r.pipeline(transaction=False) as p:
                for run in done:
                    p.xack(keys.invocations(run.inv.function), keys.GROUP, run.entry_id)
                    p.xdel(keys.invocations(run.inv.function), run.entry_id)
                p.execute()
            for run in done:  # the answer is complete and the invocation gone from the queue: only now
                del self.runs[run.inv.request_id]
                self.feedback.send(acked(run))


def acked(run: Running) -> Acked:
    """The worker's notice that `run` is done, with how long its first token took and its last one waited to be
    written (zeros for an answer the engine produced nothing for)."""
    if not run.first_out or not run.added:
        return Acked(run.inv.request_id)
    return Acked(run.inv.request_id, run.first_out - run.added, time.time() - run.last_out)


def die_with_parent() -> None:
    """A worker that dies (SIGKILL, OOM) takes its publisher with it, as a crashed machine would: its requests
    then stay pending for another worker, instead of an orphan finishing whatever the engine had produced."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: the publisher ends when the worker's end of its pipe closes
    if os.getppid() == 1:  # the worker died before the line above
        os._exit(0)


def drain(inbox: Connection, queue: SimpleQueue) -> None:
    """Read the worker's pipe as fast as it is written, so a publisher busy with a round never makes the engine
    thread wait on a full pipe: what arrives meanwhile is simply the next, bigger round."""
    try:
        while True:
            queue.put(inbox.recv())
    except (EOFError, OSError):
        queue.put(Stop())  # the worker is gone


def run(inbox: Connection, feedback: Connection, redis_url: str, settings: Settings, worker_id: str) -> None:
    """The publisher process: take everything the worker sent since the last round, handle it, flush, repeat,
    until `Stop` or the worker's end of the pipe closes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    die_with_parent()
    # The drain thread must get the GIL back within a step's time, not Python's default 5 ms.
    sys.setswitchinterval(0.0005)
    pub = Publisher(redis.Redis.from_url(redis_url), settings, worker_id, feedback)
    queue: SimpleQueue = SimpleQueue()
    threading.Thread(target=drain, args=(inbox, queue), name="drain", daemon=True).start()
    feedback.send(Ready())
    down = False
    while True:
        try:
            batch = [queue.get(timeout=IDLE_FLUSH_S)]
        except Empty:
            batch = []
        while not queue.empty():
            batch.append(queue.get())
        for msg in batch:
            if isinstance(msg, Stop):
                with contextlib.suppress(redis.RedisError):
                    pub.flush()
                return
            try:
                pub.handle(msg)
            except Exception:  # one bad output must not stop every other answer
                log.exception("publisher: cannot handle %s", type(msg).__name__)
        try:
            pub.flush()
        except BrokenPipeError:
            return  # the worker's end of the feedback pipe is gone: so is the worker
        except redis.RedisError as exc:
            if not down:
                log.warning("publisher: Redis unreachable (%s); answers wait in their outboxes", exc)
            down = True
            continue
        if down:
            log.warning("publisher: Redis is back; writing the answers that waited")
            down = False


def widen(conn: Connection) -> None:
    """Give the worker's pipe room for many engine steps (Linux: 64 KiB by default, a few steps' outputs at a
    few hundred streams), so the engine thread never waits for the publisher to read."""
    try:
        size = min(PIPE_BYTES, int(Path("/proc/sys/fs/pipe-max-size").read_text()))
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, size)
    except (OSError, ValueError, AttributeError):
        pass  # not Linux, or not allowed: the default pipe works, the engine just waits more often


class PublisherProcess:
    """The worker's handle on its publisher: `send` from any thread, `receive` on the thread that reads the
    publisher's feedback."""

    def __init__(self, redis_url: str, settings: Settings, worker_id: str) -> None:
        ctx = multiprocessing.get_context("spawn")  # not fork: the worker has threads and a CUDA context
        inbox_out, inbox_in = ctx.Pipe(duplex=False)
        feedback_out, feedback_in = ctx.Pipe(duplex=False)
        self._send_lock = threading.Lock()
        self._inbox, self._feedback = inbox_in, feedback_out
        self.process = ctx.Process(
            target=run, args=(inbox_out, feedback_in, redis_url, settings, worker_id), name="publisher", daemon=True
        )
        self.process.start()
        widen(inbox_in)
        inbox_out.close()
        feedback_in.close()
        # The worker takes requests only once their answers can be written (a spawned interpreter takes a moment).
        if not self._feedback.poll(READY_TIMEOUT_S) or not isinstance(self._feedback.recv(), Ready):
            self.process.kill()
            raise RuntimeError(f"the publisher process did not start within {READY_TIMEOUT_S} s")

    def send(self, msg: object) -> None:
        with self._send_lock:
            self._inbox.send(msg)

    def receive(self, timeout_s: float) -> object | None:
        """The publisher's next message, or None after `timeout_s`; EOFError once the publisher is gone."""
        return self._feedback.recv() if self._feedback.poll(timeout_s) else None

    def stop(self) -> None:
        try:
            self.send(Stop())
        except OSError:
            pass  # already gone
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
