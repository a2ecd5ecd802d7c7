"""Write a simulator calibration profile from the GPU benchmarks' measured results.

`sim/profiles/default.json` is built from public specs; this replaces every speed the benchmarks measured with
the measured figure (`bench/results/engine.json`, `bench/results/memory.json`), and keeps the rest (SLO, host
sizes, the GPU memory size the experiment fixes). Model shapes are not in profiles (sim/models.py). CPU only: it
reads JSON files.

    python3 bench/sim_profile.py --out sim/profiles/h200_measured.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measured_profile(default: dict, engine: dict, memory: dict) -> dict:
    big = engine["shapes"]["8b"]  # the 7B-class shape: the one the paper's smallest model matches
    prof = json.loads(json.dumps(default))
    prof["source"] = (
        f"speeds measured on {engine['device']} ({engine['date'][:10]}): bench/results/engine.json (8B shape) and "
        "bench/results/memory.json; memory sizes and SLO from default.json"
    )
    prof["_doc"] = "Written by bench/sim_profile.py; see docs/simulator.md for every field."
    gpu = prof["gpu"]
    gpu["hbm_bytes_per_s"] = engine["hbm_read_bandwidth_tb_s"] * 1e12
    gpu["hbm_efficiency"] = big["decode_b1_roofline_ms"] / big["decode_b1_ms"]
    gpu["flops"] = engine["bf16_matmul_tflop_s"] * 1e12
    gpu["prefill_mfu"] = big["prefill_1024_roofline_ms"] / big["prefill_1024_ms"]
    prof["links"]["pcie_h2d_bytes_per_s"] = memory["host_to_hot_gbps"] * 1e9
    prof["startup"]["activate_s"] = (memory["warm_to_first_token_ms"] - memory["prefill_ms"]) / 1e3
    return prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--default", default=str(ROOT / "sim/profiles/default.json"))
    ap.add_argument("--engine", default=str(ROOT / "bench/results/engine.json"))
    ap.add_argument("--memory", default=str(ROOT / "bench/results/memory.json"))
    ap.add_argument("--out", default=str(ROOT / "sim/profiles/h200_measured.json"))
    args = ap.parse_args()
    prof = measured_profile(*(json.loads(Path(p).read_text()) for p in (args.default, args.engine, args.memory)))
    Path(args.out).write_text(json.dumps(prof, indent=2) + "\n")
    print(f"wrote {args.out}: {prof['source']}")


if __name__ == "__main__":
    main()
