"""Workload shapes (sim/shapes.py): long-context pools are sized for the GPU they need, and warmserve holds its
own against ondemand on a short long-context run."""

import numpy as np

from sim import shapes, sizing
from sim.engine_model import EngineModel, load_profile
from sim.models import MODELS

PROFILE = load_profile()


def test_a_long_context_pool_takes_the_whole_gpu_a_short_one_leaves_room_for_a_neighbour():
    long = EngineModel(PROFILE, MODELS["llama3-8b"])
    room = PROFILE.usable_bytes - MODELS["llama3-8b"].shard_bytes
    prompts, outputs = np.full(100, 65_536), np.full(100, 1_024)
    s = sizing.size(long, PROFILE.usable_bytes, prompts, outputs, peak_rps=1.0)
    assert s.pool_bytes == room and s.batch >= 4  # half the room would hold two such requests
    short = EngineModel(PROFILE, MODELS["llama-7b"])
    s = sizing.size(short, PROFILE.usable_bytes, np.full(100, 1_024), np.full(100, 256), peak_rps=50.0)
    assert s.pool_bytes <= 0.5 * (PROFILE.usable_bytes - MODELS["llama-7b"].shard_bytes)


def test_long_context_prompts_are_long_and_warmserve_is_at_least_ondemand():
    sc = shapes.build("long-context", 0.25, seed=0, duration_s=600.0)
    assert sc.workload.prompt.min() >= 32_768 and sc.workload.prompt.max() + sc.workload.output.max() <= 131_072
    slo = {p: shapes.run_policy(sc, p)[1]["slo_attainment"] for p in ("warmserve", "ondemand")}
    assert slo["warmserve"] >= slo["ondemand"]
