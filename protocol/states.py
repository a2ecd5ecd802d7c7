"""Model states on a worker and the control actions that move a model between them.

The ladder is COLD (on disk) < HOST (pinned host cache) < WARM (weights mapped on the GPU) < HOT (KV mapped,
serving). LOADING is what a worker reports while a control action is moving a model: the warmer counts it as a
copy on its way to the GPU. States travel as their names, so `redis-cli` shows them as words.
"""

from __future__ import annotations

from enum import StrEnum


class ModelState(StrEnum):
    COLD = "COLD"  # safetensors on disk only
    HOST = "HOST"  # in the worker's pinned host cache
    LOADING = "LOADING"  # a control action is moving it (reported only; never a state in the memory pool)
    WARM = "WARM"  # weights mapped in GPU memory, engine built, no KV cache
    HOT = "HOT"  # KV pages mapped too: serving

    @property
    def level(self) -> int:
        """Position on the ladder, for comparisons such as `state.level >= ModelState.WARM.level`."""
        return _LEVELS[self]

    @property
    def servable(self) -> bool:
        """A worker reads a function's invocations only when its model is WARM or HOT: WARM -> HOT maps KV pages,
        cheap enough to do on the first request."""
        return self in (ModelState.WARM, ModelState.HOT)

    @classmethod
    def parse(cls, value: str | ModelState) -> ModelState:
        """``"HOST"`` / ``"host"`` / ``ModelState.HOST`` -> ``ModelState.HOST``; ValueError naming the choices."""
        try:
            return cls(str(value).upper())
        except ValueError:
            raise ValueError(f"unknown model state {value!r}; one of {[s.value for s in cls]}") from None


# Best first, for the state a request finds its function's model in (the gateway's x-warmserve-state, the
# simulator's breakdown): a model being loaded is closer to serving than one in host memory.
ARRIVAL_ORDER = (ModelState.HOT, ModelState.WARM, ModelState.LOADING, ModelState.HOST, ModelState.COLD)

_LEVELS = {
    ModelState.COLD: 0,
    ModelState.HOST: 1,
    ModelState.LOADING: 1,  # on its way from HOST to WARM
    ModelState.WARM: 2,
    ModelState.HOT: 3,
}


class ControlAction(StrEnum):
    """What the warmer and the router ask a worker to do with one function's model (an RQ job each)."""

    LOAD_HOST = "load_host"  # COLD -> HOST
    PREWARM = "prewarm"  # -> WARM
    ACTIVATE = "activate"  # -> HOT
    DEACTIVATE = "deactivate"  # HOT -> WARM
    EVICT = "evict"  # -> HOST

    @classmethod
    def parse(cls, value: str | ControlAction) -> ControlAction:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown control action {value!r} (known: {', '.join(a.value for a in cls)})") from None

    @property
    def moves_to_gpu(self) -> bool:
        """Actions that leave the model on the GPU (the planner's view of where an instance will be)."""
        return self in (ControlAction.PREWARM, ControlAction.ACTIVATE, ControlAction.DEACTIVATE)
