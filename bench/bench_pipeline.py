"""Pipeline figures: the demo's wall time, a cached rerun, Prefect's overhead per copy, resume.

Measured (each a real ``daunce`` process unless said otherwise; 2-core machine, embedded
Prefect server started by each process):

1. ``daunce run data/digits.yaml`` in a fresh workspace (the demo's flow), then the same command
   again (every task served from the cache).
2. Overhead per copy: the attribute flow with K copies, one task per copy (group_size 1) and
   with groups of 16, in this process, against the library computing the same copies
   (``TorchModuleAccess.run``) in this process; inputs (data, base model, signals) are cached for
   both, so the difference is Prefect's tasks, the Zarr writes and the scoring and exports.
3. Kill and resume: a run killed (SIGKILL) when half its copies are done, then rerun, against
   an uninterrupted run of the same configuration; total wall seconds of the processes.

Usage: ``.venv/bin/python bench/bench_pipeline.py [--quick]``; writes
``bench/results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import format_table, machine_info, write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _cli(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        check=True,
        capture_output=True,
        env=_env(),
    )
    return time.perf_counter() - started


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}


def demo_times(root: Path) -> dict:
    workspace = root / "demo"
    first = _cli("run", "data/digits.yaml", "--workspace", str(workspace))
    cached = _cli("run", "data/digits.yaml", "--workspace", str(workspace))
    return {"demo_flow_seconds": first, "cached_rerun_seconds": cached}


def overhead(root: Path, k: int) -> list[dict]:
    from pipeline_helpers import write_config, write_data

    from daunce_core import ClassificationTask, TorchModuleAccess
    from flows.attribute import run_attribute
    from flows.cli import prefect_environment
    from flows.config import load_config
    from tasks.common import load_base_model, load_split

    data = write_data(root / "data", n=1000, m=100)
    prefect_environment(root / "overhead")
    rows = []
    for group in (1, 16):
        config = load_config(
            write_config(
                root / f"g{group}.yaml", root / "overhead", data, num_models=k, group_size=group
            )
        )
        run_attribute(
            dataclasses.replace(config, daunce=dataclasses.replace(config.daunce, seed=99))
        )  # warm the inputs
        started = time.perf_counter()
        summary = run_attribute(config)
        flow_seconds = time.perf_counter() - started
        spec = json_spec(summary["run_dir"])
        model = load_base_model(config.model.recipe, spec["model"]["uri"])
        train = load_split(spec["train"]["uri"], spec["train"]["digest"])
        queries = load_split(spec["queries"]["uri"], spec["queries"]["digest"])
        started = time.perf_counter()
        TorchModuleAccess(
            model, ClassificationTask(), train, queries, config.daunce, base_l2=config.model.l2
        ).run(range(k))
        library_seconds = time.perf_counter() - started
        rows.append(
            {
                "group_size": group,
                "K": k,
                "flow_seconds": flow_seconds,
                "library_seconds": library_seconds,
                "overhead_per_copy_ms": 1e3 * (flow_seconds - library_seconds) / k,
            }
        )
    return rows


def json_spec(run_dir: str) -> dict:
    """The copy spec recorded for a run (paths and digests of its inputs)."""
    from daunce_core.storage.lineage import Lineage, query_frame

    workspace = Path(run_dir).parent.parent
    with Lineage(workspace / "lineage.duckdb").connect(read_only=True) as con:
        frame = query_frame(con, "SELECT kind, uri, digest FROM artifacts")
    latest = {
        row["kind"]: {"uri": row["uri"], "digest": row["digest"]}
        for row in frame.iter_rows(named=True)
    }
    return {
        "model": latest["model/base"],
        "train": latest["data/train"],
        "queries": latest["data/queries"],
    }


def resume(root: Path, k: int) -> dict:
    from pipeline_helpers import write_config, write_data
    from test_resume import _kill_when

    data = write_data(root / "rdata")
    slow = {"num_models": k, "group_size": 2, "train": {"lr": 0.01, "epochs": 40}}
    clean = write_config(root / "clean.yaml", root / "clean", data, **slow)
    uninterrupted = _cli("run", str(clean))
    config = write_config(root / "killed.yaml", root / "killed", data, **slow)
    started = time.perf_counter()
    done = _kill_when(config, root / "killed", lambda d, t: d >= k // 2)
    killed = time.perf_counter() - started
    rerun = _cli("run", str(config))
    return {
        "K": k,
        "uninterrupted_seconds": uninterrupted,
        "killed_after_seconds": killed,
        "copies_done_when_killed": done,
        "resume_seconds": rerun,
        "kill_and_resume_total_seconds": killed + rerun,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="daunce-bench-"))
    try:
        results = {"machine": machine_info(), "quick": args.quick}
        results |= demo_times(root)
        results["overhead"] = overhead(root, 16 if args.quick else 64)
        results["resume"] = resume(root, 8 if args.quick else 32)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"demo flow (fresh workspace): {results['demo_flow_seconds']:.1f} s; "
        f"fully cached rerun: {results['cached_rerun_seconds']:.1f} s"
    )
    headers = ["group_size", "K", "flow s", "library s", "overhead ms/copy"]
    print(
        format_table(
            headers,
            [
                [
                    r["group_size"],
                    r["K"],
                    f"{r['flow_seconds']:.2f}",
                    f"{r['library_seconds']:.2f}",
                    f"{r['overhead_per_copy_ms']:.1f}",
                ]
                for r in results["overhead"]
            ],
        )
    )
    r = results["resume"]
    print(
        f"kill at {r['copies_done_when_killed']}/{r['K']} copies + resume: "
        f"{r['kill_and_resume_total_seconds']:.1f} s (killed after {r['killed_after_seconds']:.1f}"
        f" s, resume {r['resume_seconds']:.1f} s); uninterrupted: "
        f"{r['uninterrupted_seconds']:.1f} s"
    )
    write_results("pipeline_quick" if args.quick else "pipeline", results)


if __name__ == "__main__":
    main()
