"""Engine behaviour beyond greedy parity: sampling, stop conditions, streaming, the KV memory seam."""

from __future__ import annotations

import pytest
import torch
from engine_models import build_model, hf_greedy, prompts

from gpu_runtime import Engine, SamplingParams
from gpu_runtime.weights import plan_weights


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api"))
    hf = build_model(path, "llama", seed=5, eos=[2])
    return path, hf


@pytest.fixture
def engine(model):
    return Engine.from_pretrained(model[0], block_size=4)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_seeded_sampling_is_reproducible(engine):
    batch = prompts(128, [4, 9, 6], seed=7)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=123, ignore_eos=True)
    first = [o.token_ids for o in engine.generate(batch, params)]
    # Same seed, different batch composition: each request has its own generator.
    again = [o.token_ids for o in engine.generate(batch[::-1], params)][::-1]
    other = [o.token_ids for o in engine.generate(batch, SamplingParams(**{**params.__dict__, "seed": 7}))]
    assert first == again
    assert first != other


def test_top_k_one_is_greedy(engine, model):
    batch = prompts(128, [5, 11], seed=8)
    sampled = engine.generate(batch, SamplingParams(max_tokens=8, temperature=0.7, top_k=1, ignore_eos=True))
    assert [o.token_ids for o in sampled] == [hf_greedy(model[1], p, 8) for p in batch]


def test_tiny_top_p_is_greedy(engine, model):
    batch = prompts(128, [6], seed=9)
    sampled = engine.generate(batch, SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, ignore_eos=True))
    assert sampled[0].token_ids == hf_greedy(model[1], batch[0], 8)


def test_stop_ids_and_max_tokens(engine, model):
    prompt = prompts(128, [7], seed=10)[0]
    ref = hf_greedy(model[1], prompt, 12)
    stop = next(t for t in ref[3:] if t not in ref[:3] and t != 2)
    cut = ref.index(stop) + 1
    out = engine.generate([prompt], greedy(12, stop_token_ids=[stop], ignore_eos=True))[0]
    assert out.token_ids == ref[:cut] and out.finish_reason == "stop"
    out = engine.generate([prompt], greedy(5, ignore_eos=True))[0]
    assert out.token_ids == ref[:5] and out.finish_reason == "length"


def test_eos_from_generation_config(tmp_path, model):
    hf = model[1]
    prompt = prompts(128, [7], seed=11)[0]
    ref = hf_greedy(hf, prompt, 10)
    eos = ref[4]
    path = str(tmp_path / "m")
    build_model(path, "llama", seed=5, eos=[99999, eos])
    engine = Engine.from_pretrained(path)
    assert eos in engine.eos_token_ids
    out = engine.generate([prompt], greedy(10))[0]
    assert out.token_ids == ref[: ref.index(eos) + 1] and out.finish_reason == "stop"
    assert engine.generate([prompt], greedy(10, ignore_eos=True))[0].token_ids == ref


def test_short_prompt_joins_the_decode_step(engine, model):
    """A short prompt arriving while another request decodes is prefilled in that request's next step (a mixed
    step: nobody waits for a prefill step), and both stay token-identical to transformers."""
    a, c = prompts(128, [5, 3], seed=13)
    engine.add_request("a", a, greedy(8, ignore_eos=True))
    got = {"a": engine.step()[0].new_token_ids, "c": []}  # a's prefill
    engine.add_request("c", c, greedy(5, ignore_eos=True))
    first = {o.request_id: o.new_token_ids for o in engine.step()}
    assert set(first) == {"a", "c"} and len(first["a"]) == len(first["c"]) == 1
    for rid, ids in first.items():
        got[rid] += ids
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert got["a"] == hf_greedy(model[1], a, 8)
    assert got["c"] == hf_greedy(model[1], c, 5)


def test_streaming_add_abort(engine, model):
    a, b, c = prompts(128, [5, 8, 3], seed=12)
    engine.add_request("a", a, greedy(10, ignore_eos=True))
    engine.add_request("b", b, greedy(10, ignore_eos=True))
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    reasons = {}
    for i in range(40):
        if i == 2:
            engine.abort("b")
        if i == 3:
            engine.add_request("c", c, greedy(6, ignore_eos=True))
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        if not engine.has_unfinished():
            break
    assert reasons == {"a": "length", "b": "abort", "c": "length"}
    assert got["a"] == hf_greedy(model[1], a, 10)
    assert got["c"] == hf_greedy(model[1], c, 6)
    assert got["b"] == hf_greedy(model[1], b, len(got["b"]))
    assert engine.blocks.num_used == 0


def test_abort_before_first_step(engine):
    engine.add_request("x", [5, 6, 7], greedy(4))
    engine.abort("x")
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [("x", "abort")]
    assert not engine.has_unfinished()


def test_bad_requests_are_rejected(engine):
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request("e", [], greedy(2))
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request("e", [1, 10_000], greedy(2))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("e", [1] * 300, greedy(2))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_lowest_blocks_first_and_kv_limit(engine):
    engine.add_request("a", list(range(3, 20)), greedy(3, ignore_eos=True))  # 17 tokens: 5 blocks of 4
    engine.step()
    seq = engine.scheduler.running[0]
    assert seq.block_table == [0, 1, 2, 3, 4]
    assert not engine.set_kv_limit(4)  # block 4 in use
    assert engine.set_kv_limit(6)
    while engine.has_unfinished():
        engine.step()
    assert engine.set_kv_limit(1)


def test_kv_pressure_hook_raises_limit(model):
    path, hf = model
    engine = Engine.from_pretrained(path, num_kv_blocks=64, block_size=4)
    asked = []

    def hook(want: int) -> int:
        asked.append(want)
        return want

    engine.kv_pressure_hook = hook
    assert engine.set_kv_limit(2)
    batch = prompts(128, [9, 14], seed=13)
    outs = engine.generate(batch, greedy(8, ignore_eos=True))
    assert asked and engine.blocks.limit > 2
    assert engine.scheduler.num_preemptions == 0
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 8) for p in batch]


def test_warm_engine_attach_detach(model):
    path, hf = model
    layout = plan_weights(path, torch.float32)
    donor = Engine.from_pretrained(path, num_kv_blocks=0)
    engine = Engine.from_weights(path, layout, donor._weights, "cpu", "float32", block_size=4)
    assert engine.num_kv_blocks == 0
    engine.add_request("w", [5, 6, 7], greedy(3))
    with pytest.raises(RuntimeError, match="attach_kv"):
        engine.step()
    engine.abort("w")
    engine.step()
    with pytest.raises(ValueError, match="multiple"):
        engine.attach_kv(torch.zeros(engine.kv_block_bytes + 1, dtype=torch.uint8))
    buffer = torch.zeros(32 * engine.kv_block_bytes, dtype=torch.uint8)
    engine.attach_kv(buffer)
    prompt = prompts(128, [6], seed=14)[0]
    engine.add_request("r", prompt, greedy(6, ignore_eos=True))
    engine.step()
    with pytest.raises(RuntimeError, match="still running"):
        engine.detach_kv()
    while engine.has_unfinished():
        engine.step()
    engine.detach_kv()
    engine.attach_kv(buffer)  # same buffer again (HOT after WARM)
    assert engine.generate([prompt], greedy(6, ignore_eos=True))[0].token_ids == hf_greedy(hf, prompt, 6)
