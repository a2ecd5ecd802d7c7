"""Greedy output of the engine (CPU, float32) must be token-identical to transformers on the same weights."""

from __future__ import annotations

import pytest
from engine_models import build_model, hf_greedy, prompts

from gpu_runtime import Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

CASES = {
    "llama-gqa2": ("llama", {}),
    "llama3-rope-tied": (
        "llama",
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
            rope_theta=500000.0,
        ),
    ),
    "mistral-gqa4": ("mistral", dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=None)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen3-qknorm": ("qwen3", dict(head_dim=24, num_key_value_heads=2)),
    "llama-odd": (
        "llama",
        dict(
            hidden_size=72,
            num_attention_heads=6,
            num_key_value_heads=3,
            intermediate_size=100,
            vocab_size=123,
            num_hidden_layers=3,
        ),
    ),  # fmt: skip
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model_case(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    path = str(tmp_path_factory.mktemp(request.param))
    hf = build_model(path, arch, **overrides)
    return path, hf


def test_mixed_batch_matches_transformers(model_case):
    path, hf = model_case
    batch = prompts(hf.config.vocab_size, [1, 7, 16, 37])
    engine = Engine.from_pretrained(path, block_size=8)
    outs = engine.generate(batch, GREEDY)
    for prompt, out in zip(batch, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)
        assert out.finish_reason == "length"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    hf = build_model(path, "llama", num_key_value_heads=1, seed=3)
    batch = prompts(hf.config.vocab_size, [5, 13, 21, 30, 9, 2], seed=4)
    expected = [hf_greedy(hf, p, 24) for p in batch]
    return path, batch, expected


def test_forced_preemption_keeps_tokens(llama):
    path, batch, expected = llama
    # 6 sequences of up to 54 tokens in blocks of 4 need ~80 blocks; 20 force preemption and recompute.
    engine = Engine.from_pretrained(path, num_kv_blocks=20, block_size=4)
    outs = engine.generate(batch, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert engine.blocks.num_used == 0


def test_chunked_prefill(llama):
    path, batch, expected = llama
    engine = Engine.from_pretrained(path, max_num_batched_tokens=7, block_size=4)
    outs = engine.generate(batch, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected


def test_few_seqs_at_a_time(llama):
    path, batch, expected = llama
    engine = Engine.from_pretrained(path, max_num_seqs=2)
    outs = engine.generate(batch, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected


def test_short_prompts_prefill_as_decode_rows_in_groups(tmp_path):
    """Six short prompts prefilled together as decode rows, in replays of at most 2 x max_num_seqs rows (16)."""
    path = str(tmp_path / "m")
    hf = build_model(path, "llama", seed=5)
    batch = prompts(hf.config.vocab_size, [3, 5, 2, 7, 4, 6], seed=6)
    engine = Engine.from_pretrained(path, max_num_seqs=8, block_size=4)
    calls = []
    run_rows = engine.runner._run_rows
    engine.runner._run_rows = lambda *a: calls.append(len(a[0])) or run_rows(*a)
    outs = engine.generate(batch, GREEDY)
    assert calls[:4] == [10, 11, 6, 6]  # the prefill step: whole prompts grouped in order; a decode step
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in batch]


def test_sequence_longer_than_cache_finishes_with_length(llama):
    path, batch, _ = llama
    engine = Engine.from_pretrained(path, num_kv_blocks=3, block_size=4)  # 12 tokens in all
    outs = engine.generate([batch[0], batch[1]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert outs[0].finish_reason == "length" and 0 < len(outs[0].token_ids) < 24
    assert outs[1].finish_reason == "length" and outs[1].token_ids == []
