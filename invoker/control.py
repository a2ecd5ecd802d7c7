"""Control jobs: the RQ job functions a worker runs on its own queue (ws-ctl-<worker id>).

RQ pickles only the function's import path and its arguments, so the job body must find the worker it runs in:
the worker process registers itself here before it starts consuming jobs. Workers run jobs with RQ's
SimpleWorker (no fork), because a forked child could not touch the parent's GPU memory.
"""

from __future__ import annotations

from typing import Protocol

from invoker.states import ACTIONS


class ControlTarget(Protocol):
    def apply_control(self, action: str, function: str) -> str: ...


_target: ControlTarget | None = None


def bind(target: ControlTarget) -> None:
    global _target
    _target = target


def apply(action: str, function: str) -> str:
    """Move `function`'s model on this worker by `action`; returns the model's new state."""
    if action not in ACTIONS:
        raise ValueError(f"unknown control action {action!r} (known: {', '.join(ACTIONS)})")
    if _target is None:
        raise RuntimeError("control job ran outside a WarmServe worker process")
    return _target.apply_control(action, function)
