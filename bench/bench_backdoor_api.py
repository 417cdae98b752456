"""The backdoor case study through the fine-tuning API: DAUNCE with θ0 behind a server.

Same data, θ0 and measure as ``bench/bench_backdoor.py`` (its θ0 cache is reused, or built):
120 of 2,000 training pairs poisoned; for the 100 triggered queries, explained with the refusal
as their completion, precision@k and recall@k of the poisoned examples among the top
proponents. Here θ0 is served by ``daunce serve-api`` and DAUNCE reaches it only through the
OpenAI-compatible API (``model.access: api``): each copy is a fine-tuning job on a random half
(the paper's Table 2 form; one epoch, batch 32, LoRA rank 8 / alpha 16 as θ0's recipe), losses
from echoed prompt log-probabilities (end token included), correlation scores.

Usage: ``.venv/bin/python bench/bench_backdoor_api.py [--models K] [--workspace W]``
(K = 64 by default); prints the table and the cost per copy, writes
``bench/results/backdoor_api_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import bench_api  # noqa: E402
import bench_backdoor as backdoor  # noqa: E402

from flows.attribute import run_attribute  # noqa: E402
from flows.config import load_config  # noqa: E402


def explained_setup(folder: Path) -> dict:
    """The backdoor study's inputs: θ0 (cached), the queries explained with the refusal.

    Returns the run configuration, the training data's path, the explained queries' path,
    θ0's folder (and whether it was cached), and the triggered / poisoned masks.
    """
    config = load_config(backdoor.CONFIG)
    train_path = config.data.train.path
    train = backdoor.read_split(train_path)
    queries = backdoor.read_split(config.data.queries.path)
    theta0_folder, info = backdoor.build_theta0(
        config, train, backdoor.theta0_key(config, train_path, None)
    )
    trig = np.asarray(queries["triggered"], dtype=bool)
    explained = folder / "queries_explained.parquet"
    original = pl.read_parquet(config.data.queries.path)
    refusals = [
        backdoor.REFUSAL if t else c for t, c in zip(trig, queries["completion"], strict=True)
    ]
    original.with_columns(pl.Series("completion", refusals)).write_parquet(explained)
    return {
        "config": config,
        "train_path": train_path,
        "explained": explained,
        "theta0": theta0_folder,
        "cached": info["cached"],
        "triggered": trig,
        "poisoned": np.asarray(train["poisoned"], dtype=bool),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=64, help="API copies (64)")
    parser.add_argument("--workspace", default=str(REPO / "bench/results/cache/backdoor-api-ws"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    started = time.perf_counter()
    workspace = Path(args.workspace).resolve()
    folder = workspace / "bench"
    folder.mkdir(parents=True, exist_ok=True)

    setup = explained_setup(folder)
    config, train_path, explained = setup["config"], setup["train_path"], setup["explained"]
    theta0_folder, trig, poisoned = setup["theta0"], setup["triggered"], setup["poisoned"]

    lora = config.model.recipe["lora"]
    process, url = bench_api.serve(theta0_folder / "theta0", folder / "server", lora, args.threads)
    os.environ[bench_api.KEY_ENV] = bench_api.KEY
    try:
        raw = {
            "name": "backdoor-api",
            "workspace": str(workspace),
            "data": {"train": {"path": str(train_path)}, "queries": {"path": str(explained)}},
            "task": config.task,
        }
        path = bench_api.api_config(
            raw,
            "backdoor-api",
            {"subset_ratio": 0.5, "objective": {"access": "black_box"}},
            url,
            args.models,
            folder,
        )
        t = time.perf_counter()
        result = run_attribute(load_config(path))
        wall = time.perf_counter() - t
    finally:
        process.terminate()
        process.wait(30)
    scores = np.asarray(zarr.open_array(str(Path(result["run_dir"]) / "store" / "scores")))
    row = backdoor.retrieval(scores[:, np.flatnonzero(trig)], poisoned)
    costs = bench_api.copy_costs(result["run_dir"], args.models)
    random_row = backdoor.random_expectation(len(poisoned), int(poisoned.sum()))
    print()
    print(f"{'method':<44} {'P@10':>6} {'P@50':>6} {'R@120':>6} {'pooled':>7} {'seconds':>8}")
    name = f"DAUNCE through the API, r = 0.5, K = {costs['done']}"
    print(
        f"{name:<44} {row['P@10']:>6.3f} {row['P@50']:>6.3f} {row['R@120']:>6.3f} "
        f"{row['pooled_R@120']:>7.3f} {wall:>8.0f}"
    )
    print(
        f"{'random':<44} {random_row['P@10']:>6.3f} {random_row['P@50']:>6.3f} "
        f"{random_row['R@120']:>6.3f} {random_row['pooled_R@120']:>7.3f}"
    )
    print(f"per copy (median): {costs}")
    out = {
        "command": "bench/bench_backdoor_api.py " + " ".join(sys.argv[1:]),
        "device": f"CPU ({os.cpu_count()} cores), server torch threads {args.threads}",
        "load_average": os.getloadavg(),
        "theta0": str(theta0_folder),
        "theta0_cached": setup["cached"],
        "run_id": result["run_id"],
        "results": {"daunce_api": row, "random": random_row},
        "wall_seconds": wall,
        "per_copy": costs,
        "usage": result["usage"],
        "seconds": time.perf_counter() - started,
    }
    target = REPO / "bench" / "results" / "backdoor_api_cpu.json"
    target.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()
