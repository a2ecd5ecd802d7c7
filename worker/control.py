"""Control jobs: the RQ job function a worker runs on its own queue (ws-ctl-<worker id>).

RQ pickles only the function's import path and its arguments, so the job body must find the worker it runs in:
the worker process binds itself here before it starts taking jobs. Workers run jobs with RQ's SimpleWorker (no
fork), because a forked child could not touch the parent's GPU memory. Senders enqueue this function by its
import path (`protocol.keys.CONTROL_JOB`), so the gateway and the warmer never import the worker package.

An RQ job names any importable callable, so whoever can write to Redis could otherwise run any code here. The
worker runs only this one job, with two string arguments and no callbacks, and reads jobs with RQ's JSON
serializer (`protocol.keys.CONTROL_SERIALIZER`): the default one unpickles job data, which would run code before
any check could look at the job. Any other job is logged and marked failed, never run.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue

from protocol import keys
from protocol.states import ControlAction, ModelState

log = logging.getLogger(__name__)


class ControlTarget(Protocol):
    def apply_control(self, action: ControlAction, function: str) -> ModelState: ...


_target: ControlTarget | None = None


def bind(target: ControlTarget) -> None:
    global _target
    _target = target


def refusal(job: Job) -> str | None:
    """Why a job is not a control job this worker may run, or None when it is one."""
    try:
        func, args, kwargs = job.func_name, job.args, job.kwargs
    except Exception as exc:  # data that does not decode as JSON (a pickle, garbage)
        return f"unreadable job data ({type(exc).__name__})"
    if func != keys.CONTROL_JOB:
        return f"names {func!r:.80}, not {keys.CONTROL_JOB}"
    if kwargs or len(args) != 2 or not all(isinstance(a, str) for a in args):
        return "control jobs take exactly two strings (action, function)"
    callbacks = (job._success_callback_name, job._failure_callback_name, job._stopped_callback_name)
    if any(callbacks):  # RQ imports and calls these too
        return "control jobs carry no callbacks"
    return None


def apply(action: str, function: str) -> str:
    """Move `function`'s model on this worker by `action`; returns the model's new state."""
    parsed = ControlAction.parse(action)
    if _target is None:
        raise RuntimeError("control job ran outside a WarmServe worker process")
    return _target.apply_control(parsed, function).value


class ControlWorker(SimpleWorker):
    """RQ's SimpleWorker that also ends its loop when the worker process is stopping.

    The process installs its own SIGTERM/SIGINT handlers before it registers and forwards them to RQ's
    `request_stop`. A signal that lands while RQ is still starting can have its StopRequested swallowed by RQ's
    start-up code, which left the process blocked on its queue for minutes; so the queue is read in one-second
    slices, each checking `stopping`."""

    def __init__(self, *args: Any, stopping: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "serializer": keys.CONTROL_SERIALIZER})
        self.stopping = stopping

    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        """Run a control job; refuse (log, mark failed, run nothing: not even its callbacks) any other."""
        why = refusal(job)
        if why is None:
            return super().perform_job(job, queue, execution)
        log.error("refused RQ job %s on %s: %s", job.id, queue.name, why)
        self.handle_job_failure(job, queue, exc_string=f"refused: {why}", execution=execution)
        return False

    def _install_signal_handlers(self) -> None:
        return None  # the process owns the handlers (see the class docstring)

    # RQ's command channel (shutdown / stop-job commands over pub/sub) is not used: the process is stopped by its
    # signals. Skipping it also avoids RQ's teardown joining a pub/sub thread that waits up to a minute when a
    # signal interrupted the subscription.
    def subscribe(self) -> None:
        return None

    def unsubscribe(self) -> None:
        return None

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        while not self.stopping.is_set():
            got = super().dequeue_job_and_maintain_ttl(1, max_idle_time=1)
            if got is not None:
                return got
        return None  # RQ's loop ends on None
