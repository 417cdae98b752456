"""Kill the pipeline with SIGKILL at several points; the rerun finishes with the same scores."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import PREFECT_BUDGETS, session_prefect_api
from pipeline_helpers import scores_of, write_config, write_data

from daunce_core.storage.layout import TEMPORARY

K = 16


def _env() -> dict:
    """The daunce processes report to the session's Prefect server (none starts its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    server = PREFECT_BUDGETS | {"PREFECT_API_URL": session_prefect_api()}
    return env | server | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _daunce(*args) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def _done(workspace: Path) -> int:
    """Copies whose record says finished (a record is written after its loss row)."""
    finished = 0
    for path in workspace.glob("runs/*/copies/copy-*.json"):
        with contextlib.suppress(ValueError, OSError):  # being replaced right now
            finished += json.loads(path.read_text())["status"] in ("done", "diverged")
    return finished


def _kill_when(config: Path, workspace: Path, ready, timeout: float = 180) -> int:
    """Start a run, SIGKILL it once ``ready(done, seconds)`` holds; return copies done by then.

    Fails, with the run's stderr, if the run ended on its own: no kill point is skipped.
    """
    log = workspace.parent / f"kill-{time.monotonic_ns()}.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            _daunce("run", str(config)),
            env=_env(),
            cwd=Path(__file__).parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    started, killed = time.monotonic(), False
    while proc.poll() is None and time.monotonic() - started < timeout:
        if ready(_done(workspace), time.monotonic() - started):
            proc.kill()
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed, f"the run ended before the kill point: {log.read_text()[-3000:]}"
    return _done(workspace)


def _run_to_end(config: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        _daunce("run", str(config)),
        env=_env(),
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_sigkill_at_several_points_then_resume(tmp_path):
    data = write_data(tmp_path / "data")
    workspace = tmp_path / "ws"
    slow = {"num_models": K, "group_size": 2, "train": {"lr": 0.01, "epochs": 40}}
    config = write_config(tmp_path / "run.yaml", workspace, data, **slow)
    assert _kill_when(config, workspace, lambda done, t: t > 4.0) < K  # during start-up
    first = _kill_when(config, workspace, lambda done, t: done >= 2)  # after the first copies
    assert 2 <= first < K
    second = _kill_when(config, workspace, lambda done, t: done >= K // 2)  # midway
    assert first <= second < K
    finished = _run_to_end(config)
    trained = int(re.search(r"(\d+) copies trained now", finished.stdout).group(1))
    assert trained == K - second  # only unfinished copies were redone
    assert not [p for pattern in TEMPORARY for p in workspace.rglob(pattern)]
    reference_ws = tmp_path / "reference"
    reference = write_config(tmp_path / "ref.yaml", reference_ws, data, **slow)
    _run_to_end(reference)
    resumed_dir = next(workspace.glob("runs/*"))
    clean_dir = next(reference_ws.glob("runs/*"))
    np.testing.assert_array_equal(scores_of(str(resumed_dir)), scores_of(str(clean_dir)))
