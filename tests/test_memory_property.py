"""Property test: thousands of random transitions, KV use and lending on one CPU ModelHost.

After every operation: every chunk is free or mapped exactly once by its owner, loans come only from HOT
models' KV, each HOT model's mapped + lent KV equals its promise, and its engine's limit matches what is
mapped. At the end every request has produced exactly the reference tokens (nothing it was promised was lost
or overwritten), and evicting everything returns every chunk and every host-cache byte.
"""

from __future__ import annotations

import random

import pytest
from engine_models import build_model, prompts

from gpu_runtime import Engine, SamplingParams
from gpu_runtime.memory import ModelHost, PoolExhausted
from protocol.states import ModelState

CHUNK = 64 * 1024
KW = dict(max_num_seqs=8, max_num_batched_tokens=512)
KV_CHUNKS = {"a": 6, "b": 3, "c": 2, "d": 4}  # d shares a's files: same weights, its own memory
OPS = 800  # every path is taken well before this (asserted below); more only costs CI time


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {}
    for seed, name in enumerate("abc"):
        out[name] = str(tmp_path_factory.mktemp(name))
        build_model(out[name], "llama", seed=seed)
    out["d"] = out["a"]
    return out


def test_random_transitions_keep_every_chunk_owned_once(dirs):
    rnd = random.Random(20261121)
    host = ModelHost("cpu", gpu_bytes=22 * CHUNK, host_cache_bytes=12 * CHUNK, chunk_bytes=CHUNK, engine_kwargs=KW)
    for name, kv in KV_CHUNKS.items():
        host.register(name, dirs[name], "float32", kv_bytes=kv * CHUNK)
    pool_prompts = {n: prompts(128, [rnd.randint(4, 150) for _ in range(12)], seed=i) for i, n in enumerate(dirs)}
    submitted: dict[str, tuple[str, list[int], int]] = {}  # request id -> (model, prompt, max_tokens)
    results: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    seen = {"exhausted": 0, "busy": 0, "lent": 0, "reclaimed": 0}

    def step_all(times: int) -> None:
        for name in host.models:
            if host.state(name) != ModelState.HOT:
                continue
            eng = host.engine(name)
            for _ in range(times):
                lent_before = host.report()["models"][name]["kv_chunks_lent"]
                for out in eng.step():
                    results.setdefault(out.request_id, []).extend(out.new_token_ids)
                    if out.finished:
                        finished[out.request_id] = out.finish_reason
                if host.report()["models"][name]["kv_chunks_lent"] < lent_before:
                    seen["reclaimed"] += 1

    for i in range(OPS):
        name = rnd.choice(list(KV_CHUNKS))
        op = rnd.choice(
            ["load_host", "prewarm", "activate", "deactivate", "evict_host", "evict_cold", "submit", "step"]
        )
        before = host.states()
        try:
            if op == "load_host":
                host.load_host(name)
            elif op == "prewarm":
                host.prewarm(name)
            elif op == "activate":
                host.activate(name)
            elif op == "deactivate":
                host.deactivate(name)
            elif op in ("evict_host", "evict_cold"):
                host.evict(name, to=op.split("_")[1])
            elif op == "submit" and host.state(name) == ModelState.HOT:
                prompt = rnd.choice(pool_prompts[name])
                rid = f"r{i}"
                submitted[rid] = (name, prompt, rnd.randint(1, 8))
                host.engine(name).add_request(rid, prompt, GREEDY(submitted[rid][2]))
            elif op == "step":
                step_all(rnd.randint(1, 3))
        except PoolExhausted as e:
            assert f"'{name}'" in str(e)
            seen["exhausted"] += 1
            assert host.states()[name].level <= max(before[name].level, ModelState.WARM.level)
        except RuntimeError as e:
            assert "still running" in str(e), e
            seen["busy"] += 1
            assert host.states() == before, "a refused deactivation changed states"
        host.check()
        for m in host.models.values():
            if m.state == ModelState.HOT:
                assert m.engine.blocks.limit == m.account.limit()
                assert m.engine.num_kv_blocks == m.account.blocks(m.account.promise)
        seen["lent"] += host.report()["lent_bytes"] > 0

    while any(host.engine(n).has_unfinished() for n in host.models if host.state(n) == ModelState.HOT):
        step_all(1)
    # Every path was taken, not just the easy ones.
    assert all(v > 0 for v in seen.values()), seen
    # Every request got exactly the reference tokens: no promised KV block was lost or overwritten.
    assert set(finished) == set(submitted)
    for model_name in dirs:
        mine = [(rid, p, n) for rid, (m, p, n) in submitted.items() if m == model_name]
        ref = Engine.from_pretrained(dirs[model_name], num_kv_blocks=256, **KW)
        outs = ref.generate([p for _, p, _ in mine], [GREEDY(n) for _, _, n in mine])
        for (rid, _, _), out in zip(mine, outs, strict=True):
            assert finished[rid] == "length" and results[rid] == out.token_ids, rid
    for name in KV_CHUNKS:
        host.evict(name, to="COLD")
    host.check()
    assert host.pool.free_count == host.pool.capacity and host.host_cache.used_chunks == 0


def GREEDY(n: int) -> SamplingParams:  # noqa: N802 - reads like the constant the other memory tests use
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
