"""The grammar's cost at batch 32 under different hand-overs of the GIL (docs/benchmarks.md, "The GIL, measured").

Runs bench/engine.py (or bench/grammar_cost.py) with one variant applied, so one device call can compare them side
by side:

- ``default``: the engine as it is (on CUDA it sets CPython's switch interval to ``GIL_SWITCH_S``, 0.2 ms);
- ``python-default``: the interpreter's own 5-ms switch interval (the engine before it set one);
- ``handshake``: ``python-default`` plus an engine thread that, after starting a batch's next masks, waits until
  the mask thread has begun (so it holds the GIL no longer than that).

    PYTHONPATH=. python3 bench/grammar_gil.py VARIANT bench/engine.py --shapes 1b --parts grammar --skip-transformers
"""

from __future__ import annotations

import os
import runpy
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_runtime.engine import engine, grammar  # noqa: E402

VARIANTS = ("default", "python-default", "handshake")


def handshake() -> None:
    """Mask jobs that the submitting thread waits for until they have started."""
    init, compute = grammar._MaskJob.__init__, grammar._MaskJob._compute

    def started_compute(self, matchers):
        self._started.set()
        return compute(self, matchers)

    def waiting_init(self, states, pinned):
        self._started = threading.Event()
        init(self, states, pinned)
        self._started.wait()

    grammar._MaskJob._compute, grammar._MaskJob.__init__ = started_compute, waiting_init


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: grammar_gil.py {{{'|'.join(VARIANTS)}}} SCRIPT [ARGS...]")
    variant, script = sys.argv[1], sys.argv[2]
    if variant != "default":
        engine.GIL_SWITCH_S = 0.005  # CPython's default
    if variant == "handshake":
        handshake()
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
