"""The publisher turns engine outputs into answer entries and acknowledges invocations (real Redis, no engine)."""

import pickle
import time
from multiprocessing import Pipe

import pytest
import redis

from gpu_runtime.engine.sequence import StepOutput
from protocol import keys
from protocol.messages import Done, Failed, FinishReason, Invocation, SamplingParams, Start, Token, decode_events
from protocol.settings import DEFAULTS
from worker.publisher import Acked, Fail, Forget, Produced, Publisher, Started, StopEngine

FN = "pub"


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/7")
    client.flushdb()
    client.xgroup_create(keys.invocations(FN), keys.GROUP, id="0", mkstream=True)
    return client


@pytest.fixture
def pub(r):
    mine, theirs = Pipe()
    return Publisher(r, DEFAULTS, "w1", mine), theirs


def submit(r, rid: str, **sampling) -> Started:
    inv = Invocation(rid, FN, (1, 2, 3), SamplingParams(**{"max_tokens": 8, **sampling}))
    r.xadd(keys.invocations(FN), inv.to_fields())
    ((_, [(entry_id, _)]),) = r.xreadgroup(keys.GROUP, "w1", {keys.invocations(FN): ">"}, count=1)
    return Started(inv, entry_id, None)


def entries(r, rid: str) -> list[list]:
    return [decode_events(fields) for _, fields in r.xrange(keys.response(rid))]


def feedback(conn) -> list:
    got = []
    while conn.poll(0):
        got.append(conn.recv())
    return got


def test_what_several_steps_produced_goes_out_as_one_entry_then_the_invocation_is_acknowledged(r, pub, tiny_model):
    publisher, theirs = pub
    started = submit(r, "a")
    publisher.handle(Started(started.inv, started.entry_id, str(tiny_model)))
    publisher.handle(Produced([StepOutput("a", [5], False, None)]))
    publisher.handle(Produced([StepOutput("a", [6], True, FinishReason.LENGTH)]))
    publisher.flush()
    (events,) = entries(r, "a")
    assert isinstance(events[0], Start) and [e.pos for e in events[1:3]] == [0, 1]
    assert all(isinstance(e, Token) for e in events[1:3]) and events[-1] == Done(FinishReason.LENGTH, 2)
    assert r.xlen(keys.invocations(FN)) == 0 and r.xpending(keys.invocations(FN), keys.GROUP)["pending"] == 0
    assert feedback(theirs) == [Acked("a")]


def test_a_stop_string_ends_the_answer_and_stops_the_engine(r, pub, tiny_model):
    publisher, theirs = pub
    started = submit(r, "s", stop=("a",))
    publisher.handle(Started(started.inv, started.entry_id, str(tiny_model)))
    tok = publisher.tokenizers[str(tiny_model)]
    ids = tok.encode("xa", add_special_tokens=False)
    publisher.handle(Produced([StepOutput("s", ids, False, None)]))
    publisher.flush()
    events = [e for batch in entries(r, "s") for e in batch]
    assert events[-1].finish_reason == FinishReason.STOP
    assert "".join(e.text for e in events if isinstance(e, Token)) == "x"
    assert StopEngine("s", 0) in feedback(theirs)


def test_a_failure_is_the_whole_answer_of_a_request_that_never_started(r, pub):
    publisher, theirs = pub
    started = submit(r, "f")
    publisher.handle(started)  # no model: the request failed before it started, so no Start event
    publisher.handle(Fail("f", Failed(400, "bad prompt")))
    publisher.handle(Produced([StepOutput("f", [5], False, None)]))  # late output of a failed request: dropped
    publisher.flush()
    assert entries(r, "f") == [[Failed(400, "bad prompt")]]
    assert feedback(theirs) == [Acked("f")]


def test_a_cancelled_request_is_acknowledged_without_writing_more(r, pub, tiny_model):
    publisher, theirs = pub
    started = submit(r, "c")
    publisher.handle(Started(started.inv, started.entry_id, str(tiny_model)))
    publisher.handle(Produced([StepOutput("c", [5], False, None)]))
    publisher.handle(Forget("c"))
    publisher.flush()
    assert entries(r, "c") == []
    assert r.xpending(keys.invocations(FN), keys.GROUP)["pending"] == 0
    assert feedback(theirs) == [Acked("c")]


def test_answers_wait_in_their_outbox_while_redis_is_down(r, pub, tiny_model):
    publisher, _ = pub
    started = submit(r, "d")
    publisher.handle(Started(started.inv, started.entry_id, str(tiny_model)))
    publisher.handle(Produced([StepOutput("d", [5], True, FinishReason.LENGTH)]))
    good, publisher.r = publisher.r, redis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens there
    with pytest.raises(redis.ConnectionError):
        publisher.flush()
    publisher.r = good
    publisher.flush()
    events = [e for batch in entries(r, "d") for e in batch]
    assert isinstance(events[0], Start) and events[-1] == Done(FinishReason.LENGTH, 1)


def test_the_ack_says_how_long_the_first_token_took_and_the_last_one_waited_to_be_written(r, pub, tiny_model):
    publisher, theirs = pub
    started = submit(r, "t")
    added = time.time() - 2.0
    publisher.handle(Started(started.inv, started.entry_id, str(tiny_model), added))
    first = pickle.loads(pickle.dumps(Produced([StepOutput("t", [5], False, None)], added + 0.5)))  # as piped
    publisher.handle(first)
    finished_at = time.time()
    publisher.handle(Produced([StepOutput("t", [6], True, FinishReason.LENGTH)], finished_at))
    publisher.flush()
    (ack,) = feedback(theirs)
    assert ack == Acked("t") and ack.first_token_s == pytest.approx(0.5)
    assert 0 <= ack.written_s <= time.time() - finished_at
