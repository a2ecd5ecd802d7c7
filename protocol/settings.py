"""Every tunable of the serving platform in one object, documented here and nowhere else.

Processes must agree on several of these (a worker heart-beats every `heartbeat_s`; gateways and other workers
call it dead after `heartbeat_timeout_s`), so each process builds one `Settings` the same way: the defaults
below, overridden by environment variables named `WARMSERVE_<FIELD>` in upper case
(`WARMSERVE_HEARTBEAT_TIMEOUT_S=10`). The simulator takes the warmer's fields from the same object, so it plans
with the forecaster and the time constants production runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Settings:
    # ---- liveness ----
    heartbeat_s: float = 1.0  # a worker publishes its report (WorkerInfo) this often
    heartbeat_timeout_s: float = 5.0  # a worker silent this long is dead: its claimed invocations are re-delivered
    # ---- the worker ----
    registry_check_s: float = 0.5  # how often a worker looks for deploys and removals
    response_ttl_s: int = 600  # an answer stream nobody reads expires instead of piling up
    max_inflight_per_function: int = 64  # a worker stops reading a function's stream at this many running requests
    read_batch: int = 64  # invocations taken per XREADGROUP (they join the engine together: one lock hold)
    kv_seqs: int = 8  # KV a HOT model reserves: this many sequences at its max_model_len
    drain_wait_s: float = 2.0  # a deactivate/evict waits this long for the model's running requests to finish
    # a request whose WARM model finds no room for its KV (every other model busy) is retried after each of the
    # worker's reads for this long after its submission, then answered 503
    start_wait_s: float = 30.0
    engine_max_num_seqs: int = 64  # sequences one engine batches at once (CUDA graphs are captured up to 256)
    # ---- the gateway and the router ----
    request_timeout_s: float = 300.0  # a request with no answer by then gets 504
    max_body_bytes: int = 4 << 20  # request bodies over this get 413 (counted while reading, never read whole)
    max_spec_bytes: int = 64 << 10  # a function spec (deploy body) over this gets 413; a real one is < 1 KiB
    body_timeout_s: float = 30.0  # a request body not fully received by then gets 408 (a trickling client)
    header_timeout_s: float = 10.0  # a connection that has not sent a whole request head by then is closed
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)
    max_header_bytes: int = 16 << 10  # a request head over this is refused (h11's max_incomplete_event_size)
    model_roots: str = ""  # more directories models may live in (os.pathsep-separated); the cache's models/ always
    # ---- API keys (gateway) ----
    rate_rpm: int = 600  # requests per minute per key, unless the key sets its own; 0: unlimited
    rate_tpm: int = 1_000_000  # tokens (prompt + max_tokens, counted at admission) per minute per key; 0: unlimited
    routing_lock_s: int = 10  # after an activate for a cold function, no other is sent for this long
    reroute_after_s: float = 3.0  # a waiting request that has seen no event this long re-checks its routing
    # (and that its invocation is still queued: one lost in a Redis restart is submitted again)
    redis_connections: int = 64  # a gateway's pool for short commands: past it, a command waits for a connection
    control_job_timeout_s: int = 600  # RQ kills a control job (a load) running longer than this
    # ---- the warmer (and the simulator's warmserve policy) ----
    warmer_interval_s: float = 5.0  # one planning round this often
    forecast_method: str = "blend"  # see warmer.forecast.METHODS and docs/forecasting.md
    window_s: int = 300  # forecast window (WarmServe's 5 minutes)
    lead_s: float = 60.0  # act on the next window's forecast this long before it begins
    history_windows: int = 8 * 24 * 12  # windows of history read: same time yesterday and a week ago
    resend_after_s: float = 60.0  # an action not reflected in the cluster after this long is sent again
    capacity_rps: float = 4.0  # requests/s one HOT instance absorbs within its SLO (until calibrated)
    # bench/replay.py compresses time by this factor (1: real time): windows, lead and keep-alives are given already
    # divided by it, and the forecaster counts in windows of window_s * time_scale so its day stays a day of windows
    time_scale: float = 1.0
    # ---- arrival history (gateway writes, warmer reads) ----
    history_bucket_s: int = 60
    history_retention_buckets: int = 14 * 24 * 60

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults, then `WARMSERVE_<FIELD>` variables, then `overrides`; ValueError names a bad variable."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = environ.get(f"WARMSERVE_{f.name.upper()}")
            if raw is None:
                continue
            kind = type(getattr(DEFAULTS, f.name))
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise ValueError(f"WARMSERVE_{f.name.upper()}={raw!r}: expected {kind.__name__}") from None
        return replace(DEFAULTS, **values, **overrides)


DEFAULTS = Settings()
