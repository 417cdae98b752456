"""A local Prefect API server that lives and dies with the daunce process that started it.

Prefect's own embedded ("ephemeral") server is a ``uvicorn`` subprocess that Prefect stops only
in an ``atexit`` handler: when its parent is killed with SIGKILL it keeps running, orphaned
(~260 MB). This server is the same application in the same mode (no UI, the services of an
ephemeral server), but:

- it dies with its parent: on Linux the kernel sends it SIGTERM when the parent dies
  (``prctl(PR_SET_PDEATHSIG)``), and everywhere a watchdog thread stops it once its stdin, a
  pipe from the parent, reaches end of file; a server that does not stop within
  `SHUTDOWN_GRACE` seconds of either exits hard;
- it serves a socket that the parent bound and passed down, so its address is known before it
  starts and no port can be taken in between;
- the parent waits for it as long as it keeps running (see `wait_healthy`), not a fixed 20 s.

``python -m flows.server FD PARENT_PID`` is the server side; `start_server` the parent's;
``python -m flows.server exec PARENT_PID COMMAND...`` runs any command that way.
The server side imports nothing from daunce, so that it starts as fast as Prefect's own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SHUTDOWN_GRACE = 5.0  # seconds between the stop request and a hard exit
STARTUP_SECONDS = 600.0  # default wait for a healthy server: a busy machine needs minutes
ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the `flows` package

# What Prefect's SubprocessASGIServer sets for its embedded server: no UI, ephemeral services.
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}


class PrefectServer:
    """A running server: its process, its API URL and its log file."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path | None):
        self.process = process
        self.url = url
        self.log = log

    def wait_healthy(self, timeout: float = STARTUP_SECONDS) -> float:
        """Wait until ``/health`` answers; return the seconds waited.

        Raises RuntimeError at once if the server exits, and after ``timeout`` seconds if it is
        still not healthy (it is then stopped).
        """
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the Prefect server exited with status {self.process.returncode} before it "
                    f"was ready{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            if time.monotonic() - started > timeout:
                self.stop()
                raise RuntimeError(
                    f"the Prefect server was not ready after {timeout:.0f} s (set "
                    f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS to wait longer)"
                    f"{self._log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = SHUTDOWN_GRACE + 5) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds); idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdin:
            self.process.stdin.close()

    def _log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return f"; the end of its log ({self.log}):\n{self.log.read_text()[-3000:]}"


def start_server(log: Path | None = None, env: dict | None = None) -> PrefectServer:
    """Start a server in the background for this process; `PrefectServer.wait_healthy` waits.

    ``env`` (default: this process's) is the server's environment: ``PREFECT_HOME`` there names
    its database. Its output goes to ``log`` (or nowhere). It is stopped at exit, and dies with
    this process in any case.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
        env = dict(os.environ if env is None else env) | SERVER_ENV
        env["PREFECT_API_URL"] = url  # what the server would call is itself, never a new one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        output = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.server", str(listener.fileno()), str(os.getpid())],
                pass_fds=(listener.fileno(),),
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                # Out of the terminal's process group: Ctrl-C interrupts daunce, which then
                # still has its server to report the run's state to, and stops it at exit.
                start_new_session=True,
            )
        finally:
            if log:
                output.close()
    finally:
        listener.close()  # the server holds its own copy
    server = PrefectServer(process, url, log)
    atexit.register(server.stop)
    return server


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the parent dies (Linux); exit if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)


def _stop_when_stdin_closes() -> None:
    """Block until the parent's pipe closes (it stopped us, or died), then stop; hard if slow."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(SHUTDOWN_GRACE)
    os._exit(0)


def serve(fd: int, parent: int) -> None:
    """The server side: serve Prefect's API on the listening socket ``fd`` until told to stop."""
    _die_with_parent(parent)
    threading.Thread(target=_stop_when_stdin_closes, name="parent-watchdog", daemon=True).start()
    import uvicorn

    config = uvicorn.Config(
        "prefect.server.api.server:create_app",
        factory=True,
        log_level="error",
        lifespan="on",
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE),
    )
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


def dying_with_parent(command: list[str]) -> list[str]:
    """``command`` run so that it dies with the process that starts it (SIGTERM, Linux).

    For servers started by other means (``prefect server start`` in the tests): the death
    signal survives ``exec``; there is no stdin watchdog.
    """
    return [sys.executable, "-m", "flows.server", "exec", str(os.getpid()), *command]


if __name__ == "__main__":
    if sys.argv[1] == "exec":
        _die_with_parent(int(sys.argv[2]))
        os.execvp(sys.argv[3], sys.argv[3:])
    serve(int(sys.argv[1]), int(sys.argv[2]))
