"""How big a function's KV pool is, from the tokens its requests really need.

An engine reserves its KV cache up front (the live worker: a pool per HOT instance), so the pool decides both
how many requests an instance runs at once and how much memory the instance takes. A fixed batch at the mean
request size fails both ways: for long-context traffic (32k-token prompts) 64 sequences need a terabyte, and a
pool smaller than one request would leave that request waiting for ever. So, per function:
- batch: the requests its traffic keeps running at once (Little's law at its recent peak rate, doubled for
  bursts), at most the engine's capacity batch and what fits in `pool_share` of the memory its weights leave on
  a GPU (so a GPU can hold a pool and a neighbour), or all of it where that share holds fewer than
  MIN_SHARED_BATCH requests (long contexts: a neighbour would halve what the GPU serves), at least 1. A
  function at 0.1 req/s gets a pool for a few requests, not for 64: memory the planner can give to other
  functions' copies;
- pool: `batch` requests of the function's mean size, and at least one of its 99th-percentile size, never more
  than the weights leave; all the weights leave when a long-context pool fills its GPU anyway (requests vary in
  size: the rest would hold one more of the smaller ones);
- capacity: requests/s one instance serves at that batch (sim/engine_model.py).
Requests that cannot fit next to the weights at all are left out: they are refused on arrival, never served.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.engine_model import EngineModel

MIN_SHARED_BATCH = 8  # requests a pool must hold in `pool_share` of the room, or it may take all of it


@dataclass(frozen=True)
class Sizing:
    batch: int  # requests one instance runs at capacity
    pool_bytes: float  # KV pool per GPU of one HOT instance
    capacity_rps: float  # requests/s one instance serves within its SLO (derated)
    mean_tokens: float  # prompt + output of the function's requests that fit


def size(
    engine: EngineModel,
    usable_bytes: float,
    prompt: np.ndarray,
    output: np.ndarray,
    peak_rps: float | None = None,
    pool_share: float = 0.5,
) -> Sizing:
    """Sizing of one function from its requests' prompt and output token counts (any order, may be empty) and
    its recent peak rate (None: size for the engine's capacity batch)."""
    m, p = engine.m, engine.p
    per_tok = m.kv_bytes_per_token / m.tp  # per GPU
    room = usable_bytes - m.shard_bytes
    tokens = np.asarray(prompt, dtype=np.float64) + np.asarray(output, dtype=np.float64)
    fits = tokens * per_tok <= room
    if not fits.any():  # nothing to learn from: one request of the engine's SLO prompt size
        prompt, output, tokens = np.array([p.slo_prefill_tokens]), np.array([1]), np.array([p.slo_prefill_tokens + 1])
        fits = np.array([True])
    mean_prompt, mean_output = float(np.mean(prompt[fits])), float(np.mean(output[fits]))
    mean_tokens = mean_prompt + mean_output
    # Half the room leaves space for a neighbour; but where half holds only a few requests (long contexts) a
    # neighbour would halve what the GPU serves, so the pool may take the whole room.
    share = pool_share if pool_share * room >= MIN_SHARED_BATCH * mean_tokens * per_tok else 1.0
    fill = int(min(p.capacity_batch, max(1, share * room // (mean_tokens * per_tok))))
    batch = fill
    if peak_rps is not None:  # Little's law with the latency at the largest batch (the slowest steps)
        step = engine.decode_step_s(batch, batch * (mean_prompt + mean_output / 2))
        latency = engine.prefill_s(int(mean_prompt)) + mean_output * step
        batch = int(min(batch, max(1, np.ceil(2.0 * peak_rps * latency))))
    pool = min(room, max(batch * mean_tokens, float(np.percentile(tokens[fits], 99))) * per_tok)
    if share == 1.0 and batch == fill:  # the GPU is the pool's alone: what a batch of mean size leaves is its too
        pool = room
    return Sizing(batch, pool, engine.capacity_rps(mean_prompt, mean_output, batch), mean_tokens)
