"""Every OpenAI request field the gateway honours, through the official `openai` client against a real stack (real
HTTP, real Redis, a real worker process serving the tiny model): log-probabilities, echo, n, best_of, several
prompts, penalties, logit_bias, min_tokens, streamed and not; and the ones it refuses, by name."""

from __future__ import annotations

import math
from collections import defaultdict

import httpx
import openai
import pytest

from gateway.answers import piece
from gpu_runtime.tokenizer import Tokenizer

FN = "fields-fn"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def url(stack, tiny_model):
    spec = {"name": FN, "model": str(tiny_model), "max_model_len": 128}
    assert httpx.post(f"{stack.url}/functions", json=spec).status_code == 201
    return stack.url


@pytest.fixture(scope="module")
def tok(tiny_model) -> Tokenizer:
    return Tokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def complete(client, **kw):
    return client.completions.create(model=FN, **{"prompt": "The quick brown fox", "max_tokens": 6, **kw})


def streamed_texts(chunks) -> dict[int, str]:
    texts: dict[int, str] = defaultdict(str)
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.text if hasattr(c, "text") else c.delta.content or ""
    return dict(texts)


# ---- log-probabilities ----
def test_completion_logprobs(client):
    out = complete(client, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(v <= 0 for v in lp.token_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and math.isclose(max(top.values()), chosen, abs_tol=1e-6)  # greedy: the best
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_streamed_completion_logprobs_match(client):
    whole = complete(client, logprobs=2, **GREEDY).choices[0].logprobs
    tokens, lps = [], []
    for chunk in complete(client, logprobs=2, stream=True, **GREEDY):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            lps += chunk.choices[0].logprobs.token_logprobs
    assert tokens == whole.tokens
    assert lps == pytest.approx(whole.token_logprobs, abs=1e-5)


def test_echo_scores_the_prompt_as_decoding_did(client, tok):
    """What lm-eval's loglikelihood does: echo a token-id prompt with its log-probabilities. A token greedy decoding
    chose has the same log-probability when the prompt that ends with it is scored in prefill."""
    prompt = [40, 41, 42, 43, 44]
    generated = complete(client, prompt=prompt, max_tokens=1, logprobs=1, **GREEDY).choices[0]
    gen_lp = generated.logprobs.token_logprobs[0]
    echoed = complete(client, prompt=prompt, max_tokens=1, logprobs=1, echo=True, **GREEDY).choices[0]
    lp = echoed.logprobs
    assert echoed.text == tok.decode(prompt, skip_special_tokens=True) + generated.text
    assert lp.tokens == [piece(tok, t)[0] for t in prompt] + generated.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.token_logprobs[-1] == pytest.approx(gen_lp, abs=1e-4)
    (chosen,) = ids_of(tok, generated.logprobs.tokens[0])
    rescored = complete(client, prompt=[*prompt, chosen], max_tokens=1, logprobs=0, echo=True, **GREEDY)
    assert rescored.choices[0].logprobs.token_logprobs[len(prompt)] == pytest.approx(gen_lp, abs=1e-4)


def test_echo_streamed_and_not(client):
    whole = complete(client, prompt="Hello", echo=True, **GREEDY).choices[0].text
    assert whole.startswith("Hello") and len(whole) > len("Hello")
    assert streamed_texts(complete(client, prompt="Hello", echo=True, stream=True, **GREEDY)) == {0: whole}


def test_batched_scoring_matches_one_by_one(client):
    """lm-eval's loglikelihood batches: several token-id prompts, echoed with their log-probabilities."""
    prompts, kw = [[40, 41, 42, 43], [50, 51, 52]], {"max_tokens": 1, "logprobs": 1, "echo": True, **GREEDY}
    batch = complete(client, prompt=prompts, **kw).choices
    for prompt, choice in zip(prompts, sorted(batch, key=lambda c: c.index), strict=True):
        alone = complete(client, prompt=prompt, **kw).choices[0].logprobs
        assert choice.logprobs.tokens == alone.tokens
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(alone.token_logprobs[1:], abs=1e-4)


def ids_of(tok: Tokenizer, token: str) -> list[int]:
    """The ids whose token string (as log-probabilities show it) is `token`."""
    return [i for i in range(tok.vocab_size) if piece(tok, i)[0] == token]


def test_chat_logprobs_streamed_and_not(client):
    kw = {"model": FN, "messages": [{"role": "user", "content": "Hi there"}], "max_completion_tokens": 5}
    kw |= {"logprobs": True, "top_logprobs": 2, **GREEDY}
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2 and isinstance(entry.bytes, list)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
    streamed = [
        entry
        for chunk in client.chat.completions.create(stream=True, **kw)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]


# ---- several choices, several prompts ----
def test_n_choices_streamed_and_not(client):
    kw = {"n": 3, "temperature": 1.0, "seed": 5, "extra_body": {"ignore_eos": True}}
    whole = complete(client, **kw)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in whole.choices)
    assert whole.usage.completion_tokens == 18
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}, **kw))
    assert streamed_texts(chunks) == {c.index: c.text for c in whole.choices}
    finishes = [(c.index, c.finish_reason) for ch in chunks for c in ch.choices if c.finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length"), (2, "length")]
    assert chunks[-1].usage.completion_tokens == 18


def test_chat_n_choices_streamed(client):
    kw = {"model": FN, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2, "seed": 3}
    whole = client.chat.completions.create(**kw)
    every = {"include_usage": True, "continuous_usage_stats": True}  # vLLM's: usage in every chunk (guidellm)
    chunks = list(client.chat.completions.create(stream=True, stream_options=every, **kw))
    assert streamed_texts(chunks) == {c.index: c.message.content for c in whole.choices}
    roles = [c.index for ch in chunks for c in ch.choices if c.delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    counts = [ch.usage.completion_tokens for ch in chunks]
    assert counts == sorted(counts) and counts[-1] == whole.usage.completion_tokens


def test_best_of_returns_the_most_likely(client):
    kw = {"max_tokens": 5, "temperature": 1.0, "seed": 9, "logprobs": 0, "extra_body": {"ignore_eos": True}}
    every = complete(client, n=3, **kw)
    best = complete(client, n=1, best_of=3, **kw)
    scores = sorted(sum(c.logprobs.token_logprobs) for c in every.choices)
    assert len(best.choices) == 1
    assert sum(best.choices[0].logprobs.token_logprobs) == pytest.approx(scores[-1], abs=1e-4)
    assert best.usage.completion_tokens == 15  # every sequence generated counts
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, n=1, best_of=2, stream=True)
    assert err.value.body["param"] == "best_of"


def test_a_list_of_prompts(client):
    prompts = ["Hello", [40, 41, 42]]
    one = [complete(client, prompt=p, **GREEDY).choices[0].text for p in prompts]
    both = complete(client, prompt=prompts, n=2, **GREEDY)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [one[0], one[0], one[1], one[1]]
    single = [complete(client, prompt=p, **GREEDY).usage.prompt_tokens for p in prompts]
    assert both.usage.prompt_tokens == sum(single) and both.usage.completion_tokens == 24
    chunks = list(complete(client, prompt=prompts, stream=True, **GREEDY))
    assert streamed_texts(chunks) == {0: one[0], 1: one[1]}


# ---- sampling controls ----
def greedy_text(client, **extra) -> str:
    body = {"ignore_eos": True, **extra.pop("extra_body", {})}
    return complete(client, max_tokens=12, temperature=0, extra_body=body, **extra).choices[0].text


def test_logit_bias_forces_and_forbids(client, tok):
    forced = complete(client, logit_bias={"65": 100}, logprobs=0, **GREEDY).choices[0].logprobs
    assert forced.tokens == [piece(tok, 65)[0]] * 6
    plain = complete(client, max_tokens=1, logprobs=0, **GREEDY).choices[0].logprobs.tokens[0]
    ban = {str(i): -100 for i in ids_of(tok, plain)}
    banned = complete(client, max_tokens=1, logit_bias=ban, logprobs=0, **GREEDY)
    assert banned.choices[0].logprobs.tokens[0] != plain


@pytest.mark.parametrize(
    "extra",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 3.0}},
    ],
)
def test_penalties_change_a_repetitive_answer(client, extra):
    plain = greedy_text(client)
    assert greedy_text(client, **extra) != plain


def test_min_tokens_holds_off_eos(client, tok):
    eos = {str(i): 100 for i in tok.eos_token_ids}  # eos made certain
    short = complete(client, max_tokens=10, temperature=0, logit_bias=eos)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens <= 1
    held = complete(client, max_tokens=10, temperature=0, logit_bias=eos, extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens >= 4


def test_more_than_four_stop_strings(client):
    out = complete(client, stop=["zzq1", "zzq2", "zzq3", "zzq4", "zzq5"], **GREEDY)
    assert out.choices[0].finish_reason == "length"


def test_user_and_max_completion_tokens_on_chat(client):
    out = client.chat.completions.create(
        model=FN, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=3, user="u-1", **GREEDY
    )
    assert out.usage.completion_tokens == 3


# ---- refused by name; routes ----
@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"suffix": "and then"}, "suffix"),
        ({"logprobs": 30}, "logprobs"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"extra_body": {"min_tokens": 50}}, "min_tokens"),
        ({"extra_body": {"top_logprobs": 2}}, "top_logprobs"),
    ],
)
def test_refused_fields_are_named(client, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, **kw)
    assert err.value.body["param"] == param


def test_unknown_routes_and_methods_are_openai_errors(url, client):
    missing = httpx.get(f"{url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(f"{url}/v1/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert client.models.retrieve(FN).id == FN


def test_chat_message_fields_are_honoured_or_refused_by_name(client):
    named = [{"role": "user", "content": "Hello", "name": "ada"}]
    out = client.chat.completions.create(model=FN, messages=named, max_tokens=2, **GREEDY)
    assert out.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=FN, messages=[{"role": "user", "content": "Hello", "mood": "grumpy"}], max_tokens=2
        )
    assert err.value.body["param"] == "messages" and "'mood'" in err.value.body["message"]
