"""The copies fan out over a local 2-worker Dask cluster, reporting to one real Prefect server."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import PREFECT_BUDGETS, session_prefect_api
from pipeline_helpers import REPO, scores_of, write_config, write_data


def _run(config, env) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(config)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = done.stdout.split("results: ")[-1].splitlines()[0].strip()
    return json.loads((REPO / run_dir / "summary.json").read_text()) | {"run_dir": run_dir}


def test_dask_cluster_gives_the_same_scores_as_threads(tmp_path):
    data = write_data(tmp_path / "data", n=160, m=12)
    dask = write_config(
        tmp_path / "dask.yaml",
        tmp_path / "ws-dask",
        data,
        task_runner="dask",
        num_models=8,
        group_size=2,
    )
    threads = write_config(
        tmp_path / "threads.yaml", tmp_path / "ws-threads", data, num_models=8, group_size=2
    )
    # Every process (daunce and the Dask workers) reports to the session's one Prefect server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= PREFECT_BUDGETS | {"PREFECT_API_URL": session_prefect_api()}
    on_dask = _run(dask, env)
    on_threads = _run(threads, env)
    assert on_dask["trained_now"] == 8
    assert on_dask["flow_process"] not in on_dask["copy_processes"]
    assert len(on_dask["copy_processes"]) == 2
    assert on_threads["copy_processes"] == [on_threads["flow_process"]]
    np.testing.assert_allclose(
        scores_of(on_dask["run_dir"]), scores_of(on_threads["run_dir"]), rtol=1e-5, atol=1e-6
    )
