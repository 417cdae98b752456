"""The Prefect server that ``daunce run`` starts dies with it: SIGKILL, normal exit, or refusal.

Real ``daunce run`` subprocesses, real servers on 127.0.0.1, real SIGKILL; processes are found
through /proc (Linux).
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pipeline_helpers import REPO, write_config, write_data

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def _servers(pid: int) -> dict[int, str]:
    """Prefect servers started by ``pid``: ours (flows.server) or Prefect's own (uvicorn)."""
    return {
        child: cmd
        for child, cmd in _children(pid).items()
        if "flows.server" in cmd or "uvicorn" in cmd or "prefect server" in cmd
    }


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"PYTHONUNBUFFERED": "1"} | extra


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lifecycle")
    data = write_data(folder / "data", n=60, m=5)
    slow = {"num_models": 4, "train": {"lr": 0.01, "epochs": 200}}  # runs long enough to kill
    return write_config(folder / "run.yaml", folder / "ws", data, **slow)


def _start(config: Path, workspace: Path, log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(config), "--workspace", str(workspace)],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def _wait_for(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 600):
    """Poll ``condition()`` until it is truthy; fail if the run ends or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {what} after {timeout} s: {log.read_text()[-3000:]}")


def _assert_gone(pids, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for pid in left:  # do not leave them behind for the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"server processes outlived their daunce process: {left}"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _flow_runs(url: str) -> int:
    request = urllib.request.Request(
        f"{url}/flow_runs/count",
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return int(response.read())


def _server_url(pid: int) -> str | None:
    """The API URL in the environment of process ``pid`` (what daunce pointed Prefect at)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"PREFECT_API_URL="):
            return item.split(b"=", 1)[1].decode()
    return None


def test_sigkill_once_the_flow_runs_takes_the_server_along(config, tmp_path):
    workspace, log = tmp_path / "ws", tmp_path / "run.log"
    proc = _start(config, workspace, log, _env())
    servers = _wait_for(lambda: _servers(proc.pid), proc, log, "server process")
    # The flow has started (so the server answered) once the run claimed its folder.
    _wait_for(lambda: list(workspace.glob("runs/*/store")), proc, log, "running flow")
    urls = {_server_url(pid) for pid in servers}
    assert all(_healthy(url) for url in urls if url)
    proc.kill()
    proc.wait()
    _assert_gone(servers)


def test_sigkill_while_the_server_starts_takes_it_along(config, tmp_path):
    log = tmp_path / "run.log"
    proc = _start(config, tmp_path / "ws", log, _env())
    servers = _wait_for(lambda: _servers(proc.pid), proc, log, "server process")
    time.sleep(1)  # the server is importing Prefect or migrating its fresh database
    proc.kill()
    proc.wait()
    _assert_gone(servers)


def test_normal_exit_stops_the_server(tmp_path):
    data = write_data(tmp_path / "data", n=60, m=5)
    config = write_config(tmp_path / "run.yaml", tmp_path / "ws", data, num_models=4)
    log = tmp_path / "run.log"
    proc = _start(config, tmp_path / "ws", log, _env())
    seen = {}

    def finished() -> bool:
        seen.update(_servers(proc.pid))
        return proc.poll() is not None

    deadline = time.monotonic() + 600
    while not finished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert seen, "no server process was seen"
    _assert_gone(seen, seconds=0)  # stopped before daunce exited


def test_a_configured_api_url_is_used_and_no_server_started(config, tmp_path, prefect_api):
    log = tmp_path / "run.log"
    before = _flow_runs(prefect_api)
    proc = _start(config, tmp_path / "ws", log, _env(PREFECT_API_URL=prefect_api))
    _wait_for(lambda: list((tmp_path / "ws").glob("runs/*/store")), proc, log, "running flow")
    assert not _servers(proc.pid)
    assert _flow_runs(prefect_api) == before + 1  # the run reports to the configured server
    proc.kill()
    proc.wait()
    assert _healthy(prefect_api)  # the shared server is not the run's to stop
