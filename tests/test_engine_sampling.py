"""The engine's OpenAI sampling features on CPU float32, against transformers on the same weights: logprobs and
prompt logprobs (within 1e-4), n > 1 sharing the prompt's KV, penalties, logit_bias and min_tokens; the batched
sampler against per-row draws."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_models import build_model, prompts

from gpu_runtime import Engine, SamplingParams
from gpu_runtime.engine.logprobs import start_reports
from gpu_runtime.engine.sampler import sample
from gpu_runtime.engine.sequence import Sequence
from protocol.errors import InvalidRequest
from protocol.messages import FinishReason

EOS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sampling"))
    return path, build_model(path, "llama", seed=5)


@torch.no_grad()
def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of ``ids``: row i scores token i + 1."""
    return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def prefill_tokens(engine: Engine) -> list[int]:
    """Spy on the runner: the count of tokens each prefill batch computes is appended to the returned list."""
    counted: list[int] = []
    execute = engine.runner.execute

    def spy(batch):
        if batch.is_prefill:
            counted.append(sum(c.end - c.start for c in batch.chunks))
        return execute(batch)

    engine.runner.execute = spy
    return counted


# ---- logprobs ----
@pytest.mark.parametrize("chunk", [8192, 7], ids=["whole", "chunked"])
def test_logprobs_and_prompt_logprobs_match_transformers(model, chunk):
    path, hf = model
    engine = Engine.from_pretrained(path, block_size=8, max_num_batched_tokens=chunk)
    batch = prompts(128, [1, 6, 19, 33], seed=2)
    engine.generate(batch[2:], SamplingParams(max_tokens=2, temperature=0))  # cached prefixes must not be skipped
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    for prompt, out in zip(batch, engine.generate(batch, params), strict=True):
        ref = hf_logprobs(hf, prompt + out.token_ids)
        assert out.prompt_logprobs[0] == (None, ())
        assert len(out.prompt_logprobs) == len(prompt) and len(out.logprobs) == len(out.token_ids)
        reports = out.prompt_logprobs[1:] + out.logprobs
        for pos, (lp, top) in enumerate(reports):
            assert lp == pytest.approx(ref[pos, (prompt + out.token_ids)[pos + 1]].item(), abs=1e-4)
            k = 2 if pos + 1 < len(prompt) else 3
            values, ids = ref[pos].topk(k)
            assert [t for t, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert out.cumulative_logprob == pytest.approx(sum(lp for lp, _ in out.logprobs), abs=1e-4)


def test_logprobs_zero_reports_the_chosen_token_only(model):
    path, hf = model
    engine = Engine.from_pretrained(path, block_size=8)
    prompt = prompts(128, [9], seed=3)[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=0))[0]
    assert all(top == () for _, top in out.logprobs)
    plain = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None and plain.token_ids == out.token_ids


def test_reports_for_some_rows_of_a_batch_equal_log_softmax():
    logits = torch.randn(4, 300) * 4
    chosen = torch.tensor([5, 17, 250, 3])
    wants = [SamplingParams(logprobs=3), SamplingParams(), SamplingParams(logprobs=0), SamplingParams(n=2)]
    seqs = [Sequence(f"r{i}", [1, 2], p) for i, p in enumerate(wants)]
    start_reports(logits, chosen, seqs).record(seqs)
    ref = torch.log_softmax(logits, dim=-1)
    assert seqs[1].logprobs == [] and seqs[1].cumulative_logprob == 0.0  # asked for nothing
    assert seqs[3].logprobs == [] and seqs[3].cumulative_logprob == pytest.approx(ref[3, 3].item(), abs=1e-6)
    (lp, top), (lp0, top0) = seqs[0].logprobs[0], seqs[2].logprobs[0]
    assert lp == pytest.approx(ref[0, 5].item(), abs=1e-6) and lp0 == pytest.approx(ref[2, 250].item(), abs=1e-6)
    values, ids = ref[0].topk(3)
    assert [t for t, _ in top] == ids.tolist() and [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-6)
    assert top0 == ()


# ---- the batched sampler ----
def per_row_draw(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One row drawn the plain way: filter, softmax, ``torch.multinomial`` with the sequence's generator."""
    if p.temperature == 0:
        return int(row.argmax())
    x = row / p.temperature
    if 0 < p.top_k < x.numel():
        x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        ordered, order = x.sort(descending=True)
        probs = ordered.softmax(-1)
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, probs.cumsum(-1) - probs > p.top_p)
        x = x.masked_fill(drop, float("-inf"))
    return int(torch.multinomial(x.softmax(-1), 1, generator=generator))


def test_one_batched_draw_gives_each_seeded_row_what_multinomial_gives_it():
    rows = [
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=0.7, top_k=20, seed=4),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.2, top_p=0.8, seed=5),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=6),
        SamplingParams(temperature=1.0),  # unseeded: torch's default generator, in the same draw
    ]
    seqs = [Sequence(f"r{i}", [1], p) for i, p in enumerate(rows)]
    generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in rows]
    for step in range(5):
        logits = torch.randn(len(rows), 200, generator=torch.Generator().manual_seed(step)) * 3
        tokens = sample(logits, seqs)
        for i, p in enumerate(rows[:-1]):
            assert tokens[i] == per_row_draw(logits[i], p, generators[i]), (step, i)
        assert 0 <= tokens[-1] < 200


# ---- n > 1 ----
@pytest.mark.parametrize("length", [16, 21], ids=["full-blocks", "partial-block"])
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "no-cache"])
def test_n_sequences_share_the_prompt_and_follow_their_seeds(model, length, prefix_caching):
    path, _ = model
    engine = Engine.from_pretrained(path, block_size=8, prefix_caching=prefix_caching)
    prompt = prompts(128, [length], seed=6)[0]
    counted = prefill_tokens(engine)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=3, ignore_eos=True)
    engine.add_request("r", prompt, params)
    engine.step()  # prefill, then index 0 forks 1 and 2
    full = engine.blocks._refs
    shared = engine._seqs["r"][0].block_table[: length // 8]
    assert [full[b] for b in shared] == [3] * len(shared)
    while engine.has_unfinished():
        engine.step()
    assert counted == [length]  # the prompt was computed once, for all three
    assert engine.blocks.num_used == 0
    out = engine.generate([prompt], params)[0]
    assert [s.token_ids for s in out.sequences[1:]] != [out.sequences[0].token_ids] * 2
    # Sequence i draws from seed + i: the same tokens as a single request with that seed (exact shared KV).
    for i, seq in enumerate(out.sequences):
        alone = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=11 + i, ignore_eos=True))
        assert seq.token_ids == alone[0].token_ids
        assert seq.cumulative_logprob is not None


def test_n_sequences_survive_preemption(model):
    path, _ = model
    batch = prompts(128, [13, 5, 22], seed=7)
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=3, n=3, ignore_eos=True)
    roomy = Engine.from_pretrained(path, block_size=4)
    tight = Engine.from_pretrained(path, block_size=4, num_kv_blocks=24)
    expected = [[s.token_ids for s in o.sequences] for o in roomy.generate(batch, params)]
    assert [[s.token_ids for s in o.sequences] for o in tight.generate(batch, params)] == expected
    assert tight.scheduler.num_preemptions > 0 and tight.blocks.num_used == 0


@pytest.mark.parametrize("after_fork", [False, True])
def test_abort_ends_every_sequence_of_a_request(model, after_fork):
    path, _ = model
    engine = Engine.from_pretrained(path, block_size=8)
    engine.add_request("r", prompts(128, [10])[0], SamplingParams(max_tokens=50, n=3, seed=1, ignore_eos=True))
    if after_fork:
        engine.step()
    engine.abort("r")
    finished = {(o.index, o.finish_reason) for o in engine.step() if o.finished}
    assert finished == {(i, FinishReason.ABORT) for i in range(3)}
    assert not engine.has_unfinished() and engine.blocks.num_used == 0


def test_abort_of_one_index_leaves_the_others_running(model):
    path, _ = model
    engine = Engine.from_pretrained(path, block_size=8)
    engine.add_request("r", prompts(128, [10])[0], SamplingParams(max_tokens=4, n=2, seed=1, ignore_eos=True))
    engine.step()
    engine.abort("r", index=0)
    ends = {}
    while engine.has_unfinished():
        ends |= {o.index: o.finish_reason for o in engine.step() if o.finished}
    assert ends == {0: FinishReason.ABORT, 1: FinishReason.LENGTH}


# ---- penalties, bias, min_tokens ----
@torch.no_grad()
def reference_greedy(hf, prompt: list[int], p: SamplingParams) -> list[int]:
    """Greedy decoding with the penalties written out token by token (no batching, no tensor tricks)."""
    ids = list(prompt)
    step = hf(torch.tensor([ids]), use_cache=True)
    for _ in range(p.max_tokens):
        logits = step.logits[0, -1].float().tolist()
        out = ids[len(prompt) :]
        for t, b in p.logit_bias:
            logits[t] += b
        for t in set(ids) if p.repetition_penalty != 1 else ():
            logits[t] = logits[t] / p.repetition_penalty if logits[t] > 0 else logits[t] * p.repetition_penalty
        for t in set(out):
            logits[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
        if len(out) < p.min_tokens:
            for t in (*p.stop_token_ids, EOS):
                logits[t] = float("-inf")
        ids.append(max(range(len(logits)), key=logits.__getitem__))
        step = hf(torch.tensor([ids[-1:]]), past_key_values=step.past_key_values, use_cache=True)
    return ids[len(prompt) :]


PENALIZED = {
    "presence": SamplingParams(max_tokens=12, temperature=0, presence_penalty=1.5),
    "frequency": SamplingParams(max_tokens=12, temperature=0, frequency_penalty=0.7),
    "repetition": SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.8),
    "all": SamplingParams(
        max_tokens=12,
        temperature=0,
        presence_penalty=0.4,
        frequency_penalty=0.3,
        repetition_penalty=1.3,
        logit_bias=((5, 2.0), (9, -1.0)),
    ),  # fmt: skip
}


def test_penalties_match_a_direct_computation(model):
    path, hf = model
    engine = Engine.from_pretrained(path, block_size=8)
    batch = prompts(128, [4, 11, 7, 17, 6], seed=9)
    params = [*PENALIZED.values(), SamplingParams(max_tokens=12, temperature=0)]  # a plain row in the batch too
    plain = params[-1]
    unpenalized = engine.generate(batch, plain)
    for prompt, p, out, free in zip(batch, params, engine.generate(batch, params), unpenalized, strict=True):
        expected = reference_greedy(hf, prompt, p)
        assert out.token_ids == expected[: len(out.token_ids)]
        assert p is plain or out.token_ids != free.token_ids[: len(out.token_ids)]  # the penalty changed something


def test_logit_bias_forces_a_token_and_logprobs_stay_raw(model):
    path, hf = model
    engine = Engine.from_pretrained(path, block_size=8)
    prompt = prompts(128, [8], seed=10)[0]
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=2, logit_bias=((77, 100.0),), logprobs=1)
    out = engine.generate([prompt], params)[0]
    assert out.token_ids == [77] * 5
    ref = hf_logprobs(hf, prompt + out.token_ids)
    for pos, (lp, _) in enumerate(out.logprobs):
        assert lp == pytest.approx(ref[len(prompt) - 1 + pos, 77].item(), abs=1e-4)  # the model's, not biased


def test_min_tokens_keeps_eos_and_stop_tokens_out(model):
    path, _ = model
    engine = Engine.from_pretrained(path, block_size=8)
    prompt = prompts(128, [8], seed=12)[0]
    eager = ((EOS, 100.0), (40, 60.0))  # eos first, then stop token 40, then anything
    out = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, logit_bias=eager))[0]
    assert out.token_ids == [EOS] and out.finish_reason == FinishReason.STOP
    params = SamplingParams(max_tokens=10, temperature=0, logit_bias=eager, min_tokens=3, stop_token_ids=(40,))
    out = engine.generate([prompt], params)[0]
    assert len(out.token_ids) == 4 and EOS not in out.token_ids[:3] and 40 not in out.token_ids[:3]
    assert out.token_ids[3] == EOS and out.finish_reason == FinishReason.STOP


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(logit_bias=((128, 1.0),)), "logit_bias"),
        (SamplingParams(logprobs=129), "logprobs"),
        (SamplingParams(n=65), "n"),
    ],
)
def test_bad_sampling_fields_are_the_clients_mistake(model, params, field):
    path, _ = model
    engine = Engine.from_pretrained(path, block_size=8, num_kv_blocks=4)
    with pytest.raises(InvalidRequest, match=field):
        engine.add_request("r", [3, 4], params)


# ---- the transformers reference engine ----
def test_reference_engine_matches_and_refuses_what_it_lacks(tiny_model):
    from gpu_runtime.reference_engine import ReferenceEngine

    path = str(tiny_model)  # the demo model: the reference engine reads eos ids from its tokenizer
    ref = ReferenceEngine(path)
    prompt = prompts(128, [7], seed=13)[0]
    params = dataclasses.replace(PENALIZED["all"], max_tokens=6, logprobs=2)
    ref.add_request("r", prompt, params)
    tokens, reports = [], []
    while ref.has_unfinished():
        for out in ref.step():
            tokens += out.new_token_ids
            reports += out.logprobs
    builtin = Engine.from_pretrained(path, block_size=8).generate([prompt], params)[0]
    assert tokens == builtin.token_ids
    assert [lp for lp, _ in reports] == pytest.approx([lp for lp, _ in builtin.logprobs], abs=1e-4)
    for field, value in (("n", 2), ("prompt_logprobs", 0)):
        with pytest.raises(InvalidRequest, match=field):
            ref.add_request("bad", prompt, SamplingParams(**{field: value}))
