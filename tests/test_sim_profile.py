"""The simulator can be calibrated from the GPU benchmarks' measured results (bench/sim_profile.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sim.engine_model import load_profile

ROOT = Path(__file__).resolve().parent.parent


def test_measured_profile_carries_the_benchmark_figures(tmp_path):
    out = tmp_path / "measured.json"
    subprocess.run([sys.executable, str(ROOT / "bench/sim_profile.py"), "--out", str(out)], check=True)
    prof = load_profile(out)
    engine = json.loads((ROOT / "bench/results/engine.json").read_text())
    memory = json.loads((ROOT / "bench/results/memory.json").read_text())
    assert prof.pcie_bytes_per_s == memory["host_to_hot_gbps"] * 1e9
    assert prof.flops == engine["bf16_matmul_tflop_s"] * 1e12
    assert 0 < prof.hbm_efficiency <= 1 and 0 < prof.prefill_mfu <= 1
    assert abs(prof.activate_s * 1e3 - (memory["warm_to_first_token_ms"] - memory["prefill_ms"])) < 1e-9
    default = load_profile(ROOT / "sim/profiles/default.json")
    assert prof.gpu_memory_bytes == default.gpu_memory_bytes  # the experiment's GPU size is not measured


def test_committed_measured_profile_is_current(tmp_path):
    out = tmp_path / "measured.json"
    subprocess.run([sys.executable, str(ROOT / "bench/sim_profile.py"), "--out", str(out)], check=True)
    assert json.loads(out.read_text()) == json.loads((ROOT / "sim/profiles/h200_measured.json").read_text())
