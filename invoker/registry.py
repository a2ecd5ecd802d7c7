"""The function registry: which functions exist and their specs, stored in one Redis hash.

Deploying creates the function's invocation stream and consumer group up front, so a worker can join the group
before the first request and a request can never land in a stream nobody reads.

Entries are checked when read, not only when deployed: anyone who can write to Redis can write to the hash, and
one entry that is not a spec we wrote must not stop `/v1/models`, the warmer or any worker from serving the
others. Such an entry is logged and skipped.
"""

from __future__ import annotations

import logging

import redis

from functions.spec import FunctionSpec, SpecError, quote
from protocol import keys

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def deploy(self, spec: FunctionSpec) -> bool:
        """Store (or replace) a function; True when it is new."""
        try:
            self.r.xgroup_create(keys.invocations(spec.name), keys.GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        with self.r.pipeline() as p:
            p.hset(keys.FUNCTIONS, spec.name, spec.to_json())
            p.incr(keys.FUNCTIONS_VERSION)
            created, _ = p.execute()
        return bool(created)

    def remove(self, name: str) -> bool:
        """Forget a function and its queue; False when it did not exist."""
        with self.r.pipeline() as p:
            p.hdel(keys.FUNCTIONS, name)
            p.delete(keys.invocations(name), keys.history(name))
            p.incr(keys.FUNCTIONS_VERSION)
            removed, _, _ = p.execute()
        return bool(removed)

    def get(self, name: str) -> FunctionSpec | None:
        raw = self.r.hget(keys.FUNCTIONS, name)
        return checked(name.encode(), raw) if raw else None

    def all(self) -> dict[str, FunctionSpec]:
        specs = (checked(k, v) for k, v in self.r.hgetall(keys.FUNCTIONS).items())
        return {s.name: s for s in specs if s is not None}

    def version(self) -> int:
        return int(self.r.get(keys.FUNCTIONS_VERSION) or 0)


def checked(name: bytes, raw: bytes) -> FunctionSpec | None:
    """The entry as a spec, or None (logged) when it is not one we wrote under this name."""
    try:
        spec = FunctionSpec.from_json(raw)
    except SpecError as exc:
        log.error("registry entry %s skipped: %s", quote(name), exc)
        return None
    if spec.name.encode() != name:
        log.error("registry entry %s skipped: it holds the spec of %s", quote(name), quote(spec.name))
        return None
    return spec
