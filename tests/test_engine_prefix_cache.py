"""Prefix caching: generation with cached prompt blocks is token-identical to generation without them (greedy
and seeded sampling, under preemption, after lending), and the block manager's cache keeps the lending rules."""

from __future__ import annotations

import pytest
from engine_models import build_model, prompts

from gpu_runtime import Engine, SamplingParams
from gpu_runtime.engine.block_manager import BlockManager
from gpu_runtime.engine.sequence import Sequence

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("prefix"))
    build_model(path, "llama", num_key_value_heads=1, seed=5)
    return path


def shared_prefix_prompts(n: int = 5) -> list[list[int]]:
    """A 37-token system prompt, then different user turns (blocks of 4: 9 full shared blocks)."""
    system = prompts(128, [37], seed=11)[0]
    return [system + tail for tail in prompts(128, [3, 9, 1, 14, 6][:n], seed=12)]


def run_one_by_one(engine: Engine, batch: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Each prompt after the previous finished, so later ones find the earlier ones' blocks cached."""
    return [engine.generate([p], params)[0].token_ids for p in batch]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_cached_prefix_gives_the_same_tokens(model, params):
    batch = shared_prefix_prompts()
    plain = Engine.from_pretrained(model, block_size=4, prefix_caching=False)
    cached = Engine.from_pretrained(model, block_size=4)
    expected = run_one_by_one(plain, batch, params)
    assert run_one_by_one(cached, batch, params) == expected
    assert plain.prefix_cache_tokens() == (0, 0)
    hit, query = cached.prefix_cache_tokens()
    assert query == sum(map(len, batch))
    assert hit == 4 * 36 // 4 * (len(batch) - 1)  # every later prompt reuses the 9 full system-prompt blocks
    # A repeat of a finished request reuses its prompt and its generated blocks' prefix alike.
    assert run_one_by_one(cached, batch[:1], params) == expected[:1]


def test_under_preemption_the_tokens_stay(model):
    batch = shared_prefix_prompts() * 2  # identical requests in flight together share blocks too
    plain = Engine.from_pretrained(model, block_size=4, prefix_caching=False)
    expected = [o.token_ids for o in plain.generate(batch, GREEDY)]
    engine = Engine.from_pretrained(model, num_kv_blocks=30, block_size=4)
    assert [o.token_ids for o in engine.generate(batch, GREEDY)] == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_used == 0 and engine.blocks.num_free == 30
    assert engine.prefix_cache_tokens()[0] > 0


def test_lending_drops_idle_cached_blocks_above_the_limit(model):
    batch = shared_prefix_prompts()
    plain = Engine.from_pretrained(model, block_size=4, prefix_caching=False)
    expected = run_one_by_one(plain, batch, GREEDY)
    engine = Engine.from_pretrained(model, num_kv_blocks=64, block_size=4)
    run_one_by_one(engine, batch, GREEDY)
    assert engine.blocks.num_used == 0 and engine.blocks.num_cached > 8
    assert engine.set_kv_limit(8)  # idle cached blocks never stand in the way of lending
    assert engine.blocks.num_cached <= 8
    assert engine.set_kv_limit(64)  # taken back
    assert run_one_by_one(engine, batch, GREEDY) == expected


def seq(tokens: list[int]) -> Sequence:
    return Sequence("s", tokens, GREEDY)


def test_least_recently_released_cached_block_is_evicted_first():
    bm = BlockManager(6, block_size=2, salt="m")
    a, b = seq([1, 2, 3, 4, 9]), seq([5, 6, 7])
    for s in (a, b):
        bm.match(s)
        bm.allocate(s, len(s))
        s.num_cached = len(s) - 1
        bm.commit(s)
    assert (a.block_table, b.block_table, bm.num_cached) == ([0, 1, 2], [3, 4], 3)  # full: 0, 1 and 3
    bm.free(b)
    bm.free(a)
    assert bm.num_free == 6 and bm.num_used == 0
    fresh = seq([8] * 8)
    bm.allocate(fresh, 8)  # never-cached blocks first, then the least recently released cached one (b's)
    assert fresh.block_table == [2, 4, 5, 3] and bm.num_cached == 2
    again = seq([1, 2, 3, 4, 5])
    bm.match(again)
    assert again.block_table == [0, 1] and again.num_cached == 4
    assert bm.hit_tokens == 4 and bm.query_tokens == 5 + 3 + 5


def test_held_blocks_still_refuse_a_lower_limit_and_salt_separates_models():
    bm = BlockManager(4, block_size=2, salt="model-a")
    s = seq([1, 2, 3])
    bm.allocate(s, 3)
    assert not bm.set_limit(1)
    s.num_cached = 2
    bm.commit(s)
    bm.free(s)
    other = BlockManager(4, block_size=2, salt="model-b")
    t = seq([1, 2, 3])
    assert other._hash(t, 0) != bm._hash(seq([1, 2, 3]), 0)
