"""A scheduled curation run executes: a real Prefect server, a served flow with a schedule."""

import json
import subprocess
import sys
import time
import urllib.request

from pipeline_helpers import REPO, STARTUP_SECONDS, prefect_server, write_config, write_data


def _flow_runs(url: str) -> list[dict]:
    """Flow runs known to the server; none yet if it is too busy to answer in time."""
    request = urllib.request.Request(
        f"{url}/flow_runs/filter",
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except OSError:
        return []


def _completed_scheduled_runs(url: str, served: subprocess.Popen, timeout: float) -> list[dict]:
    """Poll for a completed scheduled run while the served flow runs, ``timeout`` s at most."""
    deadline, completed = time.monotonic() + timeout, []
    while time.monotonic() < deadline and not completed and served.poll() is None:
        time.sleep(2)
        completed = [
            r for r in _flow_runs(url) if r["auto_scheduled"] and r["state_type"] == "COMPLETED"
        ]
    return completed


def test_scheduled_curation_run_executes(tmp_path):
    data = write_data(tmp_path / "data", n=120, m=10)
    config = write_config(tmp_path / "run.yaml", tmp_path / "ws", data, num_models=4)
    code = (
        "from flows.curate import curate_flow; curate_flow.serve(name='every-15-seconds', "
        f"interval=15, parameters={{'config_path': {str(config)!r}, 'flag_top': 5}})"
    )
    log = tmp_path / "served.log"
    with prefect_server(tmp_path) as (url, env), open(log, "w") as output:
        served = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            # ~1 min on an idle machine (start, register, schedule, run); more when it is busy.
            completed = _completed_scheduled_runs(url, served, timeout=STARTUP_SECONDS)
        finally:
            served.terminate()
            try:  # a loaded machine may take longer to stop it (seen at 30 s with load 6)
                served.wait(timeout=120)
            except subprocess.TimeoutExpired:
                served.kill()
                served.wait()
    assert completed, f"no scheduled run completed: {log.read_text()[-3000:]}"
    reports = list((tmp_path / "ws").glob("runs/*/reports/curation.md"))
    assert reports
    assert "highest self-influence" in reports[0].read_text()
