"""Sweep of the batch-1 GEMV's launch configuration (gpu_runtime/engine/ops.py, ``GEMV_CONFIG``) on the device.

For the Llama-3.2-1B and Llama-3-8B projection shapes, bf16 and FP8 (e4m3, per-row scales) weights: every
(rows per program 1/2/4, K tile 1024-8192, warps 2/4/8) at one pipelining stage, leaving out tiles whose float32
accumulator would need over 128 registers a thread; then the best few again at 2 and 3 stages. Each configuration
is timed as ops.py's docstring describes: inside a CUDA graph of back-to-back GEMVs over enough copies of the weight
to rotate past L2 (each launch reads its matrix from HBM), the median of several replays. Kernels are compiled
beforehand in worker processes (Triton's on-disk cache then serves the timing process), so the sweep fits in about
a minute and a half on an H100.

Prints JSON (and writes it with --out): per shape and dtype the best configuration, its time, the weight bytes/s it
reaches and that rate over the HBM read rate (bench/engine.py's `hbm_read_bandwidth`, measured in the run), the current
default's time, cuBLAS's (bf16); per dtype the single configuration best over all shapes (``GEMV_CONFIG``, ready to
paste) with the projection time per layer of each model under the default, that choice and each shape's best, and
``GEMV_SHAPES`` entries for shapes whose own best beats that choice by more than 5%.

    PYTHONPATH=. python3 bench/gemv_sweep.py [--out bench/results/gemv_sweep.json]
    PYTHONPATH=. python3 bench/gemv_sweep.py --dry-run   # tiny shapes on CPU through Triton's interpreter
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# (model, projection) -> (N, K). The engine fuses q/k/v; the separate k/v shape is there for unfused layouts.
SHAPES = {
    ("1b", "qkv"): (3072, 2048),
    ("1b", "o"): (2048, 2048),
    ("1b", "k_v"): (512, 2048),
    ("1b", "gate_up"): (16384, 2048),
    ("1b", "down"): (2048, 8192),
    ("8b", "qkv"): (6144, 4096),
    ("8b", "o"): (4096, 4096),
    ("8b", "gate_up"): (28672, 4096),
    ("8b", "down"): (4096, 14336),
}
DRY_SHAPES = {("tiny", "qkv"): (48, 64), ("tiny", "down"): (16, 200)}
DTYPES = ("bf16", "fp8")
ROWS, BLOCK_K, WARPS, STAGES = (1, 2, 4), (1024, 2048, 4096, 8192), (2, 4, 8), (2, 3)
DRY_SPACE = ((1, 2, 4), (32, 64), (2, 4), (2,))
MAX_ACC_PER_THREAD = 128  # float32 accumulators a thread holds: rows * BLOCK_K / (32 * warps)
PHASE2_PER_SHAPE, PHASE2_OVERALL = 1, 3  # phase-1 winners re-timed at more stages
SHAPE_GAIN = 1.05  # a shape gets its own GEMV_SHAPES entry when its best beats the table's choice by this much


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def stage1_configs(space: tuple) -> list:
    """Every (rows, block_k, warps) at one stage whose accumulator fits MAX_ACC_PER_THREAD."""
    from gpu_runtime.engine import ops

    rows, block_k, warps, _ = space
    product = itertools.product(rows, block_k, warps)
    return [ops.GemvConfig(r, bk, w, 1) for r, bk, w in product if r * bk <= MAX_ACC_PER_THREAD * 32 * w]


def effective(cfg, k: int):
    """The kernel ``cfg`` compiles to for K = ``k``: ops.gemv clamps the tile to K, and a single tile leaves no loop
    to pipeline (more stages then make the same kernel, timed once)."""
    block_k = min(cfg.block_k, 1 << (k - 1).bit_length())
    return cfg._replace(block_k=block_k, num_stages=cfg.num_stages if block_k < k else 1)


def make_weights(n: int, k: int, dtype: str, copies: int, device: str) -> list[tuple[torch.Tensor, object]]:
    """``copies`` distinct allocations of one random [N, K] weight (and its FP8 scales)."""
    from gpu_runtime.fp8 import quantize_rows

    w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
    scale = None
    if dtype == "fp8":
        w, scale = quantize_rows(w)
    return [(w.clone(), scale) for _ in range(copies)]


# compiling in worker processes ----------------------------------------------------------------------------------

_worker_weights: dict = {}


def compile_task(task: tuple) -> str | None:
    """Worker: one launch of ``ops.gemv`` for (K, dtype, config), so Triton compiles the kernel into its on-disk
    cache under the key the timing process will look up. The kernel depends on K, not on N beyond N % 16 == 0
    (all Triton specializes an integer on), true of every shape here: 16 rows stand in for all. Returns an error
    string, or None."""
    from gpu_runtime.engine import ops

    k, dtype, cfg = task
    try:
        if (k, dtype) not in _worker_weights:
            _worker_weights[(k, dtype)] = make_weights(16, k, dtype, 1, "cuda")[0]
        w, scale = _worker_weights[(k, dtype)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ops.gemv(x, w, None, scale, ops.GemvConfig(*cfg))
        torch.cuda.synchronize()
    except Exception as e:  # reported; the timing process compiles it itself
        return f"{task}: {e!r}"
    return None


def precompile(pool, tasks: list[tuple]) -> None:
    if pool is None or not tasks:
        return
    t = time.perf_counter()
    try:
        errors = [e for e in pool.map(compile_task, tasks, chunksize=2) if e]
    except Exception as e:  # a broken pool: the timing process compiles what is missing
        errors = [repr(e)]
    log(f"compiled {len(tasks)} kernels in workers in {time.perf_counter() - t:.1f} s; {len(errors)} errors")
    for e in errors[:3]:
        log("  ", e)


# timing ---------------------------------------------------------------------------------------------------------


class Timer:
    """Times ``fn(x, w, scale)`` over rotating weight copies: a CUDA graph of ``launches`` calls on the GPU, plain
    wall time on CPU (--dry-run)."""

    def __init__(self, device: str, replays: int) -> None:
        self.device, self.replays = device, replays

    def __call__(self, fn, x: torch.Tensor, weights: list) -> float:
        launches = max(len(weights), 16 if self.device == "cuda" else 1)
        seq = [weights[i % len(weights)] for i in range(launches)]

        def run() -> None:
            for w, s in seq:
                fn(x, w, s)

        if self.device != "cuda":
            t = time.perf_counter()
            run()
            return (time.perf_counter() - t) / launches
        side = torch.cuda.Stream()  # warm-up off the capture stream (cuBLAS sets up its workspace), as the engine does
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        times = []
        for _ in range(self.replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3 / launches)
        return statistics.median(times)


class Shape:
    """One (shape, dtype): its weight copies, input, reference output and every configuration's time."""

    def __init__(self, key: tuple, nk: tuple[int, int], dtype: str, device: str, rotate_bytes: int) -> None:
        self.key, (self.n, self.k), self.dtype = key, nk, dtype
        self.bytes = self.n * self.k * (1 if dtype == "fp8" else 2)
        copies = max(2, -(-rotate_bytes // self.bytes)) if device == "cuda" else 1
        self.weights = make_weights(self.n, self.k, dtype, copies, device)
        self.x = torch.randn(1, self.k, device=device).to(torch.bfloat16)
        w, scale = self.weights[0]
        dense = w.float() * scale[:, None] if scale is not None else w.float()
        self.want = self.x.float() @ dense.T
        self.times: dict = {}  # keyed by the configuration asked for; effective() ones share a timing
        self.max_err = 0.0
        self.cublas_s: float | None = None

    def measure(self, cfg, timer: Timer) -> float:
        from bench.engine import rel_err
        from gpu_runtime.engine import ops

        eff = effective(cfg, self.k)
        if eff not in self.times:
            w, scale = self.weights[0]
            out = ops.gemv(self.x, w, None, scale, eff)  # compiles (or loads) outside the graph; checks the result
            self.max_err = max(self.max_err, rel_err(out, self.want))
            self.times[eff] = timer(lambda x, w, s: ops.gemv(x, w, None, s, eff), self.x, self.weights)
        self.times[cfg] = self.times[eff]
        return self.times[cfg]

    def measure_cublas(self, timer: Timer) -> None:
        if self.dtype == "bf16":  # no batch-1 FP8 GEMV in torch to compare with
            self.cublas_s = timer(lambda x, w, s: torch.nn.functional.linear(x, w), self.x, self.weights)

    def ranked(self) -> list:
        """The distinct kernels timed, fastest first."""
        return sorted({effective(c, self.k) for c in self.times}, key=self.times.get)

    def best(self):
        return self.ranked()[0]


def summary(cfg, seconds: float, nbytes: int, hbm_bw: float) -> dict:
    return {**cfg._asdict(), "us": seconds * 1e6, "weight_gb_s": nbytes / seconds / 1e9,
            "fraction_of_hbm_read": nbytes / seconds / hbm_bw}  # fmt: skip


def choose_table(shapes: list[Shape], fallback):
    """The configuration timed on every shape with the least mean (over models) of the model's projection time
    over the sum of each shape's own best; ``fallback`` when none was (the time budget ran out)."""
    common = set.intersection(*(set(s.times) for s in shapes))
    models = sorted({s.key[0] for s in shapes})

    def score(cfg) -> float:
        return statistics.mean(
            sum(s.times[cfg] for s in shapes if s.key[0] == m) / sum(s.times[s.best()] for s in shapes if s.key[0] == m)
            for m in models
        )

    ranked = sorted(common, key=score)
    return ranked[0] if ranked else fallback, ranked


def sweep(args, pool) -> dict:
    from gpu_runtime.engine import ops

    device = "cpu" if args.dry_run else "cuda"
    began = time.perf_counter()
    deadline = began + args.budget_s
    space = DRY_SPACE if args.dry_run else (ROWS, BLOCK_K, WARPS, STAGES)
    shape_table = DRY_SHAPES if args.dry_run else SHAPES
    from bench.engine import hbm_read_bandwidth  # after TRITON_INTERPRET is set (main)

    hbm_bw = hbm_read_bandwidth(device, args.dry_run)
    log(f"HBM read {hbm_bw / 1e12:.2f} TB/s (bench/engine.py's limit)")
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) if device == "cuda" else 0
    timer = Timer(device, replays=1 if args.dry_run else 5)
    defaults = {d: ops.GEMV_CONFIG[d] for d in DTYPES}

    # phase 1: one stage, every (rows, tile, warps)
    phase1 = stage1_configs(space)
    precompile(pool, tasks_for([(nk, d) for nk in shape_table.values() for d in DTYPES], phase1))
    shapes = [Shape(key, nk, d, device, 4 * l2) for d in DTYPES for key, nk in shape_table.items()]
    for s in shapes:
        s.measure(defaults[s.dtype], timer)
        for cfg in phase1:
            if time.perf_counter() > deadline:
                break
            s.measure(cfg, timer)
        s.measure_cublas(timer)
        log(f"{s.dtype} {s.key} {s.n}x{s.k}: best {tuple(s.best())} {s.times[s.best()] * 1e6:.1f} us")
    phase1_s = time.perf_counter() - began

    # phase 2: the best few overall and per shape, at more pipelining stages, on every shape of their dtype
    candidates = {}
    for d in DTYPES:
        mine = [s for s in shapes if s.dtype == d]
        top = choose_table(mine, defaults[d])[1][:PHASE2_OVERALL]
        for s in mine:
            top += s.ranked()[:PHASE2_PER_SHAPE]
        candidates[d] = list(dict.fromkeys(c._replace(num_stages=st) for c in top for st in space[3]))
    if time.perf_counter() < deadline:
        precompile(pool, tasks_for([((s.n, s.k), s.dtype) for s in shapes], [], candidates))
    for s in shapes:
        for cfg in candidates[s.dtype]:
            if time.perf_counter() > deadline:
                break
            s.measure(cfg, timer)
    if time.perf_counter() > deadline:
        log("time budget spent: the sweep is partial (see configs_timed)")
    return report(shapes, defaults, hbm_bw, began, phase1_s, device)


def tasks_for(shapes: list, configs: list, per_dtype: dict | None = None) -> list[tuple]:
    """Compile tasks (k, dtype, config), one per distinct kernel (see compile_task)."""
    tasks = []
    for (n, k), d in shapes:
        assert n % 16 == 0, "compile_task's stand-in rows need N % 16 == 0"
        tasks += [(k, d, tuple(effective(c, k))) for c in (configs if per_dtype is None else per_dtype[d])]
    return list(dict.fromkeys(tasks))


def report(shapes: list[Shape], defaults: dict, hbm_bw: float, began: float, phase1_s: float, device: str) -> dict:
    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run, Triton interpreter)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "hbm_read_bandwidth_tb_s": hbm_bw / 1e12,
        "seconds": {"phase1": phase1_s, "total": time.perf_counter() - began},
        "all_correct": all(s.max_err < 1e-2 for s in shapes),
        "shapes": {},
        "GEMV_CONFIG": {},
        "GEMV_SHAPES": [],
        "per_layer_us": {},
    }
    for s in shapes:
        best = s.best()
        result["shapes"][f"{s.dtype} {s.key[0]} {s.key[1]} {s.n}x{s.k}"] = {
            "best": summary(best, s.times[best], s.bytes, hbm_bw),
            "default": summary(defaults[s.dtype], s.times[defaults[s.dtype]], s.bytes, hbm_bw),
            "cublas_us": s.cublas_s and s.cublas_s * 1e6,
            "configs_timed": len(s.times),
            "max_rel_err": s.max_err,
        }
    for d in DTYPES:
        mine = [s for s in shapes if s.dtype == d]
        table, _ = choose_table(mine, defaults[d])
        result["GEMV_CONFIG"][d] = table._asdict()
        for s in mine:
            if s.times[table] > SHAPE_GAIN * s.times[s.best()]:
                result["GEMV_SHAPES"].append({"dtype": d, "n": s.n, "k": s.k, **s.best()._asdict()})
        for m in sorted({s.key[0] for s in mine}):
            model = [s for s in mine if s.key[0] == m and s.key[1] != "k_v"]  # the engine's fused layer
            result["per_layer_us"][f"{d} {m}"] = {
                "default": 1e6 * sum(s.times[defaults[d]] for s in model),
                "table": 1e6 * sum(s.times[table] for s in model),
                "best_per_shape": 1e6 * sum(s.times[s.best()] for s in model),
            }
    result["paste_into_ops_py"] = paste(result)
    return result


def paste(result: dict) -> str:
    """GEMV_CONFIG and GEMV_SHAPES as Python, for gpu_runtime/engine/ops.py."""

    def cfg(c: dict) -> str:
        return f"GemvConfig(rows={c['rows']}, block_k={c['block_k']}, num_warps={c['num_warps']}, " \
               f"num_stages={c['num_stages']})"  # fmt: skip

    table = "".join(f'    "{d}": {cfg(c)},\n' for d, c in result["GEMV_CONFIG"].items())
    shapes = "".join(f'    ("{c["dtype"]}", {c["n"]}, {c["k"]}): {cfg(c)},\n' for c in result["GEMV_SHAPES"])
    return f"GEMV_CONFIG = {{\n{table}}}\nGEMV_SHAPES = {{\n{shapes}}}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--budget-s", type=float, default=80.0, help="stop timing after this long (partial JSON)")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by gpu_runtime, below)
    elif not torch.cuda.is_available():
        sys.exit("bench/gemv_sweep.py needs a CUDA device (or --dry-run)")
    pool = None
    if not args.dry_run and args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")  # CUDA in the workers: fork would share this process's context
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx)
    try:
        result = sweep(args, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    result["command"] = "PYTHONPATH=. python3 bench/gemv_sweep.py " + " ".join(sys.argv[1:])
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    sys.exit(0 if result["all_correct"] else 1)


if __name__ == "__main__":
    main()
