"""API keys against a real gateway app and a real Redis: scopes, function limits, revocation, rate limits across
gateways, host paths hidden from non-admins, and the official openai client with `api_key`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types

import openai
import pytest
import redis
from gateway_inproc import FAST, AppClient, db_url, serve_hot

from functions.spec import parse_spec
from gateway import apikeys, ratelimit
from gateway.app import create_app
from invoker.registry import Registry
from protocol import keys

FN, OTHER = "auth-fn", "auth-other"
BODY = {"model": FN, "prompt": "Hello", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def url(redis_url, tiny_model, tmp_path_factory):
    url = db_url(redis_url, 7)
    redis.Redis.from_url(url).flushdb()
    broken = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_model, broken)
    worker = serve_hot(url, FN, str(tiny_model), "auth-worker", max_model_len=64)
    Registry(redis.Redis.from_url(url)).deploy(parse_spec({"name": OTHER, "model": str(broken), "max_model_len": 64}))
    (broken / "tokenizer.json").write_text("{ broken")  # the gateway's tokenizer load fails: a 500 naming a path
    yield url
    worker.stop()


@pytest.fixture(scope="module")
def gw(url):
    client = AppClient(create_app(url, FAST, require_keys=True))
    yield client
    client.close()


@pytest.fixture
def r(url):
    client = redis.Redis.from_url(url)
    yield client
    client.delete(keys.API_KEYS)


def new_key(r, scope: str = "invoke", **kw) -> str:
    return apikeys.create(r, scope, **kw)[1]


def test_keys_are_stored_hashed(r):
    key, token = apikeys.create(r, "invoke", functions=(FN,))
    stored = r.hget(keys.API_KEYS, key.id)
    secret = token.split("_", 2)[2]  # ws_<id>_<secret>; the secret itself may contain "_"
    assert token.encode() not in stored and secret.encode() not in stored
    assert apikeys.ApiKey.from_json(stored).functions == (FN,)
    with pytest.raises(ValueError):
        apikeys.create(r, "admin", functions=(FN,))  # only invoke keys are limited to functions


def test_requests_need_a_valid_key_but_healthz_does_not(gw, r):
    assert gw.request("GET", "/healthz").status_code == 200
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic abc"}):
        resp = gw.request("GET", "/v1/models", headers=headers)
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        assert resp.json()["error"]["type"] == "authentication_error"
    token = new_key(r)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")  # right id, wrong secret
    assert gw.request("GET", "/v1/models", key=forged).status_code == 401
    assert gw.request("GET", "/v1/models", key=token).status_code == 200


def test_invoke_keys_see_names_only_and_only_their_functions(gw, r):
    limited, anyfn, admin = new_key(r, functions=(FN,)), new_key(r), new_key(r, "admin")
    models = gw.request("GET", "/v1/models", key=limited).json()["data"]
    assert [m["id"] for m in models] == [FN] and all("/" not in str(v) for m in models for v in m.values())
    assert {m["id"] for m in gw.request("GET", "/v1/models", key=anyfn).json()["data"]} == {FN, OTHER}
    # another function is answered exactly like one that does not exist
    assert gw.request("POST", "/v1/completions", key=limited, json={**BODY, "model": OTHER}).status_code == 404
    admin_only = [("GET", "/functions"), ("GET", "/status"), ("GET", "/metrics"), ("DELETE", f"/functions/{FN}")]
    for method, path in admin_only:
        resp = gw.request(method, path, key=anyfn)
        assert resp.status_code == 403 and resp.json()["error"]["type"] == "permission_error"
    assert gw.request("GET", "/functions", key=admin).status_code == 200
    assert gw.request("GET", "/status", key=admin).status_code == 200


def test_errors_hide_host_paths_from_non_admins(gw, r, url):
    broken_dir = str(redis.Redis.from_url(url).hget(keys.FUNCTIONS, OTHER))
    assert "model" in broken_dir
    body = {**BODY, "model": OTHER}
    user = gw.request("POST", "/v1/completions", key=new_key(r), json=body).json()["error"]["message"]
    admin = gw.request("POST", "/v1/completions", key=new_key(r, "admin"), json=body).json()["error"]["message"]
    assert "tokenizer" in user and "<path>" in user and "/broken" not in user
    assert "/broken" in admin


def test_openai_client_with_api_key(gw, r):
    async def calls(token: str) -> tuple[list[str], str]:
        client = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=token, http_client=gw.client, max_retries=0)
        models = [m.id async for m in client.models.list()]
        done = await client.completions.create(**BODY)
        return models, done.choices[0].finish_reason

    models, finish = gw.run(calls(new_key(r, functions=(FN,))))
    assert models == [FN] and finish == "length"
    with pytest.raises(openai.AuthenticationError):
        gw.run(calls("ws_000000000000_wrong"))


def test_revoked_key_is_refused_at_once(gw, r):
    key, token = apikeys.create(r, "invoke")
    assert gw.request("GET", "/v1/models", key=token).status_code == 200
    assert apikeys.revoke(r, key.id) and not apikeys.revoke(r, key.id)
    assert gw.request("GET", "/v1/models", key=token).status_code == 401


@pytest.fixture
def frozen_minute(monkeypatch):
    """Rate windows are clock minutes: pin the limiter's clock so a test never straddles two of them."""
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=lambda: 60 * 29_000_000 + 30.0))


def test_request_rate_limit_holds_across_gateways(gw, r, url, frozen_minute):
    other = AppClient(create_app(url, FAST, require_keys=True))
    try:
        token = new_key(r, rpm=3)
        codes = [c.request("GET", "/v1/models", key=token).status_code for c in (gw, other, gw, other)]
        assert codes == [200, 200, 200, 429]
        resp = other.request("GET", "/v1/models", key=token)
        assert resp.status_code == 429 and 1 <= int(resp.headers["retry-after"]) <= 61
        assert resp.json()["error"]["type"] == "rate_limit_error"
        assert gw.request("GET", "/v1/models", key=new_key(r, rpm=3)).status_code == 200  # per key
    finally:
        other.close()


def test_token_rate_limit_counts_prompt_and_max_tokens(gw, r, frozen_minute):
    first = gw.request("POST", "/v1/completions", key=new_key(r, tpm=0), json=BODY)  # 0: unlimited
    cost = first.json()["usage"]["prompt_tokens"] + BODY["max_tokens"]
    token = new_key(r, tpm=cost)  # one request fits, a second does not
    assert gw.request("POST", "/v1/completions", key=token, json=BODY).status_code == 200
    resp = gw.request("POST", "/v1/completions", key=token, json=BODY)
    assert resp.status_code == 429 and "tokens" in resp.json()["error"]["message"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "warmserve.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_creates_lists_and_revokes_keys(gw, r, url):
    out = cli("keys", "--redis", url, "create", "--scope", "invoke", "--functions", f"{FN},x", "--rpm", "5")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip().splitlines()[-1]
    assert gw.request("GET", "/v1/models", key=token).status_code == 200
    key_id = apikeys.split(token)
    listing = cli("keys", "--redis", url, "ls").stdout
    assert key_id in listing and token not in listing
    assert cli("keys", "--redis", url, "revoke", key_id).returncode == 0
    assert gw.request("GET", "/v1/models", key=token).status_code == 401
    assert cli("keys", "--redis", url, "revoke", key_id).returncode == 1
