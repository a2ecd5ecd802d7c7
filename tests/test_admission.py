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
