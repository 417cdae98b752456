"""Benchmark DAUNCE scoring: throughput against this machine's matmul rate, and peak memory.

1. Matmul rate: median of 5 square matmuls (numpy), float32 and float64, GFLOP/s.
2. Throughput: in-memory scoring of n train × m queries × K copies for compute_dtype float64 and
   float32 (median of 3), as GFLOP/s (2·K·n·m flops) and as a fraction of the matmul rate.
3. Peak memory: streamed scoring with losses and scores as zarr arrays on disk, run in a
   subprocess so that its ru_maxrss and tracemalloc peak belong to scoring alone. It runs first:
   a child starts with its parent's ru_maxrss (kept across fork and exec), still small then.

Usage: ``.venv/bin/python bench/bench_scoring.py [--quick]``; writes bench/results/scoring.json
(``scoring_quick.json`` with ``--quick``, a small smoke run).
Threads are left as numpy/BLAS set them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import timed

from daunce_core.method.scores import collect_statistics, write_scores

RESULTS = Path(__file__).resolve().parent / "results"
FULL = {"matmul": 4096, "throughput": (200, 200_000, 1_000), "peak": (200, 1_000_000, 1_000)}
QUICK = {"matmul": 1024, "throughput": (50, 20_000, 200), "peak": (50, 100_000, 200)}
PEAK_ROW_CHUNK = 16384  # train rows per tile = out chunk rows = losses_train chunk columns
PEAK_COL_CHUNK = 250  # queries per tile = out chunk columns


def matmul_rates(size: int) -> dict:
    rng = np.random.default_rng(0)
    rates = {}
    for dtype in (np.float32, np.float64):
        x, y = rng.standard_normal((2, size, size)).astype(dtype)
        x @ y  # warm-up
        seconds = statistics.median(timed(lambda x=x, y=y: x @ y, 5))
        rates[np.dtype(dtype).name] = {"seconds": seconds, "gflops": 2 * size**3 / seconds / 1e9}
    return {"size": size, "runs": 5, "rates": rates}


def throughput(k: int, n: int, m: int, matmul: dict) -> dict:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((k, n), dtype=np.float32)
    b = rng.standard_normal((k, m), dtype=np.float32)
    out = np.zeros((n, m), dtype=np.float32)
    out.fill(1.0)  # touch every page once, so that page faults are not timed
    stats = collect_statistics(a, b)
    result = {"K": k, "n": n, "m": m, "runs": 3, "out_dtype": "float32"}
    result["collect_seconds"] = statistics.median(timed(lambda: collect_statistics(a, b), 3))
    for dtype in (np.float64, np.float32):
        run = lambda dtype=dtype: write_scores(a, b, stats, out, compute_dtype=dtype)  # noqa: E731
        seconds = statistics.median(timed(run, 3))
        gflops = 2 * k * n * m / seconds / 1e9
        fraction = gflops / matmul["rates"][np.dtype(dtype).name]["gflops"]
        result[np.dtype(dtype).name] = {"seconds": seconds, "gflops": gflops, "fraction": fraction}
    return result


def fill_losses(path: Path, k: int, n: int, chunk_cols: int, seed: int) -> zarr.Array:
    """Random float32 losses written block by block (8 rows × 262144 columns at a time)."""
    array = zarr.create_array(
        store=str(path), shape=(k, n), chunks=(1, chunk_cols), dtype="float32", fill_value=np.nan
    )
    rng = np.random.default_rng(seed)
    step = max(chunk_cols, (262_144 // chunk_cols) * chunk_cols)
    for r0 in range(0, k, 8):
        for c0 in range(0, n, step):
            shape = (min(8, k - r0), min(step, n - c0))
            array[r0 : r0 + shape[0], c0 : c0 + shape[1]] = 3 + rng.standard_normal(
                shape, dtype=np.float32
            )
    return array


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB: VmRSS (now) or VmHWM (peak since exec)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields[field].split()[0]) / 1024


def child(folder: Path, trace: bool) -> None:
    """Score the zarr arrays in ``folder``; print peak memory and timings as JSON."""
    a, b = zarr.open_array(str(folder / "a")), zarr.open_array(str(folder / "b"))
    out = zarr.open_array(str(folder / "out"), mode="r+")
    report = {"rss_before_mb": status_mb("VmRSS")}
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    stats = collect_statistics(a, b)
    middle = time.perf_counter()
    write_scores(a, b, stats, out, row_chunk=PEAK_ROW_CHUNK, col_chunk=PEAK_COL_CHUNK)
    report.update(collect_seconds=middle - start, write_seconds=time.perf_counter() - middle)
    report["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["vmhwm_mb"] = status_mb("VmHWM")
    if trace:
        report["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    print(json.dumps(report))


def run_child(folder: Path, trace: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(folder)] + ["--trace"] * trace
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {**report, "wall_seconds": time.perf_counter() - start}


def check_sample(folder: Path, rows: int = 64) -> float:
    """Max |difference| between the stored scores and np.corrcoef on the first ``rows`` rows."""
    a = zarr.open_array(str(folder / "a"))[:, :rows].astype(np.float64)
    b = zarr.open_array(str(folder / "b"))[:].astype(np.float64)
    expected = np.corrcoef(np.hstack([a, b]), rowvar=False)[:rows, rows:]
    return float(np.abs(zarr.open_array(str(folder / "out"))[:rows] - expected).max())


def peak_memory(k: int, n: int, m: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="daunce-bench-"))
    try:
        fill_losses(folder / "a", k, n, PEAK_ROW_CHUNK, seed=2)
        fill_losses(folder / "b", k, m, m, seed=3)
        zarr.create_array(
            store=str(folder / "out"),
            shape=(n, m),
            chunks=(PEAK_ROW_CHUNK, min(PEAK_COL_CHUNK, m)),
            dtype="float32",
            compressors=None,
        )
        report = {"plain": run_child(folder, trace=False), "traced": run_child(folder, True)}
        report["max_abs_error_first_rows"] = check_sample(folder)
    finally:
        shutil.rmtree(folder)
    layout = {"losses_chunks": [1, PEAK_ROW_CHUNK], "query_chunks": [1, m]}
    layout.update(out_chunks=[PEAK_ROW_CHUNK, min(PEAK_COL_CHUNK, m)], row_chunk=PEAK_ROW_CHUNK)
    layout.update(col_chunk=PEAK_COL_CHUNK, stats_col_chunk=65536, compute_dtype="float64")
    return {"K": k, "n": n, "m": m, "out_gb": n * m * 4 / 1e9, "layout": layout, **report}


def table(results: dict) -> str:
    mm, tp = results["matmul"], results["throughput"]
    load = (
        f"1-min load average {results['load_before']:.1f} before, {results['load_after']:.1f} after"
    )
    lines = [f"machine: {results['machine']}; {load}", "", f"matmul {mm['size']}², median of 5:"]
    for name, rate in mm["rates"].items():
        lines.append(f"  {name:8s} {rate['gflops']:8.1f} GFLOP/s")
    lines += ["", f"scoring in memory, K={tp['K']} n={tp['n']:,} m={tp['m']:,}, median of 3:"]
    lines.append(f"  collect_statistics {tp['collect_seconds']:.3f} s")
    lines.append("  compute   seconds  GFLOP/s  of matmul")
    for name in ("float64", "float32"):
        row = tp[name]
        lines.append(
            f"  {name:8s} {row['seconds']:8.3f} {row['gflops']:8.1f} {row['fraction']:9.0%}"
        )
    return "\n".join([*lines, "", *peak_lines(results["peak"])])


def peak_lines(pk: dict) -> list[str]:
    plain, traced = pk["plain"], pk["traced"]
    before, peak = plain["rss_before_mb"], plain["maxrss_mb"]
    return [
        f"streamed zarr scoring, K={pk['K']} n={pk['n']:,} m={pk['m']:,}, float64 compute:",
        f"  layout: {json.dumps(pk['layout'])}",
        f"  output {pk['out_gb']:.1f} GB float32, uncompressed; losses zarr default (zstd)",
        "  subprocess, plain:",
        f"    collect {plain['collect_seconds']:.1f} s, write {plain['write_seconds']:.1f} s, "
        f"wall {plain['wall_seconds']:.1f} s (with start-up and imports)",
        f"    RSS after imports {before:.0f} MB, ru_maxrss {peak:.0f} MB (+{peak - before:.0f} MB),"
        f" VmHWM {plain['vmhwm_mb']:.0f} MB",
        "  subprocess under tracemalloc:",
        f"    tracemalloc peak {traced['tracemalloc_peak_mb']:.0f} MB; ru_maxrss "
        f"{traced['maxrss_mb']:.0f} MB; collect {traced['collect_seconds']:.1f} s, "
        f"write {traced['write_seconds']:.1f} s",
        f"  max |error| vs np.corrcoef, first 64 rows: {pk['max_abs_error_first_rows']:.1e}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.trace)
    sizes = QUICK if args.quick else FULL
    machine = f"{platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}"
    results = {"quick": args.quick, "machine": machine, "load_before": os.getloadavg()[0]}
    # peak first: a child's ru_maxrss starts at its parent's RSS (kept across fork and exec)
    results["peak"] = peak_memory(*sizes["peak"])
    results["matmul"] = matmul_rates(sizes["matmul"])
    results["throughput"] = throughput(*sizes["throughput"], results["matmul"])
    results["load_after"] = os.getloadavg()[0]
    path = RESULTS / ("scoring_quick.json" if args.quick else "scoring.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
