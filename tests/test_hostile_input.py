"""Hostile input gets a clean 4xx in OpenAI's error shape: documents that are too deep, too big or oddly typed,
model paths that try to leave the model roots, bodies too big or too slow (checked while reading), deploys with a
content type a browser could send across sites, unknown routes and wrong methods."""

from __future__ import annotations

import asyncio

import pytest
import redis
from gateway_inproc import FAST, AppClient, db_url

from functions.spec import SpecError, model_roots, parse_spec, parse_yaml
from gateway.app import create_app

BILLION_LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n"
    for p, n in zip("abcd", "bcde", strict=True)  # 9**5 values, 6 levels deep
)


@pytest.fixture
def roots(tiny_model):
    return model_roots()  # the cache's models dir, where tiny_model lives


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("{1: 2}", "<document>", "keys must be strings"),
        ("name: a\nmodel: x\nscaling: {[1]: 2}", "<yaml>", "unhashable"),
        ("a: " + "[" * 100 + "]" * 100, "<yaml>", "nested deeper"),
        ("- &a [*a]", "<document>", "nested deeper"),  # a recursive alias is infinitely deep
        (BILLION_LAUGHS, "<document>", "too big"),
        ("name: a\nmodel: cache:../../..", "model", "without '..'"),
        ("name: a\nmodel: relative/dir", "model", "absolute path or cache:NAME"),
        ("name: a\nmodel: /etc", "model", "outside the model roots"),
        ("name: a\nmodel: /" + "x" * 5000, "model", "at most 1024 characters"),
        ('name: a\nmodel: "/tmp/a\\0b"', "model", "without NUL"),
        ('name: "a\\n"\nmodel: cache:tiny-llama', "name", "must match"),
        ("name: a\nmodel: cache:tiny-llama\ndtype: [1]", "dtype", "must be one of"),
        ("name: a\nmodel: cache:tiny-llama\nengine: {x: 1}", "engine", "must be one of"),
    ],
)
def test_hostile_specs_are_clean_errors(roots, text, field, reason):
    with pytest.raises(SpecError) as err:
        parse_yaml(text, "body", roots=roots)
    assert err.value.field == field and reason in err.value.reason
    assert len(str(err.value)) < 300  # a value is quoted by a short prefix only


def test_symlink_out_of_the_roots_is_refused(roots, tiny_model, tmp_path):
    escape = tiny_model.parent / "escape-link"
    escape.symlink_to(tmp_path, target_is_directory=True)
    try:
        with pytest.raises(SpecError, match="outside the model roots"):
            parse_spec({"name": "a", "model": "cache:escape-link"}, roots=roots)
        with pytest.raises(SpecError, match="outside the model roots"):
            parse_spec({"name": "a", "model": str(escape)}, roots=roots)
    finally:
        escape.unlink()
    assert parse_spec({"name": "a", "model": "cache:tiny-llama"}, roots=roots).model == str(tiny_model)


@pytest.fixture(scope="module")
def gw(redis_url, tiny_model):
    url = db_url(redis_url, 10)
    redis.Redis.from_url(url).flushdb()
    settings = FAST.__class__(**{**FAST.__dict__, "body_timeout_s": 1.0, "max_spec_bytes": 4096})
    client = AppClient(create_app(url, settings))
    yield client
    client.close()


def is_openai_error(resp, status: int) -> bool:
    error = resp.json()["error"]
    return resp.status_code == status and set(error) == {"message", "type", "param", "code"}


async def endless():
    while True:
        yield b"x" * 65536


async def trickle():
    yield b'{"model": '
    await asyncio.sleep(3600)


def test_bodies_are_limited_while_reading(gw):
    assert is_openai_error(gw.request("POST", "/v1/completions", content=endless()), 413)
    yaml = {"content-type": "application/yaml"}
    assert is_openai_error(gw.request("POST", "/functions", content=endless(), headers=yaml), 413)
    big = {"content-length": str(1 << 40), **yaml}
    assert is_openai_error(gw.request("POST", "/functions", content=b"name: a", headers=big), 413)


def test_a_trickling_body_times_out(gw):
    assert is_openai_error(gw.request("POST", "/v1/completions", content=trickle()), 408)


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_deploys_refuse_types_a_browser_sends_cross_site(gw, ctype):
    headers = {"content-type": ctype} if ctype else {}
    resp = gw.request("POST", "/functions", content=b"name: a\nmodel: cache:tiny-llama\n", headers=headers)
    assert is_openai_error(resp, 415)


@pytest.mark.parametrize("ctype", ["application/yaml", "text/yaml", "application/x-yaml", "Application/YAML; x=1"])
def test_deploys_take_yaml_types(gw, ctype):
    resp = gw.request(
        "POST", "/functions", content=b"name: ok\nmodel: cache:tiny-llama\n", headers={"content-type": ctype}
    )
    assert resp.status_code in (200, 201), resp.text


def test_unknown_routes_and_wrong_methods_are_openai_errors(gw):
    assert is_openai_error(gw.request("GET", "/nope"), 404)
    resp = gw.request("DELETE", "/v1/models")
    assert is_openai_error(resp, 405) and "GET" in resp.headers["allow"]
