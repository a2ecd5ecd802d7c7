"""Control jobs: the RQ job function a worker runs on its own queue (ws-ctl-<worker id>).

RQ pickles only the function's import path and its arguments, so the job body must find the worker it runs in:
the worker process binds itself here before it starts taking jobs. Workers run jobs with RQ's SimpleWorker (no
fork), because a forked child could not touch the parent's GPU memory. Senders enqueue this function by its
import path (`protocol.keys.CONTROL_JOB`), so the gateway and the warmer never import the worker package.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from rq import SimpleWorker

from protocol.states import ControlAction, ModelState


class ControlTarget(Protocol):
    def apply_control(self, action: ControlAction, function: str) -> ModelState: ...


_target: ControlTarget | None = None


def bind(target: ControlTarget) -> None:
    global _target
    _target = target


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
        super().__init__(*args, **kwargs)
        self.stopping = stopping

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
