"""A scheduled curation run executes: a real Prefect server, a served flow with a schedule."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pipeline_helpers import write_config, write_data

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail("the Prefect server did not become healthy")


def _flow_runs(url: str) -> list[dict]:
    import json

    request = urllib.request.Request(
        f"{url}/flow_runs/filter",
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_scheduled_curation_run_executes(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    }
    data = write_data(tmp_path / "data", n=120, m=10)
    config = write_config(tmp_path / "run.yaml", tmp_path / "ws", data, num_models=4)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    served = None
    try:
        _wait_healthy(url)
        code = (
            "from flows.curate import curate_flow; curate_flow.serve(name='every-5s', "
            f"interval=5, parameters={{'config_path': {str(config)!r}, 'flag_top': 5}})"
        )
        served = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline, completed = time.monotonic() + 150, []
        while time.monotonic() < deadline and not completed:
            time.sleep(2)
            completed = [
                r for r in _flow_runs(url) if r["auto_scheduled"] and r["state_type"] == "COMPLETED"
            ]
        assert completed, "no scheduled run completed"
        reports = list((tmp_path / "ws").glob("runs/*/reports/curation.md"))
        assert reports
        assert "highest self-influence" in reports[0].read_text()
    finally:
        for proc in (served, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
