"""Structured output in the engine: grammar masks on random-weight models, batched, through preemption."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from gpu_runtime import Engine, SamplingParams, Tokenizer
from gpu_runtime.engine.grammar import GrammarCompiler, accept_tokens, apply_grammars, fill_bitmask
from protocol import structured
from protocol.errors import InvalidRequest
from protocol.messages import FinishReason

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tier": {"enum": ["free", "pro"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["name", "age", "tier", "tags"],
    "additionalProperties": False,
}
SEEDS = range(5)


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def tok(tiny_model) -> Tokenizer:
    return Tokenizer.from_pretrained(str(tiny_model))


def texts(tok: Tokenizer, outs) -> list[str]:
    return [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]


def test_json_schema_outputs_always_validate(engine, tok):
    request = structured.json_schema(SCHEMA)
    params = [SamplingParams(max_tokens=200, temperature=1.0, seed=s, structured=request) for s in SEEDS]
    outs = engine.generate([tok.encode("Hello")] * len(params), params)
    for out, text in zip(outs, texts(tok, outs), strict=True):
        assert out.finish_reason == FinishReason.STOP, text  # the grammar finished the answer
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_outputs_always_parse(engine, tok):
    # Random weights don't know JSON: in a string any of the 384 tokens is allowed, so a small bias towards '"'
    # and '}' keeps answers within max_tokens. The grammar alone makes them valid.
    bias = ((tok.token_to_id('"'), 4.0), (tok.token_to_id("}"), 4.0))
    request = structured.json_object()
    params = [SamplingParams(max_tokens=120, seed=s, logit_bias=bias, structured=request) for s in SEEDS]
    outs = engine.generate([tok.encode("Hi")] * len(params), params)
    parsed = [json.loads(t) for t in texts(tok, outs)]
    assert all(isinstance(p, dict) for p in parsed)
    assert any(p for p in parsed)  # not only {}


def test_rows_without_a_grammar_are_untouched_in_a_mixed_batch(engine, tok):
    prompts = [tok.encode("The quick brown fox"), tok.encode("Hello there")]
    alone = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    typed = SamplingParams(max_tokens=200, seed=3, structured=structured.json_schema(SCHEMA))
    mixed = engine.generate([prompts[0], prompts[0], prompts[1], prompts[1]], [free, typed, free, typed])
    assert [mixed[0].token_ids, mixed[2].token_ids] == [o.token_ids for o in alone]
    for out in (mixed[1], mixed[3]):
        jsonschema.validate(json.loads(tok.decode(out.token_ids, skip_special_tokens=True)), SCHEMA)


class Row:
    """What apply_grammars reads of a sequence."""

    def __init__(self, grammar, completion_ids=()) -> None:
        self.grammar, self.completion_ids = grammar, list(completion_ids)


def test_apply_grammars_masks_grammar_rows_only_and_keeps_the_input(engine, tok):
    compiler = GrammarCompiler(engine.model_dir, engine.config.vocab_size, engine.eos_token_ids)
    rows = [Row(None), Row(compiler.start(structured.json_object())), Row(None)]
    logits = torch.randn(3, engine.config.vocab_size)
    before = logits.clone()
    masked = apply_grammars(logits, rows)
    assert torch.equal(logits, before)  # raw logits stay for logprobs
    assert torch.equal(masked[0], before[0]) and torch.equal(masked[2], before[2])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).lstrip(" \t\r\n") in ("", "{") for t in allowed)  # an object starts
    assert not set(engine.eos_token_ids) & set(allowed)  # eos only once the grammar is complete


def test_eos_is_allowed_only_when_the_grammar_is_complete(engine, tok):
    compiler = GrammarCompiler(engine.model_dir, engine.config.vocab_size, engine.eos_token_ids)
    state = compiler.start(structured.json_schema({"type": "array", "items": {"type": "integer"}}))
    logits = torch.zeros(1, engine.config.vocab_size)
    eos = list(engine.eos_token_ids)
    ids = tok.encode("[1,2", add_special_tokens=False)
    assert not state.advance(ids)
    assert torch.isinf(apply_grammars(logits, [Row(state, ids)])[0, eos]).all()
    ids += tok.encode("]", add_special_tokens=False)
    assert state.advance(ids)  # nothing can follow "]": the sequence ends here
    assert torch.isfinite(apply_grammars(logits, [Row(state, ids)])[0, eos]).any()


def test_state_follows_the_sequence_back_and_forth(engine, tok):
    compiler = GrammarCompiler(engine.model_dir, engine.config.vocab_size, engine.eos_token_ids)
    request = structured.json_schema(SCHEMA)
    ids = tok.encode('{"name": "ab", "age": 3', add_special_tokens=False)
    state = compiler.start(request)
    state.sync(ids)
    state.sync(ids[:5])  # fewer tokens than consumed: roll back
    fresh = compiler.start(request)
    fresh.sync(ids[:5])
    logits = torch.zeros(2, engine.config.vocab_size)
    masked = apply_grammars(logits, [Row(state, ids[:5]), Row(fresh, ids[:5])])
    assert torch.equal(masked[0], masked[1])


def test_preempted_sequences_resume_their_grammar(tiny_model, tok):
    # 10 KV blocks of 16 tokens: room for any one sequence, not for 4 of ~60 tokens: some are preempted and
    # recomputed from their tokens, and their grammar state must follow
    engine = Engine.from_pretrained(str(tiny_model), num_kv_blocks=10, block_size=16)
    request = structured.json_schema(SCHEMA)
    params = [SamplingParams(max_tokens=140, seed=s, structured=request) for s in range(4)]
    outs = engine.generate([tok.encode("A prompt")] * 4, params)
    assert engine.scheduler.num_preemptions > 0
    assert all(o.finish_reason == FinishReason.STOP for o in outs)
    for text in texts(tok, outs):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_every_sequence_of_n_follows_its_own_grammar(engine, tok):
    params = SamplingParams(n=2, max_tokens=200, seed=7, structured=structured.json_schema(SCHEMA))
    (out,) = engine.generate([tok.encode("Hello")], params)
    for seq in out.sequences:
        jsonschema.validate(json.loads(tok.decode(seq.token_ids, skip_special_tokens=True)), SCHEMA)


@pytest.mark.parametrize(
    ("request_text", "param"),
    [
        (structured.json_schema({"type": "objectx"}), "response_format"),
        (structured.json_schema({"type": "string", "pattern": "[a-"}), "response_format"),
        (structured.lark("start: nothing_defined", "tools"), "tools"),
        ('{"type": "yaml"}', "structured"),
    ],
)
def test_a_bad_grammar_is_refused_naming_its_field(engine, request_text, param):
    with pytest.raises(InvalidRequest, match=f"'{param}'"):
        engine.add_request("bad", [1, 2, 3], SamplingParams(structured=request_text))
    assert not engine.has_unfinished()


def test_compiled_grammars_are_cached_per_text(engine):
    compiler = GrammarCompiler(engine.model_dir, engine.config.vocab_size, engine.eos_token_ids)
    a, b = compiler.start(structured.json_object()), compiler.start(structured.json_object())
    assert a.matcher is not b.matcher and a.fresh()._prototype is b._prototype


def test_a_prefetched_mask_equals_the_batch_computed_one(engine, tok):
    compiler = GrammarCompiler(engine.model_dir, engine.config.vocab_size, engine.eos_token_ids)
    request = structured.json_schema(SCHEMA)
    ids = tok.encode('{"name": "ab", "age": 3', add_special_tokens=False)
    ahead, behind = compiler.start(request), compiler.start(request)
    assert not ahead.advance(ids)  # starts computing the next mask on a thread
    behind.sync(ids)
    logits = torch.zeros(2, engine.config.vocab_size)
    masked = apply_grammars(logits, [Row(ahead, ids), Row(behind, ids)])
    assert torch.equal(masked[0], masked[1]) and torch.isinf(masked[0]).any()


def test_a_step_uses_its_mask_job_as_it_is_and_any_other_batch_gets_the_same_masks(engine, tok):
    compiler = GrammarCompiler(engine.model_dir, engine.config.vocab_size, engine.eos_token_ids)
    request = structured.json_schema(SCHEMA)
    ids = tok.encode('{"name": "ab", "age": 3', add_special_tokens=False)
    rows = [Row(compiler.start(request), ids[:-1]) for _ in range(3)]
    for row in rows:
        row.grammar.sync(row.completion_ids)
    accept_tokens(rows, [ids[-1]] * 3)  # the next masks start on the mask thread
    for row in rows:
        row.completion_ids = list(ids)
    fresh = compiler.start(request)
    fresh.sync(ids)
    expected = fill_bitmask([fresh], [ids])[0].clone()
    job = rows[0].grammar.job
    bitmask = fill_bitmask([r.grammar for r in rows], [r.completion_ids for r in rows])
    assert bitmask.data_ptr() == job.bitmask.data_ptr()  # the usual decode step: no copy
    assert all(torch.equal(row, expected) for row in bitmask)
    comma = tok.encode(",", add_special_tokens=False)
    accept_tokens(rows, comma * 3)
    for row in rows:
        row.completion_ids += comma
    fresh.sync(ids + comma)
    expected = fill_bitmask([fresh], [ids + comma])[0].clone()
    swapped, job = [rows[2], rows[0]], rows[0].grammar.job  # another batch: its rows are copied from the job
    bitmask = fill_bitmask([r.grammar for r in swapped], [r.completion_ids for r in swapped])
    assert bitmask.data_ptr() != job.bitmask.data_ptr()
    assert all(torch.equal(row, expected) for row in bitmask)
