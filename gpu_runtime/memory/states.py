"""Where a model's weights are on a worker. Each step up or down is one method of ``ModelHost``."""

from __future__ import annotations

import enum


class ModelState(enum.IntEnum):
    COLD = 0  # safetensors on disk only
    HOST = 1  # in the pinned host cache
    WARM = 2  # weights mapped in GPU memory, engine built, no KV cache
    HOT = 3  # KV pages mapped too: serving

    def __str__(self) -> str:
        return self.name


def parse_state(value: str | ModelState) -> ModelState:
    """``"HOST"`` / ``"host"`` / ``ModelState.HOST`` -> ``ModelState.HOST``; ValueError naming the choices."""
    if isinstance(value, ModelState):
        return value
    try:
        return ModelState[str(value).upper()]
    except KeyError:
        raise ValueError(f"unknown model state {value!r}; one of {[s.name for s in ModelState]}") from None
