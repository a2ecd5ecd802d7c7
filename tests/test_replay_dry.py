"""bench/replay.py --dry-run: the whole stack on CPU with tiny models, two policies, every request answered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_KEYS = {"policy", "rate_rps", "requests", "ttft_p50_s", "ttft_p99_s", "slo_attainment", "hot_or_warm_fraction",
            "gpu_seconds", "sim"}  # fmt: skip
STATES = {"HOT", "WARM", "LOADING", "HOST", "COLD"}


@pytest.mark.timeout(240)
def test_dry_run_answers_every_request_and_writes_the_results(tmp_path, cache_dir):
    out = tmp_path / "replay.json"
    cmd = [sys.executable, str(ROOT / "bench" / "replay.py"), "--dry-run", "--out", str(out)]
    # cache_dir points WARMSERVE_CACHE at a temporary directory: the child builds its tiny checkpoint there
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {"device", "date", "command", "runs"} <= set(doc)
    assert {r["policy"] for r in doc["runs"]} == {"warmserve", "ondemand"}
    for run in doc["runs"]:
        assert RUN_KEYS <= set(run)
        assert RUN_KEYS - {"sim"} <= set(run["sim"])  # the simulator's prediction of the same run
        reqs = run["per_request"]
        assert reqs["t"], "a run with no requests tests nothing"
        assert set(reqs["status"]) == {200}
        assert None not in reqs["ttft_s"]  # every request got its first token
        assert set(reqs["state"]) <= STATES  # every answer carried x-warmserve-state
