"""Derive client_counts_language_14d.csv.gz from the upstream-verbatim client_rates_language_<model>.csv.gz files.

ServeGen's per-window rate is an integer count divided by the 600-s window, so rate * 600 rounded is lossless;
writing integer counts as one column per client makes 314 clients x 14 days fit in ~650 KB.
Run: python traces/servegen_alibaba/make_client_counts.py /path/to/shared/traces/servegen_alibaba
"""

import csv
import gzip
import io
import sys
from pathlib import Path

import numpy as np

WINDOW_S, WINDOWS, MODELS = 600, 2016, ("m-large", "m-mid", "m-small")


def main(src: Path) -> None:
    header, cols = ["window_start_s"], [np.arange(WINDOWS) * WINDOW_S]
    for model in MODELS:
        series: dict[int, np.ndarray] = {}
        with gzip.open(src / f"client_rates_language_{model}.csv.gz", "rt") as f:
            for row in csv.DictReader(f):
                c = series.setdefault(int(row["client_id"]), np.zeros(WINDOWS))
                c[int(row["window_start_s"]) // WINDOW_S] = float(row["rate_rps"]) * WINDOW_S
        for cid in sorted(series):
            counts = np.rint(series[cid])
            assert np.abs(counts - series[cid]).max() < 1e-6, f"{model}/{cid}: rate*600 is not an integer count"
            header.append(f"{model}/{cid}")
            cols.append(counts.astype(np.int64))
    buf = io.StringIO()
    np.savetxt(buf, np.column_stack(cols), fmt="%d", delimiter=",", header=",".join(header), comments="")
    out = Path(__file__).with_name("client_counts_language_14d.csv.gz")
    out.write_bytes(gzip.compress(buf.getvalue().encode(), 9, mtime=0))
    print(f"wrote {out} ({len(header) - 1} clients)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
