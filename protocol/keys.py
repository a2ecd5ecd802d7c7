"""Every Redis key WarmServe writes, in one place.

The README's key table lists the same names; each entry here says which `redis-cli` command inspects it.
All keys share the `ws:` prefix so one deployment's data is easy to find (`redis-cli --scan --pattern 'ws:*'`).
"""

from __future__ import annotations

PREFIX = "ws"

# Function registry: hash name -> FunctionSpec JSON.            redis-cli HGETALL ws:functions
FUNCTIONS = f"{PREFIX}:functions"
# Bumped on every deploy/rm so workers and gateways reload the registry.   redis-cli GET ws:functions:version
FUNCTIONS_VERSION = f"{PREFIX}:functions:version"
# Live workers: sorted set worker_id -> last heartbeat (unix s).  redis-cli ZRANGE ws:workers 0 -1 WITHSCORES
WORKERS = f"{PREFIX}:workers"
# Consumer group every worker joins on each invocation stream.   redis-cli XINFO GROUPS ws:inv:<fn>
GROUP = "workers"
# The warmer's memory: field "<action>:<function>:<worker>" -> when it sent that control job (so a failing one is
# retried once a minute, not every round), and field "last_plan" -> {"at", "sent"} of its last round.
# redis-cli HGETALL ws:warmer
WARMER_STATE = f"{PREFIX}:warmer"
# Set (for 10 s, refreshed) while the warmer plays a baseline (`warmserve warmer --policy`): it decides cold loads.
WARMER_POLICY = f"{PREFIX}:warmer:policy"
# The RQ job every control action runs as, by import path (RQ pickles the path, not the code).
CONTROL_JOB = "worker.control.apply"
# How control jobs are encoded: JSON, because RQ's default (pickle) runs code when a job is read.
CONTROL_SERIALIZER = "rq.serializers.JSONSerializer"


def invocations(function: str) -> str:
    """Stream of pending invocations of one function.   redis-cli XLEN ws:inv:<fn> ; XPENDING ws:inv:<fn> workers"""
    return f"{PREFIX}:inv:{function}"


def response(request_id: str) -> str:
    """Stream of one request's events (start, tokens, done, error).   redis-cli XRANGE ws:resp:<id> - +"""
    return f"{PREFIX}:resp:{request_id}"


def worker(worker_id: str) -> str:
    """Hash describing one worker (device, memory, model states); expires unless heartbeats refresh it.
    redis-cli HGETALL ws:worker:<id>"""
    return f"{PREFIX}:worker:{worker_id}"


def control_queue(worker_id: str) -> str:
    """RQ queue name of one worker's control jobs (load/prewarm/activate/deactivate/evict).
    rq info --url redis://... ws-ctl-<id> ; redis-cli LLEN rq:queue:ws-ctl-<id>"""
    return f"{PREFIX}-ctl-{worker_id}"


def history(function: str) -> str:
    """Hash bucket_start_unix_s -> arrivals in that bucket (the warmer's input).   redis-cli HGETALL ws:hist:<fn>"""
    return f"{PREFIX}:hist:{function}"


# Pub/sub channel where gateways announce requests whose client went away, so workers stop generating them.
# redis-cli SUBSCRIBE ws:cancel
CANCEL_CHANNEL = f"{PREFIX}:cancel"


def routing_lock(function: str) -> str:
    """Short-lived marker: an activate job for this function was just sent, don't send another.
    redis-cli TTL ws:routing:<fn>"""
    return f"{PREFIX}:routing:{function}"


def gateway_wake(reader_id: str) -> str:
    """Stream a gateway's answer reader blocks on besides the answer streams: an entry here wakes it to read a
    request that started waiting during its blocking read (trimmed to one entry, expires when the gateway is gone).
    redis-cli --scan --pattern 'ws:wake:*'"""
    return f"{PREFIX}:wake:{reader_id}"


# API keys: hash key id -> ApiKey JSON (scope, functions, limits, sha256 of the secret; never the secret itself).
# redis-cli HGETALL ws:apikeys
API_KEYS = f"{PREFIX}:apikeys"


def rate(key_id: str, what: str, minute: int) -> str:
    """Per-key counter of requests ("req") or tokens ("tok") in one minute, shared by every gateway; expires.
    redis-cli GET ws:rate:<key id>:req:<unix minute>"""
    return f"{PREFIX}:rate:{key_id}:{what}:{minute}"


def entry_time(entry_id: bytes) -> float:
    """When Redis added a stream entry (unix s): its id is `<milliseconds>-<sequence>` by Redis's clock."""
    return int(entry_id.split(b"-", 1)[0]) / 1000
