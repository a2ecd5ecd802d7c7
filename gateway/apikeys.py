"""API keys: created and revoked by operators (`warmserve keys`), checked by every gateway, stored in Redis.

A key reads `ws_<id>_<secret>`. The id is public (it names the key in `keys ls`, `keys revoke` and the logs); the
secret is 256 random bits, and Redis holds only its SHA-256. A plain hash is enough because the secret is random,
not a password a person chose: nothing short of guessing 2**256 values inverts it, so a slow password hash
(bcrypt, argon2) would only slow every request. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import asdict, dataclass, field

import orjson
import redis
import redis.asyncio as aredis

from protocol import keys

SCOPES = ("admin", "invoke")


@dataclass(frozen=True)
class ApiKey:
    id: str
    scope: str  # admin: everything; invoke: inference and /v1/models only
    digest: str  # sha256 of the whole key, hex
    functions: tuple[str, ...] = ()  # invoke keys: the only functions they see and call (empty: all)
    rpm: int | None = None  # requests per minute (None: the gateway's Settings.rate_rpm; 0: unlimited)
    tpm: int | None = None  # tokens per minute (None: Settings.rate_tpm; 0: unlimited)
    label: str = ""
    created: float = field(default_factory=time.time)

    @property
    def admin(self) -> bool:
        return self.scope == "admin"

    def allows(self, function: str) -> bool:
        return self.admin or not self.functions or function in self.functions

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> ApiKey:
        raw = orjson.loads(data)
        return cls(**{**raw, "functions": tuple(raw["functions"])})


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def split(token: str) -> str | None:
    """The key id of a well-formed token, else None."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "ws" or len(parts[1]) != 12 or not parts[2]:
        return None
    return parts[1]


def create(
    r: redis.Redis,
    scope: str,
    functions: tuple[str, ...] = (),
    rpm: int | None = None,
    tpm: int | None = None,
    label: str = "",
) -> tuple[ApiKey, str]:
    """Store a new key; returns it and the token (shown once: only its hash is kept)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    if functions and scope != "invoke":
        raise ValueError("only invoke keys are limited to functions")
    key_id = secrets.token_hex(6)
    token = f"ws_{key_id}_{secrets.token_urlsafe(32)}"
    key = ApiKey(key_id, scope, digest(token), tuple(functions), rpm, tpm, label)
    r.hset(keys.API_KEYS, key_id, key.to_json())
    return key, token


def list_keys(r: redis.Redis) -> list[ApiKey]:
    return sorted((ApiKey.from_json(v) for v in r.hvals(keys.API_KEYS)), key=lambda k: k.created)


def revoke(r: redis.Redis, key_id: str) -> bool:
    """Delete a key; every gateway refuses it from its next request on (lookups are not cached)."""
    return bool(r.hdel(keys.API_KEYS, key_id))


async def lookup(r: aredis.Redis, token: str) -> ApiKey | None:
    """The key a request presents, or None when it is malformed, unknown, revoked or wrong."""
    key_id = split(token)
    if key_id is None:
        return None
    raw = await r.hget(keys.API_KEYS, key_id)
    if raw is None:
        return None
    key = ApiKey.from_json(raw)
    return key if hmac.compare_digest(key.digest, digest(token)) else None
