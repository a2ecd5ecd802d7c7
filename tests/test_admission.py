"""invoker.admission: a request that can never fit next to its model's weights is refused with a clear message."""

import json

import pytest

from functions.spec import FunctionSpec
from invoker.admission import check
from protocol.messages import WorkerInfo
from sim.models import CONFIGS

GB = 10**9


@pytest.fixture
def spec(tmp_path) -> FunctionSpec:
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama-7b"][0]))  # Llama-2-7B: 13.48 GB, 0.52 MB/token
    return FunctionSpec("chat", str(tmp_path), dtype="bfloat16", max_model_len=4096)


def worker(total_gb: float) -> WorkerInfo:
    return WorkerInfo("w", "h", "cuda:0", int(total_gb * GB), 0, 0, {}, {}, {}, 0.0, 0.0)


def test_a_request_that_fits_somewhere_passes(spec):
    assert check(spec, 1000, 100, [worker(16), worker(80)]) is None
    assert check(spec, 10**6, 10, []) is None  # no live worker: nothing known, the router answers 503


def test_an_unfittable_request_is_refused_naming_function_tokens_and_memory(spec):
    no = check(spec, 2000, 2000, [worker(14), worker(15)])  # 13.48 GB weights + 4000 x 0.52 MB > 15 GB
    assert no is not None and no.param == "max_tokens"
    assert "'chat'" in no.message and "2000 prompt + 2000 max tokens" in no.message
    assert "15.00 GB" in no.message and "13.48 GB of weights" in no.message
    prompt_alone = check(spec, 4000, 1, [worker(15)])
    assert prompt_alone is not None and prompt_alone.param == "prompt"


def test_the_gateway_refuses_an_unfittable_request_before_queueing_it(r, tiny_model):
    """Through InvokerClient.submit against a real Redis: 400-worthy refusal, nothing queued, nothing blocked."""
    import asyncio
    import time

    import redis.asyncio as aredis

    from functions.spec import parse_spec
    from invoker.registry import Registry
    from invoker.submit import InvokerClient, TooLarge
    from protocol import keys
    from protocol.messages import Invocation, SamplingParams
    from protocol.settings import Settings

    spec = parse_spec({"name": "small", "model": str(tiny_model), "max_model_len": 1024})
    Registry(r).deploy(spec)
    now = time.time()
    tiny_gpu = WorkerInfo("w", "h", "cpu", 64 * 1024, 0, 0, {}, {}, {}, now, now)  # 64 KiB: less than the weights
    r.zadd(keys.WORKERS, {"w": now})
    r.hset(keys.worker("w"), "info", tiny_gpu.to_json())
    url = f"redis://{r.connection_pool.connection_kwargs['host']}:{r.connection_pool.connection_kwargs['port']}/0"

    async def submit() -> None:
        client = InvokerClient(aredis.Redis.from_url(url), r, Settings(), None)
        await client.submit(Invocation("cmpl-1", "small", (1, 2, 3), SamplingParams(max_tokens=8)), spec)

    with pytest.raises(TooLarge, match="function 'small'.*can never run"):
        asyncio.run(submit())
    assert r.xlen(keys.invocations("small")) == 0
